"""The Baichuan tokenizer for current transformers: the published `tokenizer.model` files of both generations.

The tokenizer class the authors publish as remote code fails on transformers >= 4.34 (it reads `sp_model`
before creating it). This class does what it did: each stretch of text between special tokens is encoded by
the SentencePiece model as it is (Baichuan-7B/13B: nmt_nfkc with a leading "▁"; Baichuan2: identity, split
digits), byte fallback included, so ids equal the published ones. It builds on transformers'
`SentencePieceBackend` (no conversion to a `tokenizers` fast tokenizer, whose pre-tokenizer would change ids).

`import baichuan_tune` registers it, so `AutoTokenizer.from_pretrained(folder)` loads a published folder
without `trust_remote_code` (Baichuan-7B's tokenizer_config.json names the class `BaiChuanTokenizer`; that
name is registered too).
"""

from __future__ import annotations

import json
import re
import weakref
from pathlib import Path

from transformers import AddedToken
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from ..errors import CheckpointError
from ..io_utils import atomic_write_json

VOCAB_FILE = "tokenizer.model"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_sentencepiece_file(vocab_file, folder=None) -> Path:
    """Return the path of a loadable SentencePiece model, or raise CheckpointError naming the file."""
    if not vocab_file:
        where = Path(folder) / VOCAB_FILE if folder else Path(VOCAB_FILE)
        raise CheckpointError(f"{where}: missing (the SentencePiece tokenizer model of this checkpoint)")
    path = Path(vocab_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the SentencePiece tokenizer model of this checkpoint)")
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:  # sentencepiece reports a bad file as RuntimeError("INTERNAL: ...")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a valid SentencePiece tokenizer model ({reason})") from None
    return path


def _plain_special(token):
    """The same special token with `single_word` off.

    The published configs of Baichuan-13B and Baichuan2 mark special tokens `single_word`; the transformers
    releases the authors used ignored that flag in slow tokenizers, so "...</s>" in text became id 2. Current
    transformers honours it and would spell out "</s>" as characters; turning it off keeps the published ids.
    """
    if isinstance(token, AddedToken) and token.single_word:
        return AddedToken(token.content, single_word=False, lstrip=token.lstrip, rstrip=token.rstrip,
                          normalized=token.normalized, special=True)
    return token


class BaichuanTokenizer(SentencePieceBackend):
    """SentencePiece BPE tokenizer of Baichuan-7B/13B and Baichuan2 (bos/eos/pad ids 1/2/0, pad = `<unk>`)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                 add_bos_token=False, add_eos_token=False, sp_model_kwargs=None,
                 clean_up_tokenization_spaces=False, **kwargs):
        check_sentencepiece_file(vocab_file, kwargs.get("name_or_path"))
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        kwargs.pop("legacy", None)  # "legacy" False would make the base class drop Baichuan-1's leading "▁"
        specials = dict(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
        super().__init__(
            vocab_file=str(vocab_file), sp_model_kwargs=sp_model_kwargs or {},
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **{k: _plain_special(v) for k, v in specials.items()}, **kwargs,
        )

    # --- encoding ---------------------------------------------------------------------------------------

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.get_piece_size())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- decoding ---------------------------------------------------------------------------------------

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """Decode runs of ordinary ids with SentencePiece (which joins byte-fallback pieces back into UTF-8 and
        undoes the "▁" escaping); special and added tokens are written as their text, or dropped if asked."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        parts, run = [], []
        for index in ids:
            if index in skip:
                continue
            if index in self._added_tokens_decoder:
                parts.append(self.sp_model.decode(run))
                parts.append(self._added_tokens_decoder[index].content)
                run = []
            else:
                run.append(index)
        parts.append(self.sp_model.decode(run))
        text = "".join(parts)
        if clean_up_tokenization_spaces if clean_up_tokenization_spaces is not None else self.clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        parts, run = [], []
        for token in tokens:
            if token in self._added_tokens_encoder:
                parts += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        parts.append(self.sp_model.decode_pieces(run))
        return "".join(parts)

    # --- saving -----------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False, **kwargs):
        """transformers' save plus the fields of the published files it leaves out (add_bos_token,
        add_eos_token, auto_map, special_tokens_map.json), so the folder loads here and with the authors' code."""
        files = super().save_pretrained(save_directory, legacy_format=legacy_format,
                                        filename_prefix=filename_prefix, push_to_hub=push_to_hub, **kwargs)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        config_path = Path(save_directory) / f"{prefix}tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("backend", "is_local", "local_files_only", "files_loaded"):  # this machine's load state
            config.pop(key, None)
        special_map = {name: self._token_state(name) for name in SPECIAL_TOKEN_NAMES if getattr(self, name, None)}
        config.update({name: {"__type": "AddedToken", **state} for name, state in special_map.items()})
        config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        config.setdefault("auto_map", {"AutoTokenizer": [f"tokenization_baichuan.{type(self).__name__}", None]})
        atomic_write_json(config_path, dict(sorted(config.items())))
        map_path = Path(save_directory) / f"{prefix}special_tokens_map.json"
        atomic_write_json(map_path, special_map)
        return tuple(files) + (str(map_path),)

    def _token_state(self, name: str) -> dict:
        token = self._special_tokens_map[name]
        if not isinstance(token, AddedToken):
            token = AddedToken(str(token), normalized=True, special=True)
        state = token.__getstate__()
        state.pop("special", None)
        return state


