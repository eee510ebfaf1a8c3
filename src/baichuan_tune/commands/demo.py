"""Load the built-in default model and generate: a one-minute check that the install works.

    baichuan-tune demo [--model DIR] [--prompt TEXT] [--max_new_tokens N]

With no options it loads the built-in default model (a small Baichuan2-architecture model with seeded
random weights and the project's own tokenizer, written to the user cache on first use), prints its
shape and generates greedily from a few prompts with the KV cache. Random weights give random text (it
says so); `baichuan-tune sft` with no options then fine-tunes this model on the built-in demo data, and
once that demo run exists (outputs/sft-demo) `demo` also shows the trained model's answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..builtin import SFT_DEMO_DIR
from ..config import opt, parse_config


@dataclass
class DemoConfig:
    model: str = opt("default", "model folder, or 'default' for the built-in model")
    prompt: list[str] = opt(factory=lambda: ["What is the capital of France?", "你好"], help="prompts: a,b or a YAML list '[\"Hi, you\", 你好]'")
    max_new_tokens: int = opt(24, "tokens to generate per prompt")
    dtype: str = opt("fp32", "fp32, bf16 or fp16")
    device: str = opt("cpu", "cpu or cuda")


def main(argv: list[str]) -> int:
    cfg = parse_config(DemoConfig, argv, prog="baichuan-tune demo")
    import torch

    from ..models.checkpoint import load_model_and_tokenizer, resolve_model_path

    path = resolve_model_path(cfg.model)
    start = time.time()
    model, tokenizer = load_model_and_tokenizer(path, dtype=cfg.dtype, device=cfg.device)
    c = model.config
    print(f"loaded {path} in {time.time() - start:.1f}s: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.position_embedding}, norm_head={c.norm_head}, vocab {c.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    builtin = cfg.model == "default"
    if builtin:
        print("Its weights are random (seeded, never trained), so what it writes is random tokens, not answers: "
              "this checks that loading and generation work.")
    for prompt in cfg.prompt:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        print(f"> {prompt}\n{tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    if builtin:
        _trained_answers(cfg)
    return 0


def _trained_answers(cfg: DemoConfig) -> None:
    """The same prompts to the built-in model after the sft demo, in the chat format it was trained in."""
    if not (SFT_DEMO_DIR / "config.json").is_file():
        print(f"\n`baichuan-tune sft` (no options, a few CPU minutes) fine-tunes this model on the built-in demo data "
              f"into {SFT_DEMO_DIR}; after that, `baichuan-tune demo` shows the trained model's answers too.")
        return
    import yaml

    from ..models.checkpoint import load_model_and_tokenizer
    from ..serve.generation import greedy_answers  # as the sft demo asks: greedy, in its template's chat format

    config = yaml.safe_load((SFT_DEMO_DIR / "config.yaml").read_text(encoding="utf-8")) \
        if (SFT_DEMO_DIR / "config.yaml").is_file() else {}
    template = (config or {}).get("template", "baichuan2")
    model, tokenizer = load_model_and_tokenizer(SFT_DEMO_DIR, dtype=cfg.dtype, device=cfg.device)
    print(f"\nThe same model after `baichuan-tune sft` (the demo run in {SFT_DEMO_DIR}, asked in the {template} chat "
          "format it was trained in):")
    for prompt, answer in zip(cfg.prompt, greedy_answers(model, tokenizer, template, cfg.prompt, cfg.max_new_tokens)):
        print(f"> {prompt}\n{answer!r}")
