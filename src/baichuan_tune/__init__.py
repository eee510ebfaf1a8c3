"""baichuan-tune: fine-tune, align, evaluate and serve the Baichuan LLM family.

Importing the package registers `model_type: baichuan` with transformers, so that
`AutoConfig`, `AutoModelForCausalLM` and `AutoTokenizer` load the published checkpoint folders
as they are, without `trust_remote_code` and without network.
"""

from ._register import register
from .models import BaichuanConfig, BaichuanForCausalLM, BaichuanModel

__version__ = "0.1.0"
__all__ = ["BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel", "register", "__version__"]

register()
