"""`python -m oqvl.train {pretrain,sft} --out DIR ...` (under torchrun for several processes).

Every option is a field of `TrainConfig` (trainer.py), with its docstring as help.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import sys
import typing

from .trainer import TrainConfig, train


def field_docs() -> dict[str, str]:
    """The string literal after each dataclass field: its help text."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body, docs = tree.body[0].body, {}
    for a, b in itertools.pairwise(body):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m oqvl.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["pretrain", "sft"])
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        required = f.default is dataclasses.MISSING
        default = None if required else f.default
        if kind is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs.get(f.name))
        elif f.name == "betas":
            ap.add_argument(flag, type=float, nargs=2, default=default, help="AdamW betas")
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            ap.add_argument(flag, type=base, default=default, required=required, help=docs.get(f.name))
    return ap


def main(argv=None):
    args = vars(parser().parse_args(argv))
    try:
        cfg = TrainConfig(**args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
