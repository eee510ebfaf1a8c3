"""8-bit and 4-bit weights through bitsandbytes: the authors' in-place `model.quantize(8|4)`.

`quantize(model, bits)` swaps every Linear of the decoder layers (`W_pack`, `o_proj`, `gate_proj`,
`up_proj`, `down_proj`) for bitsandbytes' `Linear8bitLt` (LLM.int8(), vector-wise absmax, outlier
threshold 6.0) or `Linear4bit` (NF4 in blocks of 64 with double-quantised scales, as QLoRA), the same
layers the authors' `quantize` converts. The embedding, the norms and `lm_head` (NormHead included)
stay in the model's dtype. The weights are quantised on the device they are on; moving the model to
another device afterwards (`model.quantize(4).cuda()`, the authors' idiom) keeps them quantised.

Loading a checkpoint straight into 8/4 bits (`--quantization_bit` on the commands) goes through transformers'
`BitsAndBytesConfig` in `checkpoint.load_model`; `bnb_config(bits)` here is the config both use.

Inside compiled decoder layers (`--compile true --nf4_in_graph true`) a training forward dequantises NF4
weights with `nf4_dequantize`, plain torch ops the compiler fuses, instead of bitsandbytes' op (see
`use_compiled_nf4`); bitsandbytes' own forward stays the reference everywhere else.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import BaichuanTuneError

QUANTIZED_LINEARS = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = (4, 8)


class QuantizeError(BaichuanTuneError, ValueError):
    """Quantisation was asked for something it cannot do; the message says what and why."""


def check_bits(bits) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise QuantizeError(f"quantize must be 4 or 8 (bits per weight), got {bits!r}")
    return int(bits)


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantizeError(
            "8-bit/4-bit needs bitsandbytes: pip install 'baichuan-tune[quant]' (or pip install bitsandbytes)"
        ) from exc
    _say_int8_cast_once()
    return bitsandbytes


class _Once(logging.Filter):
    """Lets a message through the first time only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _say_int8_cast_once() -> None:
    # bitsandbytes logs this warning on every LLM.int8() matmul with non-fp16 inputs (bf16 models): one
    # line per layer per token, which buries a chat reply or a server log. Once is enough to inform.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once("MatMul8bitLt: inputs will be cast"))


def is_quantized(model) -> bool:
    """True for a model with bitsandbytes layers (in-place `quantize` or loaded with BitsAndBytesConfig)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return True
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    # any class a layer derives from: `use_compiled_nf4` gives NF4 layers a subclass defined here
    return any(c.__module__.startswith("bitsandbytes") for m in model.modules() for c in type(m).__mro__)


def stored_bytes(tensors) -> int:
    """Bytes `tensors` take as stored, plus the scales bitsandbytes keeps beside quantised weights
    (NF4 absmax and its double-quantised absmax, LLM.int8() SCB)."""
    total = 0
    for tensor in tensors:
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        for extra in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                      getattr(tensor, "SCB", None)):
            if isinstance(extra, torch.Tensor):
                total += extra.numel() * extra.element_size()
    return total


def bnb_config(bits: int, compute_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype = torch.uint8):
    """transformers' BitsAndBytesConfig for loading a checkpoint in `bits` (same settings as `quantize`).
    `quant_storage`: the dtype the packed NF4 bytes are stored as (the compute dtype for sharded training, so
    the layer's weights are float-typed like the rest of its FSDP unit and never cast by it)."""
    import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if check_bits(bits) == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=["lm_head"],
    )


def _quantized_linear(bnb, linear: nn.Linear, bits: int) -> nn.Module:
    weight = linear.weight.detach()
    device, dtype = weight.device, weight.dtype
    if bits == 8:
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, threshold=6.0, device="meta"
        )
        # Int8Params quantises when it moves off the CPU (or onto it from the CPU), hence the round trip.
        new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=new
        )
    return new.to(device).train(linear.training)


def resync_int8_state(model) -> None:
    """Point LLM.int8() layers' side tensors at their weights after `model.to(device)` / `.cuda()`.

    torch moves a parameter by swapping its `.data`, which leaves the copies bitsandbytes keeps beside an
    `Int8Params` (`CB`, `SCB`, and `state.CB`/`state.SCB` after a first forward) on the old device;
    the next forward then mixes devices. `BaichuanForCausalLM._apply` calls this after every move.
    """
    bnb = import_bitsandbytes()
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear8bitLt):
            continue
        weight, state = module.weight, module.state
        if getattr(weight, "CB", None) is not None:
            weight.CB = weight.data
        if getattr(weight, "SCB", None) is not None:
            weight.SCB = weight.SCB.to(weight.device)
        if state.CB is not None:
            state.CB = weight.data
        if state.SCB is not None:
            state.SCB = state.SCB.to(weight.device)


