"""`model.quantize(8|4)` through bitsandbytes, checked on CPU against a hand-written simulation.

Oracle: each format written out by hand from its paper, applied to the fp32 weights
- 8-bit, LLM.int8() (Dettmers et al. 2022): weights per output row w -> round(w * 127 / absmax) * absmax / 127
  (from their fp16 values), and in inference the activations likewise per token, except feature columns
  holding a value above the outlier threshold 6.0, which stay in fp16;
- 4-bit NF4 (QLoRA, Dettmers et al. 2023): per block of 64 consecutive weights, w -> absmax * the nearest of
  the 16 NF4 levels (activations untouched).
Every quantised Linear must give the simulated output for the input it really saw, to within a tenth of
the format's own rounding error (the rest is double-quantised NF4 scales and fp16 staging). For the whole
model, rounding of activations decorrelates once inputs differ a little, so the logits are only required
to be off from fp32 by the simulated format's error (0.5x to 1.5x).
bitsandbytes 0.50's CPU NF4 kernels need out_features % 32 == 0 and in_features % 64 == 0 (the published
shapes meet both; `quantize` refuses others on CPU), hence widths 64 and 192 here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baichuan_tune.models.quantize import QUANTIZED_LINEARS, QuantizeError, is_quantized
from conftest import benchmark_script, tiny_model

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


def simulate_int8_activations(x: torch.Tensor, threshold: float = 6.0) -> torch.Tensor:
    x = x.half().float()
    outliers = (x.abs() > threshold).reshape(-1, x.shape[-1]).any(dim=0)  # [in_features]
    inliers = x.masked_fill(outliers, 0)
    absmax = inliers.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(outliers, x, torch.round(inliers * 127 / absmax) * absmax / 127)


def simulate_nf4(w: torch.Tensor) -> torch.Tensor:
    blocks = w.reshape(-1, 64)  # [numel / 64, 64]: consecutive weights, row-major
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / absmax).unsqueeze(-1).sub(NF4).abs().argmin(dim=-1)  # [blocks, 64]
    return (NF4[nearest] * absmax).reshape(w.shape)


SIMULATE = {8: (simulate_int8, simulate_int8_activations), 4: (simulate_nf4, lambda x: x)}


def decoder_linears(model):
    for layer in model.model.layers:
        yield from ((layer.self_attn, n) for n in ("W_pack", "o_proj"))
        yield from ((layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))


def assert_matches_simulation(quantized, preset: str, bits: int, device: str = "cpu") -> None:
    """`quantized` (a tiny_model(preset, **SHAPE) after quantize(bits), on `device`) against the formats."""
    simulate_weight, simulate_input = SIMULATE[bits]
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    reference, simulated = tiny_model(preset, **SHAPE), tiny_model(preset, **SHAPE)
    originals = [getattr(p, n).weight.detach().clone() for p, n in decoder_linears(reference)]
    seen = []
    for parent, name in decoder_linears(quantized):
        getattr(parent, name).register_forward_hook(lambda m, args, out: seen.append((args[0].cpu(), out.cpu())))
    with torch.no_grad():
        for (parent, name), weight in zip(decoder_linears(simulated), originals):
            getattr(parent, name).weight.copy_(simulate_weight(weight))
            getattr(parent, name).register_forward_pre_hook(lambda m, args: (simulate_input(args[0]),))
        ref, sim = reference(ids).logits, simulated(ids).logits
        out = quantized(ids.to(device)).logits.float().cpu()
        for (x, y), weight in zip(seen, originals):
            x, y = x.float(), y.float()
            exact, expected = x @ weight.T, simulate_input(x) @ simulate_weight(weight).T
            layer_format_error = (expected - exact).norm() / exact.norm()
            assert (y - expected).norm() / exact.norm() < 0.1 * layer_format_error
    assert len(seen) == len(originals)
    format_error = ((sim - ref).norm() / ref.norm()).item()
    assert {8: 0.002 < format_error < 0.03, 4: 0.03 < format_error < 0.3}[bits]  # the formats' known sizes
    assert 0.5 * format_error < ((out - ref).norm() / ref.norm()).item() < 1.5 * format_error


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b", "tiny-baichuan2-13b"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_matches_simulated_format(preset, bits):
    quantized = tiny_model(preset, **SHAPE)
    assert quantized.quantize(bits) is quantized
    assert_matches_simulation(quantized, preset, bits)


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
    odd = tiny_model("tiny-baichuan2-7b")  # intermediate_size 176: not a multiple of 32
    with pytest.raises(QuantizeError, match=r"mlp.gate_proj is \[176, 64\].*divisible by 32"):
        odd.quantize(4)
    assert not is_quantized(odd)  # refused before any layer was swapped
    assert not is_quantized(model)
    model.quantize(8)
    with pytest.raises(QuantizeError, match="already quantised"):
        model.quantize(4)


def test_quantized_model_generates():
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(4)
    out = model.generate(torch.tensor([[5, 6, 7]]), do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=[])
    assert out.shape == (1, 8)


def test_int8_side_tensors_follow_a_device_move():
    """A move swaps each weight's `.data`; the int8 copies bitsandbytes keeps beside it must follow.

    `_apply(clone)` is what `.cuda()` / `.to(device)` does, with every tensor replaced on this one device.
    """
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(8)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits  # the first forward moves CB/SCB into each layer's matmul state
        old = [m.state.CB for m in model.modules() if m.__class__.__name__ == "Linear8bitLt"]
        model._apply(lambda t: t.clone())
        layers = [m for m in model.modules() if m.__class__.__name__ == "Linear8bitLt"]
        assert len(layers) == len(old) == 10
        for layer, stale in zip(layers, old):
            assert layer.state.CB.data_ptr() == layer.weight.data_ptr() != stale.data_ptr()
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_authors_idiom_quantize_then_cuda(bits):
    """`model.quantize(bits).cuda()` (the authors' idiom) keeps the weights quantised and in the format."""
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(bits)
    if bits == 8:
        model(torch.tensor([[5, 6, 7]]))  # a forward before the move, as a user trying it on the CPU first
    model = model.cuda()
    layer = model.model.layers[0].self_attn.W_pack
    assert layer.weight.device.type == "cuda" and layer.weight.dtype in (torch.int8, torch.uint8)
    assert_matches_simulation(model, "tiny-baichuan2-7b", bits, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_on_the_gpu(bits):
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).cuda().quantize(bits)
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "cuda"
    assert_matches_simulation(model, "tiny-baichuan2-7b", bits, device="cuda")


def test_memory_benchmark_counts_the_bytes_by_hand():
    """benchmarks/bench_quant_memory.py on a CPU: bytes of the tiny Baichuan2-7B shape, counted by hand."""
    bench = benchmark_script("bench_quant_memory")
    rows = bench.main(["--presets", "tiny-baichuan2-7b", "--modes", "bf16,8bit", "--device", "cpu"])
    h, i, v, layers = 64, 176, 512, 2
    linear = layers * (3 * h * h + h * h + 2 * i * h + i * h)  # W_pack, o_proj, gate/up, down
    other = 2 * v * h + layers * 2 * h + h  # embedding, lm_head, norms
    rows_per_layer = 3 * h + h + 2 * i + h  # int8 keeps one fp32 scale per output row
    expected = {"bf16": 2 * (linear + other), "8bit": linear + 2 * other + 4 * layers * rows_per_layer}
    for row in rows:
        assert abs(row["weights_gib"] * 2**30 - expected[row["mode"]]) < 1024  # + the RoPE frequency buffer


def test_int8_cast_warning_is_logged_once_not_per_matmul(caplog):
    """bitsandbytes warns on every int8 matmul of bf16 inputs; a chat reply would drown in it."""
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).to(torch.bfloat16).quantize(8)
    with caplog.at_level("WARNING"), torch.no_grad():
        for _ in range(3):
            model(torch.tensor([[5, 6, 7]]))
    casts = [r for r in caplog.records if "MatMul8bitLt: inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1  # 30 without the filter: 10 layers x 3 forwards


def test_loading_into_4bit_on_cpu_refuses_shapes_the_kernels_cannot_take(tmp_path):
    from baichuan_tune.builtin import DEFAULT_TOKENIZER
    from baichuan_tune.models.checkpoint import load_model, save_pretrained_atomic
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    folder = save_pretrained_atomic(tiny_model("tiny-baichuan2-7b", **(SHAPE | {"intermediate_size": 176})),
                                    BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER)), tmp_path / "odd")
    with pytest.raises(QuantizeError, match=r"gate_proj is \[176, 64\]: 4-bit on a CPU needs"):
        load_model(folder, quantize=4, device="cpu")


