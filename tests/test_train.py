"""Training: FSDP2 loop on gloo with 1 and 2 processes (one node, or two nodes' agents), exact resume
after a crash or a SIGTERM, checkpoints, SFT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import toy_mixture
from safetensors.torch import load_file

from oqvl.filter.clip_model import TOY_MODEL, save_checkpoint
from oqvl.model.chat import IGNORE_INDEX
from oqvl.model.tokenizer import build_qwen2_tokenizer, load_tokenizer
from oqvl.model.vlm import OpenQwen2VL
from oqvl.pack import build
from oqvl.train import launch as launcher
from oqvl.train import sft_data
from oqvl.train.data import rank_micro_batches, step_indices
from oqvl.train.trainer import FAULT_ENV, STOPPED_EXIT, TrainConfig, param_groups, warmup_cosine

VISUAL = 16
CONTEXT = 160


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Everything pretraining reads: a packed toy mixture, its shards, a tokenizer, a CLIP tower."""
    root = tmp_path_factory.mktemp("train_inputs")
    shards = toy_mixture(root, 48, 16, seed=5)
    build_qwen2_tokenizer(root / "tok", vocab_size=8192)
    build.main(["--shards", str(shards), "--tokenizer", str(root / "tok"), "--visual-tokens", str(VISUAL),
                "--context-len", str(CONTEXT), "--out", str(root / "packed")])
    torch.manual_seed(0)
    save_checkpoint(open_clip.create_model(TOY_MODEL), root / "clip", {"model_name": TOY_MODEL})
    sft_data.main(["--out", str(root / "sft" / "toy.parquet"), "--n", "24", "--seed", "3"])
    return {"shards": shards, "tokenizer": root / "tok", "packed": root / "packed", "clip": root / "clip",
            "sft": root / "sft" / "toy.parquet"}


def pretrain_args(inputs, out, **kw):
    opts = {"steps": 4, "global_batch": 4, "micro_batch": 2, "lr": 3e-3, "save_every": 2,
            "warmup_frac": 0.25, "threads": 1, **kw}
    args = ["pretrain", "--out", str(out), "--tokenizer", str(inputs["tokenizer"]),
            "--packed", str(inputs["packed"]), "--shards", str(inputs["shards"]),
            "--preset", "toy", "--vision-weights", str(inputs["clip"])]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def launch(args, nproc=None, env=None, check=True):
    """Run the trainer as a user would: `python -m oqvl.train` or under torchrun (the launcher's
    one-node command)."""
    cmd = launcher.command(1, nproc, args, env={}) if nproc else [sys.executable, "-m", "oqvl.train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_proc(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1") / "pretrain"
    launch(pretrain_args(inputs, out), nproc=1)
    return out