def keep_4bit_trainable(model) -> None:
    """Keep gradients flowing through NF4 layers on a CPU, for QLoRA training.

    bitsandbytes 0.50 repacks a CPU Linear4bit's weight for its AVX512-BF16 kernel at the first forward in
    eval mode, in place, and from then on computes it with an op that has no backward: the gradient into
    the layer's input is silently dropped, so every LoRA matrix below it learns from a truncated gradient
    (an eval pass or generation before or during training is enough). Training runs turn the repacking
    off before any forward; repacking that already happened is undone with bitsandbytes' own inverse, which
    restores the scales only approximately (about 2% of a weight's scale). GPUs never repack.
    """
    bnb = import_bitsandbytes()
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)


def check_cpu_4bit_shapes(model, names=QUANTIZED_LINEARS) -> None:
    """Refuse shapes bitsandbytes' CPU NF4 kernels cannot take, before any weight is touched.

    On a CPU, bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 kernel, which asserts
    out_features % 32 == 0, and its unpacked path quantises blocks of 64 that straddle rows wrongly when
    in_features % 64 != 0 (2.5x the NF4 rounding error). Every published shape meets both; GPUs have
    neither limit.
    """
    for module_name, module in model.named_modules():
        for name in names:
            child = getattr(module, name, None)
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                _check_cpu_4bit_shape(f"{module_name}.{name}", child.out_features, child.in_features)


def check_cpu_4bit_config(config) -> None:
    """`check_cpu_4bit_shapes` from a config alone, for loading a checkpoint straight into 4 bits on a CPU."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"W_pack": (3 * h, h), "o_proj": (h, h), "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    for name, (out_features, in_features) in shapes.items():
        _check_cpu_4bit_shape(f"model.layers.*.{name}", out_features, in_features)


def _check_cpu_4bit_shape(name: str, out_features: int, in_features: int) -> None:
    if out_features % 32 or in_features % 64:
        raise QuantizeError(
            f"{name} is [{out_features}, {in_features}]: 4-bit on a CPU needs out_features divisible by 32 and "
            "in_features by 64 (bitsandbytes' CPU kernels); use 8 bits here, or a GPU"
        )


def quantize_linears(model, bits: int, names=QUANTIZED_LINEARS) -> int:
    """Swap every plain nn.Linear child called one of `names` for its bitsandbytes version; the count."""
    bnb = import_bitsandbytes()
    replaced = 0
    for module in list(model.modules()):
        for name in names:
            child = getattr(module, name, None)
            if type(child) is nn.Linear:
                setattr(module, name, _quantized_linear(bnb, child, bits))
                replaced += 1
    return replaced


def quantize(model, bits: int):
    """Quantise `model`'s decoder Linear layers in place to `bits` (8: LLM.int8(), 4: NF4); returns `model`."""
    bits = check_bits(bits)
    import_bitsandbytes()
    if is_quantized(model):
        raise QuantizeError("the model is already quantised; load it again in full precision to change bits")
    if bits == 4:
        check_cpu_4bit_shapes(model)
    if not quantize_linears(model, bits):
        raise QuantizeError("found no decoder Linear layers (W_pack, o_proj, gate/up/down_proj) to quantise")
    model.quantization_bits = bits
    return model


# ----------------------------------------------------------------------------- NF4 inside compiled layers