def _lora_grads(model, ids):
    from baichuan_tune.train.adapters import prepare_for_training

    torch.manual_seed(5)
    peft_model = prepare_for_training(model, "qlora", lora_rank=4, lora_dropout=0.0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # B = 0 would hide the gradient path through the layers above
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad and p.grad is not None}


def test_qlora_on_cpu_keeps_the_gradient_through_nf4_layers_after_an_eval_pass():
    """bitsandbytes repacks CPU NF4 weights at an eval-mode forward into a kernel without a backward; the
    gradient into each layer's input would be dropped. sft turns that off before its "before" answers."""
    from baichuan_tune.models.quantize import keep_4bit_trainable

    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(4))
    never_evaluated = _lora_grads(tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(4), ids)
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(4)
    keep_4bit_trainable(model)
    with torch.no_grad():
        model.eval()(ids)  # what sft's before-training answers do
    states = [m.weight.quant_state for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert len(states) == 10 and not any(getattr(s, "packing_format_for_cpu", False) for s in states)
    evaluated = _lora_grads(model, ids)
    first_layer = [n for n in never_evaluated if ".layers.0." in n]
    assert first_layer and never_evaluated.keys() == evaluated.keys()
    for name in never_evaluated:
        torch.testing.assert_close(evaluated[name], never_evaluated[name], rtol=0, atol=0)


def test_qlora_bf16_keeps_embeddings_and_head_in_bf16_and_follows_the_fp32_upcast():
    """qlora_keep_dtype=bf16 undoes PEFT's fp32 upcast of the frozen embeddings, norms and head (half
    their bytes) and the loss and LoRA gradients stay those of the upcast model within bf16 rounding."""
    from baichuan_tune.train.adapters import prepare_for_training

    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    runs = {}
    for keep in (None, torch.bfloat16):
        model = tiny_model("tiny-baichuan2-7b", **SHAPE).to(torch.bfloat16).quantize(4)
        torch.manual_seed(5)
        peft_model = prepare_for_training(model, "qlora", lora_rank=4, lora_dropout=0.0, qlora_keep_dtype=keep)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1)
        base = peft_model.get_base_model()
        dtypes = {base.model.embed_tokens.weight.dtype, base.lm_head.weight.dtype, base.model.norm.weight.dtype}
        lora = {p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
        peft_model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        runs[keep] = (dtypes, lora, float(loss), grads)
    assert runs[None][0] == {torch.float32} and runs[torch.bfloat16][0] == {torch.bfloat16}
    assert runs[None][1] == runs[torch.bfloat16][1] == {torch.float32}  # the adapters train in fp32 either way
    assert abs(runs[None][2] - runs[torch.bfloat16][2]) < 0.02 * abs(runs[None][2])
    for name, grad in runs[None][3].items():
        cos = torch.nn.functional.cosine_similarity(runs[torch.bfloat16][3][name].flatten(), grad.flatten(), 0)
        assert cos > 0.98, (name, float(cos))


def _nf4_layer(out_features: int, in_features: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features, bias=False)).to(torch.bfloat16)
    from baichuan_tune.models.quantize import keep_4bit_trainable, _quantized_linear

    layer = _quantized_linear(bnb, model[0], 4)
    keep_4bit_trainable(nn.Sequential(layer))
    return layer


