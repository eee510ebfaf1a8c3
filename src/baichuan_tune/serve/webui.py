"""The browser UI: a static page (Chat and Runs) served by the API's own FastAPI app, and the JSON it reads.

`mount_ui(app, model, runs_dir, api_key)` adds to an app made by `server.create_app`:

    GET /ui/                    the page (assets/webui/index.html, app.js, style.css: plain HTML and JavaScript)
    GET /ui/api/info            the served checkpoint's chat format and sampling defaults
    GET /ui/api/runs            the training runs under `runs_dir`
    GET /ui/api/runs/{name}     one run: config, log records (from `?since=N`), results, evaluations, checkpoints

The Chat page talks to the server's own /v1/chat/completions (streamed), so it answers exactly as the API
does. Every /ui/api request needs the API key when one is set, as /v1 does; the page itself holds no key
(the user types it and the browser tab keeps it). A run's name is the path of a folder found under
`runs_dir`; any other name is answered 404, so no path a client sends is ever opened. Nothing is fetched
from outside the server: the page loads no script, font or style from anywhere else.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import yaml
from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from .generation import chat_format, chat_generation_config, context_length
from .server import APIError, _authorize
from ..train.training import RUN_MARKERS

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "webui"
RUN_DEPTH = 3  # runs_dir/a/b/c at most: outputs/sft-demo, outputs/exp1/sft, ...
LIVE_S = 300  # a run without results whose log changed this recently is shown as in progress
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The page may load only what this server sends it: no script, style or font from anywhere else.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def mount_ui(app, model, runs_dir: Path | None, api_key: str | None = None) -> None:
    """Serve the UI from `app`: the page at /ui/ and its JSON under /ui/api (see the module doc)."""
    runs_root = Path(runs_dir) if runs_dir is not None else None
    info = ui_info(model, runs_root)
    logs = LogCache()

    def authorized(request: Request) -> None:
        _authorize(SimpleNamespace(api_key=api_key), request)  # the /v1 check itself: both answer alike

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def to_ui():
        return RedirectResponse("/ui/")

    @app.api_route("/ui/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(ASSETS / "index.html", headers={"Content-Security-Policy": CSP,
                                                            "Cache-Control": "no-cache"})

    app.mount("/ui/assets", StaticFiles(directory=ASSETS), name="ui-assets")

    @app.get("/ui/api/info")
    async def api_info(request: Request):
        authorized(request)
        return info

    # Plain functions, which FastAPI runs in its thread pool: reading files must not hold up streamed answers.
    @app.get("/ui/api/runs")
    def api_runs(request: Request):
        authorized(request)
        runs = find_runs(runs_root) if runs_root is not None else {}
        summaries = []
        for name, folder in runs.items():
            try:
                summaries.append(run_summary(name, folder, logs.records(folder)))
            except OSError:  # deleted while we read it (--overwrite_output_dir): gone from the list
                continue
        summaries.sort(key=lambda s: s["updated"], reverse=True)
        return {"root": str(runs_root) if runs_root else None, "exists": bool(runs_root and runs_root.is_dir()),
                "runs": summaries}

    @app.get("/ui/api/runs/{name:path}")
    def api_run(request: Request, name: str, since: int = 0, log: str = ""):
        authorized(request)
        folder = find_runs(runs_root).get(name) if runs_root is not None else None
        if folder is None:
            raise APIError(404, f"no run '{name}' under {runs_root}", param="name", code="run_not_found")
        return run_detail(name, folder, logs, since, log)


def ui_info(model, runs_root: Path | None) -> dict:
    """What the Chat page needs before the first message: the chat format and the checkpoint's defaults."""
    config = chat_generation_config(model)
    sampled = config if config.do_sample else chat_generation_config(model, do_sample=True)
    fmt = chat_format(model.config)
    return {
        "format": fmt,
        "system_prompt": fmt == "baichuan2",  # Baichuan-7B/13B chat has no system role
        "context": context_length(model),
        "defaults": {"temperature": sampled.temperature if config.do_sample else 0.0, "top_p": sampled.top_p,
                     "top_k": sampled.top_k, "repetition_penalty": config.repetition_penalty,
                     "max_tokens": config.max_new_tokens},
        "runs": str(runs_root) if runs_root is not None else None,
    }


# ----------------------------------------------------------------------------- finding runs


def find_runs(root: Path) -> dict[str, Path]:
    """{name: folder} of the training runs under `root`: folders holding a trainer_log.jsonl or a
    train_results.json, at most RUN_DEPTH deep. A run's own subfolders are not searched, and a link that
    leads out of `root` is not followed."""
    runs: dict[str, Path] = {}
    if not root.is_dir():
        return runs
    real_root = root.resolve()
    pending = [(root, 1)]
    while pending:
        folder, depth = pending.pop()
        for child in _subfolders(folder):
            if not child.resolve().is_relative_to(real_root):
                continue
            if any((child / marker).is_file() for marker in RUN_MARKERS):
                runs[child.relative_to(root).as_posix()] = child
            elif depth < RUN_DEPTH:
                pending.append((child, depth + 1))
    return runs


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:  # unreadable, or removed while we looked
        return []


# ----------------------------------------------------------------------------- reading a run