# --- text that must not become control tokens ----------------------------------------------------------------

RESERVED_PIECE = re.compile(r"<reserved_\d+>")
_CONTROL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_token_ids(tokenizer) -> frozenset[int]:
    """Ids that user text must never produce: the special tokens (bos, eos, unk = pad) and every
    `<reserved_N>` piece (Baichuan's chat roles 195/196 are two of them). Computed once per tokenizer."""
    cached = _CONTROL_IDS.get(tokenizer)
    if cached is not None:
        return cached
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    sp = getattr(tokenizer, "sp_model", None)
    if sp is not None:  # the reserved pieces are SentencePiece user-defined symbols, matched inside any text
        pieces = sp.id_to_piece(list(range(sp.get_piece_size())))
        ids.update(i for i, piece in enumerate(pieces) if RESERVED_PIECE.fullmatch(piece))
    _CONTROL_IDS[tokenizer] = cached = frozenset(ids)
    return cached


class EscapingTokenizer:
    """A tokenizer whose `encode` gives the literal text of a control token (`<reserved_106>`, `</s>`, ...)
    as ordinary pieces, so text from a user can never forge a role, bos, eos or pad token.

    Special tokens are not parsed (`split_special_tokens`); a reserved piece, which SentencePiece itself
    matches (after NFKC for Baichuan-1, so `＜reserved_102＞` too), is spelled out one character at a time
    (UTF-8 byte pieces where a character has none). The ids decode back to the text. `extra_ids` adds ids
    to refuse (a generation config's role ids). Everything else is the wrapped tokenizer's.
    """

    def __init__(self, tokenizer, extra_ids=()):
        self.tokenizer = tokenizer
        self.refused = control_token_ids(tokenizer) | {int(i) for i in extra_ids if i is not None}

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
        if self.refused.isdisjoint(ids):
            return ids
        out: list[int] = []
        for token_id in ids:
            out += self._spelled(token_id) if token_id in self.refused else [token_id]
        return out

    def _spelled(self, token_id: int) -> list[int]:
        ids = []
        for char in self.tokenizer.convert_ids_to_tokens(token_id):
            piece = self.tokenizer.convert_tokens_to_ids(char)
            if piece is None or piece in self.refused:
                piece = [self.tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode("utf-8")]
            ids += piece if isinstance(piece, list) else [piece]
        if not self.refused.isdisjoint(ids):  # a vocabulary without byte pieces: nothing safe to spell it with
            raise ValueError(f"cannot encode the text {self.tokenizer.convert_ids_to_tokens(token_id)!r} without "
                             "control tokens in this vocabulary")
        return ids


# --- training -----------------------------------------------------------------------------------------------

# The trainer and normaliser settings of the published Baichuan2 tokenizer.model (its trainer_spec and
# normalizer_spec): BPE; one token per digit; bytes for whatever the pieces miss, so every UTF-8 text encodes;
# text kept as it is (no NFKC, no leading "▁", spaces kept); runs of spaces may be pieces.
BAICHUAN2_TRAINER_SPEC = dict(
    model_type="bpe", character_coverage=0.9998, split_digits=True, byte_fallback=True,
    allow_whitespace_only_pieces=True, max_sentencepiece_length=32,
    normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
)
BYTE_PIECES = 256
FIXED_PIECES = 3  # <unk> <s> </s>


