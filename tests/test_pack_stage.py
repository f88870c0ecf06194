"""The pack stage: real mixture shards tokenized and packed first-fit-decreasing into sequences."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import toy_mixture

from oqvl.model.tokenizer import ENDOFTEXT, build_qwen2_tokenizer
from oqvl.pack import build
from oqvl.shards import iter_samples, sample_caption, sample_meta, shard_paths

RATES = {"empty_caption": 0.05, "generic_caption": 0.05, "wrong_count": 0.1}
N_PAIRS = 40
VISUAL = 16
CONTEXT = 128


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    build_qwen2_tokenizer(out, vocab_size=8192)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from oqvl.model.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A real mixture of one toy source (40 pairs, every pair kept) in 5 small shards."""
    return toy_mixture(tmp_path_factory.mktemp("packsrc"), N_PAIRS, 9, rates=RATES)


@pytest.fixture(scope="module")
def captions(shards):
    return {str(sample_meta(s)["uid"]): sample_caption(s) for s in iter_samples(shard_paths(shards))}


def run_pack(shards, tokenizer_dir, out, context_len=CONTEXT, scope="per_shard", too_long="drop"):
    build.main(["--shards", str(shards), "--tokenizer", str(tokenizer_dir), "--visual-tokens", str(VISUAL),
                "--context-len", str(context_len), "--scope", scope, "--too-long", too_long,
                "--out", str(out)])
    return (pd.read_parquet(out / "documents.parquet"), pd.read_parquet(out / "sequences.parquet"),
            json.loads((out / "stats.json").read_text()))


@pytest.fixture(scope="module")
def packed(shards, tokenizer_dir, tmp_path_factory):
    return run_pack(shards, tokenizer_dir, tmp_path_factory.mktemp("packed"))


def check_sequences(docs, seqs, context_len):
    """Every document exactly once; lengths fit; offsets are the running sums; docs/uids agree."""
    all_uids = [u for us in seqs["uids"] for u in us]
    assert sorted(all_uids) == sorted(docs["uid"]) and len(all_uids) == len(set(all_uids))
    length_of = docs.set_index("uid")["length"]
    shard_of = docs.set_index("uid")["shard"]
    for row in seqs.itertuples():
        lengths = np.asarray(row.lengths)
        assert len(row.uids) == len(lengths) == len(row.offsets) == len(row.docs) > 0
        assert lengths.sum() <= context_len
        assert list(row.offsets) == [0, *np.cumsum(lengths)[:-1].tolist()]
        assert lengths.tolist() == length_of[list(row.uids)].tolist()
        assert docs["uid"].to_numpy()[np.asarray(row.docs)].tolist() == list(row.uids)
        if row.group != "all":  # per-shard scope: a sequence never mixes shards
            assert set(shard_of[list(row.uids)]) == {row.group}
    assert seqs["seq"].tolist() == list(range(len(seqs)))


def test_every_document_is_packed_once_and_fits(packed, captions):
    docs, seqs, stats = packed
    assert len(docs) == N_PAIRS and set(docs["uid"]) == set(captions)
    check_sequences(docs, seqs, CONTEXT)
    assert stats["documents_in"] == stats["documents_packed"] == N_PAIRS
    assert stats["too_long"] == {"count": 0, "handling": "drop"}
    assert (docs["key"] == docs["uid"]).all()  # mixture sample key = uid
    assert docs["shard"].nunique() == 5
    assert set(seqs["group"]) == set(docs["shard"])


def test_documents_are_bos_image_newline_caption_eos(packed, captions, tokenizer):
    docs, _, stats = packed
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    assert eos == 8192  # the first special token right after the toy BPE ranks
    assert "" in captions.values()  # an empty caption is still a document: "\n" + EOS
    for doc in docs.itertuples():
        ids = list(doc.text_ids)
        assert doc.length == 1 + VISUAL + len(ids)
        assert ids[-1] == eos and eos not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == "\n" + captions[doc.uid]
        assert ids[:-1] == tokenizer("\n" + captions[doc.uid], add_special_tokens=False)["input_ids"]
    assert stats["text_tokens"] == sum(len(t) for t in docs["text_ids"])


def test_stats_fill_and_padding(packed):
    docs, seqs, stats = packed
    real = int(docs["length"].sum())
    n = len(seqs)
    assert stats["real_tokens"] == real and stats["sequences"] == n
    assert stats["padding_tokens"] == n * CONTEXT - real
    assert stats["padding_tokens"] == sum(CONTEXT - int(np.sum(ls)) for ls in seqs["lengths"])
    assert stats["fill_ratio"] == round(real / (n * CONTEXT), 4)
    assert stats["context_len"] == CONTEXT and stats["visual_tokens"] == VISUAL
    by_scope = stats["fill_by_scope"]
    assert set(by_scope) == {"per_shard", "mixture"}
    assert by_scope["per_shard"] == {"sequences": n, "fill_ratio": stats["fill_ratio"]}
    assert by_scope["mixture"]["sequences"] <= n
    assert by_scope["mixture"]["fill_ratio"] >= by_scope["per_shard"]["fill_ratio"]
    assert by_scope["mixture"]["fill_ratio"] == round(real / (by_scope["mixture"]["sequences"] * CONTEXT), 4)


def test_mixture_scope(shards, tokenizer_dir, packed, tmp_path):
    docs, seqs, stats = run_pack(shards, tokenizer_dir, tmp_path, scope="mixture")
    check_sequences(docs, seqs, CONTEXT)
    assert set(seqs["group"]) == {"all"}
    assert stats["scope"] == "mixture"
    assert {"sequences": stats["sequences"], "fill_ratio": stats["fill_ratio"]} == stats["fill_by_scope"]["mixture"]
    assert stats["fill_by_scope"] == packed[2]["fill_by_scope"]  # both scopes are always reported
    pd.testing.assert_frame_equal(docs, packed[0])


