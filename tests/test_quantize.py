"""`model.quantize(8|4)` through bitsandbytes, checked on CPU against a hand-written simulation.

Oracle: the fp32 model with each decoder Linear weight rounded by hand to the format's grid
- 8-bit (LLM.int8() weights): per output row, w -> round(w * 127 / absmax_row) * absmax_row / 127 (after
  the fp16 cast bitsandbytes quantises from);
- 4-bit NF4 (QLoRA): per block of 64 consecutive weights, w -> absmax * nearest of the 16 NF4 levels.
The bitsandbytes model must land on that simulation (its residual, from double-quantised NF4 scales and
fp16 staging, is under a tenth of the format's own rounding error) and must differ from fp32 by the
format's error. bitsandbytes 0.50's CPU NF4 kernel is inaccurate for weights whose input width is not a
multiple of 64 (2.5x the expected error); every published width is (4096, 5120, 11008, 13696), so the
tiny test shapes below use widths 64 and 192.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baichuan_tune.quantize import QUANTIZED_LINEARS, QuantizeError, is_quantized
from conftest import tiny_model

bnb = pytest.importorskip("bitsandbytes")

SHAPE = dict(hidden_size=64, num_attention_heads=4, intermediate_size=192)
# The 16 NF4 levels (QLoRA paper, appendix E; the table bitsandbytes ships).
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def simulate_int8(w: torch.Tensor) -> torch.Tensor:
    w = w.half().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    return torch.round(w * 127 / absmax) * absmax / 127


def simulate_nf4(w: torch.Tensor) -> torch.Tensor:
    blocks = w.reshape(-1, 64)  # [numel / 64, 64]: consecutive weights, row-major
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(dim=-1)  # [blocks, 64]
    return (NF4[nearest] * absmax).reshape(w.shape)


def decoder_linears(model):
    for layer in model.model.layers:
        yield from ((layer.self_attn, n) for n in ("W_pack", "o_proj"))
        yield from ((layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b", "tiny-baichuan2-13b"])
@pytest.mark.parametrize("bits,simulate,err_range", [(8, simulate_int8, (0.001, 0.03)), (4, simulate_nf4, (0.03, 0.3))])
def test_quantized_model_matches_simulated_format(preset, bits, simulate, err_range):
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    reference = tiny_model(preset, **SHAPE)
    simulated = tiny_model(preset, **SHAPE)
    with torch.no_grad():
        for parent, name in decoder_linears(simulated):
            getattr(parent, name).weight.copy_(simulate(getattr(parent, name).weight))
        quantized = tiny_model(preset, **SHAPE)
        lm_head_before = quantized.lm_head.weight.detach().clone()
        assert quantized.quantize(bits) is quantized
        ref, sim, out = (m(ids).logits for m in (reference, simulated, quantized))
    format_error = ((sim - ref).norm() / ref.norm()).item()
    assert err_range[0] < format_error < err_range[1]  # the format's own rounding error, by hand
    assert ((out - sim).norm() / ref.norm()).item() < 0.1 * format_error
    assert ((out - ref).norm() / ref.norm()).item() < 1.1 * format_error


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_replaces_decoder_linears_only(bits):
    model = tiny_model("tiny-baichuan2-7b", **SHAPE)
    embed = model.model.embed_tokens.weight.detach().clone()
    head_type, head = type(model.lm_head), model.lm_head.weight.detach().clone()
    model.quantize(bits)
    expected = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    for parent, name in decoder_linears(model):
        layer = getattr(parent, name)
        assert type(layer) is expected
        # Storage: one byte a weight (int8) or two weights a byte (NF4).
        assert layer.weight.numel() * layer.weight.element_size() == layer.in_features * layer.out_features * bits // 8
    assert type(model.lm_head) is head_type and torch.equal(model.lm_head.weight, head)  # NormHead untouched
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    assert is_quantized(model) and model.quantization_bits == bits
    assert set(QUANTIZED_LINEARS) == {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_quantize_refuses_bad_requests():
    model = tiny_model("tiny-baichuan2-7b", **SHAPE)
    with pytest.raises(QuantizeError, match="4 or 8"):
        model.quantize(3)
    assert not is_quantized(model)
    model.quantize(8)
    with pytest.raises(QuantizeError, match="already quantised"):
        model.quantize(4)


def test_quantized_model_generates():
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(4)
    out = model.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=[])
    assert out.shape == (1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_authors_idiom_quantize_then_cuda(bits):
    """`model.quantize(bits).cuda()` keeps the weights quantised and gives the CPU-quantised logits."""
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).half()
    simulated = tiny_model("tiny-baichuan2-7b", **SHAPE)
    simulate = simulate_int8 if bits == 8 else simulate_nf4
    with torch.no_grad():
        for parent, name in decoder_linears(simulated):
            getattr(parent, name).weight.copy_(simulate(getattr(parent, name).weight.half().float()))
        ref = simulated(ids).logits
        model = model.quantize(bits).cuda()
        out = model(ids.cuda()).logits.float().cpu()
    layer = model.model.layers[0].self_attn.W_pack
    assert layer.weight.device.type == "cuda" and layer.weight.dtype in (torch.int8, torch.uint8)
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
