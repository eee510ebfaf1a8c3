"""The Baichuan model family in one file: Baichuan-7B, Baichuan-13B, Baichuan2-7B and Baichuan2-13B.

Variants are config fields, not copies of this file:
- `position_embedding`: "rope" (the 7B models) or "alibi" (the 13B models);
- `norm_head`: Baichuan2's row-normalised output head;
- `z_loss_weight`: Baichuan2's z-loss on the largest logit.

Weight names are the published ones (`W_pack`, `o_proj`, ...), so the authors' checkpoints load as they
are and checkpoints saved here load in the authors' code.

Attention masks: a 2-D `attention_mask` is read as segment ids. 0 is padding; tokens attend (causally)
only to earlier tokens with the same non-zero id. A 0/1 padding mask is the one-segment case, and values
1, 2, 3, ... pack several samples into one row with no attention across them. RoPE positions restart
at each segment (so left padding and packing give every sample the positions it would have alone).

KV caches: transformers' `DynamicCache` (grows by the new tokens) and `StaticCache` (a fixed buffer of
`max_cache_len` slots, for `generate(..., cache_implementation="static")` and `torch.compile`), or any
object with their `update` / `get_seq_length` / `get_mask_sizes` / `is_compileable` methods. A cache whose
`get_seq_length()` is a [B] tensor writes each row at its own position (`baichuan_tune.serve.fast_decode`'s
`SlotCache`). With a fixed-size cache the 2-D mask covers every slot (`create_masks_for_generate` pads it
with 0 for the slots not yet written), so each decoding step has the same shapes and no host sync. A
fixed-size cache with a `key_block` attribute is attended in blocks of that many keys (`block_attend`), so
that a row's result does not depend on how many slots the cache hands over (the batching server's window;
eager and on tiny models: compiled at the Baichuan2-7B shape in bf16 it was measured not to hold).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_baichuan import BaichuanConfig
from .flex_attention import ATTENTION_BACKENDS, FlexMask, flex_attend, flex_mask, flex_usable

try:  # transformers' init helpers skip weights that were loaded from a checkpoint
    from transformers import initialization as hf_init
except ImportError:  # pragma: no cover - older layouts
    hf_init = nn.init

# transformers renamed the cache field of model outputs from `past_key_values` to `cache` (5.2x).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class BaichuanRMSNorm(nn.Module):
    """RMSNorm with its statistics in fp32 whatever the activation dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class BaichuanMLP(nn.Module):
    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- positions


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): 2^(-8/n), 2^(-16/n), ... for n a power of two.

    For other head counts (Baichuan-13B has 40) the slopes of the closest lower power of two come first,
    followed by every other slope of twice that power, as in the reference implementation.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(closest) + power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its segment: [B, T] segment ids -> [B, T] positions (0 at each start)."""
    batch, length = segments.shape
    index = torch.arange(length, device=segments.device).expand(batch, length)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_inv_freq(config: BaichuanConfig) -> torch.Tensor:
    """Rotary frequencies theta^(-2i/d), i < d/2, in fp32."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


class BaichuanRotaryEmbedding(nn.Module):
    """cos/sin tables of LLaMA-style rotary embeddings, always computed in fp32."""

    def __init__(self, config: BaichuanConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # model.to(bf16) would round the frequencies (the phase error grows with position); recomputing them at
        # every forward instead would copy host memory to the device at each decoding step (no CUDA graphs).
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # model.to(bf16) rounded it: the phase error grows with position
            inv_freq = rope_inv_freq(self.config)
        # [B, T] x [D/2] -> [B, T, D/2]
        freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, D]: broadcast over heads


