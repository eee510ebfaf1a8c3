"""`BaichuanForCausalLM` against independent oracles, on tiny random-weight models (CPU, fp32).

Oracles: transformers' `LlamaForCausalLM` on converted weights (the RoPE models are LLaMA with q/k/v packed
into `W_pack` and, for Baichuan2, a row-normalised head); a plain computation written here from the
formulas in FACTS.md (the ALiBi models); hand-computed losses and gradients; the same sample run alone.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, StaticCache

import baichuan_tune  # noqa: F401  (registers the Auto classes)
from baichuan_tune.errors import BaichuanTuneError
from baichuan_tune.models import BaichuanConfig, BaichuanForCausalLM, NormHead, alibi_slopes
from baichuan_tune.models.modeling_baichuan import segment_positions

ROPE = ["tiny-baichuan-7b", "tiny-baichuan2-7b"]
ALIBI = ["tiny-baichuan-13b", "tiny-baichuan2-13b"]
VARIANTS = ROPE + ALIBI
VOCAB = 512  # the tiny presets' vocabulary
ATOL = 1e-4


def random_ids(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=generator)  # ids 0-2 are pad/bos/eos


def left_padded_batch(seed=0):
    """Two rows: a full 10-token sample and a 6-token sample left-padded with 4 pad tokens."""
    ids = random_ids(2, 10, seed=seed)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def cache_of(output):
    """The KV cache of a model output (transformers renamed the field from past_key_values to cache)."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


@torch.no_grad()
def logits_of(model, ids, mask=None):
    return model(ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------- RoPE == LLaMA


def to_llama(model: BaichuanForCausalLM) -> LlamaForCausalLM:
    """LLaMA with the same weights: W_pack rows split into q, k, v; a NormHead normalised once."""
    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager",
    )
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("W_pack.weight"):
            prefix = key.removesuffix("W_pack.weight")
            q, k, v = value.chunk(3, dim=0)  # [3*hidden, hidden] -> 3 x [hidden, hidden]
            state |= {prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v}
        elif key == "lm_head.weight" and c.norm_head:
            state[key] = value / value.norm(dim=1, keepdim=True)
        else:
            state[key] = value
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize("preset", ROPE)
def test_rope_logits_equal_llama(preset):
    model = tiny_model(preset)
    llama = to_llama(model)
    ids = random_ids(2, 12)
    assert (logits_of(model, ids) - logits_of(llama, ids)).abs().max() <= ATOL


@pytest.mark.parametrize("preset", ROPE)
def test_rope_left_padded_logits_equal_llama(preset):
    model = tiny_model(preset)
    llama = to_llama(model)
    ids, mask = left_padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = llama(ids, attention_mask=mask, position_ids=position_ids).logits
    got = logits_of(model, ids, mask)  # positions come from the mask alone
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= ATOL


