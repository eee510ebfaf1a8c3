"""`block_attend` (attention over key blocks with a running softmax) against SDPA, and the property it is
for: blocks of keys that are all masked change a row's result by nothing at all."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baichuan_tune.models.modeling_baichuan import KeyBlocks, alibi_slopes, block_attend


def _inputs(batch=3, heads=4, queries=2, keys=24, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen) for n in (queries, keys, keys))
    lengths = torch.tensor([5, 13, 24])[:batch]  # keys each row holds; its queries are its last ones
    key_pos = torch.arange(keys)[None, None, :]  # [1, 1, K]
    query_pos = (lengths[:, None] - queries + torch.arange(queries)[None])[:, :, None]  # [B, T, 1]
    allowed = key_pos <= query_pos  # [B, T, K]
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]  # [B, 1, T, K]
    alibi = alibi_slopes(heads)[None, :, None, None] * (key_pos - query_pos)[:, None].float()  # [B, H, T, K]
    return q, k, v, bias, bias + alibi


@pytest.mark.parametrize("with_alibi", [False, True])
@pytest.mark.parametrize("size", [4, 8, 24])
def test_block_attention_equals_sdpa(with_alibi, size):
    q, k, v, causal, alibi = _inputs()
    bias = alibi if with_alibi else causal
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(block_attend(q, k, v, KeyBlocks(bias, size)), expected, rtol=1e-5, atol=1e-6)


def test_masked_key_blocks_leave_each_row_bit_for_bit_unchanged():
    """Row 0 holds 5 keys: reading 8, 16 or 24 slots (1, 2 or 3 blocks of 8) gives the same bits; so do
    the rows whose keys fill two blocks, whichever longer window they are read in."""
    q, k, v, _, bias = _inputs()
    short = block_attend(q[:1], k[:1, :, :8], v[:1, :, :8], KeyBlocks(bias[:1, ..., :8], 8))
    for window in (16, 24):
        wide = block_attend(q, k[:, :, :window], v[:, :, :window], KeyBlocks(bias[..., :window], 8))
        assert torch.equal(wide[:1], short)
    two = block_attend(q[1:2], k[1:2, :, :16], v[1:2, :, :16], KeyBlocks(bias[1:2, ..., :16], 8))
    assert torch.equal(block_attend(q, k, v, KeyBlocks(bias, 8))[1:2], two)


def test_in_bf16_the_blocks_compute_in_fp32_and_return_the_input_dtype():
    q, k, v, _, bias = _inputs()
    half = [t.bfloat16() for t in (q, k, v)]
    out = block_attend(*half, KeyBlocks(bias.bfloat16(), 8))
    assert out.dtype == torch.bfloat16
    reference = F.scaled_dot_product_attention(*(t.float() for t in half), attn_mask=bias.bfloat16().float())
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=8e-3)  # one bf16 rounding of the output
