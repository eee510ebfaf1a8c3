"""The fast decoding path (`baichuan_tune.serve.fast_decode`) against the reference: transformers' `generate`.

Oracles: the same model through `generate` (greedy tokens, for all four architectures, one prompt and a
batch of prompts of different lengths, eos, min_new_tokens, repetition penalty); transformers' own
logits processors and warpers applied to the same logits (the sampling distribution); the sample
frequencies of a known distribution; each prompt decoded alone (rows of a batch are independent).
"""

from __future__ import annotations

import pytest
import torch
from conftest import recording_batch_decoder, sdpa_cudnn_allowed, tiny_model
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from baichuan_tune.train import rlhf
from baichuan_tune.serve.fast_decode import (
    Decoder,
    SamplingParams,
    SlotCache,
    cache_length,
    candidates,
    decode,
    fast_path_refusal,
    penalized,
    race,
)

VARIANTS = ["tiny-baichuan-7b", "tiny-baichuan2-7b", "tiny-baichuan-13b", "tiny-baichuan2-13b"]
VOCAB = 512


def prompts_of(*lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def greedy(max_new_tokens=12, **extra):
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0, **extra)


# ----------------------------------------------------------------------------- greedy == generate


@pytest.mark.parametrize("preset", VARIANTS)
@pytest.mark.parametrize("lengths", [(9,), (7, 12, 3)], ids=["batch1", "batch3-padded"])
def test_fast_greedy_equals_generate(preset, lengths):
    model = tiny_model(preset)
    prompts = prompts_of(*lengths)
    config = greedy(16, eos_token_id=[2], repetition_penalty=1.3)
    fast = decode(model, prompts, config, fast=True)
    assert fast == decode(model, prompts, config, fast=False)
    assert [len(row) for row in fast] == [16] * len(prompts)
    if len(prompts) > 1:  # rows are independent: each prompt alone gives its row
        assert [decode(model, [p], config, fast=True)[0] for p in prompts] == fast


def first_new_token(tokens, start=3):
    """Index of the first token from `start` on that has not appeared before it (greedy tiny models repeat)."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b"])
def test_fast_path_stops_at_eos_and_honours_min_new_tokens(preset):
    """eos is a token row 0 emits greedily for the first time at step k; both paths end that row there
    (eos kept) and agree on the other row; min_new_tokens past k bans eos until then, on both paths."""
    model = tiny_model(preset)
    prompts = prompts_of(6, 10, seed=3)
    free = decode(model, prompts, greedy(16, eos_token_id=[]), fast=False)
    k = first_new_token(free[0])
    unused = next(i for i in range(3, VOCAB) if i not in free[0] + free[1])
    config = greedy(16, eos_token_id=[free[0][k], unused])
    ended = decode(model, prompts, config, fast=True)
    assert ended == decode(model, prompts, config, fast=False)
    assert ended[0] == free[0][: k + 1]
    late = greedy(16, eos_token_id=[free[0][k]], min_new_tokens=k + 2)
    assert decode(model, prompts, late, fast=True) == decode(model, prompts, late, fast=False)


def test_streaming_callback_sees_every_token_once_and_can_stop():
    model = tiny_model("tiny-baichuan2-13b")
    prompts = prompts_of(5, 8)
    config = greedy(20, eos_token_id=[])
    whole = decode(model, prompts, config, fast=True)
    seen = [[], []]

    def collect(new):
        for row, tokens in enumerate(new):
            seen[row] += tokens
        return len(seen[0]) >= 10  # stop once row 0 has 10 tokens

    cut = decode(model, prompts, config, on_tokens=collect, fast=True)
    assert seen == cut and all(row == full[: len(row)] for row, full in zip(cut, whole))
    assert 10 <= len(cut[0]) < 20  # stopped at the next read (every 8 steps), not at the end


def test_rollout_through_fast_path_equals_generate():
    """PPO's rollout tensors (left-padded prompts, answers padded after eos) are the same on both paths."""
    model = tiny_model("tiny-baichuan2-7b")
    prompts = prompts_of(4, 9, 6, seed=5)
    free = decode(model, prompts, greedy(10, eos_token_id=[]), fast=False)
    k = first_new_token(free[1], start=2)

    class Tok:
        pad_token_id, eos_token_id, bos_token_id = 0, free[1][k], 1

        @staticmethod
        def batch_decode(ids, skip_special_tokens=True):
            return [" ".join(map(str, row)) for row in ids.tolist()]

    config = rlhf.rollout_generation_config(Tok, 10, 0, 1.0, greedy=True)
    fast = rlhf.generate_rollout(model, Tok, prompts, ["a", "b", "c"], config, fast=True)
    plain = rlhf.generate_rollout(model, Tok, prompts, ["a", "b", "c"], config, fast=False)
    assert torch.equal(fast.input_ids, plain.input_ids) and torch.equal(fast.attention_mask, plain.attention_mask)
    assert fast.responses == plain.responses and fast.response_mask[1].sum() == k + 1  # row 1 ends at its eos


