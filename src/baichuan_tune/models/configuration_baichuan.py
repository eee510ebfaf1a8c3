"""`BaichuanConfig`: one config for Baichuan-7B, Baichuan-13B and Baichuan2-7B/13B.

The published `config.json` files carry no field that names the variant, so the three variant fields
below are inferred when absent (see `infer_variant` and `infer_norm_head`) and written out explicitly on
save. The authors' code ignores the extra fields, so a config this project saves still loads there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

# Vocabulary sizes of the two published tokenizers: Baichuan2's (only Baichuan2 has NormHead) and Baichuan-1's.
BAICHUAN2_VOCAB_SIZE = 125696
BAICHUAN1_VOCAB_SIZE = 64000
POSITION_EMBEDDINGS = ("rope", "alibi")
# Largest sizes a config may ask for: far above every published model (hidden 5120, 40 layers, FFN 13696,
# vocabulary 125,696, context 4096/8192), small enough that a typo fails at once instead of hanging the
# load while memory grows or overflowing a storage size.
SIZE_LIMITS = {
    "vocab_size": 1_048_576,
    "hidden_size": 65_536,
    "intermediate_size": 262_144,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "max_position_embeddings": 1_048_576,
    "model_max_length": 1_048_576,
}


def size_problem(fields: Mapping) -> str | None:
    """What is wrong with the sizes in `fields` (a config's keys), or None: one field, its value and the limit."""
    for key, limit in SIZE_LIMITS.items():
        value = fields.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            continue  # absent, null or of another type: the type checks report it
        if value < 1:
            return f"{key} must be a positive integer, got {value}"
        if value > limit:
            return f"{key} is {value:,}; at most {limit:,} is supported (the published models use far less)"
    hidden, heads = fields.get("hidden_size"), fields.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:
        return f"hidden_size {hidden} is not divisible by num_attention_heads {heads}"
    return None


def infer_variant(max_position_embeddings, model_max_length, vocab_size) -> tuple[str, bool]:
    """(position_embedding, norm_head) from the fields a published config.json has.

    The RoPE models (Baichuan-7B, Baichuan2-7B) give `max_position_embeddings`; the ALiBi models
    (Baichuan-13B, Baichuan2-13B) give only `model_max_length`. NormHead came with Baichuan2, whose
    tokenizer has 125,696 pieces (`infer_norm_head` weighs every other hint too).
    """
    position = "rope" if max_position_embeddings is not None or model_max_length is None else "alibi"
    return position, vocab_size == BAICHUAN2_VOCAB_SIZE


# ----------------------------------------------------------------------------- NormHead or not

# Ranks of the hints, strongest first: a field only one family's code writes, the tokenizer file beside the
# config, the vocabulary size, tokenizer_class; then the weak ones, which alone give only a guess.
CODE, TOKENIZER_FILE, VOCAB, TOKENIZER_CLASS, WEAK = range(5)


def _family(norm_head: bool) -> str:
    return "Baichuan2" if norm_head else "Baichuan-1"


def _config_hints(fields: Mapping) -> list[tuple[int, bool, str]]:
    """(rank, norm_head, why) for each hint in config.json's own fields."""
    hints = []
    if "z_loss_weight" in fields and "transformers_version" in fields:
        hints.append((CODE, True, "it has z_loss_weight, which only Baichuan2's code writes into config.json"))
    architectures, auto_map = fields.get("architectures"), fields.get("auto_map")
    names = [*(architectures if isinstance(architectures, list) else []),
             *(auto_map.values() if isinstance(auto_map, dict) else [])]
    if any("BaiChuan" in str(name) for name in names):
        hints.append((CODE, False, "its architectures/auto_map name BaiChuan (Baichuan-7B's code)"))
    vocab = fields.get("vocab_size")
    if vocab in (BAICHUAN2_VOCAB_SIZE, BAICHUAN1_VOCAB_SIZE):
        hints.append((VOCAB, vocab == BAICHUAN2_VOCAB_SIZE,
                      f"vocab_size {vocab} is the {_family(vocab == BAICHUAN2_VOCAB_SIZE)} tokenizer's"))
    if fields.get("tokenizer_class") == "BaichuanTokenizer":
        hints.append((TOKENIZER_CLASS, True, "tokenizer_class is BaichuanTokenizer, which the published Baichuan2 "
                      "configs name and Baichuan-1's do not"))
    rope = fields.get("position_embedding", "rope") == "rope"
    if rope and fields.get("max_position_embeddings") and fields.get("model_max_length"):
        hints.append((WEAK, True, "it gives both max_position_embeddings and model_max_length, as Baichuan2-7B's does"))
    name = str(fields.get("_name_or_path") or "").lower().replace("_", "-")
    if "baichuan" in name:
        two = "baichuan2" in name or "baichuan-2" in name
        hints.append((WEAK, two, f"_name_or_path {fields['_name_or_path']!r} names {_family(two)}"))
    return hints


def _folder_hints(folder: Path) -> list[tuple[int, bool, str]]:
    """Hints from the tokenizer files beside config.json: tokenizer.model holds the pieces before any added
    token (so a resized vocabulary keeps them), and Baichuan-7B's tokenizer_config.json names its own class."""
    hints = []
    vocab_file = folder / "tokenizer.model"
    if vocab_file.is_file():
        try:
            import sentencepiece as spm

            pieces = spm.SentencePieceProcessor(model_file=str(vocab_file)).get_piece_size()
        except (RuntimeError, OSError):
            pieces = None  # a broken tokenizer.model is reported by the tokenizer loader
        if pieces in (BAICHUAN2_VOCAB_SIZE, BAICHUAN1_VOCAB_SIZE):
            two = pieces == BAICHUAN2_VOCAB_SIZE
            hints.append((TOKENIZER_FILE, two, f"{vocab_file} has {pieces} pieces (the {_family(two)} tokenizer)"))
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        import json

        try:
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None  # reported by the tokenizer loader
        if isinstance(data, dict) and data.get("tokenizer_class") == "BaiChuanTokenizer":
            hints.append((CODE, False, f"{tokenizer_config} names BaiChuanTokenizer (Baichuan-7B's)"))
    return hints


def infer_norm_head(fields: Mapping, folder: Path | None = None) -> tuple[bool, str | None]:
    """(norm_head, None) for a config without a `norm_head` field whose hints settle it, else (a guess, why).

    `fields` are config.json's keys; `folder` (when known) adds the tokenizer files beside it. The strongest
    hint decides (see the ranks above); the answer is a guess when only weak hints exist or some hint
    disagrees. With no hint at all the head is plain, as it was before Baichuan2.
    """
    hints = _config_hints(fields) + (_folder_hints(Path(folder)) if folder is not None else [])
    if not hints:
        return False, "nothing in it tells Baichuan2 (NormHead) from Baichuan-1 (plain head); assuming a plain head"
    hints.sort(key=lambda hint: hint[0])
    rank, value, why = hints[0]
    against = [w for _, v, w in hints if v != value]
    if rank < WEAK and not against:
        return value, None
    guess = f"guessed {'NormHead (Baichuan2)' if value else 'a plain head (Baichuan-1)'} because {why}"
    return value, guess + (f", although {'; '.join(against)}" if against else "")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning the first time this message comes up in the process (configs are built many times)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def norm_head_of(fields: Mapping, folder: Path | None = None, where: str = "config.json") -> bool:
    """`norm_head` of a config without that field, warning once (naming `where`) when it is a guess."""
    value, guess = infer_norm_head(fields, folder)
    if guess:
        warn_once(f"{where}: {guess}. If that is wrong, add \"norm_head\": {str(not value).lower()} to "
                  "config.json (this project writes the field on every save)")
    return value


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = BAICHUAN2_VOCAB_SIZE,  # tokenizer pieces
        hidden_size: int = 4096,  # model width
        intermediate_size: int = 11008,  # SwiGLU inner width
        num_hidden_layers: int = 32,  # decoder layers
        num_attention_heads: int = 32,  # attention heads (head_dim = hidden_size / heads)
        hidden_act: str = "silu",  # MLP activation (always silu in the published models)
        max_position_embeddings: int | None = None,  # context length (RoPE configs name it so)
        model_max_length: int | None = None,  # context length (ALiBi configs name it so)
        initializer_range: float = 0.02,  # std of the normal init
        rms_norm_eps: float = 1e-6,  # RMSNorm epsilon
        use_cache: bool = True,  # return the KV cache from forward
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,  # published models have an untied lm_head
        position_embedding: str | None = None,  # "rope" or "alibi"; inferred when absent
        norm_head: bool | None = None,  # Baichuan2 row-normalised lm_head; inferred when absent
        rope_theta: float = 10000.0,  # RoPE base
        rotary_fp32: bool | None = None,  # rotate q/k in fp32 (Baichuan2-7B does); default: = norm_head
        z_loss_weight: float | None = None,  # Baichuan2 z-loss weight on max_logit**2 (paper: 2e-4); None: 0
        **kwargs,
    ):
        sizes = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                     max_position_embeddings=max_position_embeddings, model_max_length=model_max_length)
        problem = size_problem(sizes)
        if problem:
            raise ValueError(problem)
        inferred_pos, _ = infer_variant(max_position_embeddings, model_max_length, vocab_size)
        self.position_embedding = position_embedding or inferred_pos
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        if norm_head is None:
            fields = {**kwargs, **sizes, "position_embedding": self.position_embedding}
            if z_loss_weight is not None:
                fields["z_loss_weight"] = z_loss_weight
            norm_head = norm_head_of(fields)
        self.norm_head = bool(norm_head)
        self.rotary_fp32 = self.norm_head if rotary_fp32 is None else bool(rotary_fp32)
        context = max_position_embeddings or model_max_length or 4096
        self.max_position_embeddings = context
        self.model_max_length = context
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.z_loss_weight = 0.0 if z_loss_weight is None else z_loss_weight
        if self.position_embedding == "rope" and (hidden_size // num_attention_heads) % 2:
            raise ValueError(f"RoPE needs an even head_dim, but hidden_size {hidden_size} / num_attention_heads "
                             f"{num_attention_heads} is {hidden_size // num_attention_heads}")
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
