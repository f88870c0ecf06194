"""A released Qwen2-VL checkpoint (Qwen2-VL-2B-Instruct) scored without training: a tiny random-weight
Qwen2-VL saved through transformers' own classes (qwen2vl_fixture), through the `oqvl_qwen2_vl`
model (the paper protocol's raw prompts and decoding; lmms-eval's own `qwen2_vl` for the lmms
protocol), by the lmms-eval command line and by the evaluate job's entry point; its plan and its
table4 row."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, lmms_eval_cli
from qwen2vl_fixture import write_tiny_qwen2vl

from oqvl.evaluate import paper, toy
from oqvl.evaluate.tasks import write_task_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmms_eval.api.instance import Instance

from oqvl.evaluate.qwen2vl import Qwen2VL
from oqvl.evaluate.run import checkpoint_format, evaluate

STOPS = [11, 13, 198]  # the reference's stop ids that the toy vocabulary holds: "," "." "\n"
PAPER_TASKS = ["oqvl_pope_paper", "oqvl_mmstar_paper"]
LMMS_TASKS = ["oqvl_pope_lmms", "oqvl_mmstar_lmms"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl") / "Qwen2-VL-tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    toy.main(["--out", str(out), "--sizes", json.dumps({"MMBench": 4, "SEEDBench": 4, "MMStar": 8,
                                                        "MathVista": 8, "POPE": 2})])
    return out / "test"


def load(path, cache):
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"test": str(path)}, split="test", cache_dir=str(cache))


class Docs:
    """What lmms-eval puts in lm.task_dict: task -> split -> indexable docs."""

    def __init__(self, docs):
        self.docs = docs

    def __getitem__(self, i):
        return self.docs[i]


@pytest.fixture(scope="module")
def docs(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {b: load(data_dir / f"{b}.parquet", cache) for b in ("POPE", "MMStar")}


@pytest.fixture(scope="module")
def lm(ckpt, docs):
    model = Qwen2VL(pretrained=str(ckpt), batch_size=3)
    pope = Docs([docs["POPE"][i] for i in range(6)])
    shuffled = Docs([docs["POPE"][i] for i in (5, 4, 3, 2, 1, 0)])  # the same questions, other images
    model.task_dict = {t: {"test": pope} for t in ("oqvl_pope_paper", "oqvl_pope_paper_likelihood", "oqvl_pope_lmms")}
    model.task_dict["oqvl_pope_lmms_shuffled"] = {"test": shuffled}
    return model


def request(kind, args):
    doc_id, task = args[-3], args[-2]
    return Instance(kind, args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def pope_requests(lm, task, n=6, gen_kwargs=None):
    """POPE's paper prompt for the first n docs (the prompt is the paper's: an lmms task reads it as text)."""
    docs = lm.task_dict[task]["test"]
    kwargs = gen_kwargs or {"max_new_tokens": 16, "until": [], "temperature": 0, "do_sample": False}
    return [request("generate_until", (paper.pope_doc_to_text(docs[i]), dict(kwargs),
                                       paper.image_doc_to_visual, i, task, "test")) for i in range(n)]


def greedy_reference(ckpt, prompt: str, images, max_new: int = 16, stops=STOPS, as_ids: bool = False):
    """What the paper protocol must answer, computed apart from the model class: the raw prompt as
    text ("<|endoftext|>" in front, <image> as Qwen2-VL's vision tokens) through the checkpoint's
    processor, then one full forward pass per new token (no KV cache, no generate()), argmax,
    stopped after the first stop id, decoded with special tokens skipped, stripped (as_ids: the new
    token ids instead)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    key = str(ckpt)
    if key not in _LOADED:
        _LOADED[key] = (AutoProcessor.from_pretrained(key, local_files_only=True),
                        Qwen2VLForConditionalGeneration.from_pretrained(key, local_files_only=True).eval())
    processor, model = _LOADED[key]
    text = "<|endoftext|>" + prompt.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    enc = processor(text=[text], images=images, return_tensors="pt")
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            ids = torch.cat([enc["input_ids"], torch.tensor([new], dtype=torch.long)], dim=1)
            extra = torch.zeros((1, len(new)), dtype=torch.long)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                           mm_token_type_ids=torch.cat([enc["mm_token_type_ids"], extra], dim=1),
                           pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                           use_cache=False).logits
            new.append(int(logits[0, -1].argmax()))
            if new[-1] in stops:
                break
    return new if as_ids else processor.tokenizer.decode(new, skip_special_tokens=True).strip()


