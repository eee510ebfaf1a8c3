"""The OpenAI-compatible server, started on a free loopback port and spoken to over real HTTP.

Clients: the official `openai` Python package and `httpx` (for raw bodies the SDK would refuse to send).
Oracles: the in-process `model.chat` / `generate_text` answers for the same prompts (greedy decoding is
deterministic), and OpenAI's documented response and error shapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.serve.generation import chat_generation_config, generate_text
from baichuan_tune.serve.server import BackgroundServer, create_app
from conftest import tiny_model

openai = pytest.importorskip("openai")

NAME = "tiny-chat"
GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return tiny_model("tiny-baichuan2-7b", vocab_size=4096), BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER))


def start(model_and_tokenizer, **kw):
    model, tokenizer = model_and_tokenizer
    return BackgroundServer(create_app(model, tokenizer, NAME, **kw)).start()


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    srv = start(model_and_tokenizer)
    yield srv
    srv.stop()


def client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(i: int) -> list[dict]:
    return [{"role": "user", "content": f"What is the capital of France? Question {i}"}]


def test_binds_to_loopback_only(server):
    assert server.host == "127.0.0.1" and server.port > 0
    from baichuan_tune.serve.launch import ServeConfig

    assert ServeConfig().host == "127.0.0.1"


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == [NAME]
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == NAME


def test_chat_completion_matches_model_chat(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reply = client(server).chat.completions.create(model=NAME, messages=ask(1), **GREEDY)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == model.chat(tokenizer, ask(1), temperature=0, max_new_tokens=8)
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens <= 8
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_adds_up_to_the_reply(server):
    c = client(server)
    whole = c.chat.completions.create(model=NAME, messages=ask(2), **GREEDY).choices[0].message.content
    chunks = list(c.chat.completions.create(model=NAME, messages=ask(2), stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole and chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].usage.completion_tokens >= 1


def test_completions_match_generate(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = generate_text(model, tokenizer, ids, chat_generation_config(model, temperature=0, max_new_tokens=8))
    c = client(server)
    reply = c.completions.create(model=NAME, prompt=prompt, **GREEDY)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(ids)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=prompt, stream=True, **GREEDY))
    assert streamed == expected.text


def test_sse_framing(server):
    body = {"model": NAME, "messages": ask(3), "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert json.loads(line[6:])["object"] == "chat.completion.chunk"


def test_concurrent_clients_get_their_own_answers(server):
    """24 clients at once (chat, streamed chat, completions): each answer equals its single-request answer."""
    c = client(server)

    def one(i: int) -> str:
        if i % 3 == 0:
            return c.chat.completions.create(model=NAME, messages=ask(i), **GREEDY).choices[0].message.content
        if i % 3 == 1:
            stream = c.chat.completions.create(model=NAME, messages=ask(i), stream=True, **GREEDY)
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        return c.completions.create(model=NAME, prompt=f"Number {i} is", **GREEDY).choices[0].text

    alone = [one(i) for i in range(24)]
    assert len(set(alone)) > 12  # the prompts really lead to different answers
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(one, range(24)))
    assert together == alone


BAD_REQUESTS = [
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    ({"model": NAME}, 400, "missing_field"),
    ({"model": NAME, "messages": ask(0), "frobnicate": 1}, 400, "unknown_field"),
    ({"model": NAME, "messages": "hello"}, 400, "invalid_value"),
    ({"model": NAME, "messages": []}, 400, "invalid_value"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
    ({"model": NAME, "messages": [{"role": "user"}]}, 400, "missing_field"),
    ({"model": NAME, "messages": ask(0), "max_tokens": "10"}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "max_tokens": 0}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "max_tokens": -3}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "max_tokens": 10**9}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "temperature": "hot"}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "temperature": 2.5}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "top_p": 0}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "n": 0}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "n": 129}, 400, "invalid_value"),  # OpenAI's limit is 128
    ({"model": NAME, "messages": ask(0), "stream": "yes"}, 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0) + [{"role": "system", "content": "late"}]}, 400, None),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context_length_exceeded"),
    ({"model": "gpt-4", "messages": ask(0)}, 404, "model_not_found"),
    ({"model": NAME, "messages": ask(0), "seed": 2**70}, 400, "invalid_value"),  # past int64: torch refuses it
    ({"model": NAME, "messages": ask(0), "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
     400, "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    # Valid JSON, but a lone surrogate is no text a tokenizer can encode.
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}', 400, "invalid_value"),
    ({"model": NAME, "messages": ask(0), "repetition_penalty": 1e-300}, 400, "invalid_value"),  # overflows logits
]


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_chat_requests_get_openai_errors(server, body, status, code):
    if isinstance(body, bytes):
        response = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                              headers={"content-type": "application/json"})
    else:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code


def test_bad_completion_requests(server):
    url = server.url + "/v1/completions"
    too_long = httpx.post(url, json={"model": NAME, "prompt": "word " * 600, "max_tokens": 4}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    edge = httpx.post(url, json={"model": NAME, "prompt": "hi", "max_tokens": 512}, timeout=30)
    assert edge.status_code == 400 and edge.json()["error"]["param"] == "max_tokens"
    assert httpx.post(url, json={"model": NAME, "prompt": ""}, timeout=30).status_code == 400
    assert httpx.post(url, json={"model": NAME, "prompt": ["a", ""]}, timeout=30).json()["error"]["param"] == "prompt.1"
    assert httpx.post(url, json={"model": NAME, "prompt": "hi", "echo": "yes"}, timeout=30).status_code == 400


def test_lone_surrogate_names_its_field(server):
    body = b'{"model": "tiny-chat", "messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "\\udfff"}]}'
    chat = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages.1.content"
    body = b'{"model": "tiny-chat", "prompt": "x\\ud800"}'
    completion = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "prompt"


def test_a_vanishing_temperature_decodes_greedily(server):
    """T -> 0 is greedy decoding; 1e-45 would overflow logits / T into NaN if it were sampled."""
    c = client(server)
    tiny = c.chat.completions.create(model=NAME, messages=ask(7), temperature=1e-45, max_tokens=8)
    greedy = c.chat.completions.create(model=NAME, messages=ask(7), **GREEDY)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_unknown_routes_and_methods(server):
    missing = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_still_serving_after_bad_input(server):
    for body, _, _ in BAD_REQUESTS:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        assert httpx.post(server.url + "/v1/chat/completions", timeout=30, **kwargs).status_code < 500
    reply = client(server).chat.completions.create(model=NAME, messages=ask(0), **GREEDY)
    assert reply.choices[0].message.content is not None


def test_long_stop_string_and_system_only_conversation(server, model_and_tokenizer):
    """A stop string may be longer than 4 characters (only the list is capped at 4), and a conversation of a
    system message alone is answered as model.chat answers it."""
    model, tokenizer = model_and_tokenizer
    c = client(server)
    assert c.chat.completions.create(model=NAME, messages=ask(0), stop="a long stop string", **GREEDY).choices
    system_only = [{"role": "system", "content": "You are a helpful assistant."}]
    reply = c.chat.completions.create(model=NAME, messages=system_only, **GREEDY)
    assert reply.choices[0].message.content == model.chat(tokenizer, system_only, temperature=0, max_new_tokens=8)


def test_client_gone_mid_request_frees_the_worker(model_and_tokenizer, monkeypatch):
    """A non-streamed request whose client disconnects is cancelled, not generated to max_tokens for nobody."""
    import socket
    import time

    from baichuan_tune.serve import server as server_module
    from baichuan_tune.serve.generation import GenerationResult

    started, outcome = threading.Event(), []

    def endless(model, tokenizer, prompt_ids, config, on_text=None, stop=None, cancelled=None):
        started.set()
        deadline = time.monotonic() + 30
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome.append(cancelled())
        return GenerationResult("", [], len(prompt_ids), "stop")

    monkeypatch.setattr(server_module, "generate_text", endless)
    with start(model_and_tokenizer, max_batch=0) as srv:  # the one-at-a-time worker (the batch's: test_batching)
        body = json.dumps({"model": NAME, "messages": ask(0), "max_tokens": 8}).encode()
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert started.wait(10)
        deadline = time.monotonic() + 10
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcome == [True]


def test_long_history_is_trimmed_not_refused(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    history = []
    for i in range(40):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    history.append({"role": "user", "content": "last question"})
    reply = client(server).chat.completions.create(model=NAME, messages=history, **GREEDY)
    assert reply.choices[0].message.content == model.chat(tokenizer, history, temperature=0, max_new_tokens=8)
    assert reply.usage.prompt_tokens <= 512 - 8  # old rounds dropped to the budget


def test_api_key_required_when_set(model_and_tokenizer):
    with start(model_and_tokenizer, api_key="s3cret") as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(srv.url + "/v1/models", headers=headers, timeout=10)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        denied = httpx.post(srv.url + "/v1/chat/completions", json={"model": NAME, "messages": ask(0)}, timeout=10)
        assert denied.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").models.list()
        assert client(srv, key="s3cret").chat.completions.create(model=NAME, messages=ask(0), **GREEDY).choices
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # health needs no key


def test_full_queue_answers_429_and_recovers(model_and_tokenizer):
    with start(model_and_tokenizer, max_queue=1) as srv:
        barrier = threading.Barrier(10)
        body = {"model": NAME, "prompt": "Count with me:", "max_tokens": 200, "temperature": 0}

        def hit(_):
            barrier.wait(timeout=30)
            return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(hit, range(10)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.json()["error"]["code"] == "queue_full" and busy.headers["retry-after"] == "1"
        assert httpx.post(srv.url + "/v1/completions", json=body | {"max_tokens": 4}, timeout=60).status_code == 200


@contextlib.contextmanager
def serve_process(folder, *extra: str):
    """`baichuan-tune serve` in its own process (API key "k"); yields an openai client, stops it with SIGINT."""
    cmd = [sys.executable, "-m", "baichuan_tune.cli", "serve", "--model", str(folder), "--port", "0",
           "--log-level", "warning", "--device", "cpu", *extra]
    env = os.environ | {"BAICHUAN_TUNE_API_KEY": "k"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        yield openai.OpenAI(base_url=match.group(0), api_key="k", max_retries=0, timeout=60)
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -2, 130)


def test_serve_command_end_to_end(tmp_path, model_and_tokenizer):
    """`baichuan-tune serve` in its own process: prints its address, answers, stops on SIGINT."""
    from baichuan_tune.models.checkpoint import save_pretrained_atomic

    model, tokenizer = model_and_tokenizer
    folder = save_pretrained_atomic(model, tokenizer, tmp_path / "tiny-chat")
    with serve_process(folder) as c:
        assert [m.id for m in c.models.list().data] == ["tiny-chat"]
        reply = c.chat.completions.create(model="tiny-chat", messages=ask(5), **GREEDY)
        assert reply.choices[0].message.content == model.chat(tokenizer, ask(5), temperature=0, max_new_tokens=8)


def test_serve_command_with_an_adapter_and_int8_weights(tmp_path, model_and_tokenizer):
    """--adapter answers as PEFT's own loading of the adapter does; --quantization_bit 8 then answers as the same
    adapter over our in-place LLM.int8() layers (`model.quantize(8)`), a second way to the same format."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from baichuan_tune.models.checkpoint import load_model, save_pretrained_atomic

    model, tokenizer = model_and_tokenizer
    folder = save_pretrained_atomic(model, tokenizer, tmp_path / "tiny-chat")
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["W_pack", "o_proj", "down_proj"])
    get_peft_model(load_model(folder, dtype="fp32"), lora).save_pretrained(str(tmp_path / "adapter"))
    tuned = PeftModel.from_pretrained(load_model(folder, dtype="fp32"), str(tmp_path / "adapter")).get_base_model()
    expected = tuned.chat(tokenizer, ask(5), temperature=0, max_new_tokens=8)
    assert expected != model.chat(tokenizer, ask(5), temperature=0, max_new_tokens=8)  # the adapter matters
    with serve_process(folder, "--adapter", str(tmp_path / "adapter"), "--dtype", "fp32") as c:
        assert c.chat.completions.create(model="tiny-chat", messages=ask(5), **GREEDY).choices[0].message.content \
            == expected
    int8 = PeftModel.from_pretrained(load_model(folder, dtype="fp32").quantize(8), str(tmp_path / "adapter"))
    expected = int8.get_base_model().chat(tokenizer, ask(5), temperature=0, max_new_tokens=8)
    with serve_process(folder, "--adapter", str(tmp_path / "adapter"), "--dtype", "fp32", "--quantization_bit", "8") as c:
        assert c.chat.completions.create(model="tiny-chat", messages=ask(5), **GREEDY).choices[0].message.content \
            == expected


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    from baichuan_tune import cli

    monkeypatch.delitem(sys.modules, "baichuan_tune.serve.server")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    assert cli.main(["serve", "--model", "default"]) == 2
    assert "serve needs fastapi: pip install 'baichuan-tune[serve]'" in capsys.readouterr().err


