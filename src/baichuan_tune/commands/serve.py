"""Serve a model over an OpenAI-compatible HTTP API (chat/completions, completions, models, health).

    baichuan-tune serve --model DIR [--adapter DIR] [--quantize 4|8] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Binds to 127.0.0.1 unless --host says otherwise; with --api-key (or $BAICHUAN_TUNE_API_KEY) every /v1
request needs `Authorization: Bearer KEY`. One request generates at a time; up to --max-queue more wait
and further ones are answered 429. Stop with Ctrl-C.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..options import LoadOptions
from ..config import ConfigError, opt, parse_config


@dataclass
class ServeConfig(LoadOptions):
    host: str = opt("127.0.0.1", "address to listen on; 0.0.0.0 exposes the API to the network (set --api-key)")
    port: int = opt(8000, "TCP port (0 picks a free one)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1 (default: $BAICHUAN_TUNE_API_KEY)")
    model_name: str | None = opt(None, "the model id clients send and /v1/models lists (default: the folder's name)")
    max_queue: int = opt(64, "requests that may wait behind the one being generated; more are answered 429")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = opt(
        "info", "uvicorn log level (checked here: uvicorn would fail on a bad one only after the model loaded)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")


def main(argv: list[str]) -> int:
    cfg = parse_config(ServeConfig, argv, prog="baichuan-tune serve")
    api_key = cfg.api_key or os.environ.get("BAICHUAN_TUNE_API_KEY") or None
    from ..checkpoint import resolve_model_path

    try:  # before loading the model: a missing extra should cost nothing
        import uvicorn

        from ..server import bind_socket, create_app
    except ModuleNotFoundError as exc:
        raise ConfigError(f"serve needs {exc.name}: pip install 'baichuan-tune[serve]'") from None

    path = resolve_model_path(cfg.model)
    name = cfg.model_name or ("default" if cfg.model == "default" else Path(path).name)
    try:
        sock = bind_socket(cfg.host, cfg.port)  # before loading: a taken port fails fast
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})") from None
    model, tokenizer = cfg.load(path)
    app = create_app(model, tokenizer, name, api_key=api_key, max_queue=cfg.max_queue)
    host, port = sock.getsockname()[:2]
    auth = "API key required" if api_key else "no API key"
    print(f"serving '{name}' at http://{host}:{port}/v1 ({auth}); Ctrl-C to stop", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level)).run(sockets=[sock])
    return 0