def apply_rotary(q, k, cos, sin, in_fp32: bool):
    """Rotate q and k ([B, H, T, D]). Baichuan2 rotates in fp32 and casts back; Baichuan-7B rotates in
    the activation dtype with cos/sin cast to it, as the authors' code does."""
    dtype = q.dtype
    if in_fp32:
        q, k = q.float(), k.float()
    else:
        cos, sin = cos.to(dtype), sin.to(dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.to(dtype), k.to(dtype)


# ----------------------------------------------------------------------------- attention


class KeyBlocks:
    """A dense additive bias ([B, 1 or H, T, K]) to attend through in blocks of `size` keys (`block_attend`)."""

    def __init__(self, bias: torch.Tensor, size: int):
        self.bias, self.size = bias, size


def block_attend(q, k, v, blocks: KeyBlocks) -> torch.Tensor:
    """SDPA's softmax(q k^T / sqrt(D) + bias) v, key block by key block with a running maximum and sum
    (the online softmax of FlashAttention, Dao et al. 2022, Algorithm 1), in fp32.

    What it is for: every block has the same shape, so each is computed by the same kernels, and a block
    whose keys are all masked adds exactly nothing (its weights exp(s - m) underflow to 0 against the
    running maximum m of the row's real keys). A row's result therefore depends on its own keys alone, not
    on how many blocks the batch's longest row makes everyone read: the batching server's answers are the
    same whoever shares the batch. SDPA's kernels split the keys by the total length, which rounds
    differently when another row makes the window longer. Products are written as multiply + sum, which
    torch.compile fuses into one pass over the keys in their own dtype (a matmul would need fp32 copies);
    meant for decoding (T of a few tokens), where attention reads the cache once either way.
    """
    scale = q.shape[-1] ** -0.5
    query = q.float()[:, :, :, None, :] * scale  # [B, H, T, 1, D]
    peak = total = acc = None
    for start in range(0, k.shape[2], blocks.size):
        keys = k[:, :, None, start : start + blocks.size]  # [B, H, 1, S, D]
        scores = (query * keys).sum(-1) + blocks.bias[..., start : start + blocks.size]  # [B, H, T, S], fp32
        new_peak = scores.amax(-1, keepdim=True) if peak is None else torch.maximum(peak, scores.amax(-1, keepdim=True))
        weights = torch.exp(scores - new_peak)  # [B, H, T, S]
        values = (weights[..., None] * v[:, :, None, start : start + blocks.size]).sum(-2)  # [B, H, T, D]
        if peak is None:
            total, acc = weights.sum(-1, keepdim=True), values
        else:
            carry = torch.exp(peak - new_peak)  # [B, H, T, 1]
            total, acc = total * carry + weights.sum(-1, keepdim=True), acc * carry + values
        peak = new_peak
    return (acc / total).to(q.dtype)


class BaichuanAttention(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # q, k and v in one matrix: rows [0, h) are q, [h, 2h) k, [2h, 3h) v.
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, attn_bias, rotary, cache, is_causal):
        batch, q_len, _ = hidden_states.shape
        qkv = self.W_pack(hidden_states)  # [B, T, 3*hidden]
        qkv = qkv.view(batch, q_len, 3, self.num_heads, self.head_dim)  # [B, T, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, D]
        if rotary is not None:
            q, k = apply_rotary(q, k, *rotary, in_fp32=self.config.rotary_fp32)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, H, past+T, D]
        if isinstance(attn_bias, FlexMask):
            out = flex_attend(q, k, v, attn_bias)
        elif isinstance(attn_bias, KeyBlocks):
            out = block_attend(q, k, v, attn_bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(batch, q_len, -1)  # [B, H, T, D] -> [B, T, hidden]
        return self.o_proj(out)


class BaichuanDecoderLayer(nn.Module):
    def __init__(self, config: BaichuanConfig, layer_idx: int):
        super().__init__()
        self.self_attn = BaichuanAttention(config, layer_idx)
        self.mlp = BaichuanMLP(config)
        self.input_layernorm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attn_bias=None, rotary=None, cache=None, is_causal=False):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), attn_bias, rotary, cache, is_causal)
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NormHead(nn.Module):
    """Baichuan2's output head: logits = hidden @ normalize(W, dim=1).T (rows of unit L2 norm).

    The stored weight stays un-normalised, as in the published files. In training the gradient flows
    through the normalisation. In eval the normalised weight is cached until the weight changes, so
    decoding does not re-normalise a 125,696-row matrix for every token.
    """

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self._cached = None
        self._cached_key = None

    def normalized_weight(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() and self.weight.requires_grad:
            return F.normalize(self.weight, dim=-1)
        if torch.compiler.is_compiling():
            # Compiled decoding steps (generate's static-cache path) follow an eager prefill, which refreshed
            # the cache below; the key is host-side bookkeeping that a traced graph cannot read.
            if self._cached is not None:
                return self._cached
            return F.normalize(self.weight.float(), dim=-1).to(self.weight.dtype)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._cached_key != key:
            self._cached = F.normalize(self.weight.detach().float(), dim=-1).to(self.weight.dtype)
            self._cached_key = key
        return self._cached

    def inverse_row_norms(self) -> torch.Tensor:
        """1 / |W_i| in fp32 ([V], as F.normalize clamps it): hidden @ normalize(W).T equals
        (hidden @ W.T) * this, without the normalised [V, hidden] copy (1 GiB for Baichuan2)."""
        norms = torch.linalg.vector_norm(self.weight, dim=-1, dtype=torch.float32)
        return 1.0 / norms.clamp_min(1e-12)

    def train(self, mode: bool = True):
        # Fused AdamW and bitsandbytes optimizers write the weight without bumping its version counter, so
        # the cache is also dropped at every train()/eval() switch.
        self._cached = self._cached_key = None
        return super().train(mode)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.normalized_weight())


