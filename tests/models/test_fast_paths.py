"""The fast paths against the plain ones on tiny models of all four architectures: FlexAttention against
the dense SDPA bias, the chunked head loss against full logits, packed rows against samples alone."""

from __future__ import annotations

import pytest
import torch

from baichuan_tune.models.modeling_baichuan import set_fast_paths
from conftest import sdpa_cudnn_allowed, tiny_model

PRESETS = ["tiny-baichuan-7b", "tiny-baichuan-13b", "tiny-baichuan2-7b", "tiny-baichuan2-13b"]


def _samples(vocab: int, lengths=(7, 5, 9), seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


def _packed_and_padded(samples):
    """Row 0 packs the first two samples (segments 1, 2) and pads; row 1 holds the third sample alone."""
    length = max(len(samples[0]) + len(samples[1]), len(samples[2])) + 2
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    a, b = len(samples[0]), len(samples[1])
    ids[0, :a], ids[0, a : a + b] = samples[0], samples[1]
    mask[0, :a], mask[0, a : a + b] = 1, 2
    ids[1, : len(samples[2])], mask[1, : len(samples[2])] = samples[2], 1
    return ids, mask, [(0, 0, a), (0, a, a + b), (1, 0, len(samples[2]))]


@pytest.mark.parametrize("preset", PRESETS)
def test_flex_attention_logits_equal_dense_bias_and_each_sample_alone(preset):
    """FlexAttention (block mask + ALiBi score_mod) gives the dense path's logits on a packed, padded
    batch, and each packed sample's logits equal that sample run alone (CPU: forward only)."""
    model = tiny_model(preset)
    samples = _samples(model.config.vocab_size)
    ids, mask, spans = _packed_and_padded(samples)
    with torch.no_grad():
        dense = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        set_fast_paths(model, attention="flex")
        flex = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        alone = [model(input_ids=s[None], use_cache=False).logits[0] for s in samples]
        set_fast_paths(model, attention="sdpa")
        alone_dense = [model(input_ids=s[None], use_cache=False).logits[0] for s in samples]
    real = mask.ne(0)
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-4, atol=1e-4)
    for (row, start, end), one, one_dense in zip(spans, alone, alone_dense):
        torch.testing.assert_close(flex[row, start:end], one, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(one, one_dense, rtol=1e-4, atol=1e-4)


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("z_loss", [0.0, 0.05])
def test_chunked_loss_equals_full_logits_loss_and_gradients(preset, z_loss):
    """The chunked head loss (chunks of 4 tokens, not dividing the row) gives the full-logits loss and the
    same gradient for every parameter, with prompt labels -100 and padding; with z-loss too (Baichuan2)."""
    model = tiny_model(preset, z_loss_weight=z_loss).train()
    ids, mask, _ = _packed_and_padded(_samples(model.config.vocab_size))
    labels = ids.masked_fill(mask.eq(0), -100)
    labels[:, :3] = -100  # a prompt
    plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
    set_fast_paths(model, loss_chunk_size=4)
    fast, fast_grads = _loss_and_grads(model, ids, mask, labels)
    assert fast.logits is None and plain.logits is not None
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and "lm_head.weight" in fast_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_keeps_the_z_loss():
    """With z-loss on, the chunked loss exceeds the plain cross-entropy by exactly weight * mean(max_logit^2)."""
    model = tiny_model("tiny-baichuan2-7b", z_loss_weight=0.1).train()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), labels[:, 1:].reshape(-1))
        z = logits.max(-1).values.pow(2).mean()
        set_fast_paths(model, loss_chunk_size=5)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(loss, ce + 0.1 * z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_packed_loss_and_gradients_equal_the_same_samples_padded(preset):
    """A packed row's loss and gradients equal those of the same samples as one right-padded batch: the
    mean over every labelled token of the step, whichever layout carries them."""
    model = tiny_model(preset).train()
    samples = _samples(model.config.vocab_size)
    packed_ids = torch.cat(samples)[None]
    packed_mask = torch.cat([torch.full((len(s),), i + 1) for i, s in enumerate(samples)])[None]
    packed_labels = packed_ids.clone()
    starts = torch.cumsum(torch.tensor([0] + [len(s) for s in samples[:-1]]), 0)
    packed_labels[0, starts] = -100  # as pack_row does: no sample is the target of the one before
    length = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = ids.masked_fill(mask.eq(0), -100)
    labels[:, 0] = -100
    padded, padded_grads = _loss_and_grads(model, ids, mask, labels)
    packed, packed_grads = _loss_and_grads(model, packed_ids, packed_mask, packed_labels)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
def test_flex_and_chunked_loss_on_gpu_bf16_follow_the_plain_path(preset):
    """On a GPU in bf16: FlexAttention (compiled) + chunked loss give the dense path's loss and gradients."""
    model = tiny_model(preset, z_loss_weight=0.01).cuda().train()
    ids, mask, _ = _packed_and_padded(_samples(model.config.vocab_size))
    ids, mask = ids.cuda(), mask.cuda()
    labels = ids.masked_fill(mask.eq(0), -100)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
        set_fast_paths(model, attention="flex", loss_chunk_size=4)
        fast, fast_grads = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=2e-2, atol=2e-2)
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten().float(), grad.flatten().float(), 0)
        assert cos > 0.99, (name, float(cos))


