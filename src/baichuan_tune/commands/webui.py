"""Open a browser UI: chat with a model and watch the training runs under a folder.

    baichuan-tune webui --model DIR [--adapter DIR] [--quantization_bit 4|8] [--runs outputs] [--port 7860] [--api-key KEY]

Then open http://127.0.0.1:7860/ui/ . Chat streams answers from the model (system prompt, sampling
controls, regenerate, clear); Runs shows each run's config, live curves, evaluation results and
checkpoints. It is `serve --ui` on port 7860: the same OpenAI-compatible API is served at /v1 beside it,
with the same --host and --api-key rules (127.0.0.1 unless --host says otherwise). On a remote GPU
machine, forward the port: `ssh -L 7860:127.0.0.1:7860 user@gpu-host`. Stop with Ctrl-C.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import opt, parse_config
from ..serve.launch import ServeConfig, run_server


@dataclass
class WebUIConfig(ServeConfig):
    port: int = opt(7860, "TCP port (0 picks a free one)")
    ui: bool = opt(True, "serve the browser UI at /ui/ (false: the API alone, as `serve`)")


def main(argv: list[str]) -> int:
    return run_server(parse_config(WebUIConfig, argv, prog="baichuan-tune webui"), "webui")