def test_too_long_documents_are_dropped_and_counted(shards, tokenizer_dir, packed, tmp_path):
    context = 40
    full = packed[0]
    over = set(full.loc[full["length"] > context, "uid"])
    assert 0 < len(over) < len(full)  # the toy captions straddle the limit
    docs, seqs, stats = run_pack(shards, tokenizer_dir, tmp_path, context_len=context, too_long="drop")
    assert set(docs["uid"]) == set(full["uid"]) - over
    check_sequences(docs, seqs, context)
    assert stats["too_long"] == {"count": len(over), "handling": "drop"}
    assert stats["documents_in"] == N_PAIRS and stats["documents_packed"] == N_PAIRS - len(over)
    assert stats["real_tokens"] == int(full.loc[~full["uid"].isin(over), "length"].sum())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stage"] == "pack" and manifest["work"] == {"amount": N_PAIRS - len(over), "unit": "documents"}
    assert set(manifest["files"]) == {"documents.parquet", "sequences.parquet", "stats.json"}
    assert manifest["counts"]["documents_in"] == N_PAIRS and manifest["config"]["too_long"] == "drop"
    assert list(manifest["inputs"]) == [str(tokenizer_dir / "tokenizer.json")]


def test_too_long_documents_are_truncated_and_counted(shards, tokenizer_dir, packed, tokenizer, tmp_path):
    context = 40
    full = packed[0].set_index("uid")
    over = set(full.index[full["length"] > context])
    docs, seqs, stats = run_pack(shards, tokenizer_dir, tmp_path, context_len=context, too_long="truncate")
    assert sorted(docs["uid"]) == sorted(full.index)
    check_sequences(docs, seqs, context)
    assert stats["too_long"] == {"count": len(over), "handling": "truncate"}
    assert stats["documents_in"] == stats["documents_packed"] == N_PAIRS
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    for doc in docs.itertuples():
        ids, orig = list(doc.text_ids), list(full.at[doc.uid, "text_ids"])
        assert doc.length == 1 + VISUAL + len(ids) <= context
        if doc.uid in over:
            assert doc.length == context
            assert ids[-1] == eos and ids[:-1] == orig[: len(ids) - 1]  # caption cut, EOS kept last
        else:
            assert ids == orig and doc.length == full.at[doc.uid, "length"]
    assert stats["real_tokens"] == int(docs["length"].sum())


def test_truncate_needs_room_for_the_image(packed):
    docs = packed[0]
    longest = docs.loc[[docs["length"].idxmax()]].reset_index(drop=True)
    with pytest.raises(ValueError, match="cannot hold one image"):
        build.fit_lengths(longest, 1 + VISUAL, "truncate")
    kept, n = build.fit_lengths(longest, 2 + VISUAL, "truncate")  # room for EOS alone
    assert n == 1 and kept.at[0, "length"] == 2 + VISUAL
    assert kept.at[0, "text_ids"].tolist() == [longest.at[0, "text_ids"][-1]]


def test_truncate_down_to_eos_alone_end_to_end(shards, tokenizer_dir, tokenizer, tmp_path):
    # context = BOS + image + EOS: every caption (even an empty one, "\n") is cut to EOS alone.
    docs, seqs, stats = run_pack(shards, tokenizer_dir, tmp_path, context_len=VISUAL + 2,
                                 too_long="truncate")
    eos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    assert [list(t) for t in docs["text_ids"]] == [[eos]] * N_PAIRS
    assert (docs["length"] == VISUAL + 2).all() and stats["text_tokens"] == N_PAIRS
    assert stats["too_long"]["count"] == N_PAIRS and stats["sequences"] == N_PAIRS
    assert stats["fill_ratio"] == 1.0 and stats["padding_tokens"] == 0
    check_sequences(docs, seqs, VISUAL + 2)


def test_missing_tokenizer_names_the_path(shards, tmp_path):
    missing = tmp_path / "no_tokenizer_here"
    with pytest.raises(SystemExit) as e:
        build.main(["--shards", str(shards), "--tokenizer", str(missing), "--visual-tokens", "16",
                    "--context-len", "128", "--out", str(tmp_path / "out")])
    assert str(missing) in str(e.value.code)
    assert not (tmp_path / "out" / "stats.json").exists()


def test_sequences_materialise_padded_with_the_real_pad_token(tmp_path_factory):
    # The index round-trips into token ids: each document at its offset, the tail padded with
    # the tokenizer's own pad token, doc ids -1 on padding.
    from oqvl.model.tokenizer import IMAGE_TOKEN
    from oqvl.pack.sequence import sequence_tokens

    tok_dir = tmp_path_factory.getbasetemp() / "tok_materialise"
    tok = build_qwen2_tokenizer(tok_dir, vocab_size=8192)
    docs = pd.DataFrame({"text_ids": [np.array([10, 11, tok.pad_token_id], dtype=np.int32),
                                      np.array([12, tok.pad_token_id], dtype=np.int32)]})
    bos, img, pad = (tok.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IMAGE_TOKEN, ENDOFTEXT))
    assert pad == tok.pad_token_id
    ids, doc_ids = sequence_tokens([1, 0], list(docs["text_ids"]), 16, 2, bos, img, pad)
    assert ids.tolist() == [bos, img, img, 12, pad, bos, img, img, 10, 11, pad] + [pad] * 5
    assert doc_ids.tolist() == [0] * 5 + [1] * 6 + [-1] * 5
    with pytest.raises(ValueError, match="context_len"):
        sequence_tokens([0, 1], list(docs["text_ids"]), 10, 2, bos, img, pad)
