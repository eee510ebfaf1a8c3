"""Training records: one JSON object of each supported form -> a list of turns `(role, text)`.

An optional system turn, then alternating user/assistant turns (see `templates.py`); a pre-training record
is `[("text", ...)]`. Record forms, told apart by their fields:

- alpaca/BELLE: `instruction`, `input` (optional), `output`, optional `system` and `history`
  (a list of `[user, assistant]` pairs before this exchange); the prompt is instruction + "\\n" + input;
- the Baichuan2 fine-tune form: `conversations` = `[{"from": "human"|"gpt"|"system", "value": ...}]`;
- OpenAI-style `messages` = `[{"role": "system"|"user"|"assistant", "content": ...}]`;
- plain text `{"text": ...}`;
- preference pairs: `conversations` (ending with a user turn) or `messages`, or flat `prompt` (or
  `instruction` + `input`, with optional `system`/`history`), plus `chosen` and `rejected`, each a
  string or a `{from|role, value|content}` object.

Instruction data (sft) must carry no preference fields: a pair (`chosen`/`rejected`) or a boolean
`label`/`kto_tag` (KTO-style data: one answer judged good or bad) is refused, since sft would learn every
answer, the rejected and bad ones too. Pair data (rm, dpo) must have both answers; an unpaired labelled
record is named as such. A bad field raises `_Bad`, which the reader turns into a DataError naming the
file and record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PREFERENCE_LABELS = ("label", "kto_tag")  # a boolean: this record's answer is good (true) or bad (false)


FROM_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


Turn = tuple[str, str]


@dataclass(slots=True)
class Example:
    """One training conversation; `where` names its file and record for error messages."""

    turns: list[Turn]
    where: str


@dataclass(slots=True)
class PairExample:
    """One preference record: a prompt (ending with a user turn) and two answers."""

    prompt: list[Turn]
    chosen: str
    rejected: str
    where: str


class _Bad(Exception):
    """A problem in one record; the reader adds the file and record number."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field = field_name
        self.problem = problem


# ----------------------------------------------------------------------------- reading files


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


# ----------------------------------------------------------------------------- one record -> turns


