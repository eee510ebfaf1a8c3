"""Chat with a model in the terminal; the reply is printed token by token as it is generated.

    baichuan-tune chat --model DIR [--adapter DIR] [--quantization_bit 4|8] [--system TEXT] [--temperature 0.3] [--max-new-tokens 512]

Type a message and press Enter. /clear forgets the conversation, /exit or /quit (or Ctrl-D) leaves,
Ctrl-C stops a reply that is being written. Prompts are in the template the model was trained in
(recorded beside it; `--template` overrides), else the authors' chat format, with their history budget;
typed text that spells a control token (`<reserved_106>`) stays text unless --allow-control-tokens.
temperature, top_k, top_p, repetition_penalty and max_new_tokens default to the checkpoint's
generation_config.json (temperature 0 = greedy).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..options import LoadOptions
from ..config import ConfigError, opt, parse_config

HELP = "commands: /clear forgets the conversation, /exit or /quit leaves (Ctrl-D too), /help shows this"


@dataclass
class ChatConfig(LoadOptions):
    system: str | None = opt(None, "system message put before the conversation (Baichuan2 models only)")
    temperature: float | None = opt(None, "sampling temperature; 0 = greedy (default: the checkpoint's, 0.3)")
    top_k: int | None = opt(None, "sample among the k likeliest tokens (default: the checkpoint's, 5)")
    top_p: float | None = opt(None, "nucleus sampling mass (default: the checkpoint's, 0.85)")
    repetition_penalty: float | None = opt(None, "penalty for repeated tokens (default: the checkpoint's)")
    max_new_tokens: int | None = opt(None, "longest reply in tokens (default: the checkpoint's, at most half the context)")


class ChatSession:
    """A conversation: `ask(text, write)` streams the reply through `write` and keeps both in the history."""

    def __init__(self, model, tokenizer, config, system: str | None = None, allow_control_tokens: bool = False):
        from ..serve.generation import prompt_format, validate_messages

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.allow_control_tokens = allow_control_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        validate_messages(self.system + [{"role": "user", "content": ""}], prompt_format(model))
        self.history: list[dict] = []

    def clear(self) -> None:
        self.history = []

    def ask(self, text: str, write) -> str:
        from ..serve.generation import chat_prompt_ids, generate_text

        messages = self.system + self.history + [{"role": "user", "content": text}]
        prompt = chat_prompt_ids(self.model, self.tokenizer, messages, self.config,
                                 allow_control_tokens=self.allow_control_tokens)
        reply = generate_text(self.model, self.tokenizer, prompt, self.config, on_text=write).text
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply


NOT_UTF8 = "(that line is not valid UTF-8 text, so it was not sent; please type it again)"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # bytes Python could not decode come back as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(session: ChatSession, read=input, write=_write) -> None:
    """The read-reply loop until /exit, /quit or end of input."""
    write(HELP + "\n")
    while True:
        try:
            text = read("\nUser: ").strip()
        except EOFError:
            write("\n")
            return
        except UnicodeDecodeError:  # a strict stdin refused the bytes
            text = None
        if text is None or not _is_utf8(text):  # one badly encoded line must not end the conversation
            write(NOT_UTF8 + "\n")
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            session.clear()
            write("(history cleared)\n")
        elif text == "/help":
            write(HELP + "\n")
        elif text:
            write("Baichuan: ")
            try:
                session.ask(text, write)
            except KeyboardInterrupt:  # the unanswered question is not kept
                write(" (stopped)")
            write("\n")


def main(argv: list[str]) -> int:
    cfg = parse_config(ChatConfig, argv, prog="baichuan-tune chat")
    from ..extras import check_extras

    check_extras("chat", cfg)
    from ..serve.generation import ChatFormatError, chat_generation_config, context_length, input_budget, prompt_format

    model, tokenizer = cfg.load()
    try:
        config = chat_generation_config(model, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                        repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens)
        input_budget(context_length(model), config.max_new_tokens, prompt_format(model))
        session = ChatSession(model, tokenizer, config, cfg.system, cfg.allow_control_tokens)
    except ChatFormatError as exc:
        raise ConfigError(str(exc)) from None
    print(f"(chat format: {prompt_format(model)})", flush=True)
    run(session)
    return 0
