"""A Qwen2-format tokenizer built offline, for both scales.

    python -m oqvl.model.tokenizer --out results/tokenizer/full
    python -m oqvl.model.tokenizer --out results/tokenizer/toy --vocab-size 8192

Paper scale uses Qwen2.5-1.5B-Instruct's tokenizer. Its byte-level BPE ranks ship offline in the
`dashscope` wheel (`dashscope/resources/qwen.tiktoken`), so we convert them to a Hugging Face fast
tokenizer with the real ids, Qwen2's pre-tokenizer, its special tokens and Qwen2.5's chat template;
a real downloaded Qwen2.5 directory loads through the same `load_tokenizer`.

Toy scale keeps only the first K ranks (the 256 byte tokens come first, so any text still encodes)
and puts the same special tokens right after them, so prompts and chat templates are unchanged.
The CLI also writes OUT/manifest.json (work: the vocabulary size).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import time
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from ..manifest import args_config, manifest_path, write_manifest

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_TOKEN = "<|image_pad|>"  # the placeholder every visual token position gets

# Qwen2.5's added tokens in id order (151643..151664); the flag is its "special" attribute.
SPECIAL_TOKENS: list[tuple[str, bool]] = [
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    (VISION_START, True), (VISION_END, True),
    ("<|vision_pad|>", True), (IMAGE_TOKEN, True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
N_BPE = 151643  # ranks in qwen.tiktoken; the first special token gets this id

PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's template without the tool-calling branches. Every turn, the last included,
# ends with "<|im_end|>\n", so the generation prompt starts on its own line.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{- raise_exception('unsupported role: ' + message['role']) }}"
    "{%- elif not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def ranks_path() -> Path:
    """qwen.tiktoken inside the installed dashscope wheel (found without importing dashscope)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the dashscope package (which ships qwen.tiktoken) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the dashscope package")
    return path


def load_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one 'base64(token) rank' per line."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that makes each multi-byte token, in rank order.

    A token's merge is the last step of BPE on its bytes using only lower ranks: several splits into
    two known tokens can exist, and only that one reproduces tiktoken's encoding.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} cannot be built by merging lower ranks")
        merges.append((parts[0], parts[1]))
    return merges


def build_backend(ranks: dict[bytes, int]) -> Tokenizer:
    """A tokenizers BPE with Qwen2's pipeline (NFC, regex split, byte-level) and added tokens."""
    alphabet = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in derive_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    # Qwen2 NFC-normalises before splitting (as Qwen's own tiktoken tokenizer does).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in order, so they take ids len(vocab), len(vocab)+1, ...
    tok.add_tokens([AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False,
                               single_word=False) for t, s in SPECIAL_TOKENS])
    return tok


# Document tokens of packed captions, `BOS <image> "\n" caption EOS` (config pack.document_tokens):
#   project:   BOS = the tokenizer's own BOS, else <|endoftext|>; EOS = <|endoftext|>, Qwen2's
#              document separator (one token the base model knows for both ends);
#   reference: the reference adds "<|endofchunk|>" and "<s>" to Qwen2's tokenizer and makes "<s>"
#              its BOS (prismatic-vlms qwen2.py:58-59); EOS is the tokenizer's eos_token
#              (<|im_end|> for Qwen2.5-Instruct; sequence_packing_image_to_pil.py:170-171).
DOCUMENT_TOKENS = ("project", "reference")
REFERENCE_ADDED_TOKENS = ("<|endofchunk|>", "<s>")  # qwen2.py:58
REFERENCE_BOS = "<s>"                                # qwen2.py:59
REFERENCE_BPE_RANKS = {"<s>": 128245}                # those Qwen2's BPE already holds


def add_reference_tokens(tok, where) -> None:
    """Give `tok` the reference's added tokens and BOS; a token the vocabulary holds keeps its id
    (Qwen2's BPE has "<s>", 128245), a new one takes the next id, as transformers adds them."""
    before = tok.get_vocab()
    if REFERENCE_ADDED_TOKENS[0] in before:
        return  # already done (a tokenizer saved by a reference-convention run)
    tok.add_special_tokens({"additional_special_tokens": list(REFERENCE_ADDED_TOKENS)},
                           replace_extra_special_tokens=False)
    tok.bos_token = REFERENCE_BOS
    expected, new_id = [], len(before)
    for t in REFERENCE_ADDED_TOKENS:
        expected.append(before.get(t, new_id))
        new_id += t not in before
    ids = tok.convert_tokens_to_ids(list(REFERENCE_ADDED_TOKENS))
    if ids != expected:
        raise ValueError(f"{where}: added tokens got ids {ids}, expected {expected}")


def training_tokenizer(path, document_tokens: str = "project"):
    """The tokenizer a stage packs and trains with, under the configured document-token convention."""
    if document_tokens not in DOCUMENT_TOKENS:
        raise ValueError(f"document_tokens must be one of {DOCUMENT_TOKENS}, got {document_tokens!r}")
    tok = load_tokenizer(path)
    if document_tokens == "reference":
        add_reference_tokens(tok, path)
    return tok