# ----------------------------------------------------------------------------- cache slots and masks


def cache_slots(cache, q_len: int, device) -> tuple[torch.Tensor, int, bool]:
    """Where the new tokens go: (slot index [1 or B, T], keys SDPA sees K, whether the cache is fixed-size).

    A growing cache holds past + T keys after the update; a fixed-size one (StaticCache) always returns
    its whole buffer, with the write position a device tensor, so that nothing here syncs with the host.
    """
    if cache is None:
        return torch.arange(q_len, device=device)[None], q_len, False
    past = cache.get_seq_length()
    fixed = bool(getattr(cache, "is_compileable", False))
    key_len = cache.get_mask_sizes(q_len, 0)[0] if fixed else int(past) + q_len
    if isinstance(past, torch.Tensor):
        past = past.to(device).reshape(-1, 1)  # [1, 1] (StaticCache) or [B, 1] (a cache with a position per row)
    return past + torch.arange(q_len, device=device)[None], key_len, fixed


def key_segments(attention_mask, batch: int, key_len: int, fixed: bool, device) -> torch.Tensor:
    """The segment id of every key slot, [B, K]: the 2-D mask, for a fixed-size cache padded with 0 (slots
    not yet written) to K; no mask is one segment over every slot (causality hides the slots not yet written)."""
    if attention_mask is None:
        return torch.ones(batch, key_len, dtype=torch.long, device=device)
    length = attention_mask.shape[-1]
    if attention_mask.dim() != 2 or length > key_len or (length < key_len and not fixed):
        expected = f"at most {key_len}" if fixed else f"{key_len} (past + new tokens)"
        raise ValueError(
            f"attention_mask must be [batch, {expected}] segment ids (0 = padding), got {list(attention_mask.shape)}"
        )
    segments = attention_mask.long()
    if segments.shape[1] < key_len:
        segments = F.pad(segments, (0, key_len - segments.shape[1]))
    return segments


# ----------------------------------------------------------------------------- model


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanDecoderLayer"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @property
    def is_gradient_checkpointing(self) -> bool:
        # PEFT reads this name whenever it wraps or loads an adapter; transformers deprecated it (for
        # `is_activation_checkpointing`, the same test) with a FutureWarning each time. Answered here directly.
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NormHead):
            hf_init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        # Non-persistent buffers are not in checkpoints: from_pretrained leaves them empty and refills them here.
        elif isinstance(module, BaichuanRotaryEmbedding):
            hf_init.copy_(module.inv_freq, rope_inv_freq(self.config))
        elif isinstance(module, BaichuanModel) and module.config.position_embedding == "alibi":
            hf_init.copy_(module.alibi_slopes, alibi_slopes(self.config.num_attention_heads))


