"""Serve a model over an OpenAI-compatible HTTP API (chat/completions, completions, models, health).

    baichuan-tune serve --model DIR [--adapter DIR] [--quantization_bit 4|8] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    baichuan-tune serve --model DIR --adapter NAME=DIR [--adapter NAME2=DIR2 ...]   # each adapter its own model name
    baichuan-tune serve --model DIR --ui [--runs outputs]      # the browser UI at /ui/ too (see `webui`)

Binds to 127.0.0.1 unless --host says otherwise; with --api-key (or $BAICHUAN_TUNE_API_KEY) every /v1
request needs `Authorization: Bearer KEY` (and so does the UI's data). Up to --max-batch requests decode
together (continuous batching; requests with log-probabilities, penalties, logit_bias, n, best_of or a
seed run one at a time beside the batch); up to --max-queue more wait and further ones are answered 429;
a body over --max-body-bytes is answered 413. Named adapters are served beside the base, in the same
batch, each with the chat template recorded in its folder. Chat prompts are in the template the model was trained in (recorded beside it; --template
overrides); message text that spells a control token (`<reserved_106>`) is encoded as text unless
--allow-control-tokens. Stop with Ctrl-C.
"""

from __future__ import annotations

from ..config import parse_config
from ..serve.launch import ServeConfig, run_server


def main(argv: list[str]) -> int:
    return run_server(parse_config(ServeConfig, argv, prog="baichuan-tune serve"), "serve")
