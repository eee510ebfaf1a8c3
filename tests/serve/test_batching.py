"""The continuous-batching server, over real HTTP with concurrent clients.

Oracles: transformers' `generate` on each request alone (`plain_decode`, greedy), the same request sent
alone to the same server, and the batch's own record of which rows decoded at each step (so the tests
know that requests really joined and left while others ran).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import benchmark_script, recording_batch_decoder, tiny_model

from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.serve.fast_decode import plain_decode
from baichuan_tune.serve.generation import chat_generation_config
from baichuan_tune.serve.server import BackgroundServer, create_app

NAME = "tiny"


@pytest.fixture(scope="module")
def tokenizer():
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER))


def serve(model, tokenizer, **kw):
    return BackgroundServer(create_app(model, tokenizer, NAME, **kw)).start()


def record_steps(srv, pause: float = 0.0) -> list[tuple[int, ...]]:
    """The requests (ids of their sequences) in the batch at each decoding step, appended as the server
    runs (each step `pause` seconds longer, so that a test can act while a request is still generating)."""
    worker = srv.server.config.app.state.worker
    decoder = worker.decoder
    steps, step, seen = [], decoder.decode_step, []

    def recorded():
        seen.extend(worker.running.values())  # held, so that a finished sequence's id is never reused by a new one
        steps.append(tuple(id(seq) for seq in worker.running.values()))
        time.sleep(pause)
        return step()

    decoder.decode_step = recorded
    return steps


def greedy_alone(model, tokenizer, prompt: list[int], max_tokens: int) -> str:
    """transformers' generate on the prompt alone, with the server's settings for temperature 0 (the
    checkpoint's defaults: the chat models' repetition penalty)."""
    config = chat_generation_config(model, temperature=0, max_new_tokens=max_tokens)
    ids = plain_decode(model, [prompt], config)[0]
    return tokenizer.decode([i for i in ids if i != 2], skip_special_tokens=True)


def complete(url: str, prompt, max_tokens: int, stream: bool = False, **extra) -> str:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if not stream:
        response = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["text"]
    return text


# Prompts of 3 to 60 tokens and 3 to 24 new tokens: rows join and leave at different steps.
REQUESTS = [(list(range(7, 7 + n)), m, i % 2 == 1) for i, (n, m) in enumerate([(3, 24), (60, 5), (17, 14), (9, 3),
                                                                              (33, 11), (5, 19)])]


@pytest.mark.parametrize("preset, invariant", [("tiny-baichuan2-7b", False), ("tiny-baichuan-13b", False),
                                               ("tiny-baichuan2-13b", False), ("tiny-baichuan2-13b", True)])
def test_concurrent_greedy_answers_equal_each_alone(preset, invariant, tokenizer):
    """RoPE + NormHead, ALiBi, ALiBi + NormHead (and with block attention, batch_invariant): six clients
    at once (streamed and not, one sampled neighbour, one log-prob request on the one-at-a-time path) each
    get the answer of its request alone."""
    model = tiny_model(preset, vocab_size=4096)
    expected = [greedy_alone(model, tokenizer, p, m) for p, m, _ in REQUESTS]
    with serve(model, tokenizer, max_batch=4, batch_invariant=invariant) as srv:
        assert srv.server.config.app.state.worker.decoder.cache.key_block == (256 if invariant else 0)
        # Slower steps: the clients' requests reach the queue while the first rows still decode, even on a
        # loaded machine (the joins counted below must not depend on how fast HTTP is served).
        steps = record_steps(srv, pause=0.02)
        alone = complete(srv.url, REQUESTS[2][0], REQUESTS[2][1])
        barrier = threading.Barrier(len(REQUESTS) + 2)

        def ask(i):
            barrier.wait(timeout=30)
            if i == len(REQUESTS):  # a sampled neighbour in the same batch
                return complete(srv.url, [9, 9, 9], 16, temperature=1.0, top_k=50)
            if i == len(REQUESTS) + 1:  # log-probs: the one-at-a-time path, pausing the batch
                return complete(srv.url, REQUESTS[0][0], REQUESTS[0][1], logprobs=2)
            prompt, max_tokens, stream = REQUESTS[i]
            return complete(srv.url, prompt, max_tokens, stream)

        with ThreadPoolExecutor(len(REQUESTS) + 2) as pool:
            answers = list(pool.map(ask, range(len(REQUESTS) + 2)))
    assert answers[: len(REQUESTS)] == expected
    assert answers[-1] == expected[0]
    assert alone == expected[2]
    assert max(len(rows) for rows in steps) == 4  # the batch was full at some step ...
    joined = sum(1 for before, after in zip(steps, steps[1:]) if set(before) & set(after) and set(after) - set(before))
    assert joined >= 2, [len(rows) for rows in steps]  # ... and requests joined a running batch more than once


def test_a_list_of_prompts_takes_a_row_each(tokenizer):
    model = tiny_model("tiny-baichuan-7b", vocab_size=4096)
    prompts = [list(range(20, 20 + n)) for n in (4, 11, 2)]
    with serve(model, tokenizer, max_batch=2) as srv:  # three prompts, two rows: the third waits for one
        body = {"model": NAME, "prompt": prompts, "max_tokens": 9, "temperature": 0}
        choices = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == [greedy_alone(model, tokenizer, p, 9) for p in prompts]


def test_seeded_sampling_is_reproducible_under_load(tokenizer):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=4096)
    with serve(model, tokenizer, max_batch=4) as srv:
        def sampled(seed):
            return complete(srv.url, [5, 6, 7], 12, temperature=1.0, top_k=0, seed=seed)

        with ThreadPoolExecutor(4) as pool:
            load = [pool.submit(complete, srv.url, list(range(30, 40)), 30) for _ in range(3)]
            first = sampled(77)
            again = sampled(77)
            other = sampled(78)
            [f.result() for f in load]
    assert first == again != other


def wait_until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_streaming_client_that_leaves_frees_its_row(tokenizer):
    model = tiny_model("tiny-baichuan-13b", vocab_size=4096)
    with serve(model, tokenizer, max_batch=2) as srv:
        worker = srv.server.config.app.state.worker
        steps = record_steps(srv, pause=0.02)  # 400 tokens: at least 8 s
        body = {"model": NAME, "prompt": [5, 6], "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: closing it closes the connection
            next(line for line in lines if line.startswith("data: {"))
            assert worker.busy == 1
        assert wait_until(lambda: worker.busy == 0 and len(worker.decoder.free_rows()) == 2, timeout=4)
        assert len(steps) < 200  # it was stopped, not generated to the end
        steps.clear()
        assert complete(srv.url, [5, 6], 5) == greedy_alone(model, tokenizer, [5, 6], 5)


def test_the_queue_bound_answers_429_with_a_json_error(tokenizer):
    """One row, one place in the queue: a running request, a waiting one, and the third is refused."""
    model = tiny_model("tiny-baichuan-7b", vocab_size=4096)
    with serve(model, tokenizer, max_batch=1, max_queue=1) as srv:
        worker = srv.server.config.app.state.worker
        record_steps(srv, pause=0.02)  # 400 tokens: at least 8 s
        body = {"model": NAME, "prompt": [5, 6], "max_tokens": 400, "temperature": 0, "stream": True}
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as running:
                lines = running.iter_lines()  # kept: closing it closes the connection
                next(line for line in lines if line.startswith("data: {"))
                waiting = pool.submit(complete, srv.url, [8, 9], 4)
                assert wait_until(lambda: worker.jobs.qsize() == 1)
                refused = httpx.post(srv.url + "/v1/completions", json=body | {"stream": False}, timeout=30)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "queue_full"
                assert httpx.get(srv.url + "/health", timeout=10).json()["waiting"] == 1
            # the running client left: its row goes to the waiting request
            assert waiting.result(timeout=30) == greedy_alone(model, tokenizer, [8, 9], 4)


def drive(model, joins: list[tuple[int, list[int], int]], slots: int = 3, **decoder_options) -> list[list[int]]:
    """Run a BatchDecoder directly: request i (prompt, max new tokens) joins at step joins[i][0] into a
    free row and leaves after its tokens; returns each request's tokens."""
    from baichuan_tune.serve.batching import BatchDecoder
    from baichuan_tune.serve.fast_decode import SamplingParams

    decoder = BatchDecoder(model, slots, 320, **decoder_options)
    out: list[list[int]] = [[] for _ in joins]
    rows: dict[int, int] = {}  # row -> request
    step = 0
    while any(len(out[i]) < joins[i][2] for i in range(len(joins))):
        for i, (at, prompt, new) in enumerate(joins):
            if at == step:
                row = decoder.free_rows()[0]
                rows[row] = i
                out[i].append(decoder.admit(row, prompt, SamplingParams(new, eos=())))
        for row, i in list(rows.items()):
            if len(out[i]) >= joins[i][2]:
                decoder.release(row)
                del rows[row]
        if rows:
            tokens = decoder.decode_step()
            for row, i in rows.items():
                out[i].append(tokens[row])
        step += 1
    return out


