"""The lmms-eval model for the project's checkpoints (registered as `oqvl`, see plugin.py).

    lmms-eval --model oqvl --model_args pretrained=results/runs/RUN/seed0/sft/final,max_new_tokens=32 \
        --include_path results/eval_tasks --tasks oqvl_mmbench_paper --batch_size 32

model_args: pretrained (a checkpoint directory: config.json, model.safetensors and the tokenizer
files), device (cpu, cuda, cuda:N), dtype (float32 | bfloat16 | float16; default float32 on the CPU,
bfloat16 on a GPU), visual_tokens (default: the checkpoint's visual_tokens_sft), max_new_tokens (a
cap on every task's generation length; default none: the task's own, 1024 if it names none),
feature_cache (visual tokens of this many images kept for reuse, by image content; 0: none).

Prompts and decoding follow the task's protocol, read from its name (oqvl.evaluate.tasks):
- `paper` (oqvl.evaluate.paper): the raw prompt the task builds, "<image>" where the image goes,
  with the model's BOS in front (`document_bos_id`); greedy, stopped by the reference's token ids
  (paper.REFERENCE_STOP_IDS; the stop token stays in the text), decoded with special tokens
  skipped and stripped.
- any other task (`lmms`, lmms-eval's own): "<image>\\n" per image followed by lmms-eval's context,
  encoded as one user turn with the chat template (`oqvl.model.chat.encode_prompt`, as in SFT);
  greedy, stopped at <|im_end|> or <|endoftext|>, and the text cut at the first of the task's
  `until` strings (a token that contains one of them also ends decoding).
Decoding uses a KV cache, batched with left padding. Log-likelihoods are batched with right
padding, which a causal model cannot see.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, defaultdict

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from ..model.chat import IMAGE_PLACEHOLDER, encode_prompt, encode_raw_prompt
from ..model.tokenizer import ENDOFTEXT, IM_END, document_bos_id, load_tokenizer
from ..model.vlm import OpenQwen2VL
from .paper import REFERENCE_STOP_IDS
from .tasks import task_protocol

DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's own models use when a task names no length
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CachedVisionVLM(OpenQwen2VL):
    """The model with its visual tokens remembered per image (by content): benchmarks ask several
    questions about one picture (MMBench's circular copies, POPE's 18 per image, each protocol and
    the control again), and the frozen vision tower would otherwise see it every time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.feature_cache_size = 0
        self._feature_cache: OrderedDict = OrderedDict()

    def encode_images(self, images: torch.Tensor, visual_tokens: int | None = None) -> torch.Tensor:
        if not self.feature_cache_size or self.training:
            return super().encode_images(images, visual_tokens)
        visual_tokens = visual_tokens or self.visual_tokens
        cache = self._feature_cache
        keys = [(visual_tokens, hashlib.blake2b(im.detach().contiguous().view(torch.uint8).cpu().numpy(),
                                                digest_size=16).digest()) for im in images]
        first = {}  # one computation per distinct image not seen yet
        for i, k in enumerate(keys):
            if k not in cache and k not in first:
                first[k] = i
        if first:
            feats = super().encode_images(images[list(first.values())], visual_tokens)
            cache.update(zip(first, feats))
        out = torch.stack([cache[k] for k in keys])
        for k in keys:
            cache.move_to_end(k)
        while len(cache) > self.feature_cache_size:
            cache.popitem(last=False)
        return out