_LOADED: dict = {}


# ------------------------------------------------------------------------ the checkpoint

def test_tiny_checkpoint_has_the_release_layout(ckpt):
    from transformers import AutoProcessor

    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert checkpoint_format(ckpt) == "qwen2_vl" and checkpoint_format(REPO) == "oqvl"
    processor = AutoProcessor.from_pretrained(str(ckpt), local_files_only=True)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.tokenizer.bos_token is None
    chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True, tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- the paper protocol, in-process

def test_paper_prompt_is_raw_after_the_bos_with_the_image_expanded(lm, docs):
    tok = lm.paper_tokenizer
    prompt = paper.pope_doc_to_text(docs["POPE"][0])
    item = lm._paper_inputs(prompt, paper.image_doc_to_visual(docs["POPE"][0]), "oqvl_pope_paper")
    ids = item["input_ids"].tolist()
    assert ids[0] == lm.bos_id == tok.convert_tokens_to_ids("<|endoftext|>")  # no BOS in Qwen2's tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    # a 64-px toy image: 56x56 after Qwen2-VL's resize, 4x4 patches of 14, merged 2x2: 4 tokens
    assert ids[1:7] == [tok.convert_tokens_to_ids("<|vision_start|>"), pad, pad, pad, pad,
                        tok.convert_tokens_to_ids("<|vision_end|>")]
    assert item["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert item["mm_token_type_ids"].tolist() == [0, 0, 1, 1, 1, 1, 0] + [0] * (len(ids) - 7)
    assert tok.decode(ids[7:]) == prompt[len("<image>"):]  # the raw prompt: no chat template
    with pytest.raises(ValueError, match="oqvl_pope_paper: prompt has 0 <image>"):
        lm._paper_inputs("Is it red?", paper.image_doc_to_visual(docs["POPE"][0]), "oqvl_pope_paper")


def test_paper_decoding_is_greedy_batched_and_stops_at_the_reference_ids(lm, ckpt):
    from oqvl.evaluate.paper import REFERENCE_STOP_IDS

    assert lm.paper_stop_ids == [i for i in sorted(REFERENCE_STOP_IDS) if i < len(lm.paper_tokenizer)] == STOPS
    reqs = pope_requests(lm, "oqvl_pope_paper")
    calls, generate = [], lm.model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    lm.model.generate = spy
    try:
        batched = lm.generate_until(reqs)
    finally:
        del lm.model.generate
    assert len(calls) == 2 and calls[0]["input_ids"].shape[0] == 3  # 6 questions, batches of 3
    assert calls[0]["eos_token_id"] == STOPS and calls[0]["do_sample"] is False
    assert calls[0]["max_new_tokens"] == 16 and calls[0]["repetition_penalty"] == 1.0
    # the release's generation_config samples (top_k 1); the answers are those of argmax decoding,
    # computed apart, one question at a time
    docs = lm.task_dict["oqvl_pope_paper"]["test"]
    want = [greedy_reference(ckpt, r.args[0], paper.image_doc_to_visual(docs[r.args[3]])) for r in reqs]
    assert batched == want and len(set(batched)) > 1


def test_paper_protocol_computes_a_repeated_question_once(lm):
    rows, generate = [], lm.model.generate

    def spy(**kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    reqs = pope_requests(lm, "oqvl_pope_paper", n=2)
    lm.model.generate = spy
    try:
        texts = lm.generate_until(reqs + reqs[:1])  # the first question again, same picture
    finally:
        del lm.model.generate
    assert sum(rows) == 2 and texts[0] == texts[2]


def test_paper_answer_keeps_its_stop_token(lm, ckpt):
    """A stop id ends the answer and stays in it ("Yes." stays "Yes."): a token of a free answer
    made a stop id cuts that answer right after it."""
    reqs = pope_requests(lm, "oqvl_pope_paper", n=1)
    images = paper.image_doc_to_visual(lm.task_dict["oqvl_pope_paper"]["test"][0])
    free = greedy_reference(ckpt, reqs[0].args[0], images, stops=[], as_ids=True)
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k])
    saved = lm.paper_stop_ids
    lm.paper_stop_ids = [free[k]]
    try:
        (text,) = lm.generate_until(reqs)
    finally:
        lm.paper_stop_ids = saved
    assert text == lm.paper_tokenizer.decode(free[:k + 1], skip_special_tokens=True).strip()
    assert text.endswith(lm.paper_tokenizer.decode([free[k]]).strip() or text[-1:])


