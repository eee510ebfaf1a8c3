"""What `serve` and `webui` share: the server's options (`ServeConfig`) and starting it (`run_server`):
check the extras, bind the port, load the model and its adapters, build the app (and the UI), run uvicorn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ..config import ConfigError, opt
from ..options import LoadOptions


@dataclass
class ServeConfig(LoadOptions):
    host: str = opt("127.0.0.1", "address to listen on; 0.0.0.0 exposes the API to the network (set --api-key)")
    port: int = opt(8000, "TCP port (0 picks a free one)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 (default: $BAICHUAN_TUNE_API_KEY)")
    model_name: str | None = opt(None, "the model id clients send and /v1/models lists (default: the folder's name)")
    adapter: list[str] = opt(factory=list, help="LoRA adapter: PATH (applied to the model, as chat does) or "
                                                "NAME=PATH, repeatable (each served as model NAME beside the base)")
    max_batch: int = opt(8, "requests decoded together (continuous batching); 0: one request at a time")
    # Each row of the batch holds a KV cache of --slot-tokens tokens: 2 x layers x hidden x 2 bytes a token
    # in bf16 (0.5 MiB for the 7B models, 0.8 MiB for 13B), so 8 rows x 4,096 tokens of 7B take 16 GiB.
    slot_tokens: int | None = opt(None, "longest request (prompt + max_tokens) the batch takes (default: the "
                                        "context length); longer ones run one at a time")
    # SDPA over a window sized by the longest row rounds a row differently as others come and go (in bf16
    # enough to flip near-tied greedy tokens); blocks of 256 keys make each row's result its own.
    batch_invariant: bool = opt(False, "batch: attention in blocks of 256 keys (experimental: invariant to the "
                                       "window on a CPU and tiny models; not at the published shapes in bf16)")
    max_queue: int = opt(64, "requests that may wait for a place in the batch; more are answered 429")
    # 4 MiB holds a full 4,096-token context many times over in any JSON escaping (a conversation over the
    # context is trimmed, so a long history is legal), or 128 full-context prompts as token-id lists for an
    # evaluation batch; beyond it a body is answered 413 before it is read.
    max_body_bytes: int = opt(4 * 1024 * 1024, "largest request body in bytes; larger ones are answered 413")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = opt(
        "info", "uvicorn log level (checked here: uvicorn would fail on a bad one only after the model loaded)")
    ui: bool = opt(False, "also serve the browser UI at /ui/: chat, and the training runs under --runs")
    runs: str = opt("outputs", "the UI's Runs page shows the training runs in this folder")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_batch < 0:
            raise ConfigError(f"--max-batch must be 0 (one request at a time) or more, got {self.max_batch}")
        if self.slot_tokens is not None and self.slot_tokens < 16:
            raise ConfigError(f"--slot-tokens must be at least 16, got {self.slot_tokens}")
        _, named = split_adapters(self.adapter)
        if named and self.max_batch == 0:
            raise ConfigError("named adapters are served in the batch: --max-batch must be at least 1")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")
        if self.ui and Path(self.runs).exists() and not Path(self.runs).is_dir():
            raise ConfigError(f"--runs {self.runs} is a file; give the folder that holds the training runs")


def split_adapters(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """--adapter values -> (the one adapter applied to the model, {name: folder} of named ones)."""
    plain = [v for v in values if "=" not in v]
    named: dict[str, str] = {}
    for value in values:
        if "=" in value:
            name, _, folder = value.partition("=")
            if not name or not folder or name in named:
                raise ConfigError(f"--adapter {value}: expected NAME=PATH with a new name for each adapter")
            named[name] = folder
    if len(plain) > 1 or (plain and named):
        raise ConfigError("--adapter: one unnamed adapter (PATH) applied to the model, or named ones (NAME=PATH) "
                          "served beside it, not both and not several unnamed")
    return (plain[0] if plain else None), named


def run_server(cfg: ServeConfig, command: str) -> int:
    """Load the model and serve it (with the UI when `cfg.ui`) until Ctrl-C; `command` names the extra to install."""
    from ..extras import check_extras

    check_extras(command, cfg)  # fastapi, uvicorn (and bitsandbytes for --quantization_bit) before anything loads
    api_key = cfg.api_key or os.environ.get("BAICHUAN_TUNE_API_KEY") or None
    from ..models.checkpoint import resolve_model_path

    try:  # before loading the model: a missing extra should cost nothing
        import uvicorn

        from .server import bind_socket, create_app, uvicorn_config

        if cfg.ui:
            from .webui import mount_ui
    except ModuleNotFoundError as exc:
        extra = "webui" if cfg.ui else "serve"
        raise ConfigError(f"{command} needs {exc.name}: pip install 'baichuan-tune[{extra}]'") from None

    path = resolve_model_path(cfg.model)
    name = cfg.model_name or ("default" if cfg.model == "default" else Path(path).name)
    try:
        sock = bind_socket(cfg.host, cfg.port)  # before loading: a taken port fails fast
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})") from None
    plain, named = split_adapters(cfg.adapter)
    if name in named:
        raise ConfigError(f"--adapter {name}=...: '{name}' is the base model's name already (see --model-name)")
    model, tokenizer = LoadOptions.load(replace(cfg, adapter=plain), path)
    app = create_app(model, tokenizer, name, api_key=api_key, max_queue=cfg.max_queue,
                     max_body_bytes=cfg.max_body_bytes, allow_control_tokens=cfg.allow_control_tokens,
                     max_batch=cfg.max_batch, slot_tokens=cfg.slot_tokens, adapters=named,
                     batch_invariant=cfg.batch_invariant)
    if cfg.ui:
        mount_ui(app, model, Path(cfg.runs), api_key=api_key)
    from .generation import prompt_format

    host, port = sock.getsockname()[:2]
    address = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    auth = "API key required" if api_key else "no API key"
    names = ", ".join(f"'{n}'" for n in [name, *named])
    print(f"serving {names} at {address}/v1 ({auth}; chat format {prompt_format(model)}); Ctrl-C to stop",
          flush=True)
    if cfg.ui:
        print(f"web UI at {address}/ui/ (runs from {cfg.runs}"
              + ("; enter the API key in the page)" if api_key else ")"), flush=True)
    uvicorn.Server(uvicorn_config(app, cfg.log_level)).run(sockets=[sock])
    return 0
