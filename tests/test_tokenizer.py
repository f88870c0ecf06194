"""The offline Qwen2 tokenizer: real ids at full scale, a small vocabulary with the same specials at toy scale."""

import functools
import json
import os
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe

from oqvl.model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    PRETOKENIZE_REGEX,
    SPECIAL_TOKENS,
    build_qwen2_tokenizer,
    check_fits,
    load_tokenizer,
    main,
    ranks_path,
    toy_token_ids,
)

TOY_VOCAB = 8192

# The ids Qwen2.5-1.5B-Instruct's tokenizer gives its added tokens.
REAL_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}

TRICKY = [
    "a simple drawing with a large blue triangle in the bottom right",
    "Hello, world! It's 2024; we'll see what they've done.",
    "1234567890 3.14159 -42 1,000,000 0x1F",
    "   leading spaces\n\n\ntrailing   \t\t\n  ",
    "tabs\tand\r\nwindows\r\nline endings\r\n\r\n",
    "Ünïcödé café naïve — “quotes” «guillemets» …",
    "你好，世界！这是一个测试。 日本語のテキスト 한국어 العربية עברית",
    "emoji 😀🎉 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}\n",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
    "",
    " ",
    "\n",
]

SYSTEM_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": f"{IMAGE_TOKEN}What is in the image?"},
]
SYSTEM_CHAT_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|image_pad|>What is in the image?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DEFAULT_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
DEFAULT_CHAT_TEXT = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
)


@functools.cache  # building an Encoding takes ~0.5 s
def tiktoken_encoding(n_ranks=None):
    ranks = load_tiktoken_bpe(str(ranks_path()))
    if n_ranks is not None:
        ranks = {t: r for t, r in ranks.items() if r < n_ranks}
    return tiktoken.Encoding("qwen-test", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return build_qwen2_tokenizer(tmp_path_factory.mktemp("tok") / "full")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "toy"
    build_qwen2_tokenizer(out, TOY_VOCAB)
    return load_tokenizer(out)  # what the pipeline does: load the saved directory


def assert_chat_template(tok):
    assert tok.apply_chat_template(SYSTEM_CHAT, tokenize=False, add_generation_prompt=True) == SYSTEM_CHAT_TEXT
    assert tok.apply_chat_template(DEFAULT_CHAT, tokenize=False) == DEFAULT_CHAT_TEXT


# --- full vocabulary ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", TRICKY)
def test_full_matches_tiktoken(full, text):
    # Qwen2 NFC-normalises first; tiktoken does not, so give it the normalised text.
    expected = tiktoken_encoding().encode_ordinary(unicodedata.normalize("NFC", text))
    assert full.encode(text, add_special_tokens=False) == expected


def test_full_special_ids_are_qwen2s(full):
    assert [t for t, _ in SPECIAL_TOKENS] == list(REAL_IDS)
    assert {t: full.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    assert len(full) == 151665
    assert full.eos_token == IM_END and full.pad_token == ENDOFTEXT
    assert full.eos_token_id == 151645 and full.pad_token_id == 151643
    assert full.bos_token is None
    # A special token in text is one id, never split into pieces.
    assert full.encode(f"{IM_START}user\n{IMAGE_TOKEN}{IMAGE_TOKEN}", add_special_tokens=False) == \
        [151644, 872, 198, 151655, 151655]


def test_full_chat_template(full):
    assert_chat_template(full)


# --- toy vocabulary ----------------------------------------------------------------------------

def test_toy_specials_follow_the_vocabulary(toy):
    ids = [toy.convert_tokens_to_ids(t) for t, _ in SPECIAL_TOKENS]
    assert ids == list(range(TOY_VOCAB, TOY_VOCAB + len(SPECIAL_TOKENS)))
    assert len(toy) == TOY_VOCAB + len(SPECIAL_TOKENS)
    assert toy.eos_token_id == TOY_VOCAB + 2 and toy.pad_token_id == TOY_VOCAB


def test_toy_chat_template(toy):
    assert_chat_template(toy)


@pytest.mark.parametrize("text", TRICKY)
def test_toy_matches_truncated_tiktoken(toy, text):
    expected = tiktoken_encoding(TOY_VOCAB).encode_ordinary(unicodedata.normalize("NFC", text))
    assert toy.encode(text, add_special_tokens=False) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_toy_round_trips(toy, text):
    ids = toy.encode(text, add_special_tokens=False)
    assert all(0 <= i < TOY_VOCAB + len(SPECIAL_TOKENS) for i in ids)
    assert toy.decode(ids) == unicodedata.normalize("NFC", text)


def test_toy_round_trips_specials_in_text(toy):
    text = f"{IM_START}user\n{IMAGE_TOKEN * 3}a red circle{IM_END}\n"
    ids = toy.encode(text, add_special_tokens=False)
    assert ids.count(toy.convert_tokens_to_ids(IMAGE_TOKEN)) == 3
    assert toy.decode(ids) == text


# --- loading -----------------------------------------------------------------------------------

def test_cli_writes_the_toy_tokenizer_and_its_manifest(tmp_path):
    out = tmp_path / "tokenizer"
    main(["--out", str(out), "--vocab-size", str(TOY_VOCAB)])
    manifest = json.loads((out / "manifest.json").read_text())
    n = len(load_tokenizer(out))
    assert manifest["stage"] == "tokenizer" and manifest["work"] == {"amount": float(n), "unit": "vocab entries"}
    assert n == TOY_VOCAB + len(SPECIAL_TOKENS)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["files"]) and "manifest.json" not in manifest["files"]
    assert manifest["config"]["vocab_size"] == TOY_VOCAB


def test_load_tokenizer_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_load_tokenizer_not_a_tokenizer_dir(tmp_path):
    (tmp_path / "readme.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path)


def test_check_fits_names_the_tokenizer_and_the_mismatch(toy, tmp_path):
    tokens, image_id = toy_token_ids(TOY_VOCAB)
    assert (len(toy), toy.convert_tokens_to_ids(IMAGE_TOKEN)) == (tokens, image_id)
    check_fits(toy, tokens, image_id, tmp_path)  # fits: no error
    with pytest.raises(ValueError, match=rf"^{tmp_path}: {tokens} tokens, but the model embeds only {tokens - 1}"):
        check_fits(toy, tokens - 1, image_id, tmp_path)
    with pytest.raises(ValueError, match=rf"^{tmp_path}: <\|image_pad\|> has id {image_id}, but the model's image_token_id is 7"):
        check_fits(toy, tokens, 7, tmp_path)