def _string(obj: dict, key: str, *, required: bool = True, nonempty: bool = False, name: str | None = None) -> str:
    name = name or key
    if key not in obj or obj[key] is None:
        if required:
            raise _Bad(name, "missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(name, f"expected a string, got {_type_name(value)}")
    if nonempty and not value.strip():
        raise _Bad(name, "empty")
    return value


def _role_list(items: Any, name: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[tuple[str, str, str]]:
    """`[{role_key: ..., text_key: ...}]` -> [(role, text, field name)]."""
    if not isinstance(items, list):
        raise _Bad(name, f"expected a list of turns, got {_type_name(items)}")
    turns = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise _Bad(where, f"expected an object with '{role_key}' and '{text_key}', got {_type_name(item)}")
        role = _string(item, role_key, name=f"{where}.{role_key}")
        if role not in roles:
            raise _Bad(f"{where}.{role_key}", f"unknown role '{role}' (expected one of {', '.join(roles)})")
        turns.append((roles[role], _string(item, text_key, name=f"{where}.{text_key}"), f"{where}.{text_key}"))
    return turns


def _history(obj: dict) -> list[tuple[str, str, str]]:
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise _Bad("history", f"expected a list of [user, assistant] pairs, got {_type_name(history)}")
    turns = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok:
            raise _Bad(f"history[{i}]", f"expected a [user, assistant] pair of strings, got {json.dumps(pair, ensure_ascii=False)[:80]}")
        turns += [("user", pair[0], f"history[{i}][0]"), ("assistant", pair[1], f"history[{i}][1]")]
    return turns


def _alpaca_prompt(obj: dict, input_join: str = "\n") -> list[tuple[str, str, str]]:
    """system, history and the instruction (+ input_join + input) of an alpaca/BELLE or flat preference record."""
    turns = []
    system = _string(obj, "system", required=False)
    if system:
        turns.append(("system", system, "system"))
    turns += _history(obj)
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", required=False)
    prompt = f"{instruction}{input_join}{extra}" if extra else instruction
    if not prompt.strip():
        raise _Bad("instruction", "empty prompt (instruction and input are both empty)")
    return turns + [("user", prompt, "instruction")]


def _check_alternation(turns: list[tuple[str, str, str]], end: str) -> None:
    """[system] user assistant user ... ending with `end`; answers must not be empty."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if any(role == "system" for role, _, _ in body):
        name = next(n for role, _, n in body if role == "system")
        raise _Bad(name, "a system turn may only come first")
    for i, (role, text, name) in enumerate(body):
        expected = "a user" if i % 2 == 0 else "an assistant"
        if role != expected.split()[1]:
            raise _Bad(name, f"expected {expected} turn here, got {role} (turns must alternate user/assistant)")
        if role == "assistant" and not text.strip():
            raise _Bad(name, "empty answer")
    if not body:
        raise _Bad("record", "no user turn")
    if body[-1][0] != end:
        raise _Bad(body[-1][2], f"the conversation must end with {'an assistant answer' if end == 'assistant' else 'a user turn'}")


def _listed_turns(obj: dict) -> list[tuple[str, str, str]] | None:
    """The turns of a Baichuan2 `conversations` or OpenAI `messages` record; None for the other forms."""
    if "conversations" in obj:
        return _role_list(obj["conversations"], "conversations", "from", "value", FROM_ROLES)
    if "messages" in obj:
        return _role_list(obj["messages"], "messages", "role", "content", MESSAGE_ROLES)
    return None


def _refuse_preference_fields(obj: dict) -> None:
    """Instruction data with preference fields: sft learns every answer it is given, whatever the label."""
    for key in ("chosen", "rejected"):
        if key in obj:
            raise _Bad(key, "a preference pair (chosen/rejected answers): sft would learn the rejected answer too; "
                            "train on pairs with `baichuan-tune rm` or `baichuan-tune dpo`")
    for key in PREFERENCE_LABELS:
        if isinstance(obj.get(key), bool):
            raise _Bad(key, "a preference label (true/false) marks KTO-style data, for KTO training ("
                            "`baichuan-tune kto`); sft would learn every answer, the bad ones too. Use rm/dpo with "
                            "paired chosen/rejected data, or drop the field to train on every answer")


def sft_turns(obj: Any, input_join: str = "\n", preference_fields: bool = False) -> list[Turn]:
    """Normalise one instruction/chat/text record to turns; raises _Bad(field, problem).

    `preference_fields`: allow chosen/rejected or a preference label (ppo reads prompts and drops the answers)."""
    if not isinstance(obj, dict):
        raise _Bad("record", f"expected a JSON object, got {_type_name(obj)}")
    if not preference_fields:
        _refuse_preference_fields(obj)
    if (turns := _listed_turns(obj)) is not None:
        pass
    elif "instruction" in obj or "output" in obj:
        turns = _alpaca_prompt(obj, input_join)
        turns.append(("assistant", _string(obj, "output"), "output"))
    elif "text" in obj:
        return [("text", _string(obj, "text", nonempty=True))]
    else:
        raise _Bad("record", f"no known fields in {sorted(obj)[:6]} (expected instruction/output, conversations, messages or text)")
    _check_alternation(turns, end="assistant")
    return [(role, text) for role, text, _ in turns]


def _answer(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, dict):
        role = value.get("from", value.get("role", "assistant"))
        if FROM_ROLES.get(role) != "assistant":
            raise _Bad(f"{key}.from", f"expected an assistant answer, got role '{role}'")
        text_key = "value" if "value" in value else "content"
        return _string(value, text_key, nonempty=True, name=f"{key}.{text_key}")
    return _string(obj, key, nonempty=True)


def _require_a_pair(obj: dict) -> None:
    """A record with neither answer is no pair: say so (not that its conversation ends with an answer)."""
    if "chosen" in obj or "rejected" in obj:
        return
    label = next((key for key in PREFERENCE_LABELS if isinstance(obj.get(key), bool)), None)
    if label is not None:
        raise _Bad(label, "an unpaired preference record (one answer labelled good or bad, KTO-style data for KTO "
                          "training with `baichuan-tune kto`); rm and dpo learn from pairs: give each prompt a "
                          "'chosen' and a 'rejected' answer")
    raise _Bad("chosen", "missing: rm and dpo learn from preference pairs, a prompt with a 'chosen' and a 'rejected' "
                         "answer (instruction data with one answer is for `baichuan-tune sft`)")


def pair_fields(obj: Any, input_join: str = "\n") -> tuple[list[Turn], str, str]:
    """Normalise one preference record to (prompt turns, chosen, rejected); raises _Bad(field, problem)."""
    if not isinstance(obj, dict):
        raise _Bad("record", f"expected a JSON object, got {_type_name(obj)}")
    _require_a_pair(obj)
    if (turns := _listed_turns(obj)) is not None:
        pass
    elif "prompt" in obj:
        turns = [("system", s, "system") for s in [_string(obj, "system", required=False)] if s] + _history(obj)
        turns.append(("user", _string(obj, "prompt", nonempty=True), "prompt"))
    elif "instruction" in obj:
        turns = _alpaca_prompt(obj, input_join)
    else:
        raise _Bad("record", f"no prompt field in {sorted(obj)[:6]} (expected conversations, messages, prompt or instruction)")
    _check_alternation(turns, end="user")
    chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
    return [(role, text) for role, text, _ in turns], chosen, rejected
