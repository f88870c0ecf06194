"""Evaluation through lmms-eval: the model adapter on a tiny random checkpoint, every task of both
protocols run by lmms-eval itself with scripted models (tidy rows, chance, control), and the
`lmms-eval` command line with the `oqvl` model, offline."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import lmms_eval_cli

from oqvl.evaluate import BENCHMARKS, toy
from oqvl.evaluate.schemas import data_file
from oqvl.evaluate.tasks import protocol_tasks
from oqvl.model.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, build_qwen2_tokenizer
from oqvl.model.vlm import OpenQwen2VL

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from oqvl.evaluate.adapter import OQVL, cut_at_stop
from oqvl.evaluate.run import evaluate

TOY_VOCAB = 8192
SIZES = {"MMBench": 8, "SEEDBench": 24, "MMStar": 24, "MathVista": 28, "POPE": 4}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint with the toy tokenizer; an untied head so it says varied things."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    lm = {"vocab_size": TOY_VOCAB + len(SPECIAL_TOKENS), "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 1024, "tie_word_embeddings": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    image_id = TOY_VOCAB + [t for t, _ in SPECIAL_TOKENS].index(IMAGE_TOKEN)
    model = OpenQwen2VL.from_components("toy-vit-p8-sigmoid", lm, image_token_id=image_id,
                                        visual_tokens_pretrain=4, visual_tokens_sft=16)
    model.save_pretrained(out)
    build_qwen2_tokenizer(out, vocab_size=TOY_VOCAB)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_data")
    toy.main(["--out", str(out), "--sizes", json.dumps(SIZES)])
    return out / "test"


# ------------------------------------------------------------------------------- the adapter

class Docs:
    """What lmms-eval puts in lm.task_dict: task -> split -> indexable docs."""

    def __init__(self, docs):
        self.docs = docs

    def __getitem__(self, i):
        return self.docs[i]


def load(path, cache):
    from datasets import load_dataset

    return load_dataset("parquet", data_files={"test": str(path)}, split="test", cache_dir=str(cache))


@pytest.fixture(scope="module")
def adapter(ckpt, data_dir, tmp_path_factory):
    lm = OQVL(pretrained=str(ckpt), batch_size=3)
    mmstar = load(data_file(data_dir, "MMStar"), tmp_path_factory.mktemp("cache"))
    lm.task_dict = {"t": {"test": Docs([mmstar[i] for i in range(6)])}}
    return lm


def image_of(doc):
    return [doc["image"]]


def request(kind, args):
    doc_id, task = args[-3], args[-2]
    return Instance(kind, args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def gen_requests(n, gen_kwargs, suffix=""):
    return [request("generate_until", (f"Question {i}?{'!' * i}{suffix}", dict(gen_kwargs), image_of,
                                       i, "t", "test")) for i in range(n)]


def test_adapter_batched_generation_equals_one_by_one(adapter):
    kwargs = {"max_new_tokens": 6, "until": []}
    batched = adapter.generate_until(gen_requests(6, kwargs))
    adapter.batch_size = 1
    try:
        single = adapter.generate_until(gen_requests(6, kwargs))
    finally:
        adapter.batch_size = 3
    assert batched == single and len(set(batched)) > 1 and all(batched)


def test_adapter_stops_at_until_strings_and_caps_length(adapter):
    free = adapter.generate_until(gen_requests(6, {"max_new_tokens": 12, "until": []}))
    stops = sorted({ch for text in free for ch in text if not ch.isalnum()})[:2] or ["e"]
    cut = adapter.generate_until(gen_requests(6, {"max_new_tokens": 12, "until": stops}))
    assert cut == [cut_at_stop(t, stops) for t in free]
    assert all(not any(s in t for s in stops) for t in cut)
    adapter.max_new_tokens = 2
    try:
        capped = adapter.generate_until(gen_requests(6, {"max_new_tokens": 12, "until": []}))
    finally:
        adapter.max_new_tokens = None
    assert all(len(adapter.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 3 for t in capped)
    with pytest.raises(ValueError, match="greedily"):
        adapter.generate_until(gen_requests(1, {"do_sample": True, "temperature": 0.7}))


def test_adapter_prompt_is_the_sft_chat_encoding(adapter):
    from oqvl.model.chat import encode_prompt

    doc = adapter.task_dict["t"]["test"][0]
    ids, images = adapter._inputs("What is it?", image_of(doc), "t")
    assert ids == encode_prompt(adapter.tokenizer, "<image>\nWhat is it?", adapter.visual_tokens)
    assert images.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="2 <image>"):
        adapter._inputs("<image> and <image>", image_of(doc), "t")


def paper_requests(adapter, n, task="oqvl_mmstar_paper"):
    adapter.task_dict[task] = adapter.task_dict["t"]
    return [request("generate_until", (f"<image>\nQuestion: {i}?{'!' * i}\nAnswer:",
                                       {"max_new_tokens": 16, "until": ["e"]}, image_of, i, task, "test"))
            for i in range(n)]


def test_adapter_paper_tasks_send_raw_prompts_after_bos(adapter):
    from oqvl.model.chat import encode_raw_prompt

    doc = adapter.task_dict["t"]["test"][0]
    for task in ("oqvl_pope_paper", "oqvl_pope_paper_likelihood_shuffled", "oqvl_mmstar_paper_shuffled"):
        ids, _ = adapter._inputs("<image>\nQuestion: Is it red?\nAnswer:", image_of(doc), task)
        assert ids == encode_raw_prompt(adapter.tokenizer, "<image>\nQuestion: Is it red?\nAnswer:",
                                        adapter.visual_tokens, adapter.bos_id)
    assert ids[0] == adapter.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # the toy tokenizer has no BOS
    assert "<|im_start|>" not in adapter.tokenizer.decode(ids)
    with pytest.raises(ValueError, match="oqvl_pope_paper: prompt has 0 <image>"):
        adapter._inputs("Is it red?", image_of(doc), "oqvl_pope_paper")  # no image slot added for it


def test_adapter_paper_decoding_stops_at_the_reference_ids_and_keeps_them(adapter):
    from oqvl.evaluate.paper import REFERENCE_STOP_IDS

    reqs = paper_requests(adapter, 6)
    texts = adapter.generate_until(reqs)
    calls = []
    generate = adapter.model.generate

    def spy(ids, *args, **kwargs):
        out = generate(ids, *args, **kwargs)
        calls.append((kwargs["stop_token_ids"], kwargs["max_new_tokens"], out))
        return out

    adapter.model.generate = spy
    try:
        assert adapter.generate_until(reqs) == texts
    finally:
        adapter.model.generate = generate
    stops, max_new, _ = calls[0]
    assert stops == {i for i in REFERENCE_STOP_IDS if i < len(adapter.tokenizer)} == {11, 13, 198}
    assert max_new == 16
    outs = [new for _, _, batch in calls for new in batch]
    for new in outs:  # 16 tokens, or the first stop token is the last
        assert all(t not in stops for t in new[:-1]) and (len(new) == 16 or new[-1] in stops)
    decoded = [adapter.tokenizer.decode(new, skip_special_tokens=True).strip() for new in outs]
    assert sorted(decoded) == sorted(texts)  # no cut at the task's `until` ("e"): the reference has none
    assert any("e" in t for t in texts)


def test_adapter_loglikelihood_matches_the_model(adapter):
    docs = adapter.task_dict["t"]["test"]
    reqs = [request("loglikelihood", (f"Is it {c}?", cont, image_of, i, "t", "test"))
            for i, (c, cont) in enumerate([("red", "Yes"), ("red", "No"), ("blue", "a long answer"), ("x", "No")])]
    reqs[1] = request("loglikelihood", (reqs[0].args[0], "No", image_of, 0, "t", "test"))  # shares request 0's context
    got = adapter.loglikelihood(reqs)
    for req, (ll, greedy) in zip(reqs, got):
        context, cont, _, doc_id, _, _ = req.args
        ids, images = adapter._inputs(context, image_of(docs[doc_id]), "t")
        cont_ids = adapter.tokenizer(cont, add_special_tokens=False)["input_ids"]
        want = adapter.model.loglikelihood(ids, cont_ids, images, visual_tokens=adapter.visual_tokens)
        assert ll == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    assert got[0] != got[1]


def test_adapter_computes_a_repeated_question_once(adapter):
    calls = []
    hidden, generate = adapter._hidden, adapter.model.generate

    def count_hidden(items):
        calls.append(("ll", len(items)))
        return hidden(items)

    def count_generate(ids, *args, **kwargs):
        calls.append(("gen", ids.shape[0]))
        return generate(ids, *args, **kwargs)

    asks = [request("loglikelihood", ("Is it red?", c, image_of, d, "t", "test")) for d, c in [(0, "Yes"), (0, "No"), (1, "Yes")]]
    gens = [request("generate_until", ("Name it.", {"max_new_tokens": 3, "until": []}, image_of, d, "t", "test")) for d in (0, 1)]
    adapter._hidden, adapter.model.generate = count_hidden, count_generate
    try:
        adapter.loglikelihood(asks)
        adapter.generate_until(gens)
        once = list(calls)
        calls.clear()
        lls = adapter.loglikelihood(asks + asks[:1])  # the first question again, same picture
        texts = adapter.generate_until(gens + gens[:1])
    finally:
        adapter._hidden, adapter.model.generate = hidden, generate
    assert calls == once and once[-1] == ("gen", 2)
    assert lls[0] == lls[3] and texts[0] == texts[2]


def test_adapter_reuses_visual_tokens_of_an_image_it_has_seen(adapter):
    from oqvl.evaluate.adapter import CachedVisionVLM

    model = adapter.model
    assert isinstance(model, CachedVisionVLM) and model.feature_cache_size == 1024
    docs = adapter.task_dict["t"]["test"]
    images = torch.stack([adapter.transform(docs[i]["image"].convert("RGB")) for i in (0, 1, 0, 2)])
    calls = []
    original = OpenQwen2VL.encode_images

    def counting(self, x, visual_tokens=None):
        calls.append(len(x))
        return original(self, x, visual_tokens)

    model._feature_cache.clear()
    OpenQwen2VL.encode_images = counting
    try:
        with torch.no_grad():
            cached = model.encode_images(images, 16)
            again = model.encode_images(images[[2, 3]], 16)
    finally:
        OpenQwen2VL.encode_images = original
    with torch.no_grad():
        fresh = original(model, images, 16)
    assert calls == [3]  # three distinct images, computed once; the second call computes nothing
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, fresh[[2, 3]], atol=1e-5, rtol=1e-5)
    model.feature_cache_size = 2
    try:
        with torch.no_grad():
            model.encode_images(images, 16)
        assert len(model._feature_cache) == 2
    finally:
        model.feature_cache_size = 1024


def test_adapter_multi_round(adapter):
    seen = []

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append((round_idx, list(previous_output)))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return image_of(doc), f"Round {round_idx}: go on.", False, previous_output, {"r": round_idx}

    req = request("generate_until_multi_round",
                  ("First?", {"max_new_tokens": 3, "until": []}, image_of, doc_to_text, 1, "t", "test"))
    (answers,) = adapter.generate_until_multi_round([req])
    assert isinstance(answers, list) and len(answers) == 2
    assert seen[0] == (1, answers[:1]) and seen[1] == (2, answers)


def test_adapter_rejects_unknown_model_args(ckpt):
    with pytest.raises(ValueError, match="unknown model_args"):
        OQVL(pretrained=str(ckpt), temprature=0)


# ------------------------------------------------------------- lmms-eval runs every task

def row_key(benchmark, doc):
    for k in ("question_id", "pid", "index"):  # POPE and SEED, MathVista, MMBench and MMStar
        if k in doc:
            return benchmark.lower(), str(doc[k]), doc["question"]
    raise KeyError


def image_bytes(visuals):
    return b"".join(v.convert("RGB").tobytes() for v in visuals)


class Scripted(lmms):
    """A stand-in model: `seeing` answers right exactly when it is shown the question's own image
    (as a perfect vision model would); `cheat` reads the answer off the document whatever the image;
    `blind` always gives the same answer."""

    def __init__(self, mode, truth):
        super().__init__()
        self.mode, self.truth = mode, truth

    def knows(self, task, doc, visuals):
        if self.mode == "cheat":
            return True
        benchmark = task.split("_")[1]  # oqvl_<benchmark>_<protocol>[_shuffled]
        return self.mode == "seeing" and self.truth.get(row_key(benchmark, doc)) == image_bytes(visuals)

    def generate_until(self, requests):
        out = []
        for req in requests:
            _, _, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if not self.knows(task, doc, doc_to_visual(doc)):
                out.append("A" if "pope" not in task else "no")
            elif "mathvista" in task and doc["choices"]:
                # lmms-eval wants the option's text (letters need its judge); the paper, a letter
                out.append(doc["answer"] if task.endswith(("lmms", "lmms_shuffled"))
                           else "ABCD"[list(doc["choices"]).index(doc["answer"])])
            else:
                out.append(doc["answer"])
        return out

    def loglikelihood(self, requests):
        out = []
        for req in requests:
            _, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            said = doc["answer"] if self.knows(task, doc, doc_to_visual(doc)) else "no"
            out.append((0.0, True) if continuation.lower() == said else (-5.0, False))
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError


@pytest.fixture(scope="module")
def truth(data_dir, tmp_path_factory):
    table, cache = {}, tmp_path_factory.mktemp("cache")
    for b in BENCHMARKS:
        ds = load(data_file(data_dir, b), cache)
        col = {"MathVista": "decoded_image"}.get(b, "image")
        for doc in ds:
            im = doc[col]
            table[row_key(b, doc)] = image_bytes(im if isinstance(im, list) else [im])
    return table


@pytest.fixture(scope="module")
def seeing_rows(data_dir, truth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "test"
    rows = evaluate(Path("scripted"), "seeing", list(BENCHMARKS), data_dir, ["paper", "lmms"], True, 8, None,
                    "cpu", out, lm=Scripted("seeing", truth))
    return out, rows


def headline(rows, protocol):
    return next(r for r in rows if r["protocol"] == protocol)


def test_every_task_runs_in_lmms_eval_and_writes_its_files(seeing_rows):
    out, rows = seeing_rows
    for b in BENCHMARKS:
        assert json.loads((out / f"{b}.json").read_text()) == rows[b]
        for protocol in ("paper", "lmms"):
            base = out / b / protocol
            results = json.loads((base / "results.json").read_text())
            tasks = protocol_tasks(b, protocol)
            assert set(results["results"]) == set(tasks) and len(tasks) == (4 if (b, protocol) == ("POPE", "paper") else 2)
            for t in tasks:
                samples = (base / f"samples_{t}.jsonl").read_text().splitlines()
                assert len(samples) == results["n-samples"][t]["effective"] > 0
        assert {r["benchmark"] for r in rows[b]} == {b}
    # One job, one manifest: every benchmark's rows and lmms-eval files, and all the work.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and manifest["device"] == {"type": "cpu", "gpus": 0}
    assert manifest["work"] == {"amount": sum(r["n"] for b in BENCHMARKS for r in rows[b]), "unit": "samples"}
    for b in BENCHMARKS:
        assert {f"{b}.json", f"{b}/paper/results.json", f"{b}/lmms/results.json"} <= set(manifest["files"])
    for b in BENCHMARKS:
        base = {"run", "seed", "split", "benchmark", "protocol", "metric", "value", "n", "chance", "control",
                "above_chance"}
        paired = {"test", "units", "clusters", "control_diff", "control_diff_se"}
        for protocol in ("paper", "lmms"):
            head, *rest = [r for r in rows[b] if r["protocol"] == protocol]
            assert set(head) == base | paired and head["test"] == "paired_clustered", (b, protocol)
            assert all(set(r) in (base, base | {"test"}) for r in rest)


def test_a_model_that_sees_the_image_beats_chance_and_control(seeing_rows):
    _, rows = seeing_rows
    for b in BENCHMARKS:
        for protocol in ("paper", "lmms"):
            head = headline(rows[b], protocol)
            if (b, protocol) == ("MathVista", "lmms"):
                # lmms-eval cannot round to the released float precision: float answers never score
                assert head["value"] == pytest.approx(100 * 24 / 28, abs=0.01)  # lmms-eval rounds
            else:
                assert head["value"] == 100.0, (b, protocol)
            assert head["above_chance"] is True, (b, protocol, head)
            assert head["control"] < head["value"]
            # the paired test read every question back from the sample logs: its mean difference
            # is the value minus the control
            assert head["control_diff"] == pytest.approx(head["value"] - head["control"], abs=0.02), (b, protocol)
            assert head["control_diff"] > 2 * head["control_diff_se"] >= 0
    pope = {r["metric"]: r for r in rows["POPE"] if r["protocol"] == "paper"}
    assert pope["f1"]["value"] == 100.0 and pope["f1"]["chance"] == pytest.approx(200 / 3, abs=1e-3)
    assert pope["yes_ratio"]["value"] == 50.0 and pope["yes_ratio"]["above_chance"] is None
    assert pope["accuracy_adversarial"]["n"] == pope["f1_adversarial"]["n"] == 4 * 6
    assert pope["f1_random"]["value"] == 100.0 and pope["f1_random"]["above_chance"] is True
    # the likelihood scorer (not the published metric) from its own task, with its own control
    assert pope["likelihood_auc"]["value"] == 100.0 and pope["likelihood_auc"]["chance"] == 50.0
    assert pope["likelihood_accuracy"]["value"] == 100.0 and pope["likelihood_auc"]["above_chance"] is True
    assert headline(rows["MMBench"], "lmms")["metric"] == "circular_accuracy"
    assert headline(rows["MMBench"], "lmms")["chance"] == pytest.approx(100 / 256, abs=1e-3)
    # a blind "A" gets a quarter of the letters in the control, and no circular question
    assert headline(rows["MMBench"], "paper")["control"] == 25.0
    assert headline(rows["MMBench"], "lmms")["control"] == 0.0


@pytest.mark.parametrize("mode", ["blind", "cheat"])
def test_no_answer_bias_passes_the_control(mode, data_dir, truth, tmp_path):
    by_benchmark = evaluate(Path("scripted"), mode, ["MMStar", "POPE"], data_dir, ["paper", "lmms"], True, 8,
                            None, "cpu", tmp_path / "test", lm=Scripted(mode, truth))
    for rows in by_benchmark.values():
        for r in rows:
            assert r["above_chance"] in (False, None), r
        if mode == "cheat":  # right everywhere, images or not: the control catches it
            assert headline(rows, "paper")["value"] == headline(rows, "paper")["control"] == 100.0


# ------------------------------------------------------------------------ the lmms-eval CLI

@pytest.mark.slow
def test_lmms_eval_cli_runs_the_oqvl_model_offline(ckpt, data_dir, tmp_path):
    from oqvl.evaluate.tasks import write_task_dir

    write_task_dir(tmp_path / "tasks", data_dir, ["POPE", "MMStar"], ["paper", "lmms"], control=False)
    cli = Path(sys.executable).with_name("lmms-eval")
    got = lmms_eval_cli([str(cli)], ckpt, ["oqvl_pope_paper", "oqvl_mmstar_lmms"], tmp_path / "tasks",
                        tmp_path / "out", limit=6)
    assert set(got["results"]) == {"oqvl_pope_paper", "oqvl_mmstar_lmms"}
    assert got["n-samples"]["oqvl_pope_paper"]["effective"] == 6
    assert 0.0 <= got["results"]["oqvl_pope_paper"]["accuracy,none"] <= 100.0
    assert len(list((tmp_path / "out").rglob("*_samples_oqvl_mmstar_lmms.jsonl"))) == 1
