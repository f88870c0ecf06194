"""Standalone HTML pages of result tables, for the Snakemake report (which shows HTML results in
place but offers CSV files only as downloads)."""

from __future__ import annotations

import html
import math

import pandas as pd

STYLE = """
body { font-family: sans-serif; margin: 16px; color: #111; background: #fff; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 16px; }
th { background: #1f4e79; color: #fff; padding: 4px 8px; text-align: left; }
td { padding: 3px 8px; border-bottom: 1px solid #ccc; }
th, td { white-space: nowrap; }
tr.repro td { background: #fff2cc; }
table.prov td { font-family: monospace; font-size: 11px; white-space: normal; word-break: break-all; max-width: 60em; }
"""
HEADER_RGB = (0x1F, 0x4E, 0x79)  # th background: the render test looks for it in the screenshot
REPRO_RGB = (0xFF, 0xF2, 0xCC)   # reproduced rows' background


def score(v: float) -> str:
    """Scores as the paper prints them: one decimal, two where a reproduced value has them."""
    return f"{v:.2f}" if round(v, 1) != round(v, 2) else f"{v:.1f}"


def cell(v, fmt=score) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return fmt(v)
    return html.escape(str(v))


def table(df: pd.DataFrame, columns: list[str], row_class=None, css_class: str = "", table_id: str = "",
          fmt=score) -> str:
    """fmt formats floats: one function, or a dict of column -> function (others as scores)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for _, r in df.iterrows():
        cls = f' class="{row_class(r)}"' if row_class else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{cell(r[c], fmt.get(c, score) if isinstance(fmt, dict) else fmt)}</td>"
                                             for c in columns) + "</tr>")
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{css_class}"' if css_class else "")
    return f"<table{attrs}><tr>{head}</tr>{''.join(rows)}</table>"


def page(title: str, note: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>\n"
            f"{body}\n</body></html>\n")