class OQVL(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1,
                 dtype: str | None = None, visual_tokens: int | str | None = None,
                 max_new_tokens: int | str | None = None, feature_cache: int | str = 1024,
                 **kwargs) -> None:
        super().__init__()
        unknown = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
        if unknown:
            raise ValueError(f"oqvl model: unknown model_args {sorted(unknown)}")
        self.device = torch.device(device or "cpu")
        dtype = dtype or ("float32" if self.device.type == "cpu" else "bfloat16")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = CachedVisionVLM.from_pretrained(pretrained, device=self.device).to(DTYPES[dtype]).eval()
        self.model.feature_cache_size = int(feature_cache)
        self.tokenizer = load_tokenizer(pretrained)
        self.transform = self.model.image_transform()
        self.visual_tokens = int(visual_tokens) if visual_tokens not in (None, "") else \
            self.model.config.visual_tokens_sft
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "", "None") else None
        self.batch_size = max(1, int(batch_size or 1))
        self.stop_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in (IM_END, ENDOFTEXT)}
        self.bos_id = document_bos_id(self.tokenizer)
        self.paper_stop_ids = {i for i in REFERENCE_STOP_IDS if i < len(self.tokenizer)}
        self._stop_cache: dict[tuple[str, ...], set[int]] = {}

    def clean(self):
        """lmms-eval calls this after each evaluation to make room for a local judge model, and
        deletes the model; there is no judge here, so the model stays for the next evaluation."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- inputs

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _inputs(self, context: str, visuals, task: str) -> tuple[list[int], torch.Tensor | None]:
        """Prompt ids (the task's protocol's encoding, image slots) and the stacked image tensor."""
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError("oqvl model takes images only (no video or audio)")
        paper = is_paper(task)
        if IMAGE_PLACEHOLDER not in context and not paper:
            context = f"{IMAGE_PLACEHOLDER}\n" * len(visuals) + context
        n_slots = context.count(IMAGE_PLACEHOLDER)
        if n_slots != len(visuals):
            raise ValueError(f"{task}: prompt has {n_slots} {IMAGE_PLACEHOLDER} but {len(visuals)} images came")
        if paper:
            ids = encode_raw_prompt(self.tokenizer, context, self.visual_tokens, self.bos_id,
                                    projector=self.model.config.projector)
        else:
            ids = encode_prompt(self.tokenizer, context, self.visual_tokens, projector=self.model.config.projector)
        images = torch.stack([self.transform(v.convert("RGB")) for v in visuals]) if visuals else None
        return ids, images

    @staticmethod
    def _content_key(ids, images) -> tuple:
        """Identifies a model input: prompt ids and image pixels (a question asked twice about the
        same picture, as POPE asks each yes question under all three samplings, is computed once)."""
        if images is None:
            return tuple(ids), b""
        return tuple(ids), hashlib.blake2b(images.contiguous().numpy(), digest_size=16).digest()

    def _images(self, batch_images):
        present = [x for x in batch_images if x is not None]
        if not present:
            return None
        dtype = next(self.model.parameters()).dtype
        return torch.cat(present).to(self.device, dtype)

    # ---- generation

    def _stop_token_ids(self, until: tuple[str, ...]) -> set[int]:
        """<|im_end|>, <|endoftext|>, and every token whose text contains a stop string."""
        if until not in self._stop_cache:
            ids = set(self.stop_ids)
            if until:
                texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
                ids |= {i for i, t in enumerate(texts) if any(u in t for u in until)}
            self._stop_cache[until] = ids
        return self._stop_cache[until]

    def _generate(self, prompts: list[list[int]], images: list, gen_kwargs: dict, task: str) -> list[str]:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            raise ValueError("oqvl model decodes greedily only (do_sample false, temperature 0)")
        paper = is_paper(task)
        until = () if paper else gen_kwargs.get("until") or []
        until = tuple([until] if isinstance(until, str) else until)
        max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            max_new = min(max_new, self.max_new_tokens)
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        stops = self.paper_stop_ids if paper else self._stop_token_ids(until)
        new = self.model.generate(ids.to(self.device), self._images(images), max_new_tokens=max_new,
                                  stop_token_ids=stops,
                                  attention_mask=mask.to(self.device) if len(prompts) > 1 else None,
                                  visual_tokens=self.visual_tokens)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        if paper:
            return [t.strip() for t in texts]
        return [cut_at_stop(t, until) for t in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        groups = defaultdict(dict)  # (settings, protocol) -> input key -> (ids, images, request indices)
        kwargs_of = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            ids, images = self._inputs(context, doc_to_visual(self._doc(task, split, doc_id)), task)
            settings = (json.dumps(gen_kwargs, sort_keys=True, default=str), is_paper(task))
            kwargs_of.setdefault(settings, (gen_kwargs, task))
            entry = groups[settings].setdefault(self._content_key(ids, images), (ids, images, []))
            entry[2].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="oqvl generate", mininterval=5)
        for settings, inputs in groups.items():
            items = sorted(inputs.values(), key=lambda it: -len(it[0]))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                gen_kwargs, task = kwargs_of[settings]
                texts = self._generate([it[0] for it in chunk], [it[1] for it in chunk], dict(gen_kwargs), task)
                for (_, _, indices), text in zip(chunk, texts):
                    for i in indices:
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                    bar.update(len(indices))
        bar.close()
        return out

    # ---- likelihood

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | context, images) and whether greedy decoding gives it. The last
        continuation token is never an input, so requests that share a context and image and differ
        only in a one-token continuation (POPE's "Yes" / "No") share one forward pass."""
        wanted = []  # (request, sequence key, context length, continuation ids)
        sequences = {}  # key -> (input ids, images)
        for i, req in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            cont = self.tokenizer(str(continuation), add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} in request {i}")
            ctx, images = self._inputs(context, doc_to_visual(doc), task)
            key = self._content_key(ctx + cont[:-1], images)
            sequences.setdefault(key, (ctx + cont[:-1], images))
            wanted.append((i, key, len(ctx), cont))
        keys = sorted(sequences, key=lambda k: -len(k[0]))
        hidden = {}
        for start in tqdm(range(0, len(keys), self.batch_size), desc="oqvl loglikelihood", mininterval=5):
            chunk = keys[start:start + self.batch_size]
            for key, h in zip(chunk, self._hidden([sequences[k] for k in chunk])):
                hidden[key] = h
        out = []
        for i, key, n_ctx, cont in wanted:
            h = hidden[key][n_ctx - 1: n_ctx - 1 + len(cont)]
            logp = F.log_softmax(self.model.lm.lm_head(h).float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            result = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
            self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], result)
            out.append(result)
        return out

    @torch.no_grad()
    def _hidden(self, items) -> list[torch.Tensor]:
        """Last hidden states of each (ids, images), batched with right padding (a causal model
        never sees tokens after a position, so padding there changes nothing)."""
        width = max(len(ids) for ids, _ in items)
        batch = torch.full((len(items), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for b, (ids, _) in enumerate(items):
            batch[b, :len(ids)] = torch.tensor(ids)
        hidden = self.model(batch.to(self.device), self._images([im for _, im in items]),
                            visual_tokens=self.visual_tokens).hidden_states
        return [hidden[b, :len(ids)] for b, (ids, _) in enumerate(items)]

    # ---- multi-round

    def generate_until_multi_round(self, requests: list[Instance]) -> list:
        """Each request: a first answer to its context, then as many rounds as the task's
        doc_to_text asks for (it gets the answers so far and returns the next context, or the
        signal to stop), one greedy generation per round."""
        results = []
        for req in tqdm(requests, desc="oqvl multi-round", mininterval=5):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals, answers, info, round_idx = doc_to_visual(doc), [], None, 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, answers, info = doc_to_text(
                        doc, previous_output=answers, round_idx=round_idx, previous_round_info=info)
                    answers = list(answers)
                    if terminal:
                        break
                ids, images = self._inputs(context, visuals, task)
                answers.append(self._generate([ids], [images], dict(gen_kwargs), task)[0])
                round_idx += 1
            results.append(list(answers))  # a list: lmms-eval reads a 2-tuple as (text, token counts)
        return results


def is_paper(task: str) -> bool:
    """Whether a task is scored under the `paper` protocol (raw prompts, the reference's decoding)."""
    return task_protocol(task) == "paper"


def cut_at_stop(text: str, until) -> str:
    """The text before the first occurrence of any stop string."""
    cut = len(text)
    for u in until:
        if u:
            at = text.find(u)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]