JOINS = [(0, list(range(5, 15)), 30), (4, list(range(40, 43)), 8), (6, list(range(100, 350)), 12),
         (13, [7, 8], 20)]  # the third crosses the 256-slot attention window; the last takes a freed row


def plain(model, prompt, new):
    config = chat_generation_config(model, temperature=0, max_new_tokens=new, repetition_penalty=1.0)
    config.eos_token_id = None
    return plain_decode(model, [prompt], config)[0]


@pytest.mark.parametrize("preset", ["tiny-baichuan-7b", "tiny-baichuan2-13b"])
def test_batch_decoder_rows_join_and_leave(preset):
    model = tiny_model(preset, vocab_size=4096)
    assert drive(model, JOINS) == [plain(model, p, n) for _, p, n in JOINS]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny-baichuan-7b", "tiny-baichuan-13b", "tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_batch_decoder_with_cuda_graphs_equals_generate(preset):
    """On a GPU the steps are compiled and replayed as CUDA graphs (one per window): the same tokens."""
    model = tiny_model(preset, vocab_size=4096).cuda()
    assert drive(model, JOINS) == [plain(model, p, n) for _, p, n in JOINS]


def _row0_logits(model, neighbours: list[int], steps: int = 10) -> torch.Tensor:
    """Row 0's logits at each step of a BatchDecoder (a 20-token prompt), rows 1.. holding `neighbours`."""
    from baichuan_tune.serve.fast_decode import SamplingParams

    decoder = recording_batch_decoder(model, 4, 700, batch_invariant=True)
    decoder.admit(0, list(range(30, 50)), SamplingParams(steps + 1, eos=()))
    for row, length in enumerate(neighbours, start=1):
        decoder.admit(row, [3 + (i * 7 + row) % 4000 for i in range(length)], SamplingParams(steps + 1, eos=()))
    kept = []
    for _ in range(steps):
        decoder.decode_step()
        kept.append(decoder.kept[0].clone())
    return torch.stack(kept)