def test_pretrain_outputs_and_log(one_proc):
    rows = log(one_proc)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens"] > 0 and r["grad_norm"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]  # lr 3e-3 on a tiny model: it learns at once
    summary = json.loads((one_proc / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["device"] == "cpu" and summary["gpus"] == 0
    manifest = json.loads((one_proc / "manifest.json").read_text())
    assert manifest["stage"] == "pretrain" and manifest["work"] == {"amount": summary["tokens"], "unit": "tokens"}
    assert manifest["device"] == {"type": "cpu", "gpus": 0}
    assert manifest["config"]["lr"] == 3e-3 and manifest["config"]["steps"] == 4
    assert set(manifest["inputs"]) == {"packed/sequences.parquet", "model_configs/toy.json", "vision_weights",
                                       "lm_path"} and manifest["inputs"]["lm_path"] == "none"
    assert {"final/model.safetensors", "summary.json", "train_log.jsonl"} <= set(manifest["files"])
    assert (one_proc / "loss.png").stat().st_size > 1000
    model = OpenQwen2VL.from_pretrained(one_proc / "final")  # consolidated, loads without FSDP
    assert load_tokenizer(one_proc / "final").convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    ckpts = sorted(p.name for p in (one_proc / "checkpoints").iterdir())
    assert ckpts == ["latest.json", "step_000002", "step_000004"]


def test_frozen_vision_tower_unchanged(one_proc, inputs):
    final = weights(one_proc)
    clip = load_file(str(inputs["clip"] / "model.safetensors"))
    for k, v in clip.items():
        if k.startswith("visual."):
            assert torch.equal(final["vision." + k[len("visual."):]], v), k


@pytest.fixture(scope="module")
def two_proc(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run2") / "pretrain"
    launch(pretrain_args(inputs, out), nproc=2)
    return out


def test_two_processes_train_the_same_model(one_proc, two_proc):
    """Global batch 4: one process runs 2 micro batches of 2, two run one each; same losses."""
    one, two = log(one_proc), log(two_proc)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-4)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert sorted(p.name for p in (two_proc / "checkpoints" / "step_000004").iterdir()) == [
        "rank00000-of-00002.safetensors", "rank00001-of-00002.safetensors", "state.json"]
    a, b = weights(one_proc), weights(two_proc)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def start(cmd, log_file):
    """A process writing its output to log_file (no pipe to fill while the test waits)."""
    with open(log_file, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_same_model(two_proc, inputs, tmp_path):
    """Two torchrun agents of one process each, meeting in a c10d rendezvous as two nodes would
    (the launcher's multi-node command, with 127.0.0.1 for the allocation's first host): the
    same model as one node of two processes."""
    out = tmp_path / "pretrain"
    cmd = launcher.torchrun(2, 1, pretrain_args(inputs, out), f"127.0.0.1:{free_port()}", "two-nodes")
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = [start(cmd, f) for f in logs]
    try:
        codes = [a.wait(timeout=600) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert codes == [0, 0], "\n".join(f.read_text()[-3000:] for f in logs)
    one, two = log(two_proc), log(out)
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=2e-4)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    a, b = weights(two_proc), weights(out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def test_killed_run_resumes_to_bitwise_identical_weights(one_proc, inputs, tmp_path):
    out = tmp_path / "pretrain"
    crashed = launch(pretrain_args(inputs, out), env={FAULT_ENV: "3"}, check=False)
    assert crashed.returncode == 17
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (out / "final").exists() and len(log(out)) == 3  # step 3 done but not checkpointed
    resumed = launch(pretrain_args(inputs, out))
    assert "resuming at step 2" in resumed.stdout
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4]  # step 3 redone, logged once
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(one_proc)]
    a, b = weights(one_proc), weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_exits_and_resumes_to_bitwise_identical_weights(one_proc, inputs, tmp_path):
    """What SLURM does at a job's time limit or preemption: SIGTERM to torchrun, which passes it on
    to its worker (SIGKILL if it still runs 30 s later). The worker saves at the step boundary, exits
    non-zero, and the rerun ends where an uninterrupted run does."""
    out = tmp_path / "pretrain"
    args = pretrain_args(inputs, out, save_every=100)  # of 4 steps only the last is a scheduled save
    agent_log = tmp_path / "agent.log"
    agent = start(launcher.command(1, 1, args, env={}), agent_log)
    try:
        deadline = time.monotonic() + 300
        while not (out / "train_log.jsonl").is_file() or not (out / "train_log.jsonl").read_text():
            assert agent.poll() is None and time.monotonic() < deadline, agent_log.read_text()[-3000:]
            time.sleep(0.02)
        agent.send_signal(signal.SIGTERM)  # a step is logged
        sent = time.monotonic()
        code = agent.wait(timeout=120)
        waited = time.monotonic() - sent
    finally:
        if agent.poll() is None:
            agent.kill()
    text = agent_log.read_text()
    assert code != 0, text[-3000:]
    assert f"exiting with status {STOPPED_EXIT}" in text and waited < 25  # saved, not killed at 30 s
    step = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    assert 0 < step < 4 and f"SIGTERM: checkpoint at step {step} of 4 saved" in text
    assert not (out / "final").exists() and len(log(out)) == step
    resumed = launch(args)
    assert f"resuming at step {step}" in resumed.stdout
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(one_proc)]
    a, b = weights(one_proc), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_config_starts_over_and_other_world_size_is_refused(one_proc, inputs, tmp_path):
    out = tmp_path / "pretrain"
    launch(pretrain_args(inputs, out), env={FAULT_ENV: "2"}, check=False)
    bad = launch(pretrain_args(inputs, out), nproc=2, check=False)
    assert bad.returncode != 0 and "saved by 1 processes, resuming with 2 (1 node(s) x 2)" in bad.stderr
    assert "set train.nodes x train.nproc (--nodes x --nproc-per-node) to it" in bad.stderr
    redo = launch(pretrain_args(inputs, out, lr=1e-3))
    assert "checkpoints of another training config or other inputs, starting over" in redo.stdout
    assert "from scratch" in redo.stdout and [r["step"] for r in log(out)] == [1, 2, 3, 4]


def test_new_data_under_the_same_path_starts_over(one_proc, inputs, tmp_path):
    data = tmp_path / "sft.parquet"
    shutil.copy(inputs["sft"], data)
    args = ["sft", "--out", str(tmp_path / "sft"), "--tokenizer", str(inputs["tokenizer"]), "--init-from",
            str(one_proc / "final"), "--sft-data", str(data), "--steps", "2", "--global-batch", "4",
            "--micro-batch", "4", "--lr", "1e-3", "--threads", "1", "--save-every", "1"]
    launch(args)
    again = launch(args)  # finished, same inputs: resumes at its last step, trains nothing
    assert "resuming at step 2" in again.stdout and len(log(tmp_path / "sft")) == 2
    df = pd.read_parquet(data)
    df.iloc[::-1].to_parquet(data, index=False)  # other data, same file name
    redo = launch(args)
    assert "checkpoints of another training config or other inputs, starting over" in redo.stdout


def test_preset_and_start_weights_are_inputs_of_pretraining(tmp_path):
    """Editing the preset (e.g. the LM's init scale) or replacing the LM under the same path makes
    old checkpoints another run's, like new data does."""
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / "sequences.parquet").touch()
    for d in ("clip", "lm"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "model.safetensors").touch()
    cfg = TrainConfig(stage="pretrain", out=str(tmp_path / "out"), tokenizer="tok", packed=str(tmp_path / "packed"),
                      shards="shards", vision_weights=str(tmp_path / "clip"), lm_path=str(tmp_path / "lm"))
    before = cfg.inputs()
    assert list(before) == ["packed/sequences.parquet", "model_configs/toy.json", "vision_weights", "lm_path"]
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"another LM")  # same path, new weights
    after = cfg.inputs()
    assert after["lm_path"] != before["lm_path"]
    assert {k: v for k, v in after.items() if k != "lm_path"} == {k: v for k, v in before.items() if k != "lm_path"}


