"""benchmarks/letter_step.py: its items are right by construction and its loss sees only answers."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from oqvl.model.tokenizer import build_qwen2_tokenizer

spec = importlib.util.spec_from_file_location(
    "letter_step", Path(__file__).resolve().parents[1] / "benchmarks" / "letter_step.py")
letter_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(letter_step)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_qwen2_tokenizer(tmp_path_factory.mktemp("tok") / "toy", vocab_size=8192)


def options_of(prompt: str) -> dict[str, str]:
    return {line[0]: line[3:] for line in prompt.splitlines() if line[:1] in "ABCD" and line[1:3] == ". "}


def test_items_answer_what_they_ask(tok):
    rng = np.random.default_rng(0)
    pool = letter_step.word_pool(tok, 50, rng)
    assert len(set(pool)) == 50
    assert all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in pool)
    for _ in range(50):
        for kind in ("near", "far"):
            prompt, answer = letter_step.item(kind, pool, rng)
            asked = prompt.split("Which option is ")[1].split("?")[0]
            assert options_of(prompt)[answer] == asked
        prompt, answer = letter_step.item("restate", pool, rng)
        first, again = prompt.split("\nAgain:\n")
        assert options_of(first)[again[-2]] == answer.strip()


def test_far_items_have_the_benchmark_layout(tok):
    prompt, _ = letter_step.item("far", letter_step.word_pool(tok, 20, np.random.default_rng(1)),
                                 np.random.default_rng(2))
    assert prompt.startswith("Which option is ")
    assert prompt.rstrip().endswith("Answer with the option's letter from the given choices directly.")


def test_labels_cover_the_answers_and_their_end_only(tok):
    pool = letter_step.word_pool(tok, 40, np.random.default_rng(0))
    items = letter_step.Items(tok, pool, [0, 1, 1], seed=3)
    ids, labels, mask = items.batch(4, per_sequence=3)
    for row in range(4):
        kept = labels[row][labels[row] != -100].tolist()
        assert len(kept) == 6  # 3 letters, each with <|im_end|>
        assert tok.decode(kept[::2]) in {a + b + c for a in "ABCD" for b in "ABCD" for c in "ABCD"}
        assert kept[1::2] == [items.end] * 3
        # labels are the next tokens' ids, as the model is fed them (shifted in the loss)
        assert (ids[row][labels[row] != -100] == labels[row][labels[row] != -100]).all()
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (labels[row, length:] == -100).all() and labels[row, length - 1] == items.end


def test_bad_mix_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="--mix"):
        letter_step.main(["--tokenizer", str(tmp_path), "--mix", "1,1"])
