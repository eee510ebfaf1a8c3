"""The Baichuan model family, registered with transformers' Auto classes on import."""

from .configuration_baichuan import BaichuanConfig
from .modeling_baichuan import BaichuanForCausalLM, BaichuanModel, NormHead, alibi_slopes

__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel", "NormHead", "alibi_slopes"]

from .._register import register_models as _register_models  # noqa: E402  (needs the classes above)

_register_models()