def test_serve_command_checks_its_options_before_loading(capsys):
    from baichuan_tune import cli

    assert cli.main(["serve", "--model", "no/such/folder", "--log-level", "loud"]) == 2
    assert "'log_level' must be one of" in capsys.readouterr().err


# ----------------------------------------------------------------------------- OpenAI request fields

PLAIN = dict(temperature=0, max_tokens=8, extra_body={"repetition_penalty": 1.0})  # greedy on the raw logits


def chat_text(c, messages=None, **kw) -> str:
    return c.chat.completions.create(model=NAME, messages=messages or ask(1), **kw).choices[0].message.content


def test_openai_defaults_and_ignored_fields_change_nothing(server):
    """The fields clients send by default (and those with no effect on a local model) are accepted and leave
    the greedy answer as it is."""
    c = client(server)
    plain = chat_text(c, **GREEDY)
    sent = chat_text(c, **GREEDY, frequency_penalty=0.0, presence_penalty=0.0, logprobs=False, n=1, user="u1",
                     store=False, metadata={"run": "7"}, service_tier="auto", parallel_tool_calls=True,
                     tool_choice="none", response_format={"type": "text"}, modalities=["text"], logit_bias={},
                     reasoning_effort="low", verbosity="medium", prompt_cache_key="k", safety_identifier="s",
                     prompt_cache_retention="24h", stop=None, seed=None, tools=[])
    assert sent == plain
    text = c.completions.create(model=NAME, prompt="The capital of France is", **GREEDY).choices[0].text
    assert c.completions.create(model=NAME, prompt="The capital of France is", best_of=1, echo=False, suffix=None,
                                user="u1", frequency_penalty=0, presence_penalty=0, **GREEDY).choices[0].text == text