def _layer_step(layer, hidden_states, attn_bias, rotary, cache, is_causal):
    return layer(hidden_states, attn_bias, rotary, cache, is_causal)


# SDPA's kernels other than cuDNN's attention (flash takes no bias: unmasked rows only). cuDNN's is left
# out where it costs: it plans anew for each new row length (training with `sdpa_cudnn=False`), and its
# decoding forward is not deterministic (the fast path's decoders, serve/fast_decode.py).
NO_CUDNN_SDPA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def sdpa_on(backends: tuple[SDPBackend, ...]):
    """A context in which the model's SDPA calls run only on `backends`."""
    return sdpa_kernel(list(backends))


def _step_on_kernels(step, backends, layer, hidden_states, attn_bias, rotary, cache, is_causal):
    # Entered inside the function that checkpointing recomputes, so the recomputation in backward runs on
    # the same SDPA kernels as the forward (the backward kernels follow the forward's choice).
    with sdpa_on(backends):
        return step(layer, hidden_states, attn_bias, rotary, cache, is_causal)


@functools.cache
def compiled_layer_step(backend: str):
    """`_layer_step` under torch.compile: every decoder layer runs the same code, so one graph serves all
    layers (their weights are graph inputs). Shapes are static for the first length seen and dynamic from
    the second (torch's automatic dynamic shapes), so varying lengths cost one more compile, not one each."""
    return torch.compile(_layer_step, backend=backend)


