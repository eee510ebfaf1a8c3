"""Scalar heads on a Baichuan backbone: the reward model of `rm` and the critic of `ppo`.

A reward model is a causal LM (plain, or a PEFT adapter on a base) plus a linear head read at the last
non-padding token. On disk it is the adapter (or full weights in the published layout) with two extra
files: `value_head.safetensors` (the head) and `reward_model.json` (what to load it on), written last so
a folder holding it is complete. PPO reads the same folder either as a second adapter on the policy's
base (LoRA: one copy of the base weights for policy, critic, reward and reference) or as a separate model.

transformers has sequence-classification heads, but they read the last token found by comparing ids with
pad_token_id, which breaks when pad = unk = 0 appears inside Baichuan text; TRL's value-head wrapper pulls
in its trainers. The head here is one linear layer read at positions taken from the attention mask.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io_utils import atomic_dir, atomic_write_json, clear_write_errors
from ..train.losses import last_token_index

HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"


class ValueHead(nn.Module):
    """hidden states [..., H] -> one fp32 scalar per position [...].

    Initialised N(0, 1/(H+1)) with zero bias, as the reward heads of Stiennon et al. 2020, so the
    initial scores have unit scale whatever the hidden size.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Small differences between scores matter (they are the loss), so the head always runs in fp32.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.float()).squeeze(-1)


def causal_lm(model):
    """The BaichuanForCausalLM inside `model` (itself, or the one a PEFT wrapper holds)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, T, H] of the decoder (adapters included), without the LM head."""
    return causal_lm(model).model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class RewardModel(nn.Module):
    """r(x, y): the head applied to the hidden state of the last non-padding token. [B, T] -> [B]."""

    def __init__(self, lm, head: ValueHead):
        super().__init__()
        self.lm, self.head = lm, head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states(self.lm, input_ids, attention_mask)  # [B, T, H]
        last = last_token_index(attention_mask)  # [B]
        picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]  # [B, H]
        return self.head(picked)


class PolicyWithValue(nn.Module):
    """PPO's actor and critic on one backbone: LM logits and a value for each response position."""

    def __init__(self, lm, head: ValueHead):
        super().__init__()
        self.lm, self.v_head = lm, head

    def forward(self, input_ids, attention_mask, response_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences [B, P+R] (response last) -> (logits [B, R, V] scoring each response token, values [B, R]).

        Position t's hidden state predicts token t+1, so the R states before each response token are used.
        """
        hidden = hidden_states(self.lm, input_ids, attention_mask)  # [B, P+R, H]
        states = hidden[:, -response_len - 1 : -1]  # [B, R, H]
        return causal_lm(self.lm).lm_head(states), self.v_head(states)


@contextmanager
def adapter_active(model, name: str):
    """Run a block with PEFT adapter `name` active, then restore the previous adapter and every
    parameter's requires_grad (PEFT's set_adapter makes the activated adapter trainable)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for n, p in model.named_parameters():
            if p.requires_grad != flags[n]:
                p.requires_grad_(flags[n])


# ----------------------------------------------------------------------------- saving and loading


def save_reward_model(rm: RewardModel, tokenizer, out: Path, meta: dict, dtype: str | None = None,
                      state_dict: dict | None = None) -> None:
    """Write the adapter (or full weights, in `dtype`), the head and `reward_model.json` (last) into `out`.
    `state_dict`: rm's whole state dict to save from instead of its own (a sharded run's, gathered)."""
    from safetensors.torch import save_file

    from ..train.training import save_final

    out = Path(out)
    lm_state = head_state = None
    if state_dict is not None:
        lm_state = {k.removeprefix("lm."): v for k, v in state_dict.items() if k.startswith("lm.")}
        head_state = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
    save_final(rm.lm, tokenizer, out, "lora" if meta["adapter"] else "full", dtype, meta.get("template"),
               state_dict=None if state_dict is None else lm_state)
    with clear_write_errors(out / HEAD_FILE, "the value head"):
        with atomic_dir(out / ".head") as tmp:
            head = rm.head.state_dict() if head_state is None else head_state
            state = {k: v.detach().float().cpu().contiguous() for k, v in head.items()}
            save_file(state, str(tmp / HEAD_FILE))
        os.replace(out / ".head" / HEAD_FILE, out / HEAD_FILE)
        (out / ".head").rmdir()
        atomic_write_json(out / META_FILE, {**meta, "hidden_size": int(rm.head.summary.in_features)})


def read_reward_meta(path: Path) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a reward model folder (no {META_FILE}); train one with `baichuan-tune rm`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    for key in ("adapter", "base_model", "hidden_size"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: field '{key}' is missing")
    return meta


def load_head(path: Path, hidden_size: int) -> ValueHead:
    from .checkpoint import load_safetensors_file

    file = Path(path) / HEAD_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: value head file is missing")
    head = ValueHead(hidden_size)
    state = load_safetensors_file(file)  # a truncated file: CheckpointError naming it
    if set(state) != set(head.state_dict()) or state["summary.weight"].shape != head.summary.weight.shape:
        raise CheckpointError(f"{file}: expected a head for hidden size {hidden_size}, found "
                              f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    head.load_state_dict(state)
    return head


def load_reward_model(path: str | Path, *, dtype: str = "auto", device: str = "cpu", quantize: int | None = None,
                      base_model: str | None = None):
    """(RewardModel in eval mode, tokenizer) from a folder written by `save_reward_model`.

    An adapter reward model is loaded on `base_model` (default: the base recorded at training time).
    """
    from .checkpoint import load_model, load_tokenizer, resolve_model_path

    path = Path(path)
    meta = read_reward_meta(path)
    if meta["adapter"]:
        base = resolve_model_path(base_model or meta["base_model"])
        lm = load_model(base, dtype=dtype, device=device, quantize=quantize, adapter=str(path))
    else:
        lm = load_model(path, dtype=dtype, device=device, quantize=quantize)
    head = load_head(path, meta["hidden_size"]).to(device)
    rm = RewardModel(lm, head).eval()
    rm.requires_grad_(False)
    return rm, load_tokenizer(path)


class RewardScorer:
    """Scores (prompt turns, answer) with a reward model in the chat format it was trained on."""

    def __init__(self, rm, tokenizer, template: str, cutoff_len: int, batch_size: int = 8):
        from ..data.templates import get_template

        self.rm, self.tokenizer, self.template = rm, tokenizer, get_template(template)
        self.cutoff_len, self.batch_size = cutoff_len, batch_size

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str]) -> list[float]:
        from ..data.collate import collate_padded

        device = next(self.rm.head.parameters()).device
        rows = []
        for turns, response in zip(prompts, responses):
            prompt_ids, answer, _, _ = self.template.encode_pair(self.tokenizer, turns, response, response,
                                                                 cutoff_len=self.cutoff_len)
            rows.append({"input_ids": prompt_ids + answer})
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = collate_padded(rows[start : start + self.batch_size])
            scores += self.rm(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return scores