def test_developer_message_is_the_system_message(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    c = client(server)
    system = [{"role": "system", "content": "Answer briefly."}] + ask(4)
    developer = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]}] + ask(4)
    expected = model.chat(tokenizer, system, temperature=0, max_new_tokens=8)
    assert chat_text(c, developer, **GREEDY) == chat_text(c, system, **GREEDY) == expected


def test_penalty_processor_is_openais_formula():
    """mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting generated tokens only (hand-computed)."""
    import torch

    from baichuan_tune.serve.generation import FrequencyPresencePenalty

    ids = torch.tensor([[5, 5, 9, 5, 5, 7]])  # a 3-token prompt (5 5 9), then 5 5 7 generated
    scores = torch.zeros(1, 10)
    out = FrequencyPresencePenalty(prompt_length=3, frequency=0.5, presence=2.0)(ids, scores)
    expected = torch.zeros(1, 10)
    expected[0, 5] = -(2 * 0.5 + 2.0)  # generated twice (its prompt occurrences do not count)
    expected[0, 7] = -(1 * 0.5 + 2.0)
    assert torch.equal(out, expected)  # token 9 only in the prompt: untouched


@pytest.fixture(scope="module")
def builtin_server():
    """The built-in default model (the `default` preset, seed 0, as builtin.default_model_dir builds it)."""
    import torch

    from baichuan_tune.models import BaichuanForCausalLM
    from baichuan_tune.models.presets import preset_config
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BaichuanForCausalLM(preset_config("default")).eval()
    tokenizer = BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server's worker and the reference loop share the cores
    srv = BackgroundServer(create_app(model, tokenizer, NAME)).start()
    yield model, tokenizer, srv
    srv.stop()
    torch.set_num_threads(threads)


