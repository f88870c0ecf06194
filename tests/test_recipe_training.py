"""Training as the reference does it, selectable by config: its document tokens, its SFT cut at
max_len, MAmmoTH-VL's split layout, and runs that share a pretraining."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import toy_mixture

from oqvl.config import ConfigError, load
from oqvl.model.chat import IGNORE_INDEX
from oqvl.model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    REFERENCE_BOS,
    build_qwen2_tokenizer,
    document_bos_id,
    document_eos_id,
    training_tokenizer,
)
from oqvl.pack import build
from oqvl.plan import Plan
from oqvl.scale import resolve
from oqvl.train.data import truncate_as_reference
from oqvl.train.sft_data import SplitRecord, load_records

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "full"
    build_qwen2_tokenizer(out)  # Qwen2's real ids: "<s>" is BPE token 128245
    return out


def test_reference_document_tokens_are_the_references(full_tokenizer_dir):
    project = training_tokenizer(full_tokenizer_dir, "project")
    reference = training_tokenizer(full_tokenizer_dir, "reference")
    endoftext = project.convert_tokens_to_ids(ENDOFTEXT)
    assert document_bos_id(project) == document_eos_id(project, "project") == endoftext
    # qwen2.py:58-59: "<s>" becomes the BOS and keeps its BPE id; "<|endofchunk|>" is new (151665)
    assert reference.bos_token == REFERENCE_BOS and document_bos_id(reference) == 128245
    assert reference.convert_tokens_to_ids("<|endofchunk|>") == 151665
    # sequence_packing_image_to_pil.py:170: EOS is the tokenizer's eos_token, <|im_end|> for Instruct
    assert document_eos_id(reference, "reference") == reference.convert_tokens_to_ids(IM_END) == 151645
    # tokenizing text is unchanged by the added tokens
    text = "\nA red circle above a blue square."
    assert reference(text, add_special_tokens=False)["input_ids"] == project(text, add_special_tokens=False)["input_ids"]


def test_pack_writes_the_chosen_document_tokens(tmp_path, full_tokenizer_dir):
    shards = toy_mixture(tmp_path / "src", 12, 3)
    out = {}
    for convention in ("project", "reference"):
        dest = tmp_path / convention
        build.main(["--shards", str(shards), "--tokenizer", str(full_tokenizer_dir), "--visual-tokens", "4",
                    "--context-len", "256", "--document-tokens", convention, "--out", str(dest)])
        stats = json.loads((dest / "stats.json").read_text())
        assert stats["document_tokens"] == convention
        out[convention] = pd.read_parquet(dest / "documents.parquet")
    ends = {c: {int(t[-1]) for t in df["text_ids"]} for c, df in out.items()}
    assert ends == {"project": {151643}, "reference": {151645}}
    # everything before EOS is the same caption tokens
    for a, b in zip(out["project"]["text_ids"], out["reference"]["text_ids"]):
        assert list(a[:-1]) == list(b[:-1])


IMG = 7


def example(n_text_before: int, n_image: int, n_after: int):
    ids = np.concatenate([np.arange(1, n_text_before + 1), np.full(n_image, IMG),
                          np.arange(100, 100 + n_after)]).astype(np.int64)
    labels = ids.copy()
    labels[: n_text_before + n_image] = IGNORE_INDEX
    return ids, labels


def test_sft_truncation_counts_the_image_as_one_token_as_the_reference():
    # 3 text + 16 image + 20 text = 39 ids; the reference sees 3 + 1 + 20 = 24 tokens
    ids, labels = example(3, 16, 20)
    same, _ = truncate_as_reference(ids, labels, 24, IMG, "x")
    assert len(same) == 39  # 24 reference tokens fit in max_len 24: nothing cut
    cut, cut_labels = truncate_as_reference(ids, labels, 10, IMG, "x")
    assert len(cut) == 10 + 15 and list(cut) == list(ids[:25]) and list(cut_labels) == list(labels[:25])
    text_only = np.arange(1, 40)
    assert len(truncate_as_reference(text_only, text_only.copy(), 10, IMG, "x")[0]) == 10
    with pytest.raises(ValueError, match="cut into its image tokens"):
        truncate_as_reference(*example(12, 16, 5), 10, IMG, "rec-7")


def write_mammoth(root, n=3):
    """The layout data_prepare/split_mammoth_10m.py writes: index jsonl + one JSON per record."""
    split = root / "instruction_si_split"
    split.mkdir(parents=True)
    images = root / "single_image_data"
    (images / "sub").mkdir(parents=True)
    lines = []
    for i in range(n):
        sample = {"id": f"m{i}", "conversations": [{"from": "human", "value": f"<image>\nWhat is {i}?"},
                                                   {"from": "gpt", "value": f"It is {i}."}]}
        if i != 2:  # the last one is text-only, as some MAmmoTH-VL records are
            sample["image"] = f"sub/{i}.jpg"
            (images / "sub" / f"{i}.jpg").write_bytes(b"jpeg-bytes-%d" % i)
        path = f"sub_{i}_jpg.json"
        (split / path).write_text(json.dumps(sample))
        lines.append(json.dumps({"path": path, "length": 729 + 6}))
    index = root / "mammoth_si_10M_simple.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return index, images


def test_mammoth_split_layout_loads_lazily(tmp_path):
    index, images = write_mammoth(tmp_path)
    records = load_records(index, images)
    assert len(records) == 3 and all(isinstance(r, SplitRecord) for r in records)
    first = records[0].load()
    assert first.id == "m0" and first.messages[1] == {"role": "assistant", "content": "It is 0."}
    assert first.image() == b"jpeg-bytes-0"
    assert records[2].load().image is None
    # a broken conversation file fails when read, naming the file
    (tmp_path / "instruction_si_split" / "sub_1_jpg.json").write_text("{not json")
    with pytest.raises(ValueError, match="sub_1_jpg.json: not a readable conversation JSON"):
        records[1].load()


def test_mammoth_index_errors_name_the_file(tmp_path):
    index, images = write_mammoth(tmp_path)
    index.write_text('{"path": "a.json"}\n{"length": 3}\n')
    with pytest.raises(ValueError, match=r"mammoth_si_10M_simple.jsonl:2: not a"):
        load_records(index, images)
    lonely = tmp_path / "other" / "index.jsonl"
    lonely.parent.mkdir()
    lonely.write_text("")
    with pytest.raises(FileNotFoundError, match="no instruction_si_split"):
        load_records(lonely)


def toy_config(**runs):
    cfg = load(REPO / "config" / "default.yaml")
    cfg = json.loads(json.dumps(cfg))
    cfg["runs"].update(runs)
    return cfg


def test_a_run_can_fine_tune_another_runs_pretraining(tmp_path):
    base = next(iter(load(REPO / "config" / "default.yaml")["runs"]))
    index, images = write_mammoth(tmp_path)
    cfg = toy_config(**{"final": {"pretrained_from": base, "sft_data": {"path": str(index),
                                                                      "image_root": str(images)}}})
    from oqvl.config import validate
    validate(cfg)
    plan = Plan(cfg, resolve(cfg))
    jobs = plan.run_jobs("final")
    seeds = plan.seeds("final")
    assert seeds == cfg["train"]["seeds"]
    for seed in seeds:  # seed k fine-tunes the base run's seed-k pretraining
        assert ("pretrain", {"run": base, "seed": seed}) in jobs and ("pretrain", {"run": "final", "seed": seed}) not in jobs
        assert ("sft", {"run": "final", "seed": seed}) in jobs
    assert plan.run_mixture("final") == plan.run_mixture(base)
    assert plan.sft_data("final")["path"] == str(index)
    assert plan.sft_data_name("final") == index.name and plan.sft_data_name(base) == "toy conversations (generated)"
    assert "final" not in plan.compute_inputs()["pretrain"]
    record = plan.run_record("final")
    assert record["pretrain_summaries"] == [f"results/runs/{base}/seed{s}/pretrain/summary.json" for s in seeds]


@pytest.mark.parametrize("run, message", [
    ({"pretrained_from": "nope"}, "pretrained_from: no run named 'nope'"),
    ({"mixture": "MIX", "pretrained_from": "BASE"}, "give mixture or pretrained_from, not both"),
    ({"pretrained_from": "BASE", "doc_isolation": True}, "doc_isolation: a pretraining switch"),
    ({}, "give its mixture"),
])
def test_bad_run_entries_stop_with_one_line(run, message):
    from oqvl.config import validate
    cfg0 = load(REPO / "config" / "default.yaml")
    base = next(iter(cfg0["runs"]))
    run = {k: (base if v == "BASE" else cfg0["runs"][base]["mixture"] if v == "MIX" else v) for k, v in run.items()}
    with pytest.raises(ConfigError, match=message):
        validate(toy_config(bad=run))
