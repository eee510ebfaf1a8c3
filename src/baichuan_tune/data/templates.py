"""Chat templates: how a conversation becomes `input_ids` and `labels` for training.

A conversation is a list of turns `(role, text)`: an optional `("system", ...)` first, then alternating
`("user", ...)` / `("assistant", ...)`. A pre-training record is the single turn `("text", ...)`.

Labels sit under the token they are (the authors' convention): the loss compares `logits[:, :-1]` with
`labels[:, 1:]`, so a label at position t is what the model should predict after reading tokens < t.
`labels[0]` is always -100: nothing predicts the first token of a sample, which also keeps packed
samples from being targets of the sample before them.

Layouts (`[x]` is a special id, `enc(s)` the tokenizer's ids for s, `-` the ignore index -100):

- `baichuan2` (the authors' `fine-tune/fine-tune.py`, with the system text of their chat prompt first):
      ids     enc(system)  [195] enc(user)  [196] enc(answer)  [195] enc(user2) [196] enc(answer2) [eos]
      labels  -...-        -     -...-      -     enc(answer)  eos   -...-      -     enc(answer2) eos
  The eos label under each later user token (195) teaches the model to end the previous answer with eos;
  no eos token sits between rounds. The authors' script also writes eos as the label of the very first
  token; that label never enters the loss (see above), so it is -100 here.
- `baichuan` (Baichuan-13B-Chat): the same ids 195/196 and layout, without a system role.
- `human_assistant`: each round is `[bos] enc("Human: {user}\\n\\nAssistant: ") enc(answer) [eos]`, the
  prompt masked, answer and eos labelled; a system text goes first as `enc("{system}\\n\\n")` after bos.
  An alpaca record's user text is instruction + input joined with nothing, as the baichuan_sft_lora recipe
  (the other templates join them with a newline, as LLaMA-Factory does).
- `base`: a text record is `[bos] enc(text) [eos]` with every token after the first labelled; a chat
  record is `[bos] enc(system) enc(user) enc(answer) [eos]` per round (no markers; answer labelled).
  Under every template a text record uses this plain-text layout.

Truncation: `cutoff_len` cuts the finished sample's tail (as the authors' script does). The per-part
flags `max_source_length`/`max_target_length` cut each round's prompt and answer separately and keep
whole rounds while the sample fits `max_source_length + max_target_length`; prompt truncation shortens
the texts, never the role tokens/markers, so every kept answer still follows its assistant marker.

Inference builds its prompts with the same templates: a model trained by this project carries its
template's record (`template.json`, see `template_record`), and chat, serve and `model.chat` prompt it
with `encode_prompt` of that template (the role-token templates through the authors' chat rule in
`generation.py`, which gives the same ids, as the tests prove).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import CheckpointError, DataError

IGNORE_INDEX = -100
USER_TOKEN_ID = 195  # generation_config.json user_token_id of the Chat models
ASSISTANT_TOKEN_ID = 196  # generation_config.json assistant_token_id
HUMAN_PREFIX = "Human: "
ASSISTANT_PREFIX = "\n\nAssistant: "
SYSTEM_SUFFIX = "\n\n"
TRAIN_ON = ("all", "last")

Turn = tuple[str, str]


class TokenizerLike(Protocol):
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...


class TemplateError(DataError):
    """A conversation that a template cannot encode; `field` names the turn, the data layer adds the file."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


@dataclass
class Part:
    """A run of prompt tokens; the last `protect` tokens (role tokens, markers) are never truncated."""

    ids: list[int]
    labels: list[int]
    protect: int = 0


