"""Golden prompts of the `paper` protocol: for one row of each benchmark, the exact string and
token ids the protocol sends equal what the reference's harness builds.

The expected strings are written from the reference code (Victorwz/Open-Qwen2VL at 0d76f9f, paths
under vlm-evaluation/vlm_eval/tasks/harnesses/; each test names its lines). The expected ids follow
the reference's own encoding: the prompt split at "<image>", each piece tokenized alone, the image
index in between (prismatic-vlms/prismatic/util/data_utils.py:387-411), the tokenizer's BOS in front
(prismatic-vlms/prismatic/models/vlms/prismatic.py:641-642), with Qwen2.5's tokenizer plus the
"<|endofchunk|>" and "<s>" tokens the reference adds, "<s>" as BOS
(prismatic-vlms/prismatic/models/backbones/llm/qwen2.py:58-59).
"""

import pytest
from oqvl.evaluate import paper
from oqvl.model.chat import encode_raw_prompt
from oqvl.model.prismatic import release_tokenizer
from oqvl.model.tokenizer import IMAGE_TOKEN, build_qwen2_tokenizer, document_bos_id

VISUAL_TOKENS = 3
IMAGE_INDEX = -200  # the reference's IMAGE_TOKEN_INDEX, expanded to the visual tokens by its model

MMBENCH = {"index": 0, "question": "Which of these is a fruit?", "hint": "Look closely.",
           "A": "apple", "B": "chair", "C": "None", "D": "nan", "answer": "A"}
SEEDBENCH = {"question_id": "1", "question": "How many dogs are there?", "choice_a": "1",
             "choice_b": "2", "choice_c": "3", "choice_d": "4", "answer": "B"}
MMSTAR = {"index": 5, "question": "What is shown?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish",
          "answer": "A"}
MATHVISTA_MC = {"pid": "1", "question": "What is the value of x?", "question_type": "multi_choice",
                "choices": ["2", "4", "6"], "unit": "cm", "answer": "4"}
MATHVISTA_FREE = {"pid": "2", "question": "How long is the bar?", "question_type": "free_form",
                  "choices": None, "unit": "cm", "answer": "12"}
POPE = {"question_id": "7", "question": "Is there a dog in the image?", "category": "random",
        "answer": "yes"}

MC = "\nAnswer with the option's letter from the given choices directly.\nAnswer:"
SHORT = "\nAnswer the question using a single word or phrase.\nAnswer:"

GOLDEN = {
    # mmbench.py:46-54 (format_example; no hint; all four options as pandas prints them),
    # sent raw by mmbench.py:190
    "MMBench": (paper.mmbench_doc_to_text, MMBENCH,
                "<image>\nWhich of these is a fruit?\nA. apple\nB. chair\nC. None\nD. nan" + MC),
    # seedbench.py:47-55 (choice_a..choice_d as A-D), sent raw by seedbench.py:192
    "SEEDBench": (paper.seedbench_doc_to_text, SEEDBENCH,
                  "<image>\nHow many dogs are there?\nA. 1\nB. 2\nC. 3\nD. 4" + MC),
    # mmstar.py:173 ("Question: " and the question, whose text holds the options)
    "MMStar": (paper.mmstar_doc_to_text, MMSTAR,
               "<image>\nQuestion: What is shown?\nOptions: A: a cat, B: a dog, C: a bird, D: a fish" + MC),
    # mathvista.py:47-58 (multi_choice: lettered choices; no unit line), sent raw by mathvista.py:282
    "MathVista-mc": (paper.mathvista_doc_to_text, MATHVISTA_MC,
                     "<image>\nWhat is the value of x?\nA. 2\nB. 4\nC. 6" + MC),
    # mathvista.py:59-63 (free_form: the short-answer line; no unit line)
    "MathVista-free": (paper.mathvista_doc_to_text, MATHVISTA_FREE, "<image>\nHow long is the bar?" + SHORT),
    # pope.py:169
    "POPE": (paper.pope_doc_to_text, POPE, "<image>\nQuestion: Is there a dog in the image?" + SHORT),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Qwen2.5's tokenizer (built offline from its BPE ranks) with the reference's added tokens,
    as the released checkpoint's converter writes it."""
    base = tmp_path_factory.mktemp("qwen2")
    build_qwen2_tokenizer(base)
    return release_tokenizer(base, vocab_rows=151936, max_length=4096)


def reference_ids(tokenizer, prompt: str) -> list[int]:
    """data_utils.py:387-411 then prismatic.py:642: pieces between "<image>" tokenized alone
    (`tokenizer(chunk).input_ids`, which adds nothing for Qwen2), the image index between them,
    BOS in front."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_INDEX] + chunk
    return [tokenizer.bos_token_id] + ids


@pytest.mark.parametrize("name", list(GOLDEN))
def test_paper_prompt_is_the_references_string(name):
    doc_to_text, doc, expected = GOLDEN[name]
    assert doc_to_text(doc) == expected


@pytest.mark.parametrize("name", list(GOLDEN))
def test_paper_prompt_ids_are_the_references(name, tokenizer):
    doc_to_text, doc, _ = GOLDEN[name]
    prompt = doc_to_text(doc)
    sent = encode_raw_prompt(tokenizer, prompt, VISUAL_TOKENS, document_bos_id(tokenizer))
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expected = []
    for i in reference_ids(tokenizer, prompt):
        expected += [image_id] * VISUAL_TOKENS if i == IMAGE_INDEX else [i]
    assert sent == expected


def test_pope_prompt_ids_by_hand(tokenizer):
    """The POPE prompt's ids written out: "<s>", which Qwen2's BPE already holds as 128245 (so
    adding it makes no new id: only "<|endofchunk|>" is new, 151665), the image, then "\\n",
    "Question", ":", " Is", " there", ..."""
    assert len(tokenizer) == 151666 and tokenizer.convert_tokens_to_ids("<|endofchunk|>") == 151665
    assert document_bos_id(tokenizer) == 128245
    sent = encode_raw_prompt(tokenizer, GOLDEN["POPE"][2], 1, document_bos_id(tokenizer))
    assert sent == [128245, 151655, 198, 14582, 25, 2160, 1052, 264, 5562, 304, 279, 2168, 5267,
                    16141, 279, 3405, 1667, 264, 3175, 3409, 476, 17133, 624, 16141, 25]


def test_stop_ids_are_the_references_punctuation(tokenizer):
    """models/prismatic.py:47: in Qwen2's vocabulary 11 is ",", 13 "." and 198 a newline."""
    assert tokenizer.convert_ids_to_tokens([11, 13, 198]) == [",", ".", "Ċ"]
    assert set(paper.REFERENCE_STOP_IDS) >= {11, 13, 198} and len(paper.REFERENCE_STOP_IDS) == 13


def test_toy_tokenizer_uses_endoftext_as_bos(tmp_path):
    """A tokenizer without a BOS (Qwen2's own, the toy one) puts <|endoftext|> in front, the
    token every pretraining document starts with."""
    tok = build_qwen2_tokenizer(tmp_path, vocab_size=512)
    assert document_bos_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