def reserved_token(n: int) -> str:
    return f"<reserved_{n}>"


def train_sentencepiece(lines, vocab_size: int, reserved: int = 200, fill_vocab: bool = False,
                        max_piece_length: int = 32, character_coverage: float = 0.9998) -> bytes:
    """Train a Baichuan2-style SentencePiece BPE model on `lines`; return the serialized tokenizer.model.

    Ids: 0 <unk>, 1 <s>, 2 </s>, then `reserved` user-defined <reserved_N> tokens (so they sit at low ids, as in
    Baichuan2, whose chat roles are ids 195/196), then 256 byte pieces, then the learned pieces. Single-threaded,
    so the same text and settings give the same bytes. If the text supports fewer pieces than `vocab_size`,
    `fill_vocab` appends further unused <reserved_N> pieces to reach it exactly; otherwise that is a DataError.
    """
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ..errors import DataError

    lines = [line for line in lines if line]
    if not lines:
        raise DataError("no training text: every input was empty")
    spec = dict(BAICHUAN2_TRAINER_SPEC, max_sentencepiece_length=max_piece_length,
                character_coverage=character_coverage)
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size,
            user_defined_symbols=[reserved_token(i) for i in range(reserved)],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
            max_sentence_length=1 << 16, minloglevel=2, **spec,
        )
    except RuntimeError as exc:  # sentencepiece reports bad settings for this text as RuntimeError
        raise DataError(_training_error(str(exc), vocab_size)) from None
    model = pb.ModelProto.FromString(out.getvalue())
    missing = vocab_size - len(model.pieces)
    if missing > 0 and not fill_vocab:
        raise DataError(
            f"the training text ({len(lines)} lines) supports only {len(model.pieces)} pieces, fewer than "
            f"vocab_size {vocab_size}: give more text, a smaller vocab_size, or fill_vocab to pad with unused "
            "reserved tokens"
        )
    for n in range(reserved, reserved + max(missing, 0)):
        model.pieces.add(piece=reserved_token(n), score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    return model.SerializeToString()


def _training_error(message: str, vocab_size: int) -> str:
    import re

    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        return (f"vocab_size {vocab_size} is too small for this text: its characters alone need {needed.group(1)} "
                "pieces (with <unk> <s> </s>, reserved and byte pieces); raise vocab_size or lower character_coverage")
    return f"sentencepiece could not train on this text: {message.splitlines()[0] if message else 'unknown error'}"


def compression(tokenizer, lines) -> dict:
    """Tokens per character and characters per token of `tokenizer` over `lines` (no bos/eos counted)."""
    lines = [line for line in lines if line]
    chars = sum(len(line) for line in lines)
    tokens = sum(len(ids) for ids in tokenizer(lines, add_special_tokens=False).input_ids) if lines else 0
    return {"lines": len(lines), "chars": chars, "tokens": tokens,
            "tokens_per_char": tokens / chars if chars else float("nan"),
            "chars_per_token": chars / tokens if tokens else float("nan")}


class BaiChuanTokenizer(BaichuanTokenizer):
    """The same tokenizer under the class name Baichuan-7B's tokenizer_config.json gives (saved as named)."""


def register_tokenizer() -> None:
    """Let `AutoTokenizer` resolve `model_type: baichuan` and both published class names to this module."""
    from transformers import AutoTokenizer

    from . import BaichuanConfig

    # Registering the alias first records its name; the second call makes BaichuanTokenizer the default.
    AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaiChuanTokenizer, exist_ok=True)
    AutoTokenizer.register(BaichuanConfig, tokenizer_class=BaichuanTokenizer, exist_ok=True)


__all__ = ["BaiChuanTokenizer", "BaichuanTokenizer", "EscapingTokenizer", "check_sentencepiece_file", "compression",
           "control_token_ids", "register_tokenizer", "train_sentencepiece"]

register_tokenizer()  # importing this module makes AutoTokenizer resolve the Baichuan classes