@pytest.mark.parametrize("shape", [(128, 192), (320, 832), (64, 4096)])
def test_nf4_dequantize_in_torch_ops_equals_bitsandbytes_bit_for_bit(shape):
    """The written-out dequantisation (double-quantised scales, nested blocks of 256 scales that do not
    divide the scale count in the second and third shape) against bitsandbytes' own."""
    from bitsandbytes.functional import dequantize_4bit

    from baichuan_tune.models.quantize import _state_args, nf4_dequantize

    layer = _nf4_layer(*shape)
    state = layer.weight.quant_state
    assert state.nested
    expected = dequantize_4bit(layer.weight.data, state)
    assert torch.equal(nf4_dequantize(layer.weight.data, *_state_args(state)), expected)


def test_nf4_forward_and_input_gradient_equal_bitsandbytes_matmul():
    from baichuan_tune.models.quantize import nf4_forward

    layer = _nf4_layer(96, 320)
    x = torch.randn(2, 7, 320, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 7, 96, dtype=torch.bfloat16)
    expected = layer(x)
    expected.backward(grad)
    expected_grad, x.grad = x.grad, None
    ours = nf4_forward(layer, x)
    ours.backward(grad)
    assert torch.equal(ours, expected) and torch.equal(x.grad, expected_grad)
    assert layer.weight.grad is None


