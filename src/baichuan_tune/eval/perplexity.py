"""Perplexity: each document is tokenized on its own and cut into windows of `max_length` tokens; every token
after the first of its window is predicted, and ppl = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..serve.generation import context_length, model_device

# ----------------------------------------------------------------------------- perplexity


def read_texts(path, text_field: str = "text") -> list[str]:
    """Documents of a .txt file (the whole file is one document) or a .jsonl/.json file (one per record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix not in (".jsonl", ".json"):
        return [text] if text.strip() else []
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: record {number}: not valid JSON ({exc.msg})") from None
    return [_record_text(rec, number, path, text_field) for number, rec in enumerate(records, start=1)]


def _record_text(record, number: int, path: Path, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{path}: record {number}: no field '{text_field}' (choose it with --text-field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{path}: record {number}: field '{text_field}' is {type(value).__name__}, expected text")
    return value


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 4,
               progress: bool = True) -> dict:
    """exp(mean NLL) over every predicted token of `texts` (windows of `max_length` tokens); a progress bar
    runs over the batches of windows."""
    from tqdm.auto import tqdm

    max_length = max_length or context_length(model)
    windows = []
    for text in texts:
        ids = tokenizer.encode(text, verbose=False)  # long documents are cut into windows below
        windows += [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise DataError("no document has two or more tokens to score")
    device = model_device(model)
    windows.sort(key=len, reverse=True)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start: start + batch_size]
        width = len(batch[0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):  # right padding: the pads sit after every real token
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, w in enumerate(batch):
            n = len(w)
            target = ids[row, 1:n].to(logits.device)
            total_nll += F.cross_entropy(logits[row, : n - 1].float(), target, reduction="sum").item()
            total_tokens += n - 1
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": total_tokens, "documents": len(texts),
            "windows": len(windows), "max_length": max_length}