def test_paper_loglikelihood_matches_a_forward_pass(lm, docs):
    doc = lm.task_dict["oqvl_pope_paper_likelihood"]["test"][1]
    prompt = paper.pope_doc_to_text(doc)
    reqs = [request("loglikelihood", (prompt, c, paper.image_doc_to_visual, 1, "oqvl_pope_paper_likelihood", "test"))
            for c in ("Yes", "No", "Yes or no")]
    got = lm.loglikelihood(reqs)
    item = lm._paper_inputs(prompt, paper.image_doc_to_visual(doc), "x")
    for (ll, greedy), cont in zip(got, ("Yes", "No", "Yes or no")):
        cont_ids = lm.paper_tokenizer(cont, add_special_tokens=False)["input_ids"]
        ids = torch.cat([item["input_ids"], torch.tensor(cont_ids)])[None]
        mm = torch.cat([item["mm_token_type_ids"], torch.zeros(len(cont_ids), dtype=torch.long)])[None]
        with torch.no_grad():
            logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                              pixel_values=item["pixel_values"], image_grid_thw=item["image_grid_thw"]).logits[0]
        n = len(item["input_ids"])
        logp = torch.log_softmax(logits[n - 1:n - 1 + len(cont_ids)].float(), -1)
        assert ll == pytest.approx(float(logp[range(len(cont_ids)), cont_ids].sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont_ids)).all())
    assert got[0] != got[1]
    with pytest.raises(NotImplementedError):  # lmms-eval's Qwen2_VL scores no likelihood
        lm.loglikelihood([request("loglikelihood", (prompt, "Yes", paper.image_doc_to_visual, 1, "oqvl_pope_lmms",
                                                    "test"))])


# ------------------------------------------------------------------ the lmms protocol, in-process

def test_lmms_tasks_go_to_lmms_eval_qwen2_vl_one_task_at_a_time(lm):
    """lmms-eval's Qwen2_VL reads every document of a batch through its first request's task: a task
    and its shuffled twin asked together would share images. Asked together here, each request
    gets what its own task alone gets, and the two tasks see different images."""
    kwargs = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
    plain = pope_requests(lm, "oqvl_pope_lmms", n=4, gen_kwargs=kwargs)
    twin = pope_requests(lm, "oqvl_pope_lmms_shuffled", n=4, gen_kwargs=kwargs)
    together = lm.generate_until([r for pair in zip(plain, twin) for r in pair])
    alone = lm.generate_until(pope_requests(lm, "oqvl_pope_lmms", n=4, gen_kwargs=kwargs)) + \
        lm.generate_until(pope_requests(lm, "oqvl_pope_lmms_shuffled", n=4, gen_kwargs=kwargs))
    assert together[0::2] == alone[:4] and together[1::2] == alone[4:]
    assert together[0::2] != together[1::2]
    lengths, generate = [], lm.model.generate

    def spy(**kw):
        lengths.append(kw["max_new_tokens"])
        return generate(**kw)

    lm.max_new_tokens, lm.model.generate = 2, spy  # the cap (null at paper scale) shortens lmms-eval's lengths
    try:
        lm.generate_until(pope_requests(lm, "oqvl_pope_lmms", n=4, gen_kwargs=kwargs)
                          + pope_requests(lm, "oqvl_pope_lmms_shuffled", n=4, gen_kwargs={**kwargs, "max_new_tokens": 1}))
    finally:
        lm.max_new_tokens = None
        del lm.model.generate
    assert sorted(set(lengths)) == [1, 2]


# --------------------------------------------------------------------------- the lmms-eval CLI