@pytest.mark.parametrize("preset", ROPE)
def test_rope_greedy_generate_equals_llama(preset):
    model = tiny_model(preset)
    llama = to_llama(model)
    ids, mask = left_padded_batch(seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ours, theirs = model.generate(ids, **kwargs), llama.generate(ids, **kwargs)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- ALiBi == formulas


def reference_slopes(num_heads: int) -> list[float]:
    """FACTS.md: geometric slopes from 2^(-8/n) for n a power of two; otherwise those of the nearest
    lower power of two p, then every other slope of the 2p-head sequence."""

    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 1 << (num_heads.bit_length() - 1)
    return geometric(p) if p == num_heads else geometric(p) + geometric(2 * p)[::2][: num_heads - p]


def alibi_probs(q, k, slopes, key_mask, form):
    """softmax(q k^T / sqrt(d) + ALiBi + causal/padding mask): q, k [B, H, T, D] -> [B, H, T, T]."""
    t = q.shape[2]
    query, key = torch.arange(t)[:, None], torch.arange(t)[None, :]
    distance = key - query if form == "baichuan2" else key.expand(t, t)  # Baichuan2-13B / Baichuan-13B
    bias = torch.tensor(slopes)[:, None, None] * distance  # [H, T, T]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    allowed = (key <= query) & key_mask[:, None, None, :]  # [B, 1, T, T]
    allowed = allowed | (key == query)  # a padding query sees itself, so no row is empty
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_alibi_logits(model, ids, key_mask=None, slopes=None, form="baichuan2"):
    """The ALiBi model computed from its state dict with plain tensor ops: pre-norm RMSNorm, packed
    q/k/v, ALiBi attention, SwiGLU, final norm, plain or row-normalised head."""
    c, w = model.config, model.state_dict()
    heads, d, eps = c.num_attention_heads, c.head_dim, c.rms_norm_eps
    slopes = reference_slopes(heads) if slopes is None else slopes
    key_mask = torch.ones_like(ids, dtype=torch.bool) if key_mask is None else key_mask.bool()
    b, t = ids.shape
    h = w["model.embed_tokens.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q, k, v = (x @ w[p + "self_attn.W_pack.weight"].T).split(c.hidden_size, dim=-1)
        q, k, v = (y.view(b, t, heads, d).transpose(1, 2) for y in (q, k, v))  # [B, H, T, D]
        attn = alibi_probs(q, k, slopes, key_mask, form) @ v
        h = h + attn.transpose(1, 2).reshape(b, t, -1) @ w[p + "self_attn.o_proj.weight"].T  # [B, T, hidden]
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["lm_head.weight"]
    if c.norm_head:
        head = head / head.norm(dim=1, keepdim=True)
    return rms_norm(h, w["model.norm.weight"], eps) @ head.T


@pytest.mark.parametrize("preset", ALIBI)
def test_alibi_logits_equal_formula(preset):
    model = tiny_model(preset)
    assert model.config.num_attention_heads == 5  # not a power of two: the interleaved slopes are used
    ids = random_ids(2, 12)
    got = logits_of(model, ids)
    assert (got - reference_alibi_logits(model, ids)).abs().max() <= ATOL
    # The check can fail: the same computation without the position bias is far off.
    assert (got - reference_alibi_logits(model, ids, slopes=[0.0] * 5)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("preset", ALIBI)
def test_alibi_padded_logits_equal_formula(preset):
    model = tiny_model(preset)
    ids, mask = left_padded_batch()
    real = mask.bool()
    assert (logits_of(model, ids, mask)[real] - reference_alibi_logits(model, ids, mask)[real]).abs().max() <= ATOL


def test_alibi_slopes_follow_published_rule():
    expected_40 = [2 ** (-8 * (i + 1) / 32) for i in range(32)] + [2 ** (-8 * (i + 1) / 64) for i in range(0, 16, 2)]
    assert torch.allclose(alibi_slopes(40), torch.tensor(expected_40), rtol=1e-6, atol=0)
    assert torch.allclose(alibi_slopes(40), torch.tensor(reference_slopes(40)), rtol=1e-6, atol=0)
    geometric_32 = [2 ** (-0.25 * (i + 1)) for i in range(32)]  # start 2^(-8/32), ratio 2^(-8/32)
    assert torch.allclose(alibi_slopes(32), torch.tensor(geometric_32), rtol=1e-6, atol=0)
    assert alibi_slopes(5).tolist() == [0.25, 0.0625, 0.015625, 0.00390625, 0.5]


def test_baichuan_13b_and_baichuan2_13b_alibi_forms_agree():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 9, 16), torch.randn(2, 5, 9, 16)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, :3] = False
    slopes = reference_slopes(5)
    key_form = alibi_probs(q, k, slopes, key_mask, form="baichuan")  # slope * key
    relative_form = alibi_probs(q, k, slopes, key_mask, form="baichuan2")  # slope * (key - query)
    assert torch.allclose(key_form, relative_form, atol=1e-6)
    model = tiny_model("tiny-baichuan2-13b")
    ids = random_ids(1, 10)
    assert torch.allclose(reference_alibi_logits(model, ids, form="baichuan"), reference_alibi_logits(model, ids), atol=1e-5)


# ----------------------------------------------------------------------------- NormHead


def test_norm_head_train_forward_and_gradient():
    head = tiny_model("tiny-baichuan2-7b").lm_head.train()
    assert isinstance(head, NormHead)
    torch.manual_seed(0)
    x, upstream = torch.randn(3, 4, 64), torch.randn(3, 4, VOCAB)
    out = head(x)
    weight = head.weight.detach()
    row_norm = weight.norm(dim=1, keepdim=True)  # [V, 1]
    assert (out - x @ (weight / row_norm).T).abs().max() <= 1e-5
    (out * upstream).sum().backward()

    explicit = weight.clone().requires_grad_()  # autograd through the written-out formula
    (x @ (explicit / explicit.norm(dim=1, keepdim=True)).T * upstream).sum().backward()
    assert torch.allclose(head.weight.grad, explicit.grad, atol=1e-5)
    # Closed form: d/dW of (W/|W|) with G = dL/d(W/|W|) is (G - <G, W/|W|> W/|W|) / |W| per row.
    g = upstream.reshape(-1, VOCAB).T @ x.reshape(-1, 64)  # [V, hidden]
    unit = weight / row_norm
    closed_form = (g - (g * unit).sum(1, keepdim=True) * unit) / row_norm
    assert torch.allclose(head.weight.grad, closed_form, atol=1e-5)
    assert not torch.allclose(head.weight.grad, g, atol=1e-3)  # not a plain linear layer's gradient


def test_norm_head_eval_equals_train_and_keeps_stored_weight():
    model = tiny_model("tiny-baichuan2-7b")
    stored = model.lm_head.weight.detach().clone()
    assert not torch.allclose(stored.norm(dim=1), torch.ones(VOCAB))  # published files are un-normalised
    ids = random_ids(2, 8)
    eval_logits = logits_of(model.eval(), ids)
    eval_again = logits_of(model, ids)  # served from the cached normalised weight
    train_logits = model.train()(ids).logits.detach()
    assert torch.allclose(eval_logits, train_logits, atol=1e-6)
    assert torch.equal(eval_logits, eval_again)
    assert torch.equal(model.lm_head.weight.detach(), stored)


def head_logits(hidden, weight):
    return hidden @ (weight / weight.norm(dim=1, keepdim=True)).T


@pytest.mark.parametrize("fused", [False, True])  # a fused AdamW step does not bump the version counter
def test_norm_head_cache_refreshes_after_optimizer_step(fused):
    head = tiny_model("tiny-baichuan2-7b").lm_head.eval()
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = head(x)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.5, fused=fused)
    head.train()
    head(x).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = head.eval()(x)
    expected = head_logits(x, head.weight.detach())
    assert (after - expected).abs().max() <= 1e-5
    assert (after - before).abs().max() > 1e-2  # the step did change the logits