def document_eos_id(tokenizer, document_tokens: str = "project") -> int:
    """The token that ends every packed caption document (see DOCUMENT_TOKENS)."""
    if document_tokens == "reference":
        if tokenizer.eos_token_id is None:
            raise ValueError("document_tokens reference ends documents with the tokenizer's eos_token, "
                             "and this tokenizer has none")
        return tokenizer.eos_token_id
    return tokenizer.convert_tokens_to_ids(ENDOFTEXT)


def document_bos_id(tokenizer) -> int:
    """The token in front of every document in pretraining and of every `paper`-protocol prompt:
    the tokenizer's BOS where it has one (the reference adds "<s>" to Qwen2's), else
    <|endoftext|>, Qwen2's document separator."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return tokenizer.convert_tokens_to_ids(ENDOFTEXT)


def check_fits(tokenizer, vocab_size: int, image_token_id: int, where) -> None:
    """A model's embedding holds every id of `tokenizer` and its <|image_pad|> is the tokenizer's;
    else one line naming `where` (the tokenizer) and the mismatch, before any training."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{where}: {len(tokenizer)} tokens, but the model embeds only {vocab_size} "
                         "(the model preset's lm.vocab_size and the tokenizer's vocab_size disagree)")
    got = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if got != image_token_id:
        raise ValueError(f"{where}: {IMAGE_TOKEN} has id {got}, but the model's image_token_id is "
                         f"{image_token_id} (the model preset and the tokenizer disagree)")


def toy_token_ids(vocab_size: int | None, document_tokens: str = "project") -> tuple[int, int]:
    """(tokens, <|image_pad|> id) of the tokenizer build_qwen2_tokenizer writes for vocab_size, as
    training_tokenizer loads it under `document_tokens`."""
    base = N_BPE if vocab_size is None else vocab_size
    tokens = base + len(SPECIAL_TOKENS)
    if document_tokens == "reference":  # the added tokens the kept BPE ranks do not hold
        tokens += sum(REFERENCE_BPE_RANKS.get(t, base) >= base for t in REFERENCE_ADDED_TOKENS)
    return tokens, base + [t for t, _ in SPECIAL_TOKENS].index(IMAGE_TOKEN)


def build_qwen2_tokenizer(out_dir, vocab_size: int | None = None, ranks_file=None):
    """Write a Qwen2-format tokenizer to out_dir and return it (loaded back from out_dir).

    vocab_size=None gives Qwen2's full vocabulary with the real ids; vocab_size=K keeps ranks
    0..K-1 and puts the special tokens at K, K+1, ...
    """
    from transformers import PreTrainedTokenizerFast

    ranks = load_ranks(Path(ranks_file) if ranks_file else ranks_path())
    if len(ranks) != N_BPE and ranks_file is None:
        raise ValueError(f"expected {N_BPE} ranks in qwen.tiktoken, found {len(ranks)}")
    if vocab_size is not None:
        if not 256 <= vocab_size <= len(ranks):
            raise ValueError(f"vocab_size must be in [256, {len(ranks)}], got {vocab_size}")
        ranks = {t: r for t, r in ranks.items() if r < vocab_size}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("ranks are not 0..n-1")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("not every byte has a token, so some text could not be encoded")

    specials = [t for t, s in SPECIAL_TOKENS if s and t != ENDOFTEXT]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_backend(ranks),
        bos_token=None, unk_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,  # as Qwen2.5-Instruct
        additional_special_tokens=specials, chat_template=CHAT_TEMPLATE,
        model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False,
        add_prefix_space=False, errors="replace",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The template goes into tokenizer_config.json, as in the released Qwen2.5 directories.
    hf.save_pretrained(out_dir, save_jinja_files=False)
    return load_tokenizer(out_dir)


def load_tokenizer(path):
    """A tokenizer directory (ours or a downloaded Qwen2.5 one), loaded offline with transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path} is not a tokenizer directory (no tokenizer.json, vocab.json "
                                f"or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers' errors are long; keep the path in front
        raise OSError(f"could not load a tokenizer from {path}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from e


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="keep only the first K BPE ranks (toy scale); default: all 151643")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = build_qwen2_tokenizer(args.out, args.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in SPECIAL_TOKENS}
    manifest = manifest_path(args.out)
    write_manifest(manifest, "tokenizer", work=(len(tok), "vocab entries"), config=args_config(args),
                   files=sorted(p for p in args.out.iterdir() if p.is_file() and p != manifest),
                   counts={"vocab": len(tok), "bpe": len(tok) - len(ids), "added": len(ids)})
    print(f"{args.out}: vocab {len(tok)} ({len(tok) - len(ids)} BPE + {len(ids)} added) "
          f"in {time.perf_counter() - t0:.1f}s")
    print(f"eos {tok.eos_token} = {tok.eos_token_id}, pad {tok.pad_token} = {tok.pad_token_id}")
    for t, i in ids.items():
        print(f"  {i:>6d}  {t}")


if __name__ == "__main__":
    main()