def cli_samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(ckpt, data_dir, tmp_path_factory):
    """lmms-eval's command line on the tiny checkpoint: our model under both protocols, then
    lmms-eval's own qwen2_vl on the lmms tasks."""
    root = tmp_path_factory.mktemp("cli")
    write_task_dir(root / "tasks", data_dir, ["POPE", "MMStar"], ["paper", "lmms"], control=False)
    cli = [str(Path(sys.executable).with_name("lmms-eval"))]
    ours = lmms_eval_cli(cli, ckpt, PAPER_TASKS + LMMS_TASKS, root / "tasks", root / "ours", limit=4,
                         model="oqvl_qwen2_vl", model_args="device=cpu")
    theirs = lmms_eval_cli(cli, ckpt, LMMS_TASKS, root / "tasks", root / "theirs", limit=4,
                           model="qwen2_vl", model_args="device=cpu,device_map=cpu")
    return root, ours, theirs


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_qwen2_vl_release_under_both_protocols(cli_run, ckpt, docs):
    root, ours, _ = cli_run
    tasks = PAPER_TASKS + LMMS_TASKS
    assert set(ours["results"]) == set(tasks) and ours["config"]["model"] == "oqvl_qwen2_vl"
    for task in tasks:
        assert ours["n-samples"][task]["effective"] == 4
    pope = ours["results"]["oqvl_pope_paper"]
    assert {"accuracy,none", "f1,none", "yes_ratio,none"} <= set(pope) and 0.0 <= pope["accuracy,none"] <= 100.0
    assert 0.0 <= ours["results"]["oqvl_mmstar_paper"]["accuracy,none"] <= 100.0
    assert "average,none" in ours["results"]["oqvl_mmstar_lmms"] and "pope_accuracy,none" in ours["results"]["oqvl_pope_lmms"]
    # the paper protocol: the raw prompt, answered as the model answers it greedily, one at a time
    for task, bench, to_text in [("oqvl_pope_paper", "POPE", paper.pope_doc_to_text),
                                 ("oqvl_mmstar_paper", "MMStar", paper.mmstar_doc_to_text)]:
        rows = cli_samples(root / "ours", task)
        assert [r["doc_id"] for r in rows] == [0, 1, 2, 3]
        for r in rows:
            doc = docs[bench][r["doc_id"]]
            assert r["input"] == to_text(doc) and r["input"].startswith("<image>\n")
            assert r["filtered_resps"] == greedy_reference(ckpt, to_text(doc), paper.image_doc_to_visual(doc))
        assert len({r["filtered_resps"] for r in rows}) > 1


@pytest.mark.slow
def test_lmms_protocol_answers_are_lmms_eval_qwen2_vl_s_own(cli_run):
    root, ours, theirs = cli_run
    assert theirs["config"]["model"] == "qwen2_vl"
    for task in LMMS_TASKS:
        mine, own = cli_samples(root / "ours", task), cli_samples(root / "theirs", task)
        assert [(r["doc_id"], r["input"], r["filtered_resps"]) for r in mine] == \
            [(r["doc_id"], r["input"], r["filtered_resps"]) for r in own]
        assert not mine[0]["input"].startswith("<image>")  # lmms-eval's prompt, sent through its chat template
        assert ours["results"][task] == theirs["results"][task]


# ------------------------------------------------------------------- the evaluate job's entry point

@pytest.mark.slow
def test_evaluate_entry_point_scores_a_qwen2_vl_directory(ckpt, data_dir, tmp_path):
    """What rule evaluate_released runs (python -m oqvl.evaluate --checkpoint DIR): the model is
    told from the directory's config.json; both protocols, the control, tidy rows and manifest."""
    out = tmp_path / "eval" / "test"
    rows = evaluate(ckpt, "Qwen2-VL-tiny", ["POPE"], data_dir, ["paper", "lmms"], True, 8, 4, "cpu", out)
    got = {(r["protocol"], r["metric"]) for r in rows["POPE"]}
    assert {("paper", "accuracy"), ("paper", "likelihood_auc"), ("lmms", "accuracy")} <= got
    assert all(r["run"] == "Qwen2-VL-tiny" and r["seed"] is None and r["n"] > 0 for r in rows["POPE"])
    raw = [json.loads(line) for line in (out / "POPE" / "paper" / "samples_oqvl_pope_paper.jsonl").read_text().splitlines()]
    assert len(raw) == 36 and all(r["input"].startswith("<image>\nQuestion: ") for r in raw)
    lmms = [json.loads(line) for line in (out / "POPE" / "lmms" / "samples_oqvl_pope_lmms.jsonl").read_text().splitlines()]
    assert len(lmms) == 36 and not lmms[0]["input"].startswith("<image>")  # lmms-eval's own prompt
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and str(ckpt) in manifest["inputs"]