@dataclass
class Round:
    """One user -> assistant exchange: prompt parts, then the answer tokens the model learns."""

    source: list[Part]
    target: list[int]
    target_labels: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.target_labels:
            self.target_labels = list(self.target)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_targets(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def _enc(tokenizer: TokenizerLike, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _fixed(ids: list[int], labels: list[int] | None = None) -> Part:
    return Part(list(ids), labels if labels is not None else [IGNORE_INDEX] * len(ids), protect=len(ids))


def _text(ids: list[int], protect: int = 0) -> Part:
    return Part(ids, [IGNORE_INDEX] * len(ids), protect)


def as_turns(turns) -> list[Turn]:
    """Turns from `(role, text)` pairs or OpenAI-style `{"role": ..., "content": ...}` messages."""
    return [(t["role"], t["content"]) if isinstance(t, dict) else (t[0], t[1]) for t in turns]


def split_turns(turns: list[Turn], *, allow_system: bool = True, need_answer: bool = True):
    """(system, [(user, answer), ...]) from a turn list; the last answer is None when `need_answer` is False.

    Raises TemplateError naming the turn that breaks `[system] user assistant user assistant ...`.
    """
    turns = list(turns)
    system = ""
    if turns and turns[0][0] == "system":
        if not allow_system:
            raise TemplateError("system", "this template has no system role")
        system = turns.pop(0)[1]
        offset = 1
    else:
        offset = 0
    for i, (role, _) in enumerate(turns):
        expected = "a user" if i % 2 == 0 else "an assistant"
        if role != expected.split()[1]:
            raise TemplateError(f"turns[{i + offset}]", f"expected {expected} turn, got '{role}' (turns must alternate)")
    if not turns:
        raise TemplateError("turns", "no user turn")
    if need_answer and len(turns) % 2:
        raise TemplateError(f"turns[{len(turns) - 1 + offset}]", "the conversation must end with an assistant answer")
    if not need_answer and len(turns) % 2 == 0:
        raise TemplateError(f"turns[{len(turns) - 1 + offset}]", "a prompt must end with a user turn")
    users = [t[1] for t in turns[0::2]]
    answers = [t[1] for t in turns[1::2]] + ([] if need_answer else [None])
    return system, list(zip(users, answers))


def _cut_parts(parts: list[Part], budget: int) -> tuple[list[Part], bool]:
    """Shorten the longest texts first until `parts` fit `budget`; protected tails (markers) stay whole."""
    parts = [Part(list(p.ids), list(p.labels), p.protect) for p in parts]
    excess = sum(len(p.ids) for p in parts) - budget
    cut = excess > 0
    while excess > 0:
        part = max(parts, key=lambda p: len(p.ids) - p.protect)
        room = len(part.ids) - part.protect
        if room <= 0:
            break  # only role tokens and markers are left: keep them, the total check drops later rounds
        n = min(excess, room)
        del part.ids[room - n : room], part.labels[room - n : room]
        excess -= n
    return parts, cut


def _shorten(rnd: Round, tail: Part, max_source: int, max_target: int) -> tuple[Round, bool]:
    """A copy of `rnd` with `tail` after its answer, its prompt cut to max_source and answer to max_target."""
    source, cut = _cut_parts(rnd.source, max_source) if max_source else (rnd.source, False)
    ids, labels = rnd.target + tail.ids, rnd.target_labels + tail.labels
    if max_target and len(ids) > max_target:
        ids, labels, cut = ids[:max_target], labels[:max_target], True
    return Round(source, ids, labels), cut


def _length(rnd: Round) -> int:
    return sum(len(p.ids) for p in rnd.source) + len(rnd.target)


def _fit_rounds(rounds: list[Round], tail: Part, max_source: int, max_target: int) -> tuple[list[Round], bool]:
    """Per-part truncation; whole rounds are kept while the sample fits max_source + max_target.

    The first round is always kept. The tail (the final eos) follows whichever round ends up last.
    """
    limit = max_source + max_target if max_source and max_target else 0
    no_tail = Part([], [])
    kept, used = [], 0
    for rnd in rounds:
        if kept and limit and used + _length(_shorten(rnd, tail, max_source, max_target)[0]) > limit:
            break
        kept.append(rnd)
        used += _length(_shorten(rnd, no_tail, max_source, max_target)[0])
    shortened = [_shorten(r, no_tail, max_source, max_target) for r in kept[:-1]]
    shortened.append(_shorten(kept[-1], tail, max_source, max_target))
    truncated = len(kept) < len(rounds) or any(cut for _, cut in shortened)
    return [r for r, _ in shortened], truncated


def _join(rounds: list[Round], train_on: str) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    final = len(rounds) - 1
    for i, rnd in enumerate(rounds):
        for part in rnd.source:
            ids += part.ids
            labels += part.labels if train_on == "all" else [IGNORE_INDEX] * len(part.ids)
        ids += rnd.target
        labels += rnd.target_labels if train_on == "all" or i == final else [IGNORE_INDEX] * len(rnd.target)
    return ids, labels


def _positive_min(*values: int) -> int:
    values = [v for v in values if v and v > 0]
    return min(values) if values else 0


class Template:
    """Turns conversations into training ids/labels; subclasses say how one round looks."""

    name = ""
    allow_system = True
    input_join = "\n"  # between an alpaca record's instruction and input (LLaMA-Factory's join)
    # The layout in words, as template.json records it (see `record`); the subclasses' `rounds` follow it.
    user_token_id: int | None = None  # id before each user turn
    assistant_token_id: int | None = None  # id before each answer
    user_prefix = ""  # text before each user turn
    assistant_prefix = ""  # text after each user turn, right before the answer
    system_suffix = ""  # text after the system message
    bos_each_round = False  # every round starts with bos
    eos_after_each_answer = False  # every answer ends with eos (else only the last answer of a sample)

    def record(self) -> dict:
        """The template's name and layout: what `template.json` holds, so other tools can read the format too."""
        return {"name": self.name, "user_token_id": self.user_token_id, "assistant_token_id": self.assistant_token_id,
                "user_prefix": self.user_prefix, "assistant_prefix": self.assistant_prefix,
                "system_role": self.allow_system, "system_suffix": self.system_suffix,
                "bos_each_round": self.bos_each_round, "eos_after_each_answer": self.eos_after_each_answer,
                "input_join": self.input_join}

    def rounds(self, system: str, pairs, tokenizer: TokenizerLike, exact_markers: bool) -> tuple[list[Round], Part]:
        """The rounds of a conversation and the tail after the last answer (a prompt's last answer is None)."""
        raise NotImplementedError

    def _text(self, text: str, tokenizer: TokenizerLike) -> tuple[list[Round], Part]:
        eos = tokenizer.eos_token_id
        return [Round([_fixed([tokenizer.bos_token_id])], _enc(tokenizer, text))], Part([eos], [eos])

    def encode(self, tokenizer: TokenizerLike, turns, *, train_on: str = "all", cutoff_len: int = 0,
               max_source_length: int = 0, max_target_length: int = 0) -> Encoded:
        """(input_ids, labels) of one training sample; `labels[0]` is always IGNORE_INDEX."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        turns = as_turns(turns)
        if len(turns) == 1 and turns[0][0] == "text":
            rounds, tail = self._text(turns[0][1], tokenizer)
            cutoff_len = _positive_min(cutoff_len, (max_source_length or 0) + (max_target_length or 0))
            max_source_length = max_target_length = 0
        else:
            system, pairs = split_turns(turns, allow_system=self.allow_system)
            rounds, tail = self.rounds(system, pairs, tokenizer, exact_markers=bool(max_source_length))
        rounds, truncated = _fit_rounds(rounds, tail, max_source_length, max_target_length)
        ids, labels = _join(rounds, train_on)
        if cutoff_len and len(ids) > cutoff_len:
            ids, labels, truncated = ids[:cutoff_len], labels[:cutoff_len], True
        if labels:
            labels[0] = IGNORE_INDEX
        return Encoded(ids, labels, truncated)

    def encode_prompt(self, tokenizer: TokenizerLike, turns, budget: int = 0) -> list[int]:
        """Ids of a conversation that ends with a user turn, up to where the assistant's answer starts:
        exactly the ids `encode` gives that part of the conversation in training.

        With `budget` (inference), the chat models' history rule: the newest round always stays, older
        rounds are dropped whole until the prompt fits, then it is cut on the left to `budget` tokens.
        """
        system, pairs = split_turns(as_turns(turns), allow_system=self.allow_system, need_answer=False)
        rounds, _ = self.rounds(system, pairs, tokenizer, exact_markers=False)
        ids = _join(rounds, "all")[0]
        if not budget or len(ids) <= budget:
            return ids
        # Rounds are encoded one by one, so the length of the newest k rounds is the sum of theirs plus
        # what the system text adds to the first of them (found on the newest round alone).
        lengths = [_length(r) for r in self.rounds("", pairs, tokenizer, exact_markers=False)[0]]
        system_cost = _length(self.rounds(system, pairs[-1:], tokenizer, False)[0][0]) - lengths[-1]
        keep, used = 1, system_cost + lengths[-1]
        while keep < len(pairs) and used + lengths[-keep - 1] <= budget:
            keep, used = keep + 1, used + lengths[-keep - 1]
        rounds, _ = self.rounds(system, pairs[-keep:], tokenizer, exact_markers=False)
        return _join(rounds, "all")[0][-budget:]

    def encode_pair(self, tokenizer: TokenizerLike, prompt, chosen: str, rejected: str, *,
                    cutoff_len: int = 0, max_source_length: int = 0, max_target_length: int = 0):
        """(prompt_ids, chosen_ids, rejected_ids, truncated) for reward modelling and DPO.

        The answers end with the template's end of answer (eos). Answers are cut to max_target_length and
        the prompt keeps its last max_source_length tokens (the assistant marker stays next to the
        answer). With cutoff_len, answers get max(cutoff_len // 2, cutoff_len - len(prompt)) tokens and
        the prompt keeps its last cutoff_len - len(longer answer) tokens.
        """
        system, pairs = split_turns(as_turns(prompt), allow_system=self.allow_system, need_answer=False)
        rounds, _ = self.rounds(system, pairs, tokenizer, exact_markers=False)
        prompt_ids = _join(rounds, "all")[0]
        # every template ends an answer with eos (baichuan2 in its tail, the others inside the round)
        answers = [_enc(tokenizer, a) + [tokenizer.eos_token_id] for a in (chosen, rejected)]
        before = (len(prompt_ids), len(answers[0]), len(answers[1]))
        if max_target_length:
            answers = [a[:max_target_length] for a in answers]
        if max_source_length:
            prompt_ids = prompt_ids[-max_source_length:]
        if cutoff_len:
            budget = max(cutoff_len // 2, cutoff_len - len(prompt_ids))
            answers = [a[:budget] for a in answers]
            keep = cutoff_len - max(len(a) for a in answers)
            prompt_ids = prompt_ids[-keep:] if keep > 0 else []
        truncated = before != (len(prompt_ids), len(answers[0]), len(answers[1]))
        return prompt_ids, answers[0], answers[1], truncated


class RoleTokenTemplate(Template):
    """Baichuan Chat models: user turns start with 195, assistant turns with 196 (generation_config.json)."""

    name = "baichuan2"
    user_token_id = USER_TOKEN_ID
    assistant_token_id = ASSISTANT_TOKEN_ID

    def rounds(self, system, pairs, tokenizer, exact_markers):
        eos = tokenizer.eos_token_id
        rounds = []
        for i, (user, answer) in enumerate(pairs):
            source = [_text(_enc(tokenizer, system))] if i == 0 and system else []
            # The label under a later user token is eos: the previous answer ends there (authors' script).
            source.append(_fixed([self.user_token_id], [eos if i > 0 else IGNORE_INDEX]))
            source += [_text(_enc(tokenizer, user)), _fixed([self.assistant_token_id])]
            rounds.append(Round(source, _enc(tokenizer, answer) if answer is not None else []))
        return rounds, Part([eos], [eos])


class BaichuanTemplate(RoleTokenTemplate):
    """Baichuan-13B-Chat: role ids 195/196, no system role, and an eos after every assistant answer in the
    input itself: the authors' `_build_chat_input` for this model puts eos after each earlier reply (Baichuan2's
    does not), so training uses the layout the model is prompted with."""

    name = "baichuan"
    allow_system = False
    eos_after_each_answer = True

    def rounds(self, system, pairs, tokenizer, exact_markers):
        eos = tokenizer.eos_token_id
        rounds = []
        for user, answer in pairs:
            source = [_fixed([self.user_token_id]), _text(_enc(tokenizer, user)), _fixed([self.assistant_token_id])]
            rounds.append(Round(source, _enc(tokenizer, answer) + [eos] if answer is not None else []))
        return rounds, Part([], [])


class HumanAssistantTemplate(Template):
    """`Human: ...\\n\\nAssistant: ` rounds for base models, each between bos and eos."""

    name = "human_assistant"
    input_join = ""  # the baichuan_sft_lora recipe's prompt: "Human: " + instruction + input + "\n\nAssistant: "
    user_prefix, assistant_prefix, system_suffix = HUMAN_PREFIX, ASSISTANT_PREFIX, SYSTEM_SUFFIX
    bos_each_round = eos_after_each_answer = True

    def rounds(self, system, pairs, tokenizer, exact_markers):
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        protect = self._marker_length(tokenizer) if exact_markers else 0
        rounds = []
        for i, (user, answer) in enumerate(pairs):
            source = [_fixed([bos])]
            if i == 0 and system:
                source.append(_text(_enc(tokenizer, system + SYSTEM_SUFFIX)))
            source.append(_text(_enc(tokenizer, HUMAN_PREFIX + user + ASSISTANT_PREFIX), protect))
            target = _enc(tokenizer, answer) + [eos] if answer is not None else []
            rounds.append(Round(source, target))
        return rounds, Part([], [])

    @staticmethod
    def _marker_length(tokenizer) -> int:
        """Tokens that "\\n\\nAssistant: " takes at the end of a prompt (it is encoded joined to the text)."""
        return len(_enc(tokenizer, "。" + ASSISTANT_PREFIX)) - len(_enc(tokenizer, "。"))


class BaseTemplate(Template):
    """Plain text; chat records become prompt then answer with no markers, each round bos ... eos."""

    name = "base"
    bos_each_round = eos_after_each_answer = True

    def rounds(self, system, pairs, tokenizer, exact_markers):
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        rounds = []
        for i, (user, answer) in enumerate(pairs):
            source = [_fixed([bos])]
            if i == 0 and system:
                source.append(_text(_enc(tokenizer, system)))
            source.append(_text(_enc(tokenizer, user)))
            target = _enc(tokenizer, answer) + [eos] if answer is not None else []
            rounds.append(Round(source, target))
        return rounds, Part([], [])


TEMPLATES: dict[str, Template] = {
    t.name: t for t in (RoleTokenTemplate(), BaichuanTemplate(), HumanAssistantTemplate(), BaseTemplate())
}


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name is a DataError listing the known ones."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise DataError(f"unknown template '{name}'; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# ----------------------------------------------------------------------------- the record a model carries

# Written beside adapter_config.json / config.json by every command that saves a model (sft, rm, dpo, ppo,
# export): a plain JSON file any tool can read, since a PEFT adapter folder has no generation_config.json
# and transformers' tokenizer chat templates cannot give these ids exactly (they tokenise one rendered
# string, where the templates encode each part alone). A full checkpoint also carries the same record
# as `template` in generation_config.json, so a model loaded with transformers' `from_pretrained` alone
# chats in its format too (`model.chat`).
TEMPLATE_FILE = "template.json"


def template_record(name: str) -> dict:
    """{"name": ..., the layout's fields} of the template called `name`."""
    return get_template(name).record()


def check_template_record(record, where: str) -> str:
    """The template name of a record read from `where` (a file, or a file and field); a record this version
    cannot honour is a CheckpointError naming the field, never a silent fallback to another format."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: expected a JSON object with the template's 'name', got {record!r}")
    name = record.get("name")
    if name not in TEMPLATES:
        raise CheckpointError(f"{where}: field 'name': unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    for key, expected in TEMPLATES[name].record().items():
        if key in record and record[key] != expected:
            raise CheckpointError(f"{where}: field '{key}' is {record[key]!r}, but template '{name}' has {expected!r}; "
                                  f"write the record of template '{name}' again or pass --template")
    return name


def write_template_record(folder, name: str) -> None:
    from ..io_utils import atomic_write_json

    atomic_write_json(Path(folder) / TEMPLATE_FILE, template_record(name))


def read_template_record(folder) -> str | None:
    """The template recorded in `folder`/template.json, or None when the folder has no record."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return check_template_record(record, str(path))


def choose_template(recorded: str | None, requested: str | None, where) -> str | None:
    """`requested` (a --template option) if given, else the recorded one; a warning when they differ."""
    if requested and recorded and requested != recorded:
        from ..errors import warn

        warn(f"{where} records template '{recorded}' (the chat format the model was trained in); using "
             f"--template {requested} as asked")
    return requested or recorded


def _generation_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's base
    return getattr(inner, "generation_config", None)


def set_model_template(model, name: str | None) -> None:
    """Attach template `name` to the model (its generation config, where `model.chat` and a full save find
    it); a role-token template also sets the generation config's user/assistant ids. None: no change."""
    if name is None:
        return
    config = _generation_config(model)
    template = get_template(name)
    config.template = template.record()
    config._from_model_config = False  # transformers drops every extra field of a config it marks so, on load
    if template.user_token_id is not None:
        config.user_token_id, config.assistant_token_id = template.user_token_id, template.assistant_token_id


def model_template(model) -> str | None:
    """The template attached to `model` (by the loader, from its folder's record), or None."""
    record = getattr(_generation_config(model), "template", None)
    return None if record is None else check_template_record(record, "generation_config.json, field 'template'")
