"""Prompts for the online methods (`ppo`, `grpo`): any sft, preference or labelled file with its answers
dropped, or {"prompt": ...} records; encoded in the chat template and split into train and held-out."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import DataError


def load_prompts(files: list[str], tokenizer, template_name: str, max_prompt_length: int, max_samples: int,
                 val_size: float, seed: int, out: Path) -> tuple[list, list, str]:
    """(train, held-out) prompts as (token ids, text of the last user turn, all turns), split with `seed`, and
    the data line (counted as sft, rm and dpo count theirs). No files: the built-in demo prompts, written
    into `out` so that the run records what it trained on."""
    from .loading import data_report
    from .templates import get_template

    files = list(files) or [str(_demo_prompt_file(out))]
    template = get_template(template_name)
    prompts, read, truncated = [], {}, 0
    for path in files:
        for turns in prompt_turns(path, max_samples, template.input_join):
            ids = template.encode_prompt(tokenizer, turns)
            truncated += len(ids) > max_prompt_length
            prompts.append((ids[-max_prompt_length:], turns[-1][1], turns))
            read[path] = read.get(path, 0) + 1
    count = int(val_size) if val_size >= 1 else round(val_size * len(prompts))
    if count >= len(prompts):
        raise DataError(f"val_size {val_size} leaves no training prompts (of {len(prompts)})")
    held = set(random.Random(seed).sample(range(len(prompts)), count))
    train, held_out = [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]
    return train, held_out, data_report(read, len(train), len(held_out), "prompts", truncated=truncated)


def _demo_prompt_file(out: Path) -> Path:
    from ..io_utils import atomic_write_text
    from .builtin_pref import demo_prompts

    path = Path(out) / "demo_prompts.jsonl"
    atomic_write_text(path, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in demo_prompts()))
    return path


def prompt_turns(path: str, max_samples: int, input_join: str = "\n") -> list:
    """Prompt turn lists of one file: {prompt} records directly, others through the data module's readers."""
    from . import sources

    first = next(iter(sources.iter_json_records(path)), None)
    if first is None:
        raise DataError(f"{path}: no records")
    obj = first[1]
    if isinstance(obj, dict) and "prompt" in obj and "chosen" not in obj:
        return plain_prompts(path, max_samples)
    if isinstance(obj, dict) and "chosen" in obj:
        pairs = sources.load_dataset([path], kind="pair", max_samples=max_samples, input_join=input_join).train
        return [r.prompt for r in pairs]
    records = sources.load_dataset([path], kind="prompt", max_samples=max_samples, input_join=input_join).train
    turns = [r.turns[:-1] for r in records if r.turns[-1][0] == "assistant"]
    if not turns:
        raise DataError(f"{path}: no prompts found (plain-text records have no prompt to answer)")
    return turns


def plain_prompts(path: str, max_samples: int) -> list:
    """The turn lists of a file of {"prompt": text} records."""
    from . import sources

    prompts = []
    for where, obj, line_error in sources.iter_json_records(path):
        if line_error:
            raise DataError(line_error)
        text = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}, field 'prompt': expected a non-empty string, got {type(text).__name__}")
        prompts.append([("user", text)])
        if max_samples and len(prompts) >= max_samples:
            break
    return prompts
