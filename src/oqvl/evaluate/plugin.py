"""Registration of the `oqvl` model with lmms-eval (entry-point group `lmms_eval.models`).

lmms-eval 0.7.3 resolves model names through manifests; `@register_model` alone does not reach its
CLI. Kept apart from adapter.py so that listing models does not import torch and the model code.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "oqvl"


def lmms_eval_models() -> ModelManifest:
    return ModelManifest(model_id=MODEL_ID, simple_class_path="oqvl.evaluate.adapter.OQVL")
