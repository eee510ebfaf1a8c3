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
from baichuan_tune.generation import chat_generation_config, generate_text
from baichuan_tune.server import BackgroundServer, create_app
from conftest import tiny_model

openai = pytest.importorskip("openai")

NAME = "tiny-chat"
GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from baichuan_tune.tokenization_baichuan import BaichuanTokenizer

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
    from baichuan_tune.commands.serve import ServeConfig

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

    from baichuan_tune import server as server_module
    from baichuan_tune.generation import GenerationResult

    started, outcome = threading.Event(), []

    def endless(model, tokenizer, prompt_ids, config, on_text=None, stop=None, cancelled=None):
        started.set()
        deadline = time.monotonic() + 30
        while not cancelled() and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome.append(cancelled())
        return GenerationResult("", [], len(prompt_ids), "stop")

    monkeypatch.setattr(server_module, "generate_text", endless)
    with start(model_and_tokenizer) as srv:
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
    from baichuan_tune.checkpoint import save_pretrained_atomic

    model, tokenizer = model_and_tokenizer
    folder = save_pretrained_atomic(model, tokenizer, tmp_path / "tiny-chat")
    with serve_process(folder) as c:
        assert [m.id for m in c.models.list().data] == ["tiny-chat"]
        reply = c.chat.completions.create(model="tiny-chat", messages=ask(5), **GREEDY)
        assert reply.choices[0].message.content == model.chat(tokenizer, ask(5), temperature=0, max_new_tokens=8)


def test_serve_command_with_an_adapter_and_int8_weights(tmp_path, model_and_tokenizer):
    """--adapter answers as PEFT's own loading of the adapter does; --quantize 8 then answers as the same
    adapter over our in-place LLM.int8() layers (`model.quantize(8)`), a second way to the same format."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from baichuan_tune.checkpoint import load_model, save_pretrained_atomic

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
    with serve_process(folder, "--adapter", str(tmp_path / "adapter"), "--dtype", "fp32", "--quantize", "8") as c:
        assert c.chat.completions.create(model="tiny-chat", messages=ask(5), **GREEDY).choices[0].message.content \
            == expected


def test_serve_without_its_extra_says_how_to_install_it(monkeypatch, capsys):
    from baichuan_tune import cli

    monkeypatch.delitem(sys.modules, "baichuan_tune.server")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    assert cli.main(["serve", "--model", "default"]) == 2
    assert "serve needs fastapi: pip install 'baichuan-tune[serve]'" in capsys.readouterr().err


def test_serve_command_checks_its_options_before_loading(capsys):
    from baichuan_tune import cli

    assert cli.main(["serve", "--model", "no/such/folder", "--log-level", "loud"]) == 2
    assert "'log_level' must be one of" in capsys.readouterr().err