def test_slot_cache_gives_each_row_its_own_positions():
    """The model's forward over a SlotCache whose rows hold different lengths equals each row run alone."""
    for preset in ("tiny-baichuan2-7b", "tiny-baichuan-13b"):
        model = tiny_model(preset)
        a, b = prompts_of(5, 9, seed=7)
        c = model.config
        cache = SlotCache(c.num_hidden_layers, 2, c.num_attention_heads, c.head_dim, 32, torch.float32, "cpu")
        with torch.no_grad():
            for t in range(9):  # row 0 starts 4 tokens late: its first 4 steps are rewritten below
                step = torch.tensor([[a[max(t - 4, 0)]], [b[t]]])
                if t == 4:
                    cache.lengths[:, 0] = 0
                logits = model(step, cache=cache, use_cache=True).logits[:, -1]
            alone_a = model(torch.tensor([a])).logits[0, -1]
            alone_b = model(torch.tensor([b])).logits[0, -1]
        assert cache.lengths[:, 0].tolist() == [5] * c.num_hidden_layers
        assert torch.allclose(logits[0], alone_a, atol=1e-5) and torch.allclose(logits[1], alone_b, atol=1e-5)


# ----------------------------------------------------------------------------- sampling


def hf_probabilities(logits, prompt, generated, params: SamplingParams):
    """transformers' processors in generate()'s order, then the softmax: the distribution it samples from."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.min_new_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt.shape[1], params.min_new_tokens,
                                                            torch.tensor(params.eos)))
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    return processors(torch.cat([prompt, generated], 1), logits.clone()).softmax(-1)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.05),  # Baichuan2-Chat's defaults
    dict(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.1),
    dict(temperature=1.3, top_k=40, top_p=1.0),
    dict(temperature=0.8, min_new_tokens=3),
    dict(temperature=1.0),
])
def test_sampling_distribution_equals_transformers_warpers(settings):
    generator = torch.Generator().manual_seed(0)
    batch, vocab = 3, 300
    logits = torch.randn(batch, vocab, generator=generator) * 3
    prompt = torch.randint(0, vocab, (batch, 6), generator=generator)
    generated = torch.randint(0, vocab, (batch, 2), generator=generator)
    params = SamplingParams(max_new_tokens=8, do_sample=True, eos=(7, 11), **settings)
    expected = hf_probabilities(logits, prompt, generated, params)

    seen = torch.zeros(batch, vocab, dtype=torch.bool)
    seen.scatter_(1, torch.cat([prompt, generated], 1), True)
    is_eos = torch.zeros(vocab, dtype=torch.bool)
    is_eos[list(params.eos)] = True
    banned = is_eos[None] & (torch.full((batch, 1), generated.shape[1]) < params.min_new_tokens)
    processed = penalized(logits, seen, torch.full((batch, 1), params.repetition_penalty), banned)
    full = lambda value: torch.full((batch, 1), float(value))  # noqa: E731
    probs, index = candidates(processed, params.kind(vocab), full(params.temperature),
                              torch.full((batch,), params.top_k), full(params.top_p))
    ours = probs if index is None else torch.zeros(batch, vocab).scatter_(1, index, probs)
    assert torch.allclose(ours, expected, atol=1e-6), (ours - expected).abs().max()


def test_race_draws_follow_the_probabilities():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(20000, 5)
    torch.manual_seed(0)
    counts = torch.bincount(race(probs), minlength=5).double() / 20000
    assert counts[4] == 0
    assert torch.allclose(counts, probs[0].double(), atol=0.012)  # ~4 standard errors at n = 20000


def test_sampled_decoding_is_seeded_and_top_k_1_is_greedy():
    model = tiny_model("tiny-baichuan2-7b")
    prompts = prompts_of(5, 7)
    sample = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, pad_token_id=0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(decode(model, prompts, sample, fast=True))
    assert runs[0] == runs[1] != runs[2]
    one = GenerationConfig(do_sample=True, temperature=0.7, top_k=1, max_new_tokens=12, pad_token_id=0)
    assert decode(model, prompts, one, fast=True) == decode(model, prompts, greedy(12), fast=False)


# ----------------------------------------------------------------------------- routing and sizes


def test_fast_path_refuses_what_it_does_not_implement():
    model = tiny_model("tiny-baichuan2-7b")
    assert fast_path_refusal(model, greedy()) is None
    assert "num_beams" in fast_path_refusal(model, greedy(num_beams=2))
    assert "no_repeat_ngram_size" in fast_path_refusal(model, greedy(no_repeat_ngram_size=3))
    with pytest.raises(ValueError, match="num_beams"):
        decode(model, prompts_of(4), greedy(num_beams=2), fast=True)
    beams = decode(model, prompts_of(4), greedy(4, num_beams=2))  # on the CPU: transformers' generate
    assert len(beams[0]) == 4


def test_cache_length_is_a_power_of_two_within_the_context():
    assert [cache_length(n, 4096) for n in (1, 256, 257, 3000, 4096)] == [256, 256, 512, 4096, 4096]
    assert cache_length(600, 512) == 600  # past the context: exactly what is needed


def test_decoder_is_reused_and_follows_weight_changes():
    model = tiny_model("tiny-baichuan2-7b")
    prompts = prompts_of(5)
    first = decode(model, prompts, greedy(6), fast=True)
    decoder = model.__dict__["_fast_decoder"]
    decode(model, prompts, greedy(20), fast=True)
    assert model.__dict__["_fast_decoder"] is decoder  # 25 of 256 slots: the same decoder
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # in place (an optimizer step): the same tensors, so the same decoder
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=generator))
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)
    edited = decode(model, prompts, greedy(6), fast=True)
    assert model.__dict__["_fast_decoder"] is decoder
    assert edited == decode(model, prompts, greedy(6), fast=False) != first
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=generator))
    replaced = decode(model, prompts, greedy(6), fast=True)  # a new tensor: a new decoder
    assert model.__dict__["_fast_decoder"] is not decoder
    assert replaced == decode(model, prompts, greedy(6), fast=False)


@pytest.mark.slow
def test_compiled_decoding_step_equals_eager():
    """torch.compile of the decoding step (inductor; on the CPU without a CUDA graph) gives the eager tokens."""
    model = tiny_model("tiny-baichuan2-13b", num_hidden_layers=1)
    prompts = prompts_of(6, 3)
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.2, eos=(2,))
    eager = Decoder(model, 2, 256, compile=False).generate(prompts, params)
    assert Decoder(model, 2, 256, compile=True).generate(prompts, params) == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny-baichuan2-13b"])
def test_cuda_graph_decoding_equals_generate(preset):
    """On a GPU: the compiled step in a CUDA graph (the default there) gives generate's greedy tokens, for one
    prompt and a padded batch, and sampled decoding stays seeded."""
    model = tiny_model(preset).cuda()
    config = greedy(24, eos_token_id=[2], repetition_penalty=1.2)
    for prompts in (prompts_of(9), prompts_of(7, 12, 3)):
        assert decode(model, prompts, config) == decode(model, prompts, config, fast=False)
    decoder = model.__dict__["_fast_decoder"]
    assert decoder.cuda_graph and all(graph is not False for graph in decoder._graphs.values())
    sample = GenerationConfig(do_sample=True, temperature=0.3, top_k=5, top_p=0.85, max_new_tokens=24, pad_token_id=0)
    torch.manual_seed(3)
    first = decode(model, prompts_of(7, 12, 3), sample)
    torch.manual_seed(3)
    assert decode(model, prompts_of(7, 12, 3), sample) == first
    # serve's worker thread: generate_text on the fast path from another thread, streamed
    from pathlib import Path

    import baichuan_tune
    from baichuan_tune.serve.generation import generate_text, stream_in_thread
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    tok = BaichuanTokenizer(vocab_file=str(Path(baichuan_tune.__file__).parent / "assets/default/tokenizer.model"))
    prompt = prompts_of(9)[0]
    reference = generate_text(model, tok, prompt, config, fast=False)
    streamed = "".join(stream_in_thread(lambda on_text: generate_text(model, tok, prompt, config, on_text)))
    assert streamed == reference.text and generate_text(model, tok, prompt, config).token_ids == reference.token_ids


def test_lora_policy_decodes_like_generate_and_adapter_switches_rebuild():
    """PPO's policy: a PEFT LoRA model. The fast path gives generate's tokens, and a change of adapter state
    (what a captured graph would otherwise keep replaying) builds a new decoder."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model("tiny-baichuan2-7b"), lora).eval()
    prompts = prompts_of(6, 3)
    assert decode(model, prompts, greedy(10), fast=True) == decode(model, prompts, greedy(10), fast=False)
    decoder = causal_lm_of(model).__dict__["_fast_decoder"]
    with model.disable_adapter():
        plain = decode(model, prompts, greedy(10), fast=False)
        assert decode(model, prompts, greedy(10), fast=True) == plain
        assert causal_lm_of(model).__dict__["_fast_decoder"] is not decoder