class BaichuanModel(BaichuanPreTrainedModel):
    # "sdpa": a dense bias for padded/packed rows and ALiBi (the reference); "flex": FlexAttention block
    # masks and an ALiBi score_mod (set by `set_fast_paths`; a runtime choice, not saved in config.json).
    attention_backend = "sdpa"
    # None: layers run eagerly (the reference); a torch.compile backend name ("inductor"): forwards without
    # a KV cache run each decoder layer compiled (set by `set_fast_paths`; not saved in config.json).
    compile_backend = None
    # Under gradient checkpointing, how many decoder layers (the first ones) recompute their activations in
    # backward; the others keep them (-1: all). Recomputation costs a third of a LoRA step's matrix products.
    checkpoint_layers = -1
    # None: SDPA picks its kernel (the reference); a tuple of SDPBackend: the layers' SDPA calls run only on
    # those (set by `set_fast_paths(sdpa_cudnn=False)`: cuDNN's attention builds a plan for each new row
    # length, measured at milliseconds of host time a call on one-row steps of changing length).
    sdpa_backends = None

    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BaichuanDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BaichuanRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BaichuanRotaryEmbedding(config) if config.position_embedding == "rope" else None
        if config.position_embedding == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.num_attention_heads), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def attention_inputs(self, attention_mask, position_ids, batch, q_len, cache, device, dtype):
        """(rotary cos/sin, additive attention bias or None, is_causal) for SDPA."""
        query_index, key_len, fixed = cache_slots(cache, q_len, device)
        plain = attention_mask is None or (not fixed and bool((attention_mask == 1).all()))
        if plain and not fixed and self.rotary_emb is not None and (key_len == q_len or q_len == 1):
            # No padding and no packing: SDPA's own causal masking (the flash path on GPU). SDPA aligns
            # is_causal to the top left, so several new tokens after a cache need the explicit bias below.
            positions = query_index if position_ids is None else position_ids
            return self.rotary_emb(positions.expand(batch, q_len)), None, q_len > 1
        segments = key_segments(None if plain else attention_mask, batch, key_len, fixed, device)  # [B, K]
        query_index = query_index.expand(batch, q_len)  # [B, T]
        rotary = None
        if self.rotary_emb is not None:
            if position_ids is None:
                position_ids = query_index if plain else segment_positions(segments).gather(1, query_index)
            rotary = self.rotary_emb(position_ids)
        if self.attention_backend == "flex" and not fixed and key_len == q_len and flex_usable(device):
            # a fresh forward (training, prefill): a block mask instead of the dense bias below
            return rotary, flex_mask(segments, self.alibi_slopes if self.rotary_emb is None else None), False
        key_pos = torch.arange(key_len, device=device)[None, None]  # [1, 1, K]
        query_pos = query_index[:, :, None]  # [B, T, 1]
        seg_q = segments.gather(1, query_index)[:, :, None]  # [B, T, 1]
        seg_k = segments[:, None, :]  # [B, 1, K]
        allowed = (key_pos <= query_pos) & (seg_q == seg_k) & (seg_k != 0)  # [B, T, K]
        # A padding query attends to itself only, so no row of the softmax is empty.
        allowed |= key_pos == query_pos
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, T, K]
        if self.rotary_emb is None:
            # Baichuan2-13B's form slope * (key - query); Baichuan-13B's slope * key is the same after softmax.
            distance = (key_pos - query_pos).to(torch.float32)  # [B, T, K]
            alibi = self.alibi_slopes.to(device)[None, :, None, None] * distance[:, None]  # [B, H, T, K]
            bias = bias + alibi.to(dtype)
        if fixed and getattr(cache, "key_block", 0):  # the cache asks for results independent of its window
            bias = KeyBlocks(bias, cache.key_block)
        return rotary, bias, False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if (self.gradient_checkpointing or self.compile_backend) and self.training and torch.is_grad_enabled():
            # recomputation would write the cache twice; a compiled layer would specialise on each cache slot
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, q_len, _ = hidden_states.shape
        rotary, bias, is_causal = self.attention_inputs(
            attention_mask, position_ids, batch, q_len, cache if use_cache else None, hidden_states.device,
            hidden_states.dtype,
        )
        step = compiled_layer_step(self.compile_backend) if self.compile_backend and not use_cache else _layer_step
        if self.sdpa_backends is not None:
            step = functools.partial(_step_on_kernels, step, self.sdpa_backends)
        checkpointed = len(self.layers) if self.checkpoint_layers < 0 else self.checkpoint_layers
        for index, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and index < checkpointed:
                hidden_states = self._gradient_checkpointing_func(step, layer, hidden_states, bias, rotary, None,
                                                                  is_causal)
            else:
                hidden_states = step(layer, hidden_states, bias, rotary, cache if use_cache else None, is_causal)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache if use_cache else None})


def _chunk_loss_sums(hidden, weight, labels, ignore_index: int, column_scale=None, ce_w=None, z_w=None):
    """(sum of cross-entropy over labelled rows, sum of max_logit**2 over all rows) for one chunk of tokens;
    each term weighted per token by `ce_w` / `z_w` when given."""
    logits = F.linear(hidden, weight).float()  # [n, V], only this chunk's
    if column_scale is not None:
        logits = logits * column_scale
    z = logits.max(dim=-1).values.pow(2)
    if ce_w is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum"), z.sum()
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return (ce * ce_w).sum(), (z * z_w).sum() if z_w is not None else z.sum()


def _shifted_weights(loss_weights, z_loss_weights, z_loss_weight: float, device):
    """Per-token weights aligned with labels[..., 1:] ([N] fp32), checked: a z-loss needs its own weights."""
    if loss_weights is None:
        return None, None
    if z_loss_weight and z_loss_weights is None:
        raise ValueError("per-token loss_weights under a z-loss need z_loss_weights too")
    ce_w = loss_weights[..., 1:].to(device, torch.float32).reshape(-1)
    z_w = z_loss_weights[..., 1:].to(device, torch.float32).reshape(-1) if z_loss_weight else None
    return ce_w, z_w


