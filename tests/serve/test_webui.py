"""The browser UI, driven in headless Chromium (Playwright) against the server on the built-in model and on
a published-layout checkpoint; its Runs page on real training runs of the training commands.

Oracles: `model.chat` and the API's own answer for the same request (greedy decoding, or a fixed seed);
the trainer_log.jsonl each run wrote, read here with `json`; the published generation_config.json for the
controls' defaults. Each browser test saves a screenshot into its tmp folder. Without Playwright or a
Chromium they skip, saying what to install; the tests that need no browser run anyway.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from baichuan_tune.serve.server import BackgroundServer, create_app
from conftest import need_shared

KEY = "s3cret"
NAME = "default"
TIMEOUT_MS = 180_000  # a generation on a busy 2-core machine can take a while


def find_chromium() -> str | None:
    """$BAICHUAN_TUNE_CHROMIUM, else the system's Chromium (Debian's `chromium` package)."""
    named = os.environ.get("BAICHUAN_TUNE_CHROMIUM")
    if named:
        return named
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Module fixtures run before the per-test cache fixture: keep the built-in model out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAICHUAN_TUNE_HOME", str(tmp_path_factory.getbasetemp() / "baichuan_tune_home"))
        yield tmp_path_factory.mktemp("webui")


@pytest.fixture(scope="module")
def builtin(home):
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer, resolve_model_path

    return load_model_and_tokenizer(resolve_model_path("default"), dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def runs_dir(home, builtin):
    """Real runs of the training commands on the built-in model: sft (LoRA, eval, a checkpoint, a perplexity
    evaluation in the run folder) and a 2-step PPO run one folder deeper."""
    from baichuan_tune.commands import eval as eval_command
    from baichuan_tune.commands import ppo, sft

    root = home / "outputs"
    fast = ["--report_to", "none", "--device", "cpu", "--logging_steps", "1"]
    assert sft.main(["--model", "default", "--dataset", "demo", "--max_samples", "16", "--cutoff_len", "32",
                     "--per_device_train_batch_size", "2", "--max_steps", "3", "--val_size", "4", "--eval_steps", "2",
                     "--save_steps", "2", "--cache_dir", "none", "--preprocessing_num_workers", "1",
                     "--output_dir", str(root / "sft-lora"), *fast]) == 0
    assert ppo.main(["--model", "default", "--rollout_batch_size", "4", "--per_device_train_batch_size", "4",
                     "--max_new_tokens", "4", "--ppo_epochs", "1", "--val_size", "4", "--max_steps", "2",
                     "--output_dir", str(root / "rl" / "ppo"), *fast]) == 0
    text = home / "text.txt"
    text.write_text("The capital of France is Paris. The capital of Italy is Rome.\n")
    assert eval_command.main(["--model", "default", "--task", "ppl", "--data", str(text), "--device", "cpu",
                              "--output_dir", str(root / "sft-lora" / "eval-ppl")]) == 0
    return root


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def server(builtin, runs_dir):
    from baichuan_tune.serve.webui import mount_ui

    model, tokenizer = builtin
    app = create_app(model, tokenizer, NAME, api_key=KEY)
    mount_ui(app, model, runs_dir, api_key=KEY)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():  # browser tests take `page` first, so that without a browser they skip before any setup
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser tests need Playwright: pip install playwright")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium to drive: apt-get install chromium (Debian), or set BAICHUAN_TUNE_CHROMIUM")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.screenshot(path=str(tmp_path / "last.png"))
    context.close()
    assert not errors, errors  # no script error on the page


def open_ui(page, url: str, hash_: str = "chat", key: str | None = KEY):
    """The UI with the key already entered (the tab keeps it in sessionStorage), ready to use."""
    if key is not None:
        page.add_init_script(f"sessionStorage.setItem('baichuan-tune.api-key', {json.dumps(key)})")
    page.goto(f"{url}/ui/#{hash_}")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)


def chat_requests(page) -> list[dict]:
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def send(page, text: str) -> str:
    """Type `text`, send it, wait for the streamed answer to finish; the answer as shown."""
    count = page.locator(".message.assistant[data-state=done]").count()
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_function(f"() => document.querySelectorAll('.message.assistant[data-state=done]').length > {count}",
                           timeout=TIMEOUT_MS)
    return page.locator(".message.assistant .text").last.text_content()


def wait_for_curve(page, run: str, chart: str, key: str) -> None:
    # "attached", not "visible": a curve of one point is a path with no area.
    page.wait_for_selector(f"#run-detail[data-run='{run}'] .chart[data-title='{chart}'] path[data-key='{key}']",
                           state="attached", timeout=30_000)


def path_points(page, chart: str, key: str) -> list[tuple[float, float]]:
    d = page.get_attribute(f"#run-detail .chart[data-title='{chart}'] path[data-key='{key}']", "d")
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d)]


def assert_curve_follows(points: list[tuple[float, float]], records: list[dict], key: str) -> None:
    """One point per logged value, left to right in step order, higher values drawn higher (smaller y)."""
    logged = [(r["step"], r[key]) for r in records if key in r]
    assert len(points) == len(logged), (key, len(points), len(logged))
    xs = [x for x, _ in points]
    assert xs == sorted(xs)
    for (_, y1), (_, y2), (_, v1), (_, v2) in zip(points, points[1:], logged, logged[1:]):
        assert (y1 > y2) == (v1 < v2) or v1 == v2, key


# ----------------------------------------------------------------------------- chat


def test_chat_streams_the_models_answer(page, server, builtin, tmp_path):
    model, tokenizer = builtin
    served = httpx.get(server.url + "/ui/", timeout=30)
    assert served.status_code == 200 and KEY not in served.text  # the page holds no key
    assert "default-src 'self'" in served.headers["content-security-policy"]  # loads nothing from elsewhere
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server.url + "/ui/#chat")
    page.wait_for_selector("#notice.error:has-text('API key')", timeout=60_000)  # 401 until the key is given
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const view = document.querySelector('#messages .message.assistant:last-child');
            if (view) window.seen.push([view.dataset.state, view.querySelector('.text').textContent]);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    prompt = "What is the capital of France?"
    answer = send(page, prompt)
    assert answer == model.chat(tokenizer, [{"role": "user", "content": prompt}], temperature=0, max_new_tokens=24)
    growing = []
    for state, text in page.evaluate("window.seen"):
        if state == "streaming" and text and (not growing or text != growing[-1]):
            growing.append(text)
    assert len(growing) >= 3, growing  # the answer appeared piece by piece, before it was complete
    assert all(answer.startswith(text) for text in growing)
    usage = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                       json={"model": NAME, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                             "max_tokens": 24}).json()["usage"]
    assert page.text_content(".message.assistant .meta").startswith(f"{usage['completion_tokens']} tokens")
    assert all(url.startswith(server.url) for url in requested)  # nothing fetched from anywhere else
    page.screenshot(path=str(tmp_path / "chat.png"))


def test_sampling_controls_regenerate_and_clear_reach_the_request(page, server, tmp_path):
    open_ui(page, server.url)
    bodies = chat_requests(page)
    for field, value in {"#system": "Answer briefly.", "#temperature": "0.9", "#top_p": "0.8", "#top_k": "7",
                         "#repetition_penalty": "1.2", "#max_tokens": "6", "#seed": "1234"}.items():
        page.fill(field, value)
    first = send(page, "Hello there")
    system = {"role": "system", "content": "Answer briefly."}
    user = {"role": "user", "content": "Hello there"}
    expected = {"model": NAME, "messages": [system, user], "stream": True, "stream_options": {"include_usage": True},
                "temperature": 0.9, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.2, "max_tokens": 6, "seed": 1234}
    assert bodies == [expected]
    # The server side: the same request, not streamed, gives the answer the page showed (seeded sampling).
    plain = httpx.post(server.url + "/v1/chat/completions", json=expected | {"stream": False, "stream_options": None},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120).json()
    assert plain["choices"][0]["message"]["content"] == first

    page.click("#regenerate")  # the same request again, in place of the old answer
    page.wait_for_function("() => document.querySelector('.message.assistant:last-child').dataset.state === 'done'",
                           timeout=TIMEOUT_MS)
    assert bodies[1] == expected and page.locator(".message.assistant").count() == 1
    assert page.locator(".message.assistant .text").last.text_content() == first

    send(page, "And then?")
    assert bodies[2]["messages"] == [system, user, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "And then?"}]
    page.screenshot(path=str(tmp_path / "chat-settings.png"))
    page.click("#clear")
    assert page.locator(".message").count() == 0
    send(page, "New topic")
    assert bodies[3]["messages"] == [system, {"role": "user", "content": "New topic"}]


# ----------------------------------------------------------------------------- runs


def test_runs_page_draws_each_logged_step_and_shows_the_run(page, server, runs_dir, tmp_path):
    open_ui(page, server.url, "runs")
    page.wait_for_selector("#run-list li[data-name='rl/ppo']", timeout=30_000)
    names = page.eval_on_selector_all("#run-list li", "items => items.map(item => item.dataset.name)")
    assert {"sft-lora", "rl/ppo"} <= set(names)
    page.click("#run-list li[data-name='sft-lora']")
    wait_for_curve(page, "sft-lora", "Loss", "eval_loss")
    records = read_log(runs_dir / "sft-lora")
    for chart, key in [("Loss", "loss"), ("Loss", "eval_loss"), ("Learning rate", "lr"),
                       ("Throughput", "tokens_per_s"), ("Gradient norm", "grad_norm")]:
        assert_curve_follows(path_points(page, chart, key), records, key)
    detail = page.text_content("#run-detail")
    results = json.loads((runs_dir / "sft-lora" / "train_results.json").read_text())
    assert results["global_step"] == 3 and "global_step" in detail and "finished" in detail
    assert "checkpoint-2" in page.text_content("#run-checkpoints")
    assert "finetuning_type: lora" in page.text_content("#run-config pre")
    row = page.eval_on_selector_all("#run-evals tr:nth-child(2) td", "tds => tds.map(td => td.textContent)")
    ppl = json.loads((runs_dir / "sft-lora" / "eval-ppl" / "results.json").read_text())["perplexity"]
    assert row[:2] == ["eval-ppl", "ppl"] and float(row[-1]) == pytest.approx(ppl, rel=1e-3)
    assert "--adapter" in page.text_content("#run-outputs")
    page.screenshot(path=str(tmp_path / "runs.png"))


def test_ppo_run_shows_reward_and_kl(page, server, runs_dir, tmp_path):
    open_ui(page, server.url, "runs/rl/ppo")
    wait_for_curve(page, "rl/ppo", "KL", "kl")
    records = read_log(runs_dir / "rl" / "ppo")
    for chart, key in [("Reward", "reward"), ("Reward", "eval_reward"), ("KL", "kl"),
                       ("Throughput", "rollout_tokens_per_s")]:
        assert_curve_follows(path_points(page, chart, key), records, key)
    assert "ppo" in page.text_content("#run-head")
    # PPO's other logged values (policy_loss, value_loss, entropy, ...) each get a chart below.
    assert page.locator("#other-charts .chart[data-title=policy_loss] path").count() == 1
    page.screenshot(path=str(tmp_path / "ppo.png"))


def test_a_run_in_progress_updates_live(page, server, runs_dir, tmp_path):
    """A step logged while the page is open (by the training code's own RunLog) appears without a reload."""
    from baichuan_tune.train.training import RunLog

    run = runs_dir / "live"
    shutil.copytree(runs_dir / "sft-lora", run)
    open_ui(page, server.url, "runs/live")
    wait_for_curve(page, "live", "Loss", "loss")
    before = len(path_points(page, "Loss", "loss"))
    log = RunLog(run, total_steps=5, start_step=3, tensorboard=False)  # as a resumed run rewrites, then appends
    for step in (4, 5):
        log.log(step, loss=1.5 / step, lr=0.0, grad_norm=1.0, epoch=1.0, tokens_per_s=10.0)
    log.close()
    page.wait_for_function("() => document.querySelector(\"#run-detail .chart[data-title=Loss] path[data-key=loss]\")"
                           f".getAttribute('data-points') === '{before + 2}'", timeout=30_000)
    assert_curve_follows(path_points(page, "Loss", "loss"), read_log(run), "loss")
    page.wait_for_selector("#run-head .badge.in-progress", timeout=30_000)  # logging again, after its results
    page.screenshot(path=str(tmp_path / "live.png"))


# ----------------------------------------------------------------------------- no browser needed


def raw_get(srv, target: str, key: str | None = KEY) -> int:
    """GET `target` byte for byte (an HTTP client would normalise '..' away before sending it)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.putrequest("GET", target, skip_accept_encoding=True)
    if key:
        conn.putheader("Authorization", f"Bearer {key}")
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_run_data_stays_inside_the_runs_folder_and_needs_the_key(server, runs_dir, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "trainer_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (runs_dir / "escape").symlink_to(outside, target_is_directory=True)
    try:
        names = [r["name"] for r in httpx.get(server.url + "/ui/api/runs", headers={"Authorization": f"Bearer {KEY}"},
                                              timeout=30).json()["runs"]]
        assert "sft-lora" in names and "escape" not in names
        for target in ["/ui/api/runs/escape", "/ui/api/runs/../../../etc/passwd", "/ui/api/runs/..%2F..%2Fetc%2Fpasswd",
                       "/ui/api/runs/%2Fetc%2Fpasswd", "/ui/api/runs/sft-lora/../../secret",
                       "/ui/api/runs/sft-lora/checkpoint-2", "/ui/api/runs/sft-lora%00", "/ui/assets/../webui.py",
                       "/ui/assets/%2e%2e/%2e%2e/server.py", "/ui/assets/..%2F..%2Fserver.py"]:
            assert raw_get(server, target) == 404, target
        assert raw_get(server, "/ui/api/runs/sft-lora") == 200
        assert raw_get(server, "/ui/api/runs/rl/ppo") == 200
        for target in ["/ui/api/info", "/ui/api/runs", "/ui/api/runs/sft-lora"]:
            assert raw_get(server, target, key=None) == 401 and raw_get(server, target, key="wrong") == 401
        assert raw_get(server, "/ui/", key=None) == 200 and raw_get(server, "/ui/assets/app.js", key=None) == 200
    finally:
        (runs_dir / "escape").unlink()


def test_run_api_sends_only_new_records_and_resets_on_a_rewritten_log(server, runs_dir):
    def get(**params):
        return httpx.get(server.url + "/ui/api/runs/sft-lora", params=params, timeout=30,
                         headers={"Authorization": f"Bearer {KEY}"}).json()

    records = read_log(runs_dir / "sft-lora")
    whole = get()
    assert whole["reset"] and whole["records"] == records and whole["total"] == len(records)
    tail = get(since=2, log=whole["log_id"])
    assert not tail["reset"] and tail["records"] == records[2:]
    assert get(since=2, log="another-file")["records"] == records  # a rewritten log is sent again whole
    assert get(since=len(records) + 5, log=whole["log_id"])["reset"]  # a shortened one too


def test_info_follows_the_checkpoint(shared_reference):
    """Baichuan-13B-Chat: no system role, and its own published defaults (repetition penalty 1.1)."""
    from transformers import GenerationConfig

    from baichuan_tune.models import BaichuanConfig, BaichuanForCausalLM
    from baichuan_tune.serve.webui import ui_info

    folder = need_shared(shared_reference / "baichuan-13b-chat")
    published = json.loads((folder / "config.json").read_text())
    config = BaichuanConfig(**published | dict(hidden_size=40, num_attention_heads=5, intermediate_size=64,
                                                num_hidden_layers=1, vocab_size=256))
    model = BaichuanForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(str(folder))
    gen = json.loads((folder / "generation_config.json").read_text())
    info = ui_info(model, None)
    assert info["format"] == "baichuan" and info["system_prompt"] is False
    assert info["defaults"] == {"temperature": gen["temperature"], "top_p": gen["top_p"], "top_k": gen["top_k"],
                                "repetition_penalty": gen["repetition_penalty"], "max_tokens": gen["max_new_tokens"]}


def test_serve_ui_mounts_the_page_and_webui_defaults(monkeypatch, home, tmp_path):
    import uvicorn

    from baichuan_tune import cli
    from baichuan_tune.commands.webui import WebUIConfig
    from baichuan_tune.config import parse_config

    cfg = parse_config(WebUIConfig, [])
    assert (cfg.host, cfg.port, cfg.ui, cfg.runs) == ("127.0.0.1", 7860, True, "outputs")
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(self.config.app))
    assert cli.main(["serve", "--ui", "--model", "default", "--port", "0", "--device", "cpu",
                     "--runs", str(tmp_path)]) == 0
    paths = {getattr(route, "path", None) for route in served[0].routes}
    assert {"/ui/", "/ui/api/runs", "/v1/chat/completions"} <= paths
    assert cli.main(["serve", "--model", "default", "--port", "0", "--device", "cpu"]) == 0
    assert "/ui/" not in {getattr(route, "path", None) for route in served[1].routes}  # only when asked


def test_webui_checks_its_extra_and_options_before_loading(monkeypatch, capsys, tmp_path):
    from baichuan_tune import cli

    monkeypatch.delitem(sys.modules, "baichuan_tune.serve.server", raising=False)
    monkeypatch.delitem(sys.modules, "baichuan_tune.serve.webui", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    assert cli.main(["webui", "--model", "default"]) == 2
    assert "webui needs fastapi: pip install 'baichuan-tune[webui]'" in capsys.readouterr().err
    monkeypatch.undo()
    (tmp_path / "file").write_text("")
    assert cli.main(["webui", "--model", "no/such/folder", "--runs", str(tmp_path / "file")]) == 2
    assert "--runs" in capsys.readouterr().err


def test_training_logs_gpu_memory_only_on_a_gpu(tmp_path):
    from baichuan_tune.train.training import RunLog, gpu_memory

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process; the GPU test below covers it")
    log = RunLog(tmp_path, total_steps=1, tensorboard=False)
    log.log(1, loss=1.0)
    log.close()
    assert gpu_memory() == {} and set(read_log(tmp_path)[0]) == {"step", "loss", "elapsed"}


@pytest.mark.gpu
def test_training_logs_gpu_memory(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from baichuan_tune.train.training import RunLog

    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 0.25 GiB held while logging
    log = RunLog(tmp_path, total_steps=2, tensorboard=False)
    log.log(1, loss=1.0)
    log.log(1, eval_loss=1.0)
    log.close()
    train, evaluation = read_log(tmp_path)
    assert train["memory_gib"] >= 0.25 and train["max_memory_gib"] >= train["memory_gib"]
    assert train["memory_gib"] == pytest.approx(torch.cuda.memory_allocated() / 2**30, abs=1e-3)
    assert "memory_gib" not in evaluation  # held-out records carry only their metrics
    del block


# ----------------------------------------------------------------------------- a published-layout checkpoint


@contextlib.contextmanager
def webui_process(folder: Path, runs: Path):
    """`baichuan-tune webui` in its own process (key from $BAICHUAN_TUNE_API_KEY); yields the UI's base URL."""
    cmd = [sys.executable, "-m", "baichuan_tune.cli", "webui", "--model", str(folder), "--port", "0",
           "--runs", str(runs), "--device", "cpu", "--dtype", "fp32", "--log-level", "warning"]
    env = os.environ | {"BAICHUAN_TUNE_API_KEY": KEY}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        match = re.search(r"web UI at (http://127\.0\.0\.1:\d+)/ui/", lines[1])
        assert match, "".join(lines) + (proc.stderr.read() if proc.poll() is not None else "")
        yield match.group(1)
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_both_pages_on_a_published_layout_checkpoint(page, shared_reference, runs_dir, tmp_path):
    """A tiny random-weight Baichuan2-13B-Chat (the published config shrunk, its generation_config.json and
    real tokenizer), saved with save_pretrained: the controls start at the published defaults and the
    page's answer in Chinese equals model.chat's."""
    from transformers import GenerationConfig

    from baichuan_tune.models.checkpoint import load_model_and_tokenizer
    from baichuan_tune.models import BaichuanConfig, BaichuanForCausalLM

    reference = need_shared(shared_reference / "baichuan2-13b-chat")
    folder = tmp_path / "Baichuan2-13B-Chat-tiny"
    folder.mkdir()
    for file in reference.iterdir():  # contents only: ../shared's files are read-only
        shutil.copyfile(file, folder / file.name)
    published = json.loads((reference / "config.json").read_text())
    config = BaichuanConfig(**published | dict(hidden_size=40, num_attention_heads=5, intermediate_size=64,
                                                num_hidden_layers=2))
    torch.manual_seed(0)
    model = BaichuanForCausalLM(config)
    model.generation_config = GenerationConfig.from_pretrained(str(reference))
    model.save_pretrained(str(folder))
    model, tokenizer = load_model_and_tokenizer(folder, dtype="fp32", device="cpu")  # as the server loads it
    gen = json.loads((reference / "generation_config.json").read_text())

    with webui_process(folder, runs_dir) as url:
        open_ui(page, url)
        fields = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                  "repetition_penalty": "repetition_penalty", "max_tokens": "max_new_tokens"}
        shown = {control: float(page.input_value(f"#{control}")) for control in fields}
        assert shown == {control: gen[key] for control, key in fields.items()}  # the published defaults
        assert page.is_enabled("#system")  # Baichuan2 has a system role
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")
        prompt = [{"role": "user", "content": "世界上第二高的山峰是哪座"}]
        assert send(page, prompt[0]["content"]) == model.chat(tokenizer, prompt, temperature=0, max_new_tokens=8)
        page.screenshot(path=str(tmp_path / "published-chat.png"))
        page.click("#tab-runs")
        page.click("#run-list li[data-name='sft-lora']")
        wait_for_curve(page, "sft-lora", "Loss", "loss")
        assert_curve_follows(path_points(page, "Loss", "loss"), read_log(runs_dir / "sft-lora"), "loss")
        page.screenshot(path=str(tmp_path / "published-runs.png"))
