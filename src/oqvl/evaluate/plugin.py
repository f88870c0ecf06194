"""Registration of the project's models with lmms-eval (entry-point group `lmms_eval.models`):
`oqvl` (this project's checkpoints, adapter.py) and `oqvl_qwen2_vl` (a released Qwen2-VL
checkpoint, qwen2vl.py).

lmms-eval 0.7.3 resolves model names through manifests; `@register_model` alone does not reach its
CLI. Kept apart from the models so that listing models does not import torch and the model code.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "oqvl"
QWEN2_VL_MODEL_ID = "oqvl_qwen2_vl"


def lmms_eval_models() -> list[ModelManifest]:
    return [ModelManifest(model_id=MODEL_ID, simple_class_path="oqvl.evaluate.adapter.OQVL"),
            ModelManifest(model_id=QWEN2_VL_MODEL_ID, simple_class_path="oqvl.evaluate.qwen2vl.Qwen2VL")]
