"""Bad files handed to the stages, tried on purpose: checkpoint directories that are incomplete or
do not fit their config, benchmark files that are missing or miss a column. Each stops with one
line naming the file and the problem, before the stage's work starts (the model is checked from
the weights file's header; the benchmark files before the model is loaded). Bad configs are in
test_config.py; docs/reliability.md lists these cases by test name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from oqvl.evaluate import toy
from oqvl.evaluate.schemas import SchemaError, check_schema, data_file
from oqvl.model.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_qwen2_tokenizer
from oqvl.model.vlm import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, OpenQwen2VL

TOY_VOCAB = 8192
SIZES = {"MMBench": 8, "SEEDBench": 8, "MMStar": 8, "MathVista": 8, "POPE": 4}


def tiny_model(hidden: int = 64) -> OpenQwen2VL:
    torch.manual_seed(0)
    lm = {"vocab_size": TOY_VOCAB + len(SPECIAL_TOKENS), "hidden_size": hidden, "intermediate_size": 2 * hidden,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 512, "tie_word_embeddings": True,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    image_id = TOY_VOCAB + [t for t, _ in SPECIAL_TOKENS].index(IMAGE_TOKEN)
    return OpenQwen2VL.from_components("toy-vit-p8-sigmoid", lm, image_token_id=image_id,
                                       visual_tokens_pretrain=4, visual_tokens_sft=16)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "good"
    tiny_model().save_pretrained(out)
    build_qwen2_tokenizer(out, vocab_size=TOY_VOCAB)
    return out


def copy_of(good: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in good.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def refusal(checkpoint: Path) -> str:
    """The one-line error loading `checkpoint` stops with."""
    with pytest.raises(CheckpointError) as err:
        OpenQwen2VL.from_pretrained(checkpoint)
    return one_line(err)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_a_good_checkpoint_loads(good):
    assert isinstance(OpenQwen2VL.from_pretrained(good), OpenQwen2VL)


def test_a_checkpoint_without_its_weights_file_is_one_line(good, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    (bad / WEIGHTS_FILE).unlink()
    assert refusal(bad) == f"{bad / WEIGHTS_FILE}: no weights file (an incomplete checkpoint)"


def test_a_checkpoint_without_its_config_is_one_line(good, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    (bad / CONFIG_FILE).unlink()
    assert refusal(bad) == f"{bad}: not a complete checkpoint (no {CONFIG_FILE})"


def test_weights_of_another_shape_are_named_before_any_tensor_is_read(good, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    tiny_model(hidden=32).save_pretrained(tmp_path / "narrow")
    (bad / WEIGHTS_FILE).write_bytes((tmp_path / "narrow" / WEIGHTS_FILE).read_bytes())
    text = refusal(bad)
    assert text.startswith(f"{bad / WEIGHTS_FILE}: weights do not fit {CONFIG_FILE}: shape of ")
    # the first named with both shapes, the rest counted
    assert text.endswith(": shape of projector.fc1.weight [32, 128] in the file, [64, 128] in the model (and 17 more)")


def test_a_weight_missing_from_the_file_is_named(good, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    tensors = load_file(str(good / WEIGHTS_FILE))
    name = min(k for k in tensors if k.startswith("projector"))
    del tensors[name]
    save_file(tensors, str(bad / WEIGHTS_FILE))
    assert refusal(bad) == f"{bad / WEIGHTS_FILE}: weights do not fit {CONFIG_FILE}: 1 weights missing (e.g. {name})"


def test_a_truncated_weights_file_is_one_line(good, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    data = (good / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    assert refusal(bad).startswith(f"{bad / WEIGHTS_FILE}: not a readable safetensors file (")


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_data")
    toy.main(["--out", str(out), "--sizes", json.dumps(SIZES)])
    return out / "test"


def test_a_missing_benchmark_file_is_one_line(tmp_path):
    path = data_file(tmp_path, "POPE")
    with pytest.raises(SchemaError) as err:
        check_schema(path, "POPE")
    assert one_line(err).startswith(f"{path}: POPE file not found")


def test_a_benchmark_file_missing_a_column_names_it(bench, tmp_path):
    table = pq.read_table(data_file(bench, "MMBench"))
    path = tmp_path / "MMBench.parquet"
    pq.write_table(table.drop(["hint"]), path)
    with pytest.raises(SchemaError) as err:
        check_schema(path, "MMBench")
    assert one_line(err) == f"{path}: columns differ from MMBench's: missing ['hint'], unexpected []"


def test_a_benchmark_file_that_is_no_parquet_is_one_line(tmp_path):
    path = tmp_path / "POPE.parquet"
    path.write_text("question,answer\n")
    with pytest.raises(SchemaError) as err:
        check_schema(path, "POPE")
    assert one_line(err).startswith(f"{path}: not a parquet file")


def evaluate_cli(checkpoint: Path, data_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oqvl.evaluate", "--checkpoint", str(checkpoint), "--run", "r",
                           "--benchmarks", "POPE", "--data-dir", str(data_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)


def test_evaluation_stops_with_one_line_on_a_bad_checkpoint_or_benchmark_file(good, bench, tmp_path):
    bad = copy_of(good, tmp_path / "bad")
    (bad / WEIGHTS_FILE).unlink()
    proc = evaluate_cli(bad, bench, tmp_path / "eval")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad / WEIGHTS_FILE}: no weights file (an incomplete checkpoint)"
    assert "Traceback" not in proc.stderr
    proc = evaluate_cli(good, tmp_path / "no_data", tmp_path / "eval")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'no_data' / 'POPE.parquet'}: POPE file not found")
    assert not (tmp_path / "eval" / "POPE.json").exists()