def reference_greedy(model, prompt: list[int], steps: int, frequency=0.0, presence=0.0, bias=None) -> list[int]:
    """Greedy decoding written out: a full forward pass per token, OpenAI's penalty formula and logit_bias
    applied by hand to the raw logits, stopping at eos (2)."""
    import torch

    ids, generated = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        for token_id, value in (bias or {}).items():
            logits[token_id] += value
        for token_id in set(generated):
            logits[token_id] -= generated.count(token_id) * frequency + presence
        nxt = int(logits.argmax())
        if nxt == 2:
            break
        ids.append(nxt)
        generated.append(nxt)
    return generated


def test_penalties_change_a_repetitive_greedy_answer(builtin_server):
    """The built-in model repeats itself under greedy decoding; presence and frequency penalties change the
    answer, to exactly what the formula written out by hand gives."""
    model, tokenizer, srv = builtin_server
    c = client(srv)
    prompt = "What is the capital of France?"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    settings = dict(model=NAME, prompt=prompt, temperature=0, max_tokens=16, extra_body={"repetition_penalty": 1.0})
    plain = reference_greedy(model, ids, 16)
    assert max(plain.count(t) for t in plain) >= 4  # repetitive: some token comes back again and again
    assert c.completions.create(**settings).choices[0].text == tokenizer.decode(plain, skip_special_tokens=True)
    for penalties in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5}):
        expected = reference_greedy(model, ids, 16, penalties.get("frequency_penalty", 0.0),
                                    penalties.get("presence_penalty", 0.0))
        assert expected != plain
        reply = c.completions.create(**settings, **penalties).choices[0].text
        assert reply == tokenizer.decode(expected, skip_special_tokens=True), penalties
    chat = dict(model=NAME, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16,
                extra_body={"repetition_penalty": 1.0})
    assert c.chat.completions.create(**chat, presence_penalty=2.0).choices[0].message.content != \
        c.chat.completions.create(**chat).choices[0].message.content


