"""`BaichuanConfig`: one config for Baichuan-7B, Baichuan-13B and Baichuan2-7B/13B.

The published `config.json` files carry no field that names the variant, so the three variant fields
below are inferred when absent (see `infer_variant`) and written out explicitly on save. The authors'
code ignores the extra fields, so a config this project saves still loads there.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Vocabulary size of the Baichuan2 tokenizer; only Baichuan2 checkpoints use it and only they have NormHead.
BAICHUAN2_VOCAB_SIZE = 125696
POSITION_EMBEDDINGS = ("rope", "alibi")


def infer_variant(max_position_embeddings, model_max_length, vocab_size) -> tuple[str, bool]:
    """(position_embedding, norm_head) from the fields a published config.json has.

    The RoPE models (Baichuan-7B, Baichuan2-7B) give `max_position_embeddings`; the ALiBi models
    (Baichuan-13B, Baichuan2-13B) give only `model_max_length`. NormHead came with Baichuan2, whose
    tokenizer has 125,696 pieces.
    """
    position = "rope" if max_position_embeddings is not None or model_max_length is None else "alibi"
    return position, vocab_size == BAICHUAN2_VOCAB_SIZE


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
        z_loss_weight: float = 0.0,  # Baichuan2 z-loss weight on max_logit**2 (paper: 2e-4 in pretraining)
        **kwargs,
    ):
        inferred_pos, inferred_head = infer_variant(max_position_embeddings, model_max_length, vocab_size)
        self.position_embedding = position_embedding or inferred_pos
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}"
            )
        self.norm_head = inferred_head if norm_head is None else bool(norm_head)
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
        self.z_loss_weight = z_loss_weight
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
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