def test_interrupted_save_leaves_previous_checkpoint(one_proc, inputs, tmp_path):
    from oqvl.train import checkpoint as ckpt

    root = one_proc / "checkpoints"
    partial = root / "step_000006.tmp"
    partial.mkdir()  # what a crash mid-save leaves
    try:
        assert ckpt.latest(root).name == "step_000004"
    finally:
        partial.rmdir()


def test_sft_from_pretrained(one_proc, inputs, tmp_path):
    out = tmp_path / "sft"
    launch(["sft", "--out", str(out), "--tokenizer", str(inputs["tokenizer"]), "--init-from",
            str(one_proc / "final"), "--sft-data", str(inputs["sft"]), "--steps", "3",
            "--global-batch", "4", "--micro-batch", "4", "--lr", "1e-3", "--threads", "1"])
    rows = log(out)
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    model = OpenQwen2VL.from_pretrained(out / "final")
    assert model.config.visual_tokens_sft == 64
    pre, post = weights(one_proc), weights(out)
    assert not torch.equal(pre["projector.fc1.weight"], post["projector.fc1.weight"])


def test_sft_labels_cover_only_assistant_answers(inputs):
    from oqvl.train.data import Conversations

    tok = load_tokenizer(inputs["tokenizer"])
    records = sft_data.load_records(inputs["sft"])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    ds = Conversations(records, tok, lambda im: torch.zeros(3, 64, 64), visual_tokens=64, max_len=1024,
                       pad_id=eot, bos_id=eot)
    b = ds.batch([0, 1])
    assert b.images.shape == (2, 3, 64, 64)
    assert int((b.input_ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 2 * 64
    for row in range(2):
        kept = b.labels[row][b.labels[row] != IGNORE_INDEX].tolist()
        answers = [m["content"] for m in records[row].messages if m["role"] == "assistant"]
        assert tok.decode(kept) == "<|im_end|>".join(answers) + "<|im_end|>"


def test_sft_raw_record_is_the_paper_protocols_prompt_then_the_answer(inputs):
    """A raw-format record: BOS, the raw prompt (no chat template), " answer\\n"; only the answer
    and its newline carry a loss."""
    from oqvl.model.chat import encode_raw_prompt
    from oqvl.train.data import Conversations

    tok = load_tokenizer(inputs["tokenizer"])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    prompt = "<image>\nQuestion: Is there a red circle?\nAnswer the question using a single word or phrase.\nAnswer:"
    rec = sft_data.Record("r0", [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Yes"}],
                          None, "raw")
    ds = Conversations([rec], tok, None, visual_tokens=4, max_len=1024, pad_id=eot, bos_id=eot)
    b = ds.batch([0])
    ids, labels = b.input_ids[0].tolist(), b.labels[0]
    head = encode_raw_prompt(tok, prompt, 4, eot)
    assert ids[:len(head)] == head and ids[0] == eot and "<|im_start|>" not in tok.decode(ids)
    assert tok.decode(ids[len(head):]) == " Yes\n"
    assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == " Yes\n"
    two_turns = sft_data.Record("r1", rec.messages * 2, None, "raw")
    with pytest.raises(ValueError, match="r1: a raw-format record holds one user turn"):
        Conversations([two_turns], tok, None, visual_tokens=4, max_len=1024, pad_id=eot, bos_id=eot).batch([0])


def test_data_order_is_a_function_of_the_step():
    n, g = 10, 4
    seen = np.concatenate([step_indices(0, s, g, n) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert np.array_equal(step_indices(0, 3, g, n), seen[12:16])
    mb = rank_micro_batches(np.arange(8), rank=1, world=2, micro_batch=2)
    assert [m.tolist() for m in mb] == [[4, 5], [6, 7]]


def test_schedule_and_no_decay_on_1d_params():
    f = warmup_cosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(lin, 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 3


def test_bad_sft_data_names_the_file(tmp_path):
    bad = tmp_path / "data.json"
    bad.write_text(json.dumps([{"id": 1, "conversations": [{"from": "robot", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="data.json id 1: bad turn"):
        sft_data.load_records(bad)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        sft_data.load_records(tmp_path / "missing.parquet")


def test_killed_run_with_workers_resumes_to_bitwise_identical_weights(one_proc, inputs, tmp_path):
    """Data-loader workers change when a batch is made, not what it holds: a crash and a resume,
    both with two workers, end on the weights of the plain in-process run."""
    out = tmp_path / "pretrain"
    crashed = launch(pretrain_args(inputs, out, workers=2), env={FAULT_ENV: "3"}, check=False)
    assert crashed.returncode == 17
    launch(pretrain_args(inputs, out, workers=2))
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(one_proc)]
    a, b = weights(one_proc), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_log_fields_tensorboard_and_offline_wandb(inputs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "pretrain"
    launch([*pretrain_args(inputs, out, steps=2, peak_tflops=0.5), "--wandb", "--time-phases"])
    records = log(out)
    for r in records:
        assert r["images"] > 0 and r["attn_pairs"] > 0 and r["flops"] > 0
        assert 0 <= r["data_share"] < 1 and 0 < r["vision_flops_share"] < 1
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, abs=1e-3) and r["peak_mem_mb"] > 0
        assert {"forward_s", "backward_s", "optimizer_s"} <= r.keys()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [round(e.value, 5) for e in loss] == [round(r["loss"], 5) for r in records]
    assert "train/mfu" in events.Tags()["scalars"]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flop_model"]["lm_params"] > 0 and summary["mfu"] > 0