def test_norm_head_cache_refreshes_after_load_state_dict_and_in_place_edit():
    model, other = tiny_model("tiny-baichuan2-7b", seed=0), tiny_model("tiny-baichuan2-7b", seed=1)
    ids = random_ids(1, 6)
    logits_of(model, ids)  # fills the cache
    model.load_state_dict(other.state_dict())
    assert torch.allclose(logits_of(model, ids), logits_of(other, ids), atol=1e-6)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
        hidden = model.model(ids).last_hidden_state
    assert (logits_of(model, ids) - head_logits(hidden, model.lm_head.weight.detach())).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- loss


def hand_loss(logits, labels, z_weight):
    """Mean cross-entropy over shifted, non-ignored labels + z_weight * mean over every shifted position
    of (max logit)^2, with plain tensor ops."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    top = logits.max(-1, keepdim=True).values  # [B, T-1, 1]
    log_z = top.squeeze(-1) + (logits - top).exp().sum(-1).log()
    keep = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    cross_entropy = ((log_z - picked) * keep).sum() / keep.sum()
    return cross_entropy + z_weight * top.squeeze(-1).pow(2).mean()


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b"])
def test_loss_with_and_without_z_loss(preset):
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[0, :4] = -100
    plain = tiny_model(preset)
    assert plain.config.z_loss_weight == 0.0
    out = plain(ids, labels=labels)
    assert abs(out.loss.item() - hand_loss(out.logits, labels, 0.0).item()) <= 1e-5
    weighted = tiny_model(preset, z_loss_weight=0.5)
    out_z = weighted(ids, labels=labels)
    assert abs(out_z.loss.item() - hand_loss(out_z.logits, labels, 0.5).item()) <= 1e-5
    assert out_z.loss.item() - out.loss.item() > 1e-3  # the z term is present and not negligible


# ----------------------------------------------------------------------------- padding and packing


@pytest.mark.parametrize("preset", VARIANTS)
def test_left_and_right_padding_match_unpadded(preset):
    model = tiny_model(preset)
    sample, other = random_ids(1, 6, seed=2), random_ids(1, 10, seed=3)
    alone = logits_of(model, sample)[0]
    pad = torch.zeros(1, 4, dtype=torch.long)
    left = torch.cat([torch.cat([pad, sample], 1), other])
    right = torch.cat([torch.cat([sample, pad], 1), other])
    mask_left, mask_right = (left != 0).long(), (right != 0).long()
    mask_left[1], mask_right[1] = 1, 1
    assert (logits_of(model, left, mask_left)[0, 4:] - alone).abs().max() <= 1e-5
    assert (logits_of(model, right, mask_right)[0, :6] - alone).abs().max() <= 1e-5
    assert (logits_of(model, left, mask_left)[1] - logits_of(model, other)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", VARIANTS)
def test_packed_segments_match_samples_alone(preset):
    model = tiny_model(preset)
    lengths = [4, 5, 3]
    samples = [random_ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    row = torch.cat(samples + [torch.zeros(1, 2, dtype=torch.long)], 1)  # [1, 14]: three samples + padding
    segments = torch.tensor([[1] * 4 + [2] * 5 + [3] * 3 + [0] * 2])
    packed = logits_of(model, row, segments)[0]
    starts = [0, 4, 9]
    for sample, start, n in zip(samples, starts, lengths):
        assert (packed[start : start + n] - logits_of(model, sample)[0]).abs().max() <= 1e-5

    changed = row.clone()
    changed[0, :4] = random_ids(1, 4, seed=99)  # a different first sample
    repacked = logits_of(model, changed, segments)[0]
    assert (repacked[:4] - packed[:4]).abs().max() > 1e-3
    assert torch.equal(repacked[4:12], packed[4:12])  # no attention across samples


def test_rope_positions_restart_at_each_segment():
    """RoPE is shift-invariant, so the logit tests above cannot see the positions; check them directly
    (each packed sample gets the positions it has alone, so it stays within the trained context)."""
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(segment_positions(segments), expected)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("preset", VARIANTS)
def test_incremental_decoding_equals_full_forward(preset):
    model = tiny_model(preset)
    ids, mask = left_padded_batch(seed=4)
    full = logits_of(model, ids, mask)
    real = mask.bool()
    with torch.no_grad():
        out = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 10):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache_of(out), use_cache=True)
            steps.append(out.logits)
    incremental = torch.cat(steps, 1)
    assert (incremental[real] - full[real]).abs().max() <= ATOL


@pytest.mark.parametrize("preset", VARIANTS)
@pytest.mark.parametrize("padded", [False, True])
def test_several_tokens_after_cache_equal_full_forward(preset, padded):
    """A multi-token step after a prefill (chunked prefill, assisted decoding) stays causal."""
    model = tiny_model(preset)
    ids, mask = left_padded_batch(seed=5)
    if not padded:
        ids, mask = random_ids(2, 10, seed=5), torch.ones_like(ids)
    full = logits_of(model, ids, mask)
    with torch.no_grad():
        first = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        rest = model(ids[:, 4:], attention_mask=mask, cache=cache_of(first), use_cache=True)
    real = mask.bool()[:, 4:]
    assert (rest.logits[real] - full[:, 4:][real]).abs().max() <= ATOL


@pytest.mark.parametrize("preset", VARIANTS)
def test_generate_with_and_without_cache_agree(preset):
    model = tiny_model(preset)
    ids, mask = left_padded_batch(seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached, uncached = model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- fixed-size caches


def generate_with_logits(model, ids, mask, **extra):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              eos_token_id=None, output_logits=True, return_dict_in_generate=True, **extra)


def max_logit_gap(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("preset", VARIANTS)
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_generate_equals_dynamic(preset, padded):
    """generate(cache_implementation="static") (transformers' StaticCache, the 2-D mask padded to its length
    by create_masks_for_generate) gives the dynamic cache's tokens and logits."""
    model = tiny_model(preset)
    ids, mask = left_padded_batch(seed=8)
    if not padded:
        ids = random_ids(2, 10, seed=8)
        mask = torch.ones_like(ids)
    dynamic = generate_with_logits(model, ids, mask)
    static = generate_with_logits(model, ids, mask, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences) and static.sequences.shape == (2, 18)
    assert max_logit_gap(static, dynamic) <= 1e-5