class LogCache:
    """Parsed trainer_log.jsonl records, re-read only when the file changed (the page polls every few seconds)."""

    def __init__(self):
        self._cache: dict[Path, tuple[tuple, list[dict]]] = {}

    def records(self, folder: Path) -> list[dict]:
        return self.read(folder)[1]

    def read(self, folder: Path) -> tuple[str, list[dict]]:
        """(an id of this log file, its records): a run started afresh or resumed rewrites the file anew."""
        path = folder / "trainer_log.jsonl"
        try:
            stat = path.stat()
        except OSError:
            return "", []
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            cached = (key, read_records(path))
            self._cache[path] = cached
        return f"{stat.st_dev}-{stat.st_ino}", cached[1]


def read_records(path: Path) -> list[dict]:
    """The complete JSON lines of a log being written: a last line without its newline is still being
    written and is left for the next read; a line that is not a JSON object is skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.split("\n")[:-1]:  # the part after the last newline is unfinished
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_config(folder: Path) -> tuple[str | None, dict]:
    try:
        text = (folder / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return None, {}
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        values = None
    return text, values if isinstance(values, dict) else {}


def run_kind(config: dict, records: list[dict]) -> str:
    """sft, rm, dpo or ppo, from the options only that command has (rm has none: it logs accuracy)."""
    if "ppo_epochs" in config:
        return "ppo"
    if "loss_type" in config:
        return "dpo"
    if "demo_prompts" in config:
        return "sft"
    return "rm" if any("accuracy" in r for r in records) else ""


def run_status(folder: Path, now: float | None = None) -> str:
    """finished (results written after the last log line), in progress (logging lately) or stopped."""
    now = time.time() if now is None else now
    log, results = folder / "trainer_log.jsonl", folder / "train_results.json"
    log_time = log.stat().st_mtime if log.is_file() else 0.0
    if results.is_file() and results.stat().st_mtime >= log_time:
        return "finished"
    return "in progress" if now - log_time < LIVE_S else "stopped"


def run_summary(name: str, folder: Path, records: list[dict]) -> dict:
    _, config = _read_config(folder)
    training = [r for r in records if not any(k.startswith("eval_") for k in r)]
    last = training[-1] if training else {}
    times = [p.stat().st_mtime for p in (folder / "trainer_log.jsonl", folder / "train_results.json") if p.is_file()]
    return {
        "name": name, "kind": run_kind(config, records), "status": run_status(folder),
        "step": max((r.get("step", 0) for r in records if isinstance(r.get("step"), int)), default=0),
        "max_steps": config.get("max_steps"), "finetuning_type": config.get("finetuning_type"),
        "model": config.get("model"), "updated": max(times, default=folder.stat().st_mtime),
        "last": {k: v for k, v in last.items() if k in ("loss", "reward", "kl", "accuracy")},
    }


def run_detail(name: str, folder: Path, logs: LogCache, since: int, log_id: str) -> dict:
    """Everything the Runs page shows of one run; log records from index `since` on unless the log was
    rewritten (another `log_id`) or shortened, when all are sent again with `reset`."""
    current_id, records = logs.read(folder)
    reset = log_id != current_id or since < 0 or since > len(records)
    text, config = _read_config(folder)
    return {
        **run_summary(name, folder, records), "path": str(folder),
        "log_id": current_id, "reset": reset, "total": len(records), "records": records if reset else records[since:],
        "config_text": text, "config": config, "results": _json_file(folder / "train_results.json"),
        "evaluations": evaluations(folder), "checkpoints": checkpoints(folder), "outputs": outputs(folder, config),
    }


def checkpoints(folder: Path) -> list[dict]:
    """The complete checkpoint-N folders (a save in progress is a hidden folder until it is complete)."""
    found = []
    for path in _subfolders(folder):
        step = path.name.removeprefix("checkpoint-")
        if not path.name.startswith("checkpoint-") or not step.isdigit():
            continue
        state = _json_file(path / "trainer_state.json") or {}
        found.append({"name": path.name, "step": int(step), "bytes": _size(path), "saved": path.stat().st_mtime,
                      "epoch": state.get("epoch"), "tokens": state.get("tokens")})
    return sorted(found, key=lambda c: c["step"])


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def outputs(folder: Path, config: dict) -> dict:
    """The final adapter or weights in the run folder, and how to chat with them."""
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(folder.iterdir())
             if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in ("adapter_config.json", "config.json"))]
    if (folder / "adapter_config.json").is_file():
        base = config.get("model") or "BASE_MODEL"
        command = f"baichuan-tune chat --model {base} --adapter {folder}"
    elif (folder / "config.json").is_file():
        command = f"baichuan-tune chat --model {folder}"
    else:
        command = None
    return {"files": files, "chat_command": command}


def evaluations(folder: Path) -> list[dict]:
    """Summaries of the `baichuan-tune eval` results.json files inside the run folder (two levels down)."""
    found = []
    for path in sorted([*folder.glob("*/results.json"), *folder.glob("*/*/results.json")]):
        data = _json_file(path)
        if not isinstance(data, dict) or path.parent.name.startswith("checkpoint-"):
            continue
        overall = data.get("overall") if isinstance(data.get("overall"), dict) else {}
        categories = data.get("categories") if isinstance(data.get("categories"), dict) else {}
        found.append({
            "path": path.parent.relative_to(folder).as_posix(),
            "task": data.get("task", "ppl" if "perplexity" in data else None),
            "split": data.get("split"), "n_shot": data.get("n_shot"), "accuracy": overall.get("accuracy"),
            "questions": overall.get("questions"), "perplexity": data.get("perplexity"), "tokens": data.get("tokens"),
            "categories": {c: g.get("accuracy") for c, g in categories.items() if isinstance(g, dict)},
        })
    return found
