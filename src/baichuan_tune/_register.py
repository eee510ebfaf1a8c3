"""Registration of the Baichuan classes with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models import BaichuanConfig, BaichuanForCausalLM, BaichuanModel

_done = False


def register() -> None:
    """Make `Auto*.from_pretrained` resolve `model_type: baichuan` to this package (idempotent)."""
    global _done
    if _done:
        return
    AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
    AutoModel.register(BaichuanConfig, BaichuanModel, exist_ok=True)
    AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
    _register_tokenizer()
    _done = True


def _register_tokenizer() -> None:
    try:
        from .models.tokenization_baichuan import register_tokenizer
    except ImportError:  # the tokenizer module is optional until it exists
        return
    register_tokenizer()