@pytest.mark.parametrize("preset", VARIANTS)
def test_static_cache_incremental_decoding_equals_full_forward(preset):
    """A StaticCache passed by hand, fed the growing 2-D mask as with a dynamic cache."""
    model = tiny_model(preset)
    ids, mask = left_padded_batch(seed=4)
    full = logits_of(model, ids, mask)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache, use_cache=True).logits]
        for t in range(5, 10):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= ATOL
    too_long = torch.ones(2, 17, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, at most 16\]"):
        model(ids[:, :1], attention_mask=too_long, cache=StaticCache(config=model.config, max_cache_len=16))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b"])
def test_compiled_static_generate_equals_eager(preset):
    """generate's auto-compiled static path (torch.compile with fullgraph=True, so no graph break; asked for
    on the CPU, where transformers compiles only on request) gives the eager static path's tokens and logits."""
    from transformers import CompileConfig

    model = tiny_model(preset, num_hidden_layers=1)
    ids, mask = left_padded_batch(seed=9)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers' switch for compiling on a CPU
    eager = generate_with_logits(model, ids, mask, cache_implementation="static", disable_compile=True)
    compiled = generate_with_logits(model, ids, mask, cache_implementation="static", compile_config=compile_config)
    assert hasattr(model, "_compiled_call")  # the decoding steps ran compiled
    assert torch.equal(compiled.sequences, eager.sequences)
    assert max_logit_gap(compiled, eager) <= 1e-5


