"""Several LoRA adapters on one base (`serve --adapter name=path`), batched together.

Oracles: PEFT's own loading of each adapter (`PeftModel.from_pretrained`) answering alone through
transformers' generate, and the base model alone; the chat prompt of an adapter's recorded template.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import tiny_model

from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.serve.fast_decode import plain_decode
from baichuan_tune.serve.generation import chat_generation_config
from baichuan_tune.serve.server import BackgroundServer, create_app

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base model and two random LoRA adapters: 'a' (r 4, recorded template human_assistant) and
    'b' (r 8 on other layers, rsLoRA), saved as PEFT saves them."""
    from baichuan_tune.data.templates import write_template_record
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    tmp = tmp_path_factory.mktemp("adapters")
    folders = {}
    for name, seed, config in (
        ("a", 1, dict(r=4, lora_alpha=8, target_modules=["W_pack", "o_proj", "down_proj"])),
        ("b", 2, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["W_pack", "gate_proj", "up_proj"])),
    ):
        torch.manual_seed(seed)
        lora = peft.LoraConfig(init_lora_weights=False, **config)
        peft.get_peft_model(tiny_model("tiny-baichuan-13b", vocab_size=4096), lora).save_pretrained(str(tmp / name))
        folders[name] = str(tmp / name)
    write_template_record(tmp / "a", "human_assistant")
    return tiny_model("tiny-baichuan-13b", vocab_size=4096), BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER)), folders


def alone(model, tokenizer, prompt, max_tokens: int) -> str:
    config = chat_generation_config(model, temperature=0, max_new_tokens=max_tokens)
    return tokenizer.decode(plain_decode(model, [prompt], config)[0], skip_special_tokens=True)


def peft_model(folder: str):
    return peft.PeftModel.from_pretrained(tiny_model("tiny-baichuan-13b", vocab_size=4096), folder).eval()


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", GPU])
def test_mixed_adapter_batch_equals_each_adapter_alone(setup, device):
    """Base, 'a' and 'b' rows decode in one batch (ALiBi base; on a GPU through the CUDA graphs); each
    answer equals PEFT's model of that adapter alone, and the base rows equal the base."""
    import copy

    model, tokenizer, folders = setup
    model = copy.deepcopy(model).to(device)
    prompts = {"base": list(range(5, 14)), "a": list(range(40, 43)), "b": list(range(90, 110))}
    models = {"base": model, "a": peft_model(folders["a"]).to(device), "b": peft_model(folders["b"]).to(device)}
    expected = {name: alone(models[name], tokenizer, prompts[name], 20) for name in prompts}
    assert len(set(expected.values())) == 3  # the adapters change the answer
    app = create_app(model, tokenizer, "base", max_batch=6, adapters=folders)
    with BackgroundServer(app) as srv:
        listed = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in listed] == ["base", "a", "b"]
        worker = app.state.worker
        mixed, step = [], worker.decoder.decode_step

        def recorded():
            mixed.append({seq.job.adapter for seq in worker.running.values()})
            return step()

        worker.decoder.decode_step = recorded
        order = [name for name in prompts for _ in range(2)]
        barrier = threading.Barrier(len(order))

        def ask(name):
            barrier.wait(timeout=30)
            body = {"model": name, "prompt": prompts[name], "max_tokens": 20, "temperature": 0}
            response = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            return response.json()["model"], response.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(ask, order))
    assert answers == [(name, expected[name]) for name in order]
    assert {0, 1, 2} in mixed  # all three in one decoding step


def test_each_adapter_chats_in_its_recorded_template(setup):
    """'a' records human_assistant, so its chat prompt is that template's; 'b' and the base use the model's."""
    from baichuan_tune.serve.generation import build_chat_input

    model, tokenizer, folders = setup
    messages = [{"role": "user", "content": "Hello there"}]
    with BackgroundServer(create_app(model, tokenizer, "base", adapters=folders)) as srv:
        def chat(name):
            body = {"model": name, "messages": messages, "max_tokens": 6, "temperature": 0}
            return httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).json()

        replies = {name: chat(name) for name in ("base", "a", "b")}
    templated = build_chat_input(tokenizer, messages, model_max_length=512, max_new_tokens=6, fmt="human_assistant")
    assert replies["a"]["usage"]["prompt_tokens"] == len(templated)
    assert replies["a"]["choices"][0]["message"]["content"] == alone(peft_model(folders["a"]), tokenizer, templated, 6)
    assert replies["base"]["usage"]["prompt_tokens"] == replies["b"]["usage"]["prompt_tokens"] != len(templated)


def test_unknown_model_names_every_served_one(setup):
    model, tokenizer, folders = setup
    with BackgroundServer(create_app(model, tokenizer, "base", adapters=folders)) as srv:
        body = {"model": "c", "prompt": "x", "max_tokens": 2}
        response = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "'base', 'a', 'b'" in response.json()["error"]["message"]


def test_serve_adapter_option_forms():
    from baichuan_tune.serve.launch import ServeConfig, split_adapters
    from baichuan_tune.config import ConfigError, parse_config

    cfg = parse_config(ServeConfig, ["--adapter", "a=/x/one", "--adapter", "b=/x/two"])
    assert split_adapters(cfg.adapter) == (None, {"a": "/x/one", "b": "/x/two"})
    assert split_adapters(parse_config(ServeConfig, ["--adapter", "/x/one"]).adapter) == ("/x/one", {})
    for argv in (["--adapter", "/x/one", "--adapter", "a=/x/two"], ["--adapter", "a=/x", "--adapter", "a=/y"],
                 ["--adapter", "=/x"], ["--adapter", "a=/x", "--max-batch", "0"]):
        with pytest.raises(ConfigError, match="--adapter|--max-batch"):
            parse_config(ServeConfig, argv)