def nf4_dequantize(packed, absmax, code, blocksize: int, shape, dtype, nested=None) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit` of an NF4 weight, as plain torch ops ([out, in] in `dtype`).

    Written out so that torch.compile fuses it into one kernel inside a compiled layer, where bitsandbytes'
    op is an opaque call with about 0.25 ms of host work each (docs/PERFORMANCE.md). The formulas are
    bitsandbytes': each byte holds two 4-bit codes, the first in the high nibble; a value is
    code[q] * absmax of its block of `blocksize`; with double quantisation (`nested` = (absmax2, code2,
    offset, blocksize2)) each absmax is code2[a] * absmax2 of its block of blocksize2, plus offset; all in
    fp32, then cast to `dtype`. Equal to bitsandbytes' on a CPU; on a GPU at most about 1 value in 60,000
    rounds one unit in the last place apart (measured at the published shapes; a GPU-marked test bounds it).
    """
    codes = packed.reshape(-1).view(torch.uint8)  # [n / 2] bytes (stored as another dtype when sharded)
    # A broadcast shift, not a stack of the two nibbles: the compiler fuses it with the rest (a stack was
    # written out as two byte tensors first). The shifts are a small constant tensor, which the compiler's
    # cache cannot store (torch logs a warning at the first compile); [4, 0] computed from an arange on
    # int64 codes instead ran the 13B recipe's step slower (0.29 against 0.17-0.22 s, 0.12 GiB more; one
    # run, docs/PERFORMANCE.md).
    shifts = torch.tensor([4, 0], dtype=torch.uint8, device=codes.device)
    pairs = ((codes[:, None] >> shifts) & 15).reshape(-1).long()  # [n / 2, 2] -> [n]: high nibble first
    if nested is not None:
        absmax2, code2, offset, blocksize2 = nested
        blocks = torch.arange(absmax.numel(), device=absmax.device) // blocksize2
        absmax = code2[absmax.long()] * absmax2[blocks] + offset  # [n / blocksize]
    values = code[pairs].view(-1, blocksize) * absmax.float()[:, None]  # [n / blocksize, blocksize]
    return values.view(shape).to(dtype)


def _state_args(state) -> tuple:
    nested = None
    if state.nested:
        nested = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
    return state.absmax, state.code, state.blocksize, tuple(state.shape), state.dtype, nested


def fusable_nf4(module) -> bool:
    """An NF4 layer `nf4_dequantize` can read: whole blocks, the packed bytes in one plain (unsharded) tensor."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or type(module.weight.data) is not torch.Tensor:
        return False
    return math.prod(state.shape) % state.blocksize == 0


def nf4_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit's training forward with `nf4_dequantize` (inside a compiled layer; see `use_compiled_nf4`).

    The dequantisation runs under `checkpoint`, which torch.compile turns into "recompute in backward":
    the backward dequantises the weight again for the input's gradient, as bitsandbytes' MatMul4Bit does,
    instead of keeping the [out, in] weight of every layer until then (the compiler otherwise merges the
    two dequantisations and keeps it, even from an autograd.Function that dequantises in its backward:
    an earlier build did that and held 0.43 GiB more on the 13B recipe)."""
    from torch.utils.checkpoint import checkpoint

    dtype = module.compute_dtype or x.dtype
    # no RNG state to keep: the dequantisation draws no random numbers
    weight = checkpoint(nf4_dequantize, module.weight.data, *_state_args(module.weight.quant_state),
                        use_reentrant=False, preserve_rng_state=False)  # [out, in]
    out = torch.nn.functional.linear(x.to(dtype), weight.to(dtype))
    if module.bias is not None:
        out = out + module.bias.to(out.dtype)
    return out.to(x.dtype)


def _compiled_nf4_forward(self, x):
    # checked at each call: a sharded run's gathered weight may come without its quant_state, which only
    # bitsandbytes' forward restores (from the module)
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and fusable_nf4(self):
        return nf4_forward(self, x)
    return self._bnb_forward(x)


_COMPILED_NF4: dict[type, type] = {}


def use_compiled_nf4(model, enabled: bool = True) -> int:
    """Let each NF4 layer of `model` compute through `nf4_forward` while torch.compile traces a training
    forward (grad enabled), so that its dequantisation fuses into the compiled layer; everywhere else
    (eager, generation, no grad) bitsandbytes' own forward runs, and stays the reference. Done by a
    subclass of the layer's class (its state, saving and PEFT's wrapping unchanged); `enabled=False`
    gives the layers their own class back. Returns the layers changed."""
    bnb = import_bitsandbytes()
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or not fusable_nf4(module):
            continue
        compiled = type(module) in _COMPILED_NF4.values()
        if enabled == compiled:
            continue
        base = type(module).__mro__[1] if compiled else type(module)
        if enabled and base not in _COMPILED_NF4:
            _COMPILED_NF4[base] = type(f"Compiled{base.__name__}", (base,),
                                       {"forward": _compiled_nf4_forward, "_bnb_forward": base.forward})
        module.__class__ = _COMPILED_NF4[base] if enabled else base
        changed += 1
    return changed
