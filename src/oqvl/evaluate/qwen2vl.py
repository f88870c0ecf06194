"""The lmms-eval model for a released Qwen2-VL checkpoint (registered as `oqvl_qwen2_vl`, see plugin.py).

    lmms-eval --model oqvl_qwen2_vl --model_args pretrained=models/Qwen2-VL-2B-Instruct,device=cuda \\
        --include_path results/eval_tasks --tasks oqvl_pope_paper,oqvl_pope_lmms --batch_size 16

A subclass of lmms-eval's own `qwen2_vl` model (lmms_eval.models.simple.qwen2_vl.Qwen2_VL), built on
transformers' Qwen2VLForConditionalGeneration and the checkpoint's processor, read from a local
directory (config.json, safetensors, tokenizer, processor and chat template; nothing is fetched).
model_args: those of lmms-eval's `qwen2_vl` (device default cpu here, device_map default the
device), and max_new_tokens (a cap on every task's generation length, as the `oqvl` model's; default
none).

- `lmms` tasks (every task not of the paper protocol) go to lmms-eval's Qwen2_VL.generate_until
  itself: its system prompt and chat template, its image handling (a JPEG of quality 85 in a data
  URL, read back by qwen_vl_utils, resized between its min_pixels 3136 and max_pixels 602112), its
  generation settings (128 new tokens where the task names none, stop at the tokenizer's EOS and
  the task's `until`). Two things are ours: the requests of each task go to it separately (its
  batches read every document through the first request's task, so a batch mixing a task and its
  shuffled-image twin would show the wrong images; one call per task keeps its code and gives
  each request its own image), and the max_new_tokens cap when one is set (none at paper scale).
- `paper` tasks (oqvl.evaluate.paper) are encoded and decoded as the `oqvl` model does for the
  reproduced checkpoint (oqvl.evaluate.adapter): the raw prompt the task builds, no chat template,
  the tokenizer's BOS in front (`document_bos_id`: Qwen2's tokenizer has none, so <|endoftext|>,
  which is also the bos_token_id of Qwen2-VL's config), each "<image>" written as Qwen2-VL's
  "<|vision_start|><|image_pad|><|vision_end|>" that its processor expands to the image's visual
  tokens; greedy, at most the task's 16 new tokens, stopped only by the reference's token ids
  (paper.REFERENCE_STOP_IDS, the stop token kept), decoded with special tokens skipped and
  stripped. The image goes through the checkpoint's own processor (its dynamic resolution and
  pixel limits, from the image as given). Log-likelihoods (POPE's likelihood scorer) likewise.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen2_vl import Qwen2_VL
from tqdm import tqdm
from transformers import AutoProcessor

from ..model.tokenizer import VISION_END, VISION_START, document_bos_id
from .paper import IMAGE, REFERENCE_STOP_IDS
from .plugin import QWEN2_VL_MODEL_ID as MODEL_ID
from .tasks import task_protocol

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's Qwen2_VL, where a task names no length


def is_paper(task: str) -> bool:
    return task_protocol(task) == "paper"


class Qwen2VL(Qwen2_VL):
    model_id = MODEL_ID

    def __init__(self, pretrained: str, device: str = "cpu", device_map: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str | None = None, **kwargs) -> None:
        super().__init__(pretrained=pretrained, device=device, device_map=device_map or device,
                         batch_size=batch_size, **kwargs)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "", "None") else None
        # The paper protocol's processor: the checkpoint's own settings (lmms-eval's Qwen2_VL
        # overrides its pixel limits, in self.processor).
        self.paper_processor = AutoProcessor.from_pretrained(pretrained, local_files_only=True)
        tok = self.paper_processor.tokenizer
        self.paper_tokenizer = tok
        self.image_text = VISION_START + self.paper_processor.image_token + VISION_END
        self.bos_id = document_bos_id(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.paper_stop_ids = sorted(i for i in REFERENCE_STOP_IDS if i < len(tok))

    def clean(self):
        """lmms-eval calls this after each evaluation to make room for a local judge model, and
        deletes the model; there is no judge here, so the model stays for the next evaluation."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- dispatch by protocol

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        paper = [i for i, r in enumerate(requests) if is_paper(r.args[4])]
        for i, text in zip(paper, self._paper_generate([requests[i] for i in paper])):
            out[i] = text
        by_task: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            if not is_paper(r.args[4]):
                by_task.setdefault(r.args[4], []).append(i)
        for indices in by_task.values():  # lmms-eval's own code, one task at a time
            chosen = [requests[i] for i in indices]
            if self.max_new_tokens is not None:
                for r in chosen:
                    gen_kwargs = r.args[1]
                    gen_kwargs["max_new_tokens"] = min(int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                                                       self.max_new_tokens)
            for i, text in zip(indices, super().generate_until(chosen)):
                out[i] = text
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        if not all(is_paper(r.args[4]) for r in requests):
            return super().loglikelihood(requests)  # lmms-eval's Qwen2_VL has none: it raises
        return self._paper_loglikelihood(requests)

    # ---- the paper protocol

    def _paper_inputs(self, context: str, visuals, task: str) -> dict:
        """The raw prompt with the BOS in front, each <image> as Qwen2-VL's vision tokens, through
        the checkpoint's processor: input_ids, attention_mask, mm_token_type_ids (each 1-D), and
        pixel_values and image_grid_thw when there are images."""
        visuals = [v for v in (visuals or []) if v is not None]
        if any(not hasattr(v, "convert") for v in visuals):
            raise ValueError(f"{MODEL_ID} model takes images only under the paper protocol (no video or audio)")
        if context.count(IMAGE) != len(visuals):
            raise ValueError(f"{task}: prompt has {context.count(IMAGE)} {IMAGE} but {len(visuals)} images came")
        text = context.replace(IMAGE, self.image_text)
        images = [v.convert("RGB") for v in visuals] or None
        enc = self.paper_processor(text=[text], images=images, return_tensors="pt")
        first = {"input_ids": self.bos_id, "attention_mask": 1, "mm_token_type_ids": 0}
        item = {k: torch.cat([enc[k][0].new_tensor([v]), enc[k][0]]) for k, v in first.items()}
        if images:
            item["pixel_values"], item["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        return item

    @staticmethod
    def _key(item: dict) -> tuple:
        """Identifies a model input: its ids and pixels (a question asked twice about the same
        picture, as POPE asks each yes question under all three samplings, is computed once)."""
        if "pixel_values" not in item:
            return tuple(item["input_ids"].tolist()), b""
        digest = hashlib.blake2b(item["pixel_values"].contiguous().numpy().tobytes(), digest_size=16)
        digest.update(item["image_grid_thw"].numpy().tobytes())
        return tuple(item["input_ids"].tolist()), digest.digest()

    def _batch(self, items: list[dict], left: bool) -> dict:
        """Items padded to one width (left for generation, right for scoring), images concatenated
        in order, on the model's device."""
        width = max(len(it["input_ids"]) for it in items)
        batch = {"input_ids": torch.full((len(items), width), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(items), width), dtype=torch.long),
                 "mm_token_type_ids": torch.zeros((len(items), width), dtype=torch.long)}
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            cols = slice(width - n, width) if left else slice(0, n)
            for k in batch:
                batch[k][b, cols] = it[k]
        with_images = [it for it in items if "pixel_values" in it]
        if with_images:
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def _paper_generate(self, requests: list[Instance]) -> list[str]:
        groups: dict[int, dict] = {}  # max new tokens -> input key -> (item, request indices)
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
                raise ValueError(f"{MODEL_ID} model decodes the paper protocol greedily only")
            max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            if self.max_new_tokens is not None:
                max_new = min(max_new, self.max_new_tokens)
            item = self._paper_inputs(context, doc_to_visual(self.task_dict[task][split][doc_id]), task)
            groups.setdefault(max_new, {}).setdefault(self._key(item), (item, []))[1].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"{MODEL_ID} paper generate", mininterval=5)
        for max_new, inputs in groups.items():
            entries = sorted(inputs.values(), key=lambda e: -len(e[0]["input_ids"]))
            for start in range(0, len(entries), self.batch_size):
                chunk = entries[start:start + self.batch_size]
                batch = self._batch([item for item, _ in chunk], left=True)
                ids = self.model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new,
                                          eos_token_id=self.paper_stop_ids, pad_token_id=self.pad_id,
                                          repetition_penalty=1.0, use_cache=True)
                texts = self.paper_tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)
                for (_, indices), text in zip(chunk, texts):
                    for i in indices:
                        out[i] = text.strip()
                        self.cache_hook.add_partial("generate_until", requests[i].args[:2], out[i])
                    bar.update(len(indices))
        bar.close()
        return out

    @torch.no_grad()
    def _paper_loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | raw prompt, images) and whether greedy decoding gives it; requests
        that differ only in a one-token continuation (POPE's "Yes" / "No") share a forward pass."""
        wanted, sequences = [], {}
        for i, req in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            cont = self.paper_tokenizer(str(continuation), add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"empty continuation {continuation!r} in request {i}")
            item = self._paper_inputs(context, doc_to_visual(doc), task)
            n_ctx = len(item["input_ids"])
            extra = torch.tensor(cont[:-1], dtype=item["input_ids"].dtype)
            item = {**item, "input_ids": torch.cat([item["input_ids"], extra]),
                    "attention_mask": torch.cat([item["attention_mask"], torch.ones_like(extra)]),
                    "mm_token_type_ids": torch.cat([item["mm_token_type_ids"], torch.zeros_like(extra)])}
            key = self._key(item)
            sequences.setdefault(key, item)
            wanted.append((i, key, n_ctx, cont))
        keys = sorted(sequences, key=lambda k: -len(k[0]))
        logits = {}
        for start in tqdm(range(0, len(keys), self.batch_size), desc=f"{MODEL_ID} paper loglikelihood",
                          mininterval=5):
            chunk = keys[start:start + self.batch_size]
            batch = self._batch([sequences[k] for k in chunk], left=False)
            out = self.model(**batch, use_cache=False).logits
            for b, k in enumerate(chunk):
                logits[k] = out[b, :len(k[0])]
        results = []
        for i, key, n_ctx, cont in wanted:
            logp = F.log_softmax(logits[key][n_ctx - 1:n_ctx - 1 + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            result = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
            self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], result)
            results.append(result)
        return results