# ----------------------------------------------------------------------------- training paths


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("preset", VARIANTS)
def test_gradient_checkpointing_keeps_loss_and_grads(preset):
    model = tiny_model(preset).train()
    ids = random_ids(2, 10)
    loss, grads = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable()
    mlp, calls = model.model.layers[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # counts runs (forward hooks skip recomputation)
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids)
    assert len(calls) == 2  # the layer ran again in backward: checkpointing is really on
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6), name


@pytest.mark.parametrize("preset", VARIANTS)
def test_checkpointing_only_the_first_layers_keeps_loss_and_grads(preset):
    """checkpoint_layers=1 of the tiny models' 2 layers: layer 0 runs again in backward, layer 1 does not,
    and loss and gradients are those of the model without checkpointing."""
    from baichuan_tune.train.adapters import set_checkpoint_layers

    model = tiny_model(preset).train()
    ids = random_ids(2, 10)
    loss, grads = loss_and_grads(model, ids)
    model.gradient_checkpointing_enable()
    set_checkpoint_layers(model, 1)
    calls = []
    for index, layer in enumerate(model.model.layers):
        forward = layer.mlp.forward
        layer.mlp.forward = lambda x, forward=forward, index=index: calls.append(index) or forward(x)
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids)
    assert sorted(calls) == [0, 0, 1]  # layer 0 recomputed in backward, layer 1 kept its activations
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ckpt[name], atol=1e-6), name
    with pytest.raises(BaichuanTuneError, match="checkpoint_layers"):
        set_checkpoint_layers(model, -2)


@pytest.mark.parametrize("preset", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(preset, dtype):
    """Tolerance: each rounding costs at most eps/2 of the dtype; a few of them compound through two layers,
    so logits may differ by ~2 eps of their scale (bf16 eps 2^-7, fp16 2^-10); grads by a few eps."""
    ids = random_ids(2, 10)
    reference = tiny_model(preset).train()
    loss32, grads32 = loss_and_grads(reference, ids)
    logits32 = reference(ids).logits.detach()
    model = tiny_model(preset).to(dtype).train()
    loss, grads = loss_and_grads(model, ids)
    logits = model(ids).logits.detach()
    eps = torch.finfo(dtype).eps
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert (logits.float() - logits32).abs().max() <= 2 * eps * logits32.abs().max()
    assert abs(loss.item() - loss32.item()) <= 2 * eps * loss32.item()
    for name, grad in grads.items():
        assert grad.dtype == dtype and torch.isfinite(grad).all(), name
        error = (grad.float() - grads32[name]).norm() / grads32[name].norm()
        assert error <= 8 * eps, (name, error.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_tables_stay_fp32_after_half_precision_cast(dtype):
    """FACTS.md: cos/sin in fp32. A bf16-rounded frequency (0.3162 -> 0.3164) would shift the angle at
    position 4000 by ~0.5 rad, so the tables must not follow `model.to(dtype)`."""
    model = tiny_model("tiny-baichuan2-7b").to(dtype)
    d = model.config.head_dim
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = (torch.tensor([5.0, 4000.0], dtype=torch.float64)[:, None] * inv_freq).repeat(1, 2)  # [2, D]
    cos, sin = model.model.rotary_emb(torch.tensor([[5, 4000]]))
    assert cos.dtype == sin.dtype == torch.float32
    assert (cos[0, 0] - angle.cos()).abs().max() <= 2e-3
    assert (sin[0, 0] - angle.sin()).abs().max() <= 2e-3


# ----------------------------------------------------------------------------- saving and loading

PUBLISHED_NAMES = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
    f"model.layers.{i}.{name}.weight"
    for i in range(2)
    for name in ("input_layernorm", "self_attn.W_pack", "self_attn.o_proj", "post_attention_layernorm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
}


@pytest.mark.parametrize("preset", VARIANTS)
def test_save_pretrained_reloads_with_auto_class(preset, tmp_path):
    model = tiny_model(preset)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert set(saved.keys()) == PUBLISHED_NAMES
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(loaded) is BaichuanForCausalLM
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(loaded_state) == PUBLISHED_NAMES
    for name, tensor in state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    ids = random_ids(2, 8)
    assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))  # non-saved buffers rebuilt too


