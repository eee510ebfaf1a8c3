"""Attention through FlexAttention (`torch.nn.attention.flex_attention`): the masks of packed and padded
rows as a block mask and ALiBi as a score modification, so no dense [B, H, T, T] bias is built.

The dense path (`attention_inputs` + SDPA in modeling_baichuan.py) stays the reference. Both compute:
a query attends causally to earlier keys of its own non-zero segment, a padding query to itself only,
and the 13B models add `slope_h * (key - query)` to each score. On a GPU the kernel is compiled
(`torch.compile`, once per shape family); on a CPU torch runs FlexAttention forward-only and unfused,
so there it serves inference and the tests, and training falls back to the dense path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("sdpa", "flex")


@dataclass
class FlexMask:
    """What every layer's FlexAttention call needs: the block mask and the score modification (or None)."""

    block_mask: object
    score_mod: object


def flex_usable(device: torch.device) -> bool:
    """FlexAttention has a backward on CUDA only; elsewhere it is used only where no gradient is needed."""
    return device.type == "cuda" or not torch.is_grad_enabled()


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():  # inside a compiled layer: traced into its graph
        return flex_attention
    return _compiled_flex()


def flex_mask(segments: torch.Tensor, alibi_slopes: torch.Tensor | None) -> FlexMask:
    """The block mask of `segments` ([B, T] ids, 0 = padding) and ALiBi as a score_mod when slopes are given."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segments.shape

    def mask_mod(b, h, q, k):
        same = (segments[b, q] == segments[b, k]) & (segments[b, k] != 0)
        return ((k <= q) & same) | (q == k)  # a padding query sees itself, so no softmax row is empty

    block_mask = create_block_mask(mask_mod, batch, None, length, length, device=segments.device,
                                   _compile=segments.device.type == "cuda")
    score_mod = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(segments.device, torch.float32)

        def score_mod(score, b, h, q, k):  # Baichuan2-13B's slope * (key - query)
            return score + slopes[h] * (k - q).to(torch.float32)

    return FlexMask(block_mask, score_mod)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: FlexMask) -> torch.Tensor:
    """[B, H, T, D] attention output under `mask`."""
    return _flex(q.device)(q, k, v, score_mod=mask.score_mod, block_mask=mask.block_mask)