# ------------------------------------------------------------------------- config, plan, table4

def paper_config() -> dict:
    import yaml

    return yaml.safe_load((REPO / "config" / "full.yaml").read_text())


def test_paper_config_evaluates_qwen2_vl_as_downloaded_at_a_pinned_revision():
    from oqvl import layout
    from oqvl.config import ConfigError, validate
    from oqvl.plan import Plan
    from oqvl.scale import resolve

    cfg = validate(paper_config())
    spec = cfg["released"]["Qwen2-VL-2B-Instruct"]
    assert spec["format"] == "qwen2_vl" and spec["model_dir"] == "models/Qwen2-VL-2B-Instruct"
    assert len(spec["revision"]) == 40 and int(spec["revision"], 16) >= 0
    plan = Plan(cfg, resolve(cfg))
    assert list(plan.released("qwen2_vl")) == ["Qwen2-VL-2B-Instruct"]
    assert list(plan.released("prismatic")) == ["Open-Qwen2VL-2B"]
    assert plan.released_checkpoint("Qwen2-VL-2B-Instruct") == "models/Qwen2-VL-2B-Instruct/config.json"
    assert plan.released_checkpoint("Open-Qwen2VL-2B") == layout.released_model("Open-Qwen2VL-2B")
    assert plan.released_jobs("Qwen2-VL-2B-Instruct") == [
        ("eval_data", {}), ("evaluate_released", {"name": "Qwen2-VL-2B-Instruct", "split": "test"})]
    assert [r for r, _ in plan.released_jobs("Open-Qwen2VL-2B")][0] == "convert_released"
    record = plan.released_record("Qwen2-VL-2B-Instruct")
    assert record["manifests"] == [layout.manifest("evaluate_released", name="Qwen2-VL-2B-Instruct", split="test")]
    assert record["paper_row"] == "Qwen2-VL-2B-Instruct" and record["revision"] == spec["revision"]
    assert ("evaluate_released", {"name": "Qwen2-VL-2B-Instruct", "split": "test"}) in plan.all_jobs()
    # each format takes its own keys
    bad = paper_config()
    bad["released"]["Qwen2-VL-2B-Instruct"]["lm"] = "models/Qwen2-1.5B"
    with pytest.raises(ConfigError, match=r"^unknown key released.Qwen2-VL-2B-Instruct.lm$"):
        validate(bad)
    bad = paper_config()
    del bad["released"]["Qwen2-VL-2B-Instruct"]["model_dir"]
    with pytest.raises(ConfigError, match=r"^released.Qwen2-VL-2B-Instruct: .model_dir. is a required property"):
        validate(bad)


def test_table4_shows_qwen2_vl_measured_beside_the_papers_row(tmp_path):
    from oqvl.report import tables

    scores = {"MMBench": 70.0, "SEEDBench": 71.0, "MMStar": 45.0, "MathVista": 40.0, "POPE": 86.0}
    evals = []
    for b, v in scores.items():
        path = tmp_path / f"{b}.json"
        path.write_text(json.dumps([{"run": "Qwen2-VL-2B-Instruct", "benchmark": b, "protocol": p, "metric": "accuracy",
                                     "value": v, "n": 10, "chance": 25.0, "control": 25.0, "above_chance": True}
                                    for p in ("paper", "lmms")]))
        evals.append(str(path))
    record = {"evals": evals, "manifests": [], "sft_data": "Qwen2-VL's own (not released)",
              "paper_row": "Qwen2-VL-2B-Instruct", "revision": "895c3a49bc3fa70a340399125c650a463535e71c"}
    df = tables.build("table4", {"runs": {}, "mixtures": {}}, {}, {"Qwen2-VL-2B-Instruct": record})
    measured = df[df["run"] == "Qwen2-VL-2B-Instruct"].set_index("protocol")
    assert list(measured.index) == ["paper", "lmms"]
    assert (measured["row"] == "Qwen2-VL-2B-Instruct (released checkpoint, measured)").all()
    assert measured.loc["paper", "MMBench"] == 70.0 and measured.loc["paper", "avg_5"] == 62.4
    assert "revision 895c3a49bc3f" in measured.loc["paper", "source"]
    # the paper's copied row of the same model (Table 4's baseline)
    assert df[df["row"] == "Qwen2-VL-2B-Instruct"]["MMBench"].tolist() == [68.8]
