"""The batching server under load: 1 client beside --clients concurrent clients, over real HTTP.

    python benchmarks/bench_serve.py --shared ../shared          # GPU: random-weight Baichuan2-7B, bf16, 32 clients
    python benchmarks/bench_serve.py --smoke                     # CPU: the built-in model, 4 clients, short requests

A random-weight checkpoint is written at the published Baichuan2-7B config's shapes (<shared>/reference,
the Baichuan2 tokenizer) and `baichuan-tune serve` runs it in its own process (--max-batch = --clients).
The client (httpx, one thread per client) sends --requests completions (token-id prompts of random
lengths, random max_tokens, greedy, streamed with usage), first one at a time (1 client), then spread
over --clients clients at once, each client sending its next request as soon as its last one ended, so
requests join and leave the running batch at different steps. Reported for each phase: aggregate
completion tokens/s (all tokens / wall time), request latency and time to first token (first streamed
chunk) p50/p95; then the ratio of the two rates (target >= 10x at 32 clients) and whether every
concurrent answer equals the same request's answer alone (greedy). `--smoke` writes nothing: it serves
the built-in model (`--model default`) on the CPU. The last line starts with RESULT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="folder with reference/ (published configs)")
    p.add_argument("--smoke", action="store_true", help="CPU, the built-in model, few short requests")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="requests per phase")
    p.add_argument("--prompt-tokens", default="16,384", help="min,max prompt length")
    p.add_argument("--new-tokens", default="64,192", help="min,max max_tokens")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temporary folder)")
    p.add_argument("--serve-args", default="", help="more `serve` options, e.g. '--quantization_bit 4'")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.requests = min(args.clients, 4), min(args.requests, 8)
        args.prompt_tokens, args.new_tokens, args.dtype = "4,40", "8,24", "fp32"
    return args


def write_checkpoint(reference: Path, folder: Path) -> Path:
    """Random bf16 weights at the published Baichuan2-7B config, written as the published checkpoint is."""
    import torch

    import baichuan_tune  # noqa: F401
    from baichuan_tune.models import BaichuanConfig, BaichuanForCausalLM

    published = json.loads((reference / "baichuan2-7b-chat" / "config.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = BaichuanForCausalLM(BaichuanConfig(**published))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(folder), max_shard_size="5GB")
    del model
    (folder / "config.json").write_text(json.dumps(published, indent=2))
    for name in TOKENIZER_FILES:  # Baichuan2-7B and -13B share one tokenizer
        shutil.copy(reference / "baichuan2-13b-chat" / name, folder / name)
    return folder


def start_server(model: str, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "baichuan_tune.cli", "serve", "--model", model, "--port", "0", "--dtype", args.dtype,
           "--log-level", "warning", "--max-batch", str(args.clients), "--max-queue", str(max(64, args.requests)),
           *(["--device", "cpu"] if args.smoke else []), *args.serve_args.split()]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("BAICHUAN_TUNE_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"(http://\S+?)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def make_requests(count: int, prompt_tokens: str, new_tokens: str, vocab: int, seed: int = 0) -> list[dict]:
    """`count` completions: random token-id prompts ("min,max" tokens, ids from 1,000 or half a small
    vocabulary up to `vocab`) and random max_tokens ("min,max"); the same ones for the same arguments."""
    rng = random.Random(seed)
    (p_lo, p_hi), (n_lo, n_hi) = map(int, prompt_tokens.split(",")), map(int, new_tokens.split(","))
    return [{"prompt": [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(rng.randint(p_lo, p_hi))],
             "max_tokens": rng.randint(n_lo, n_hi)} for _ in range(count)]


def sse_data(response):
    """The `data:` lines of a server-sent event stream. Events end at a blank line and lines at CR/LF only, as
    the SSE spec says: httpx's iter_lines would also split at U+2028 and the like, which random tokens decode to."""
    buffer = ""
    for text in response.iter_text():
        buffer += text.replace("\r\n", "\n")
        *events, buffer = buffer.split("\n\n")
        for event in events:
            yield from (line for line in event.split("\n") if line.startswith("data: "))


def send(client, url: str, model: str, request: dict) -> dict:
    """One streamed greedy completion: its text, completion tokens, latency and time to first chunk."""
    body = {"model": model, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **request}
    start, first, text, tokens = time.perf_counter(), None, "", 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in sse_data(response):
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter() - start
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text += choice["text"]
    return {"text": text, "tokens": tokens, "latency": time.perf_counter() - start, "ttft": first}


def agreeing_prefix(alone: list[dict], together: list[dict]) -> float:
    """The mean share of each answer alone that its concurrent answer repeats before the first differing
    character: 1.0 when all agree; near 0 when they part at once (a prompt-stage fault, not a late near-tie)."""
    shares = []
    for a, b in zip(alone, together):
        same = next((k for k, (x, y) in enumerate(zip(a["text"], b["text"])) if x != y), min(len(a["text"]), len(b["text"])))
        shares.append(same / max(len(a["text"]), 1))
    return round(sum(shares) / max(len(shares), 1), 3)


def phase(url: str, model: str, requests: list[dict], clients: int) -> tuple[list[dict], float]:
    """Every request answered by `clients` clients, each sending its next one when its last one ended."""
    import httpx

    todo, lock, answers = list(enumerate(requests)), threading.Lock(), [None] * len(requests)

    def client_loop(_):
        with httpx.Client() as client:
            while True:
                with lock:
                    if not todo:
                        return
                    i, request = todo.pop(0)
                answers[i] = send(client, url, model, request)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    return answers, time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(name: str, answers: list[dict], wall: float) -> dict:
    tokens = sum(a["tokens"] for a in answers)
    out = {"phase": name, "requests": len(answers), "completion_tokens": tokens, "wall_s": round(wall, 2),
           "tokens_per_s": round(tokens / wall, 1)}
    for key in ("latency", "ttft"):
        values = [a[key] for a in answers]
        out[f"{key}_p50_s"], out[f"{key}_p95_s"] = round(quantile(values, 0.5), 3), round(quantile(values, 0.95), 3)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_serve_"))
    if args.smoke:
        model, vocab = "default", 4000
    else:
        model, vocab = str(write_checkpoint(Path(args.shared) / "reference", workdir / "baichuan2-7b-random")), 125000
    proc, url = start_server(model, args)
    try:
        name = json.loads(__import__("urllib.request").request.urlopen(url + "/v1/models").read())["data"][0]["id"]
        requests = make_requests(args.requests, args.prompt_tokens, args.new_tokens, vocab)
        longest = max(requests, key=lambda r: len(r["prompt"]) + r["max_tokens"])
        phase(url, name, [longest, requests[0]], 1)  # warm-up: compiles and captures the steps' graphs
        alone, wall_1 = phase(url, name, requests, 1)
        one = summary("1 client", alone, wall_1)
        together, wall_n = phase(url, name, requests, args.clients)
        many = summary(f"{args.clients} clients", together, wall_n)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a["text"] != b["text"]]
    result = {"clients": args.clients, "ratio": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
              "target_ratio": 10 if args.clients >= 32 else None, "greedy_equal": not differ,
              "differing_requests": differ, "agreeing_prefix": agreeing_prefix(alone, together),
              "one_client": one, "many_clients": many}
    print("RESULT " + json.dumps(result), flush=True)
    if differ:
        raise SystemExit(f"{len(differ)} concurrent answers differ from the same request alone: {differ[:10]}")
    return result


if __name__ == "__main__":
    main()
