"""config/full.yaml against the reference's recipe (config/full.reference.csv), value by value."""

import subprocess
import sys

import yaml

from oqvl import recipe
from oqvl.config import load


def test_every_sourced_value_is_the_references():
    compared = recipe.compare(load(recipe.FULL), recipe.read_table())
    wrong = {c["key"]: (c["full.yaml"], c["reference"]) for c in compared if c["match"] is False}
    assert not wrong, f"full.yaml differs from the reference: {wrong}"
    assert sum(c["match"] is True for c in compared) >= 30


def test_every_recipe_value_of_full_yaml_has_a_source():
    raw = yaml.safe_load(recipe.FULL.read_text())
    assert recipe.unsourced(raw, recipe.read_table()) == []


def test_the_check_fails_on_a_changed_value(tmp_path):
    changed = recipe.FULL.read_text().replace("lr: 5.0e-5", "lr: 1.0e-4", 1)
    assert changed != recipe.FULL.read_text()
    cfg = tmp_path / "full.yaml"
    cfg.write_text(changed)
    proc = subprocess.run([sys.executable, "-m", "oqvl.recipe", "--check", "--config", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "train.pretrain.lr" in proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| train.pretrain.lr |"))
    assert "**NO**" in row


def test_docs_show_the_current_table():
    doc = (recipe.REPO / "docs" / "recipe.md").read_text()
    shown = doc.split("<!-- recipe table: python -m oqvl.recipe -->\n")[1].split("\n<!-- end recipe table -->")[0]
    assert shown == recipe.markdown(recipe.compare(load(recipe.FULL), recipe.read_table())), \
        "docs/recipe.md is stale: paste the output of python -m oqvl.recipe"