# ----------------------------------------------------------------------------- compiled decoder layers


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from an empty cache (tiny configs differ in shapes) and counts its own graphs."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield counters
    torch._dynamo.reset()


def _lora_model(preset, finetuning_type="lora", device="cpu", **overrides):
    """A tiny model with LoRA on every linear (dropout 0: a compiled graph draws other random masks) and
    non-zero B matrices, so that every layer's gradient path is live; gradient checkpointing on. QLoRA
    quantises on `device` (on a GPU bitsandbytes' kernels take any shape)."""
    from baichuan_tune.train.adapters import prepare_for_training

    model = tiny_model(preset, **overrides).to(device)
    if finetuning_type == "qlora":
        model = model.to(torch.bfloat16).quantize(4)
    torch.manual_seed(5)
    model = prepare_for_training(model, finetuning_type, lora_rank=4, lora_dropout=0.0, gradient_checkpointing=True,
                                 qlora_keep_dtype=torch.bfloat16 if finetuning_type == "qlora" else None)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_layers_equal_eager_layers_with_lora_and_checkpointing(preset, fresh_dynamo):
    """`compile` (each decoder layer through torch.compile; aot_eager here, as it traces and runs the same
    graph inductor would compile) gives the eager path's loss and LoRA gradients under gradient
    checkpointing on a packed, padded batch, and its logits in eval (FlexAttention too); the chunked loss
    on top changes nothing either."""
    model = _lora_model(preset, z_loss_weight=0.05)
    ids, mask, _ = _packed_and_padded(_samples(model.config.vocab_size))
    labels = ids.masked_fill(mask.eq(0), -100)
    plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
    with torch.no_grad():
        plain_logits = model.eval()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    set_fast_paths(model, compile=True, compile_backend="aot_eager", loss_chunk_size=4)
    fast, fast_grads = _loss_and_grads(model.train(), ids, mask, labels)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1  # the compiled path ran
    with torch.no_grad():
        set_fast_paths(model, compile=True, compile_backend="aot_eager", attention="flex")
        fast_logits = model.eval()(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == fast_grads.keys() and any(".layers.0." in n for n in fast_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    real = mask.ne(0)
    torch.testing.assert_close(fast_logits[real], plain_logits[real], rtol=1e-4, atol=1e-4)


def test_compiled_layers_compile_once_for_all_layers_and_once_more_for_all_lengths(fresh_dynamo):
    """One graph serves every layer, and batches of new lengths reuse a second, dynamic-shape graph:
    4 lengths x 2 layers x (forward + recomputation) compile 2 graphs, not 16."""
    model = _lora_model("tiny-baichuan2-7b")
    set_fast_paths(model, compile=True, compile_backend="aot_eager")
    for length in (9, 13, 17, 22):
        ids = torch.randint(3, 512, (2, length), generator=torch.Generator().manual_seed(length))
        model(input_ids=ids, labels=ids).loss.backward()
    assert fresh_dynamo["stats"]["unique_graphs"] == 2
    assert not fresh_dynamo["graph_break"]


def test_compiled_layers_equal_eager_layers_under_qlora_nf4(fresh_dynamo):
    """NF4 layers under compile (dequantised by nf4_forward inside the graph): the QLoRA
    loss and LoRA gradients of the eager path in bf16, with no graph break."""
    model = _lora_model("tiny-baichuan2-7b", "qlora", hidden_size=64, num_attention_heads=4, intermediate_size=192)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, ids, None, ids)
        set_fast_paths(model, compile=True, compile_backend="aot_eager")
        fast, fast_grads = _loss_and_grads(model, ids, None, ids)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1 and not fresh_dynamo["graph_break"]
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-2, atol=1e-2)
    assert plain_grads.keys() == fast_grads.keys() and len(fast_grads) == 20
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten().float(), grad.flatten().float(), 0)
        assert cos > 0.999, (name, float(cos))