def _invariance(model) -> None:
    """Alone (window 256) and beside rows that make the window 512 and 1024: the same bits."""
    torch._dynamo.reset()  # three decoders, each compiling its step: well inside the recompile limit
    alone = _row0_logits(model, [])
    for neighbours in ([300], [40, 600]):
        assert torch.equal(_row0_logits(model, neighbours), alone), neighbours


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_a_rows_logits_do_not_depend_on_its_neighbours_window(preset):
    _invariance(tiny_model(preset, vocab_size=4096))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_in_bf16_on_gpu_a_rows_logits_do_not_depend_on_its_neighbours_window(preset):
    """Compiled steps in CUDA graphs, bf16, head_dim 128 as published: the batch's window changes nothing."""
    shape = dict(hidden_size=1024, num_attention_heads=8, intermediate_size=2816, vocab_size=4096)
    _invariance(tiny_model(preset, **shape).to("cuda", torch.bfloat16))


def test_serve_replay_benchmark_smoke():
    """benchmarks/bench_serve_replay.py on a CPU: every request alone twice and as 4 clients, in fp32 the same
    tokens each time; the repeated forward from one state gives the same logits through the decoders' SDPA
    kernels and through math (the CPU has no cuDNN or memory-efficient kernel)."""
    bench = benchmark_script("bench_serve_replay")
    result = bench.main(["--preset", "tiny-baichuan2-13b", "--dtype", "fp32", "--device", "cpu", "--slots", "4",
                         "--requests", "8", "--prompt-tokens", "4,40", "--new-tokens", "4,12", "--slot-tokens", "400",
                         "--forward-repeats", "2"])
    assert result["alone_again"] == {"same_tokens": 8, "same_top_logits": 8, "of": 8}
    assert result["batched"]["same_tokens"] == 8
    assert result["forward_repeats"]["decoding"] == 0 and result["forward_repeats"]["math"] == 0