@pytest.mark.parametrize("preset", ["tiny-baichuan-7b", "tiny-baichuan2-13b"])
def test_from_pretrained_with_sdpa(preset, tmp_path):
    model = tiny_model(preset)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config._attn_implementation == "sdpa"
    ids, mask = left_padded_batch()
    assert torch.equal(logits_of(model, ids, mask), logits_of(loaded, ids, mask))


# folder under ../shared/reference -> (position_embedding, norm_head), as FACTS.md states them.
PUBLISHED = {
    "baichuan-7b": ("rope", False),
    "baichuan-13b-chat": ("alibi", False),
    "baichuan2-7b-chat": ("rope", True),
    "baichuan2-13b-chat": ("alibi", True),
}


def write_published_folder(raw: dict, folder, seed=0) -> dict:
    """A checkpoint folder laid out as published: the real config.json (sizes shrunk, auto_map and
    vocabulary kept) and weights as two `pytorch_model-0000N-of-00002.bin` shards with an index."""
    heads = 5 if raw["num_attention_heads"] == 40 else 4  # keep 13B's non-power-of-two head count
    raw = raw | dict(hidden_size=8 * heads, num_attention_heads=heads, num_hidden_layers=1, intermediate_size=64)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(seed)
    state = BaichuanForCausalLM(BaichuanConfig(**raw)).state_dict()
    shards = {"pytorch_model-00001-of-00002.bin": [], "pytorch_model-00002-of-00002.bin": []}
    for i, name in enumerate(state):
        shards[list(shards)[i % 2]].append(name)
    for file, names in shards.items():
        torch.save({name: state[name] for name in names}, folder / file)
    weight_map = {name: file for file, names in shards.items() for name in names}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return state


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_folder_loads_without_remote_code(shared_reference, tmp_path, name):
    raw = json.loads((shared_reference / name / "config.json").read_text())
    assert "auto_map" in raw
    state = write_published_folder(raw, tmp_path / name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
    assert type(loaded) is BaichuanForCausalLM
    position, norm_head = PUBLISHED[name]
    assert (loaded.model.rotary_emb is None) == (position == "alibi")
    assert isinstance(loaded.lm_head, NormHead) == norm_head
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for key, tensor in state.items():
        assert torch.equal(tensor, loaded_state[key]), key


def test_bf16_attention_softmax_is_computed_in_fp32():
    """Scores and softmax of a bf16 model in fp32: the attention output equals the fp32 computation from the
    same bf16 q/k/v, rounded once to bf16. Scores held in bf16 would be ~5x further off (checked alongside)."""
    from baichuan_tune.models.modeling_baichuan import BaichuanAttention

    torch.manual_seed(0)
    cfg = BaichuanConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1,
                         vocab_size=100, position_embedding="alibi")
    attn = BaichuanAttention(cfg, 0)
    with torch.no_grad():
        attn.W_pack.weight.normal_(0, 0.5)  # peaked attention: where bf16 scores lose most
        attn.o_proj.weight.copy_(torch.eye(64))  # the module's output is the attention output itself
    attn = attn.to(torch.bfloat16)
    h = torch.randn(2, 48, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = attn(h, None, None, None, True).float()
        q, k, v = attn.W_pack(h).view(2, 48, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, T, D]
        causal = torch.full((48, 48), float("-inf")).triu(1)
        scores = q.float() @ k.float().transpose(-1, -2) / 4 + causal  # [B, H, T, T], 1/sqrt(16)
        exact = (scores.softmax(-1) @ v.float()).transpose(1, 2).reshape(2, 48, 64)
        bf16_scores = ((q @ k.transpose(-1, -2)) / 4).float() + causal
        low = (bf16_scores.to(torch.bfloat16).softmax(-1) @ v).float().transpose(1, 2).reshape(2, 48, 64)
    rounding = (exact.to(torch.bfloat16).float() - exact).abs().mean()
    assert (out - exact).abs().mean() < 1.25 * rounding
    assert (low - exact).abs().mean() > 3 * rounding