def test_chunked_loss_keeps_no_normalised_head_for_backward():
    """NormHead under the chunked loss scales each chunk's logits by 1 / |row| instead of normalising the
    [V, hidden] weight, so the only head-sized tensor autograd saves is the stored weight itself (the plain
    path keeps the normalised copy)."""
    model = tiny_model("tiny-baichuan2-7b").train()
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    head = model.lm_head.weight

    def head_sized_saves():
        saved = []

        def pack(t):
            if t.shape == head.shape:
                saved.append(t.data_ptr() == head.data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return saved

    assert False in head_sized_saves()  # the plain NormHead keeps its normalised copy
    set_fast_paths(model, loss_chunk_size=5)
    assert head_sized_saves() and all(head_sized_saves())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset,method", [("tiny-baichuan2-7b", "lora"), ("tiny-baichuan-13b", "lora"),
                                           ("tiny-baichuan2-13b", "qlora")])
def test_compiled_layers_on_gpu_bf16_follow_the_plain_path(preset, method, fresh_dynamo):
    """On a GPU in bf16, inductor-compiled layers + FlexAttention + the chunked loss (LoRA or QLoRA NF4,
    gradient checkpointing) give the eager dense path's loss and LoRA gradients on a packed, padded batch."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    model = _lora_model(preset, method, "cuda", z_loss_weight=0.01)
    ids, mask, _ = _packed_and_padded(_samples(512))
    ids, mask = ids.cuda(), mask.cuda()
    labels = ids.masked_fill(mask.eq(0), -100)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
        set_fast_paths(model, attention="flex", loss_chunk_size=4, compile=True)
        fast, fast_grads = _loss_and_grads(model, ids, mask, labels)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(fast.loss, plain.loss, rtol=2e-2, atol=2e-2)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten().float(), grad.flatten().float(), 0)
        assert cos > 0.99, (name, float(cos))


def test_compile_option_reaches_every_decoder_stack():
    """`--compile true` (ModelOptions.compile) goes through fast_path_kwargs and prepare_for_training to the
    model inside the PEFT wrapper; off, the layers run eagerly (the reference)."""
    from baichuan_tune.commands.sft import SFTConfig
    from baichuan_tune.config import read_options
    from baichuan_tune.models.modeling_baichuan import BaichuanModel
    from baichuan_tune.train.adapters import prepare_for_training
    from baichuan_tune.train.training import fast_path_kwargs

    for flag, backend in (("true", "inductor"), ("false", None)):
        cfg = read_options(SFTConfig, ["--compile", flag])
        model = prepare_for_training(tiny_model("tiny-baichuan2-13b"), "lora", **fast_path_kwargs(cfg, None))
        stacks = [m for m in model.modules() if isinstance(m, BaichuanModel)]
        assert len(stacks) == 1 and stacks[0].compile_backend == backend


@pytest.mark.parametrize("preset,compiled", [("tiny-baichuan-13b", False), ("tiny-baichuan2-7b", True)])
def test_sdpa_cudnn_false_leaves_cudnn_out_of_forward_and_recomputation(preset, compiled, monkeypatch, fresh_dynamo):
    """`--sdpa_cudnn false` reaches the decoder stack through fast_path_kwargs; then every SDPA call of a
    checkpointed training step, the forward and the recomputation in backward, runs with cuDNN's attention
    disabled (by default it stays enabled), and the loss and gradients are the default path's, compiled or
    not (the CPU runs the same kernel either way)."""
    from baichuan_tune.commands.sft import SFTConfig
    from baichuan_tune.config import read_options
    from baichuan_tune.models.modeling_baichuan import BaichuanModel
    from baichuan_tune.train.training import fast_path_kwargs

    model = _lora_model(preset)
    ids, mask, _ = _packed_and_padded(_samples(model.config.vocab_size))
    labels = ids.masked_fill(mask.eq(0), -100)
    allowed = sdpa_cudnn_allowed(monkeypatch)
    set_fast_paths(model, compile=compiled, compile_backend="aot_eager")  # the reference: SDPA's own choice
    plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
    torch._dynamo.reset()  # the kernel choice is traced into a compiled graph: compile afresh
    layers = model.config.num_hidden_layers
    assert len(allowed) == 2 * layers and all(allowed)  # forward and recomputation, cuDNN allowed
    cfg = read_options(SFTConfig, ["--sdpa_cudnn", "false", "--compile", str(compiled).lower()])
    kwargs = fast_path_kwargs(cfg, None)
    assert kwargs["sdpa_cudnn"] is False
    set_fast_paths(model, attention=kwargs["attention"], compile=kwargs["compile"], sdpa_cudnn=False,
                   compile_backend="aot_eager")
    assert [m.sdpa_backends is not None for m in model.modules() if isinstance(m, BaichuanModel)] == [True]
    allowed.clear()
    fast, fast_grads = _loss_and_grads(model, ids, mask, labels)
    assert len(allowed) == 2 * layers and not any(allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the restriction ends with each layer call
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-6, atol=1e-7)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sdpa_cudnn_false_on_gpu_fp16_follows_sdpas_own_choice(fresh_dynamo):
    """On a GPU in fp16 (the 13B recipe's precision), compiled ALiBi layers under gradient checkpointing with cuDNN's attention left out
    (the recipe's setting) give the loss and LoRA gradients of SDPA's own kernel choice, within fp16."""
    model = _lora_model("tiny-baichuan-13b", "lora", "cuda")
    ids, mask, _ = _packed_and_padded(_samples(512))
    ids, mask = ids.cuda(), mask.cuda()
    labels = ids.masked_fill(mask.eq(0), -100)
    with torch.autocast("cuda", dtype=torch.float16):
        set_fast_paths(model, compile=True)
        plain, plain_grads = _loss_and_grads(model, ids, mask, labels)
        torch._dynamo.reset()
        set_fast_paths(model, compile=True, sdpa_cudnn=False)
        fast, fast_grads = _loss_and_grads(model, ids, mask, labels)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=2e-2, atol=2e-2)
    assert plain_grads.keys() == fast_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fast_grads[name].flatten().float(), grad.flatten().float(), 0)
        assert cos > 0.99, (name, float(cos))


def _group(vocab: int, sizes=((1,), (2,), (1,), (3,)), seed: int = 3, same_length: bool = False):
    """Micro-batches of features of random ids; labels -100 on a prompt of 2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    group = []
    for (b,) in sizes:
        n = 6 if same_length else None
        rows = []
        for _ in range(b):
            length = n or int(torch.randint(4, 10, (1,), generator=gen))
            ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
            rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
        group.append(rows)
    return group


def _plain_and_fused_grads(model, group, z_loss):
    from baichuan_tune.data.collate import collate_padded, fuse_micro_batches

    model.zero_grad(set_to_none=True)
    plain = 0.0
    for mb in group:
        loss = model(**collate_padded(mb), use_cache=False).loss / len(group)
        loss.backward()
        plain += float(loss.detach())
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    fused = model(**fuse_micro_batches(group, 4096, z_loss=z_loss), use_cache=False).loss
    fused.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return plain, float(fused.detach()), want, got


@pytest.mark.parametrize("chunk", [0, 5])
@pytest.mark.parametrize("preset", PRESETS)
def test_fused_group_loss_and_gradients_equal_the_plain_accumulation(preset, chunk):
    """One packed row with per-token weights gives the plain loop's mean loss and summed gradients:
    RoPE (7b) and ALiBi (13b), Baichuan2's NormHead with its z-loss (same-length rows: no padding)."""
    model = tiny_model(preset, **({"z_loss_weight": 1e-2} if "baichuan2" in preset else {})).train()
    set_fast_paths(model, loss_chunk_size=chunk)
    z_loss = bool(model.config.z_loss_weight)
    group = _group(model.config.vocab_size, same_length=z_loss)
    plain, fused, want, got = _plain_and_fused_grads(model, group, z_loss)
    assert fused == pytest.approx(plain, rel=1e-5)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_group_with_z_loss_and_lora_equals_the_plain_accumulation():
    model = _lora_model("tiny-baichuan2-13b", z_loss_weight=1e-2)
    group = _group(model.config.vocab_size, same_length=True)
    plain, fused, want, got = _plain_and_fused_grads(model, group, True)
    assert fused == pytest.approx(plain, rel=1e-5)
    assert any("lora_A" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
