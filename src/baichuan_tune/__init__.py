"""baichuan-tune: fine-tune, align, evaluate and serve the Baichuan LLM family.

Importing the package registers `model_type: baichuan` with transformers, so that
`AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` load the published checkpoint folders
as they are, without `trust_remote_code` and without network. The import itself stays light (no torch,
no transformers, so `baichuan-tune --help` answers at once): when transformers is already imported the
classes register now, otherwise they register as soon as transformers is imported.
"""

from ._register import register, register_when_transformers_loads

__version__ = "0.1.0"
__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel", "register", "__version__"]
_MODEL_CLASSES = ("BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel")


def __getattr__(name: str):
    # The model classes import torch and transformers: only when they are asked for.
    if name in _MODEL_CLASSES:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_when_transformers_loads()