def test_compiled_layers_dequantise_nf4_in_the_graph_and_keep_the_eager_loss(monkeypatch):
    """Under set_fast_paths(compile=True) every NF4 layer traces through nf4_forward (plain ops the compiler
    fuses) instead of bitsandbytes' opaque op; eager forwards and no-grad forwards keep bitsandbytes'."""
    import torch._dynamo

    from baichuan_tune.models import quantize
    from baichuan_tune.models.modeling_baichuan import set_fast_paths
    from baichuan_tune.train.adapters import prepare_for_training

    torch._dynamo.reset()
    model = tiny_model("tiny-baichuan2-7b", **SHAPE).to(torch.bfloat16).quantize(4)
    model = prepare_for_training(model, "qlora", lora_rank=4, lora_dropout=0.0, gradient_checkpointing=True,
                                 qlora_keep_dtype=torch.bfloat16).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads()
    traced = []
    original = quantize.nf4_forward
    monkeypatch.setattr(quantize, "nf4_forward", lambda module, x: traced.append(module) or original(module, x))
    set_fast_paths(model, compile=True, compile_backend="aot_eager")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 10 and all(type(m).__name__ == "CompiledLinear4bit" for m in layers)
    fast_loss, fast_grads = loss_and_grads()
    assert {id(m) for m in traced} == {id(m) for m in layers}  # every layer, while tracing the compiled layers
    assert abs(fast_loss - plain_loss) < 1e-2 * abs(plain_loss)
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten().float(), grad.flatten().float(), 0)
        assert cos > 0.999, (name, float(cos))
    traced.clear()
    with torch.no_grad():
        model(input_ids=ids)  # eval-style forward: bitsandbytes' path
    assert not traced
    torch._dynamo.reset()