def causal_lm_of(model):
    return model.get_base_model()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_of_a_lora_policy_equals_generate():
    """PPO's rollouts on a GPU: a PEFT LoRA policy through the compiled, graph-captured step, before and after
    an in-place update of its LoRA weights (an optimizer step), gives generate's greedy tokens."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model("tiny-baichuan2-7b"), lora).cuda().eval()
    prompts = prompts_of(6, 11, 4)
    config = greedy(16, eos_token_id=[2])
    assert decode(model, prompts, config) == decode(model, prompts, config, fast=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3)
    assert decode(model, prompts, config) == decode(model, prompts, config, fast=False)
    assert all(graph is not False for graph in causal_lm_of(model).__dict__["_fast_decoder"]._graphs.values())


# ----------------------------------------------------------------------------- deterministic attention


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_decoding_attention_leaves_cudnn_out_and_training_keeps_it(preset, monkeypatch):
    """Prefill and decoding steps (one request and the batching server's rows) run SDPA without cuDNN's
    attention, whose forward is not deterministic on a GPU; a training forward keeps SDPA's own choice."""
    from baichuan_tune.serve.batching import BatchDecoder

    model = tiny_model(preset)
    allowed = sdpa_cudnn_allowed(monkeypatch)
    model(torch.tensor(prompts_of(9)))
    assert allowed and all(allowed)  # the default outside decoding
    allowed.clear()
    decode(model, prompts_of(9, 4), greedy(max_new_tokens=3), fast=True)
    batch = BatchDecoder(model, 2, 64, compile=False)
    batch.admit(1, prompts_of(5)[0], SamplingParams(3))
    batch.decode_step()
    layers = model.config.num_hidden_layers
    assert len(allowed) == layers * (1 + 2 + 1 + 1) and not any(allowed)  # prefill, 2 steps; prefill, 1 step


def _published_heads_rows(decoder, max_new_tokens: int) -> None:
    """Rows of 300, 50, 150, 200 and 250 tokens in `decoder`, whose model has the published head geometry
    (32 heads of 128): where cuDNN's attention gave rows other bits from call to call."""
    for row, length in enumerate((300, 50, 150, 200, 250)):
        decoder.admit(row, [3 + (7 * i + row) % 4000 for i in range(length)], SamplingParams(max_new_tokens, eos=()))


def _published_heads_model():
    return tiny_model("tiny-baichuan2-7b", num_hidden_layers=2, hidden_size=4096, num_attention_heads=32,
                      intermediate_size=1024, vocab_size=4096).to("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_bf16_on_gpu_the_same_decoding_step_gives_the_same_bits():
    """Rows of a few hundred keys: the batch's decoding forward from one state, repeated, gives identical
    logits (cuDNN's attention did not)."""
    from baichuan_tune.serve.batching import BatchDecoder

    decoder = BatchDecoder(_published_heads_model(), 8, 600, cuda_graph=False, compile=False)
    _published_heads_rows(decoder, 4)
    decoder.cache.window = 512
    lengths = decoder.cache.lengths.clone()

    def forward():
        with torch.inference_mode():
            decoder.cache.lengths.copy_(lengths)
            return decoder._logits().clone()

    first = forward()
    assert all(torch.equal(forward(), first) for _ in range(30))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_in_bf16_on_gpu_the_served_step_decodes_a_request_the_same_twice():
    """As `serve` runs it (compiled, CUDA graphs): the same rows decoded twice give the same logits bits."""
    decoder = recording_batch_decoder(_published_heads_model(), 8, 600)

    def run() -> torch.Tensor:
        for row in range(8):
            decoder.release(row)
        _published_heads_rows(decoder, 12)
        kept = []
        for _ in range(10):
            decoder.decode_step()
            kept.append(decoder.kept[:5].clone())
        return torch.stack(kept)

    first = run()
    assert torch.equal(run(), first) and torch.equal(run(), first)
