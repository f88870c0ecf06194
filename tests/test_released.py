"""A released checkpoint scored without training: a tiny checkpoint in the exact released layout
(prismatic-vlms run directory, random weights) through the converter's command line, then the
lmms-eval command line under both protocols; and its rows in table4."""

import json
import sys
from pathlib import Path

import pytest
from conftest import lmms_eval_cli
from prismatic_fixture import TINY_VISION, write_tiny_release

from oqvl.evaluate import toy
from oqvl.evaluate.tasks import write_task_dir
from oqvl.model import prismatic
from oqvl.model.tokenizer import load_tokenizer

TASKS = ["oqvl_pope_paper", "oqvl_pope_lmms", "oqvl_mmstar_paper", "oqvl_mmstar_lmms"]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny release converted by the command line, as rule convert_released runs it."""
    root = tmp_path_factory.mktemp("tiny")
    run_dir = write_tiny_release(root)
    out = root / "converted"
    prismatic.main(["--run-dir", str(run_dir), "--lm", str(root / "qwen2"), "--vision", TINY_VISION,
                    "--vision-weights", str(root / "siglip" / "open_clip_model.safetensors"),
                    "--out", str(out)])
    return root, out


def test_conversion_writes_a_checkpoint_and_its_manifest(released):
    _, out = released
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "convert_released" and manifest["work"]["unit"] == "parameters"
    assert {"config.json", "model.safetensors"} <= set(manifest["files"])
    read = {Path(p).name for p in manifest["inputs"]}
    assert read == {"latest-checkpoint.pt", "config.json", "open_clip_model.safetensors"}
    assert load_tokenizer(out).bos_token == "<s>"


@pytest.mark.slow
def test_released_checkpoint_through_the_lmms_eval_cli_under_both_protocols(released, tmp_path):
    root, ckpt = released
    data = tmp_path / "eval_data"
    toy.main(["--out", str(data), "--sizes", json.dumps({"MMBench": 4, "SEEDBench": 4, "MMStar": 8,
                                                          "MathVista": 8, "POPE": 2})])
    write_task_dir(tmp_path / "tasks", data / "test", ["POPE", "MMStar"], ["paper", "lmms"], control=False)
    # lmms-eval's own command-line entry point; first the tiny tower's open_clip config is
    # registered, which the real SigLIP tower does not need.
    run = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
           "from lmms_eval.cli.dispatch import main; sys.exit(main())")
    launcher = [sys.executable, "-c", run, str(root / "open_clip" / f"{TINY_VISION}.json")]
    got = lmms_eval_cli(launcher, ckpt, TASKS, tmp_path / "tasks", tmp_path / "out", limit=4)
    assert set(got["results"]) == set(TASKS)
    for task in TASKS:
        assert got["n-samples"][task]["effective"] == 4
    assert 0.0 <= got["results"]["oqvl_pope_paper"]["accuracy,none"] <= 100.0
    # the paper protocol's prompt is raw, the lmms protocol's goes through the chat template
    (paper,) = (tmp_path / "out").rglob("*_samples_oqvl_pope_paper.jsonl")
    first = json.loads(paper.read_text().splitlines()[0])
    assert first["input"].startswith("<image>\nQuestion: ")


def test_table4_shows_the_released_checkpoint_as_measured(tmp_path):
    from oqvl.report import tables

    rows = [{"run": "Open-Qwen2VL-2B", "benchmark": b, "protocol": p, "metric": "accuracy", "value": v,
             "n": 10, "chance": 25.0, "control": 25.0, "above_chance": True}
            for b, v in [("MMBench", 80.0), ("SEEDBench", 70.0), ("MMStar", 50.0), ("MathVista", 40.0),
                         ("POPE", 85.0)] for p in ("paper", "lmms")]
    evals = []
    for b in ("MMBench", "SEEDBench", "MMStar", "MathVista", "POPE"):
        path = tmp_path / f"{b}.json"
        path.write_text(json.dumps([r for r in rows if r["benchmark"] == b]))
        evals.append(str(path))
    record = {"evals": evals, "manifests": [], "sft_data": "MAmmoTH-VL-10M (single-image)",
              "paper_row": "Open-Qwen2VL-2B", "revision": "0123abc"}
    config = {"runs": {}, "mixtures": {}}
    df = tables.build("table4", config, {}, {"Open-Qwen2VL-2B": record})
    measured = df[df["run"] == "Open-Qwen2VL-2B"].set_index("protocol")
    assert list(measured.index) == ["paper", "lmms"]
    assert (measured["row"] == "Open-Qwen2VL-2B (released checkpoint, measured)").all()
    assert (measured["scale"] == "paper").all() and measured.loc["paper", "MMBench"] == 80.0
    assert measured.loc["paper", "avg_5"] == 65.0 and "revision 0123abc" in measured.loc["paper", "source"]
    assert (measured["sft_data"] == "MAmmoTH-VL-10M (single-image)").all()
    assert str(Path(evals[0]).name) in measured.loc["paper", "input_hashes"]
    # beside the paper's own row of the same model
    paper = df[df["row"] == "Open-Qwen2VL-2B"]
    assert paper["MMBench"].tolist() == [80.9]