def test_compiled_nf4_forward_keeps_no_dequantised_weight_for_backward():
    """Under torch.compile with inductor's partitioner the backward dequantises the weight again: nothing of
    the weight's [out, in] size is among the tensors the forward graph keeps for backward (only the packed
    bytes and scales, as bitsandbytes' MatMul4Bit keeps)."""
    import torch._dynamo
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from baichuan_tune.models.quantize import nf4_forward

    kept = []

    def forward_compiler(gm, example_inputs):
        outputs = next(node for node in gm.graph.nodes if node.op == "output").args[0]
        kept.extend(node.meta["val"] for node in outputs if hasattr(node, "meta") and "val" in node.meta)
        return gm

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm,
                           partition_fn=min_cut_rematerialization_partition)
    layer = _nf4_layer(96, 320)
    x = torch.randn(5, 320, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(lambda x: nf4_forward(layer, x), backend=backend, fullgraph=True)(x)
    out.sum().backward()
    torch._dynamo.reset()
    assert x.grad is not None and kept  # the graph's output and what it keeps for backward
    big = [tuple(t.shape) for t in kept if t.is_floating_point() and t.numel() >= 96 * 320]
    assert not big, big


def test_nf4_in_graph_option_reaches_the_nf4_layers_and_turns_back_off():
    """`--nf4_in_graph` (with `--compile true`) goes through fast_path_kwargs and prepare_for_training to
    every NF4 layer; false (or compile off) leaves bitsandbytes' own class, also after it was on."""
    from baichuan_tune.commands.sft import SFTConfig
    from baichuan_tune.config import read_options
    from baichuan_tune.models.modeling_baichuan import set_fast_paths
    from baichuan_tune.train.adapters import prepare_for_training
    from baichuan_tune.train.training import fast_path_kwargs

    def layer_classes(model):
        return {type(m).__name__ for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}

    for flag, expected in (("true", {"CompiledLinear4bit"}), ("false", {"Linear4bit"})):
        cfg = read_options(SFTConfig, ["--compile", "true", "--nf4_in_graph", flag])
        model = tiny_model("tiny-baichuan2-7b", **SHAPE).quantize(4)
        model = prepare_for_training(model, "qlora", lora_rank=4, **fast_path_kwargs(cfg, None))
        assert layer_classes(model) == expected
    set_fast_paths(model, compile=True)
    assert layer_classes(model) == {"CompiledLinear4bit"}
    set_fast_paths(model, compile=False)
    assert layer_classes(model) == {"Linear4bit"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_nf4_dequantize_on_gpu_follows_bitsandbytes_within_one_unit(dtype):
    """On a GPU the compiled dequantisation is bitsandbytes' up to the rounding of the double-quantised
    scales: a few values in 10,000 at most differ, each by one unit in the last place."""
    import torch._dynamo
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from baichuan_tune.models.quantize import _state_args, nf4_dequantize

    torch._dynamo.reset()
    weight = torch.randn(1536, 1024, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    packed, state = quantize_4bit(weight * 0.02, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = dequantize_4bit(packed, state)
    ours = torch.compile(nf4_dequantize)(packed, *_state_args(state))
    torch._dynamo.reset()
    ulp = expected.float().abs() * torch.finfo(dtype).eps
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    assert ((ours.float() - expected.float()).abs() <= ulp).all()
    assert (ours != expected).float().mean() < 1e-3


def test_nf4_benchmark_smoke_compares_the_two_dequantisations(tmp_path):
    """benchmarks/bench_nf4.py on a CPU: both dequantisations timed and found equal at a small shape."""
    bench = benchmark_script("bench_nf4")
    rows = bench.main(["--device", "cpu", "--shapes", "128x256", "--dtypes", "bfloat16", "--repeats", "2",
                       "--json", str(tmp_path / "nf4.json")])
    assert [(r["shape"], r["dtype"], r["equal"]) for r in rows] == [("128x256", "bfloat16", True)]
    assert rows[0]["bnb_host_us"] > 0 and rows[0]["ours_host_us"] > 0
    assert (tmp_path / "nf4.json").exists()


def test_compiled_nf4_layer_without_quant_state_on_its_weight_keeps_bitsandbytes_forward():
    """A gathered (sharded-run) weight can arrive without its quant_state, which bitsandbytes' forward
    restores from the module: the compiled layer then traces bitsandbytes' path (one graph, no break),
    with its result."""
    import torch._dynamo

    from baichuan_tune.models.quantize import use_compiled_nf4

    layer = _nf4_layer(96, 320)
    x = torch.randn(3, 320, dtype=torch.bfloat16, requires_grad=True)
    expected = layer(x)
    assert use_compiled_nf4(nn.Sequential(layer)) == 1
    layer.quant_state = layer.weight.quant_state
    plain = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4", module=None)
    layer.weight = plain  # as a gathered weight: the packed bytes, no quant_state
    assert getattr(layer.weight, "quant_state", None) is None
    torch._dynamo.reset()
    out = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    torch._dynamo.reset()
    assert torch.equal(out, expected)
