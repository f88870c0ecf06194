"""Untrusted artefacts: nothing in the project unpickles, loads a torch file with pickle enabled or
runs a hub's remote code. An AST scan of every Python file of the package, the benchmarks, the
rules and the Snakefile; the scanner itself is checked on snippets that break each rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py")),
           *sorted((ROOT / "rules").rglob("*.smk")), ROOT / "Snakefile", *sorted((ROOT / "containers").rglob("*.py"))]
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
              ("dill", "loads"), ("joblib", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
              ("cloudpickle", "load"), ("cloudpickle", "loads")}


def _name(node) -> tuple[str, str] | None:
    """(owner, attribute) of a call like owner.attr(...) or (`""`, name) of name(...)."""
    f = node.func
    if isinstance(f, ast.Attribute):
        owner = f.value.id if isinstance(f.value, ast.Name) else (f.value.attr if isinstance(f.value, ast.Attribute) else "")
        return owner, f.attr
    if isinstance(f, ast.Name):
        return "", f.id
    return None


def _keyword(node, name):
    return next((k.value for k in node.keywords if k.arg == name), None)


def _is_true(value) -> bool:
    return isinstance(value, ast.Constant) and value.value is True


def violations(source: str, where: str = "<snippet>") -> list[str]:
    """Each unsafe call in a Python source, as 'where:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle") and \
                any(a.name in ("load", "loads", "Unpickler") for a in node.names):
            found.append(f"{where}:{node.lineno}: imports an unpickler from {node.module}")
        if not isinstance(node, ast.Call) or (name := _name(node)) is None:
            continue
        owner, attr = name
        if (owner, attr) in UNPICKLERS or (owner == "" and attr == "read_pickle"):
            found.append(f"{where}:{node.lineno}: {owner + '.' if owner else ''}{attr} unpickles")
        if owner == "torch" and attr == "load" and not _is_true(_keyword(node, "weights_only")):
            found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        if _is_true(_keyword(node, "trust_remote_code")):
            found.append(f"{where}:{node.lineno}: trust_remote_code=True")
        if _is_true(_keyword(node, "allow_pickle")):
            found.append(f"{where}:{node.lineno}: allow_pickle=True")
    return found


@pytest.mark.parametrize("path", [p for p in SCANNED if p.suffix == ".py"], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_in_python(path):
    assert violations(path.read_text(), str(path.relative_to(ROOT))) == []


def test_no_unsafe_loading_in_rules():
    """Rules and the Snakefile are not plain Python; their text must not name the unsafe calls."""
    bad = ("pickle.load", "read_pickle", "trust_remote_code=True", "allow_pickle=True")
    hits = [f"{p.relative_to(ROOT)}: {b}" for p in SCANNED if p.suffix != ".py" for b in bad if b in p.read_text()]
    hits += [f"{p.relative_to(ROOT)}: torch.load" for p in SCANNED if p.suffix != ".py" and "torch.load(" in p.read_text()]
    assert hits == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "import pickle\npickle.loads(b'')",
    "from pickle import load\n",
    "import pandas as pd\npd.read_pickle('x')",
    "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)",
    "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)",
    "import numpy as np\nnp.load('x', allow_pickle=True)",
])
def test_scanner_flags_each_unsafe_call(snippet):
    assert len(violations(snippet)) == 1


def test_scanner_passes_safe_calls():
    assert violations("import torch, numpy as np\ntorch.load('x', map_location='cpu', weights_only=True)\n"
                      "np.load('x', allow_pickle=False)\nfrom safetensors.torch import load_file\nload_file('x')") == []