def chunked_causal_lm_loss(hidden, weight, labels, z_loss_weight: float = 0.0, chunk_size: int = 1024,
                           ignore_index: int = -100, column_scale=None, loss_weights=None, z_loss_weights=None):
    """`causal_lm_loss((hidden @ weight.T) * column_scale, labels)` without materialising the [B, T, V] logits.

    Tokens go through the head `chunk_size` at a time, each chunk under activation checkpointing, so only
    one chunk's fp32 logits exist at once (forward and backward), as in Liger's fused linear cross-entropy.
    Without z-loss only labelled positions pass through the head at all. `column_scale` ([V], fp32) is
    NormHead's 1 / |row| of the stored weight: the normalised weight itself is never built.
    `loss_weights` / `z_loss_weights` ([B, T], aligned with labels): weighted sums instead of the means.
    """
    shift_hidden = hidden[..., :-1, :].reshape(-1, hidden.size(-1))  # [N, hidden]
    shift_labels = labels[..., 1:].to(hidden.device).reshape(-1)  # [N]
    positions = shift_labels.numel()
    ce_w, z_w = _shifted_weights(loss_weights, z_loss_weights, z_loss_weight, hidden.device)
    if not z_loss_weight:  # rows without a label add nothing: skip them
        keep = shift_labels.ne(ignore_index).nonzero().squeeze(-1)
        shift_hidden, shift_labels = shift_hidden.index_select(0, keep), shift_labels.index_select(0, keep)
        ce_w = ce_w.index_select(0, keep) if ce_w is not None else None
    ce = z = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, shift_labels.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        ce_part, z_part = torch.utils.checkpoint.checkpoint(
            _chunk_loss_sums, shift_hidden[part], weight, shift_labels[part], ignore_index, column_scale,
            None if ce_w is None else ce_w[part], None if z_w is None else z_w[part], use_reentrant=False)
        ce, z = ce + ce_part, z + z_part
    if ce_w is not None:  # the weights already hold the normalisation
        return ce + z_loss_weight * z if z_loss_weight else ce
    loss = ce / shift_labels.ne(ignore_index).sum()  # the mean over labelled tokens, as cross_entropy takes it
    if z_loss_weight:
        loss = loss + z_loss_weight * z / positions
    return loss