def test_logit_bias_bans_and_forces_tokens(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    c = client(server)
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    plain = reference_greedy(model, ids, 8)
    banned = plain[0]
    reply = c.completions.create(model=NAME, prompt=prompt, logit_bias={str(banned): -100}, logprobs=0, **PLAIN)
    expected = reference_greedy(model, ids, 8, bias={banned: -100})
    assert banned not in expected and reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert tokenizer.convert_ids_to_tokens(banned).replace("\u2581", " ") not in reply.choices[0].logprobs.tokens
    forced = c.completions.create(model=NAME, prompt=prompt, logit_bias={"1234": 100}, **PLAIN).choices[0].text
    assert forced == tokenizer.decode([1234] * 8)  # +100: exclusive selection


def test_n_returns_that_many_choices(server):
    c = client(server)
    reply = c.chat.completions.create(model=NAME, messages=ask(2), n=3, temperature=1.0, max_tokens=6, seed=1)
    assert [ch.index for ch in reply.choices] == [0, 1, 2]
    assert all(ch.message.content is not None and ch.finish_reason for ch in reply.choices)
    assert len({ch.message.content for ch in reply.choices}) > 1  # sampled: the choices differ
    chunks = list(c.chat.completions.create(model=NAME, messages=ask(2), n=3, temperature=1.0, max_tokens=6,
                                            seed=1, stream=True))
    streamed = {i: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i)
                for i in range(3)}
    assert streamed == {ch.index: ch.message.content for ch in reply.choices}  # same seed: the same three
    finishes = sorted(ch.choices[0].index for ch in chunks if ch.choices[0].finish_reason)
    assert finishes == [0, 1, 2]
    two_prompts = c.completions.create(model=NAME, prompt=["One", "Two"], n=2, **GREEDY)
    assert [ch.index for ch in two_prompts.choices] == [0, 1, 2, 3]
    texts = [ch.text for ch in two_prompts.choices]
    assert texts[0] == texts[1] != texts[2] == texts[3]  # greedy: prompt i's choices are i*n .. i*n+n-1


