"""Registration of the Baichuan classes with transformers' Auto classes.

The model and tokenizer modules register their classes when they are imported (the end of
`models/__init__.py`, the end of `tokenization_baichuan.py`). `import baichuan_tune` imports them at once
when transformers is already loaded, and otherwise as soon as transformers is imported, so the package
import needs neither torch nor transformers (the command line's `--help` stays fast).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

MODEL_MODULE = "baichuan_tune.models"


def register() -> None:
    """Make `Auto*.from_pretrained` resolve `model_type: baichuan` to this package (idempotent).

    Importing the model module registers the config and model classes and imports the tokenizer module,
    which registers the tokenizer. A module that is still being imported (this call came from inside it)
    is returned as it is and registers when its import ends.
    """
    importlib.import_module(MODEL_MODULE)


def register_models() -> None:
    """Called at the end of `models/__init__.py`: the config and model classes, then the tokenizer module."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .models import BaichuanConfig, BaichuanForCausalLM, BaichuanModel

    AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    importlib.import_module("baichuan_tune.models.tokenization_baichuan")  # registers itself at its end


class _AfterTransformers:
    """A meta path finder that finds nothing itself: it wraps transformers' own loader so that `register()`
    runs right after `import transformers` has executed (a one-shot post-import hook; the standard library
    has none)."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the finders after this one
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                register()

            spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    """Register now when transformers is loaded, otherwise right after it is imported."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