def causal_lm_loss(logits, labels, z_loss_weight: float = 0.0, ignore_index: int = -100, loss_weights=None,
                   z_loss_weights=None):
    """Next-token cross-entropy in fp32, plus Baichuan2's z-loss `z_loss_weight * mean(max_logit**2)`.

    The z-loss (Baichuan2 technical report, sec. 2.6) keeps the softmax normaliser small; it is averaged
    over every shifted position, as the authors' code does. With `loss_weights` (and `z_loss_weights`,
    [B, T] aligned with labels) both terms are weighted sums instead of means.
    """
    shift_logits = logits[..., :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[..., 1:].to(shift_logits.device)  # [B, T-1]
    flat_logits, flat_labels = shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1)
    ce_w, z_w = _shifted_weights(loss_weights, z_loss_weights, z_loss_weight, shift_logits.device)
    if ce_w is not None:
        ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="none")
        loss = (ce * ce_w).sum()
        if z_loss_weight:
            loss = loss + z_loss_weight * (flat_logits.max(dim=-1).values.pow(2) * z_w).sum()
        return loss
    loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index)
    if z_loss_weight:
        loss = loss + z_loss_weight * shift_logits.max(dim=-1).values.pow(2).mean()
    return loss


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    # Training forwards with labels compute the loss this many tokens at a time through the head and return
    # logits=None (0: full logits, the reference). Set by `set_fast_paths`; not saved in config.json.
    loss_chunk_size = 0

    def __init__(self, config: BaichuanConfig):
        super().__init__(config)
        self.model = BaichuanModel(config)
        if config.norm_head:
            self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def create_masks_for_generate(self, attention_mask=None, cache=None, past_key_values=None, inputs_embeds=None,
                                  **kwargs):
        """generate()'s mask hook for fixed-size caches (transformers would build a 4-D causal mask, which
        loses the segment ids): the 2-D mask padded with 0 to the cache's length, the same shape at every step."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is None or cache is None or attention_mask.dim() != 2:
            return attention_mask
        key_len = cache.get_mask_sizes(inputs_embeds.shape[1] if inputs_embeds is not None else 1, 0)[0]
        if attention_mask.shape[1] >= key_len:
            return attention_mask
        return F.pad(attention_mask, (0, key_len - attention_mask.shape[1]))

    def chat(self, tokenizer, messages, stream=False, generation_config=None, **overrides):
        """The authors' chat API (see `baichuan_tune.serve.generation.chat`)."""
        from ..serve.generation import chat

        return chat(self, tokenizer, messages, stream=stream, generation_config=generation_config, **overrides)

    def quantize(self, bits: int):
        """The authors' in-place 8/4-bit API (see `baichuan_tune.models.quantize.quantize`); returns the model."""
        from .quantize import quantize

        return quantize(self, bits)

    def _apply(self, fn, *args, **kwargs):
        # `.cuda()` / `.to(device)` after `quantize(8)` (the authors' idiom) must also move the int8 copies
        # bitsandbytes keeps beside each weight, which torch's in-place move leaves behind.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "quantization_bits", None) == 8:
            from .quantize import resync_int8_state

            resync_int8_state(self)
        return self

    def chunkable_head_weight(self):
        """(the head's stored weight, its column scale or None) when the chunked loss applies, else None."""
        if not self.loss_chunk_size:
            return None
        if isinstance(self.lm_head, NormHead):
            return self.lm_head.weight, self.lm_head.inverse_row_norms()  # the gradient flows through both
        return (self.lm_head.weight, None) if type(self.lm_head) is nn.Linear else None  # not quantised/wrapped

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int = 0,
        cache=None,
        loss_weights=None,
        z_loss_weights=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        head = self.chunkable_head_weight() if labels is not None and self.training else None
        if head is not None:
            loss = chunked_causal_lm_loss(hidden_states, head[0], labels, self.config.z_loss_weight,
                                          self.loss_chunk_size, column_scale=head[1], loss_weights=loss_weights,
                                          z_loss_weights=z_loss_weights)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.z_loss_weight, loss_weights=loss_weights,
                                  z_loss_weights=z_loss_weights)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})


def set_fast_paths(model, attention: str = "sdpa", loss_chunk_size: int = 0, compile: bool = False,
                   compile_backend: str = "inductor", sdpa_cudnn: bool = True, nf4_in_graph: bool = True):
    """Choose the attention backend, the chunked loss, compiled decoder layers (`compile`, through
    `compile_backend`), whether SDPA may use cuDNN's attention (`sdpa_cudnn`) and whether compiled layers
    dequantise NF4 weights as torch ops (`nf4_in_graph`, `quantize.use_compiled_nf4`) of a
    BaichuanForCausalLM (or a PEFT model around one). A compiled layer keeps the SDPA kernel it was traced
    with (torch.compile does not guard on SDPA's backend flags): after changing `sdpa_cudnn` in a process
    that has already run compiled layers, call `torch._dynamo.reset()`."""
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if loss_chunk_size < 0:
        raise ValueError(f"loss_chunk_size must be >= 0, got {loss_chunk_size}")
    if attention == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise ValueError(f"attention 'flex' needs torch >= 2.5 (this is {torch.__version__}): "
                             "pip install -U torch, or use attention 'sdpa'") from None
    from .quantize import is_quantized, use_compiled_nf4

    if is_quantized(model):
        use_compiled_nf4(model, enabled=compile and nf4_in_graph)  # fused into the compiled layers' graphs
    for module in model.modules():
        if isinstance(module, BaichuanModel):
            module.attention_backend = attention
            module.compile_backend = compile_backend if compile else None
            module.sdpa_backends = None if sdpa_cudnn else NO_CUDNN_SDPA
        elif isinstance(module, BaichuanForCausalLM):
            module.loss_chunk_size = loss_chunk_size
    return model