def test_seed_reproduces_sampling(server):
    c = client(server)
    sample = dict(model=NAME, messages=ask(3), temperature=1.0, top_p=1.0, max_tokens=8, n=2,
                  extra_body={"top_k": 0})

    def texts(seed):
        return [ch.message.content for ch in c.chat.completions.create(**sample, seed=seed).choices]

    first = texts(1234)
    assert texts(1234) == first
    assert texts(4321) != first


def test_best_of_keeps_the_most_likely_candidate(server):
    """best_of=4 returns, of the four candidates that n=4 shows for the same seed, the one with the highest
    mean token log-prob."""
    c = client(server)
    sample = dict(model=NAME, prompt="Once upon a time", temperature=1.0, max_tokens=6, seed=99, logprobs=0)
    candidates = c.completions.create(**sample, n=4).choices
    means = [sum(ch.logprobs.token_logprobs) / len(ch.logprobs.token_logprobs) for ch in candidates]
    best = c.completions.create(**sample, best_of=4).choices
    assert len(best) == 1 and best[0].text == candidates[means.index(max(means))].text


def model_logprobs(model, ids: list[int]):
    """log-softmax of the model's logits over `ids` in one plain forward pass: row i scores token i + 1."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_chat_logprobs_are_the_models_log_softmax(server, model_and_tokenizer):
    from baichuan_tune.serve.generation import chat_prompt_ids

    model, tokenizer = model_and_tokenizer
    config = chat_generation_config(model, temperature=0, max_new_tokens=8)
    prompt = chat_prompt_ids(model, tokenizer, ask(6), config)
    generated = generate_text(model, tokenizer, prompt, config).token_ids
    reply = client(server).chat.completions.create(model=NAME, messages=ask(6), logprobs=True, top_logprobs=3,
                                                   **GREEDY).choices[0]
    content = reply.logprobs.content
    oracle = model_logprobs(model, prompt + generated)
    assert len(content) == len(generated) >= 1
    for i, (entry, token_id) in enumerate(zip(content, generated)):
        row = oracle[len(prompt) + i - 1]
        assert abs(entry.logprob - row[token_id].item()) < 1e-4
        top = row.topk(3)
        assert [abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, top.values.tolist())] == [True] * 3
    assert b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace") == reply.message.content
    chunks = client(server).chat.completions.create(model=NAME, messages=ask(6), logprobs=True, top_logprobs=3,
                                                    stream=True, **GREEDY)
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert streamed == content  # streamed: the same entries (with the choice's last chunk)


def test_completion_echo_scores_the_prompt(server, model_and_tokenizer):
    """lm-eval's local-completions request: token-id prompts, echo, max_tokens 0, logprobs; the string form
    of the same prompts scores the same."""
    model, tokenizer = model_and_tokenizer
    texts = ["The capital of France is Paris", "你好, 世界 😀"]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    c = client(server)
    by_ids = c.completions.create(model=NAME, prompt=ids, echo=True, max_tokens=0, logprobs=2, temperature=0)
    by_text = c.completions.create(model=NAME, prompt=texts, echo=True, max_tokens=0, logprobs=2, temperature=0)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids)) and by_ids.usage.completion_tokens == 0
    for choice, text_choice, prompt, text in zip(by_ids.choices, by_text.choices, ids, texts):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(prompt)
        oracle = model_logprobs(model, prompt)
        for i in range(1, len(prompt)):
            assert abs(lp.token_logprobs[i] - oracle[i - 1, prompt[i]].item()) < 1e-4
            assert abs(max(lp.top_logprobs[i].values()) - oracle[i - 1].max().item()) < 1e-4
            assert 2 <= len(lp.top_logprobs[i]) <= 3  # the 2 most likely, and the chosen token
        assert choice.text == text_choice.text == text and text_choice.logprobs.token_logprobs == lp.token_logprobs
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    scored = c.completions.create(model=NAME, prompt=[ids[0]], echo=True, max_tokens=1, logprobs=1, temperature=0)
    lp, prompt = scored.choices[0].logprobs, ids[0]
    full = prompt + [reference_greedy(model, prompt, 1, bias=None)[0]]  # repetition penalty: no history yet
    oracle = model_logprobs(model, full)
    assert len(lp.token_logprobs) == len(full)
    assert abs(lp.token_logprobs[-1] - oracle[-2, full[-1]].item()) < 1e-4
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # lm-eval's is_greedy check


def test_score_tokens_in_chunks_equals_one_pass(model_and_tokenizer):
    from baichuan_tune.serve.generation import score_tokens

    model, tokenizer = model_and_tokenizer
    ids = tokenizer.encode("A long enough prompt to be cut into several chunks of five", add_special_tokens=False)
    oracle = model_logprobs(model, ids)
    scored = score_tokens(model, ids, top=2, chunk=5)
    assert scored[0] is None and len(scored) == len(ids) > 10
    for i, entry in enumerate(scored[1:], start=1):
        assert entry.token_id == ids[i] and abs(entry.logprob - oracle[i - 1, ids[i]].item()) < 1e-4
        assert [t for t, _ in entry.top] == oracle[i - 1].topk(2).indices.tolist()


def test_stop_cuts_the_text(server):
    c = client(server)
    whole = chat_text(c, ask(8), temperature=0, max_tokens=16)
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    assert len(stop) == 2 and stop in whole
    cut = c.chat.completions.create(model=NAME, messages=ask(8), temperature=0, max_tokens=16, stop=[stop, "zzz"],
                                    logprobs=True).choices[0]
    assert cut.message.content == whole[: whole.index(stop)] and cut.finish_reason == "stop"
    shown = b"".join(bytes(e.bytes) for e in cut.logprobs.content).decode("utf-8", "replace")
    assert shown.startswith(cut.message.content) and len(shown) < len(whole)  # tokens past the stop are dropped


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, IMAGE]}]},
     "messages.0.content.1.type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]}, "messages.0.content.0.type"),
    ({"messages": ask(0) + [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]},
                            {"role": "tool", "tool_call_id": "1", "content": "42"}]}, "messages.1.tool_calls"),
    ({"messages": ask(0) + [{"role": "tool", "tool_call_id": "1", "content": "42"}]}, "messages.1.role"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"999999": 1}}, "logit_bias.999999"),
    ({"logit_bias": {"5": -101}}, "logit_bias.5"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
]


@pytest.mark.parametrize("fields,param", REFUSED, ids=[p for _, p in REFUSED])
def test_what_the_model_cannot_do_is_refused_by_name(server, fields, param):
    body = {"messages": ask(0), **GREEDY, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(model=NAME, **body)
    assert refused.value.param == param and refused.value.status_code == 400
    assert set(refused.value.body) == {"message", "type", "param", "code"} and param in refused.value.body["message"]


def test_completion_refusals_name_the_field(server):
    c = client(server)
    for fields, param in (({"suffix": "The end."}, "suffix"), ({"prompt": [[1, 4096]]}, "prompt"),
                          ({"prompt": [[5], [4096]]}, "prompt.1"), ({"best_of": 1, "n": 2}, "best_of"),
                          ({"best_of": 3, "stream": True}, "best_of"), ({"logprobs": 21}, "logprobs")):
        body = {"prompt": "hi", **GREEDY, **fields}
        with pytest.raises(openai.BadRequestError) as refused:
            result = c.completions.create(model=NAME, **body)
            list(result) if body.get("stream") else None
        assert refused.value.param == param, fields


# ----------------------------------------------------------------------------- limits


def test_a_body_over_the_limit_is_answered_413(model_and_tokenizer):
    with start(model_and_tokenizer, max_body_bytes=64 * 1024) as srv:
        url = srv.url + "/v1/completions"
        big = {"model": NAME, "prompt": "word " * 20_000, "max_tokens": 1}
        for response in (httpx.post(url, json=big, timeout=30),  # Content-Length says so at once
                         httpx.post(url, content=(b"x" * 10_000 for _ in range(10)), timeout=30)):  # chunked
            assert response.status_code == 413
            assert response.json()["error"]["code"] == "request_too_large" and set(response.json()["error"]) == {
                "message", "type", "param", "code"}
        with pytest.raises(openai.APIStatusError) as too_large:
            client(srv).completions.create(model=NAME, prompt="word " * 20_000, max_tokens=1)
        assert too_large.value.status_code == 413
        assert client(srv).completions.create(model=NAME, prompt="word " * 50, **GREEDY).choices  # under: served


def test_oversized_or_malformed_requests_get_the_json_error_body(server):
    import socket

    response = httpx.get(server.url + "/health", headers={"X-Big": "a" * 1_000_000}, timeout=30)
    assert response.status_code == 431 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "invalid_http_request"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", raw, re.IGNORECASE).group(1)):
            raw += sock.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


class SlowTokenizer:
    """The real tokenizer, except that encoding a long text takes `seconds` longer (as a huge prompt does)."""

    def __init__(self, tokenizer, seconds: float):
        self.tokenizer, self.seconds = tokenizer, seconds

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)

    def encode(self, text, **kwargs):
        import time

        if len(text) > 100_000:
            time.sleep(self.seconds)
        return self.tokenizer.encode(text, **kwargs)


def test_health_answers_while_a_large_request_is_tokenised(model_and_tokenizer):
    """A 250 KB prompt whose tokenising takes over 2.5 s: /health keeps answering meanwhile (within a second;
    tokenising on the event loop would hold it for the whole 2.5 s)."""
    import time

    model, tokenizer = model_and_tokenizer
    with BackgroundServer(create_app(model, SlowTokenizer(tokenizer, 2.5), NAME)) as srv:
        httpx.get(srv.url + "/health", timeout=10)  # a warm connection pool
        body = {"model": NAME, "prompt": "word " * 50_000, "max_tokens": 1}
        with ThreadPoolExecutor(1) as pool:
            began = time.monotonic()
            big = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=60)
            latencies = []
            while not big.done():
                sent = time.monotonic()
                assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
                latencies.append(time.monotonic() - sent)
                time.sleep(0.05)
            took = time.monotonic() - began
        assert big.result().json()["error"]["code"] == "context_length_exceeded"  # tokenised, then refused
        assert took >= 2.5 and len(latencies) >= 10
        assert max(latencies) < 1.0, latencies


def test_serve_checks_its_body_limit_option():
    from baichuan_tune.serve.launch import ServeConfig
    from baichuan_tune.config import ConfigError

    assert ServeConfig().max_body_bytes == 4 * 1024 * 1024
    with pytest.raises(ConfigError, match="--max-body-bytes"):
        ServeConfig(max_body_bytes=10).validate()
