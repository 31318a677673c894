"""Record formats: plain text, chat, prompt-completion; each becomes token ids and a loss mask.

* ``text``: every token is trained on; a document is the tokenizer's leading
  special tokens (BOS where it adds one), the text, and EOS when the tokenizer
  has one.
* ``chat``: ``messages`` (a list of ``{"role", "content"}``) rendered with the
  tokenizer's chat template; only assistant turns are trained on. The span of
  assistant turn i is what the template adds between rendering the first i
  messages with the generation prompt and rendering the first i+1 messages,
  which holds for any template that renders a conversation as a growing
  prefix (templates that rewrite earlier turns are refused).
* ``prompt-completion``: the prompt (with leading special tokens) is context,
  the completion and EOS are trained on.

A mask of 1 marks tokens whose label is kept; everything else gets -100.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoep.data.sources import Piece
from autoep.errors import ConfigError

FORMATS = ("text", "chat", "prompt-completion")


class RecordError(ValueError):
    """A record that cannot be encoded; the builder adds where it is."""


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256, no special tokens): the built-in tiny models' tokenizer."""

    name = "UTF-8 bytes"
    vocab_size = 256
    eos_id: int | None = None
    pad_id = 0
    prefix: tuple[int, ...] = ()
    chat_template = None
    fast = False

    def fingerprint(self) -> str:
        return "bytes"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]


class HFTokenizer:
    """A transformers tokenizer loaded from a local directory."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = path
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except Exception as err:
            raise ConfigError(f"cannot load a tokenizer from {path} ({type(err).__name__})") from None
        self.name = f"{type(self.tok).__name__} from {path}"
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos_id or 0)
        specials = self.tok("", add_special_tokens=True)["input_ids"]
        self.prefix = [t for t in specials if t != self.eos_id]
        self.chat_template = getattr(self.tok, "chat_template", None)
        self.fast = bool(getattr(self.tok, "is_fast", False))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for file in sorted(Path(self.path).iterdir()):
            if file.is_file() and ("token" in file.name or file.suffix in {".model", ".jinja", ".txt"}):
                digest.update(file.name.encode() + file.read_bytes())
        digest.update(str(self.chat_template).encode())
        return digest.hexdigest()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        out = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(out["input_ids"], dtype=np.int64), np.asarray(out["offset_mapping"], dtype=np.int64)


def has_tokenizer(directory: str | None) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    return directory is not None and any((Path(directory) / n).is_file() for n in names)


def load_tokenizer(directory: str | None, vocab_size: int) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of ``directory`` (``--tokenizer`` or the model's), else UTF-8 bytes."""
    if has_tokenizer(directory):
        tokenizer = HFTokenizer(directory)
    else:
        tokenizer = ByteTokenizer()
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocabulary of {vocab_size}"
        )
    return tokenizer


def detect_format(fields: Sequence[str], text_field: str | None) -> str:
    """``chat`` with ``messages``, ``prompt-completion`` with both, ``text`` otherwise."""
    if text_field is None and "messages" in fields:
        return "chat"
    if text_field is None and "prompt" in fields and "completion" in fields:
        return "prompt-completion"
    return "text"


class Encoder:
    """Turns pieces into ``(ids, mask or None, starts_doc)``; ``mask is None`` means every label is kept."""

    masked = False

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer, text_field: str = "text") -> None:
        self.tokenizer = tokenizer
        self.text_field = text_field

    def encode(self, pieces: Sequence[Piece]) -> list[tuple[np.ndarray, np.ndarray | None, bool]]:
        raise NotImplementedError


class TextEncoder(Encoder):
    def _text(self, piece: Piece) -> str:
        value = piece.value
        if isinstance(value, str):
            return value
        text = value.get(self.text_field)
        if self.text_field in value and not isinstance(text, str):
            raise RecordError(f"field {self.text_field!r} is not a string (it is {type(text).__name__})")
        if not isinstance(text, str):
            fields = ", ".join(sorted(value)) or "none"
            raise RecordError(
                f"no string field {self.text_field!r} (fields: {fields}); choose one with --text-field, "
                "or --format chat / prompt-completion"
            )
        return text

    def encode(self, pieces):
        texts = []
        for index, piece in enumerate(pieces):
            try:
                texts.append(self._text(piece))
            except RecordError as err:
                raise RecordError(index, str(err)) from None
        tok = self.tokenizer
        out = []
        for piece, ids in zip(pieces, tok.encode_batch(texts), strict=True):
            parts = [np.asarray(tok.prefix, dtype=np.int64)] if piece.starts_doc and tok.prefix else []
            parts.append(ids)
            if piece.ends_doc and tok.eos_id is not None:
                parts.append(np.asarray([tok.eos_id], dtype=np.int64))
            out.append((np.concatenate(parts) if len(parts) > 1 else ids, None, piece.starts_doc))
        return out


class PromptCompletionEncoder(Encoder):
    masked = True

    def encode(self, pieces):
        tok = self.tokenizer
        prompts, completions = [], []
        for index, piece in enumerate(pieces):
            value = piece.value if isinstance(piece.value, dict) else {}
            prompt, completion = value.get("prompt"), value.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise RecordError(index, "prompt-completion records need string fields 'prompt' and 'completion'")
            prompts.append(prompt)
            completions.append(completion)
        out = []
        eos = [tok.eos_id] if tok.eos_id is not None else []
        for p_ids, c_ids in zip(tok.encode_batch(prompts), tok.encode_batch(completions), strict=True):
            head = np.concatenate([np.asarray(tok.prefix, dtype=np.int64), p_ids])
            tail = np.concatenate([c_ids, np.asarray(eos, dtype=np.int64)])
            if tail.size == 0:
                raise RecordError(len(out), "the completion is empty")
            mask = np.concatenate([np.zeros(head.size, np.uint8), np.ones(tail.size, np.uint8)])
            out.append((np.concatenate([head, tail]), mask, True))
        return out


class ChatEncoder(Encoder):
    masked = True

    def encode(self, pieces):
        return [(*self._one(index, piece.value), True) for index, piece in enumerate(pieces)]

    def _one(self, index: int, value: Any) -> tuple[np.ndarray, np.ndarray]:
        messages = value.get("messages") if isinstance(value, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
        ):
            raise RecordError(index, "chat records need 'messages': a list of {'role': ..., 'content': ...}")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise RecordError(index, "the conversation has no assistant turn (nothing to train on)")
        tok = self.tokenizer
        full = tok.render(messages, generation_prompt=False)
        spans = []
        for i in turns:
            before = tok.render(messages[:i], generation_prompt=True) if i else ""
            upto = tok.render(messages[: i + 1], generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise RecordError(
                    index,
                    "the chat template does not render this conversation as a growing prefix (it rewrites "
                    "earlier turns), so assistant tokens cannot be located",
                )
            spans.append((len(before), len(upto)))
        ids, offsets = tok.encode_with_offsets(full)
        starts = offsets[:, 0] if offsets.size else np.zeros(0, np.int64)
        mask = np.zeros(ids.size, np.uint8)
        for a, b in spans:
            mask |= ((starts >= a) & (starts < b)).astype(np.uint8)
        if not mask.any():
            raise RecordError(index, "the assistant turns render to no tokens")
        return ids, mask


def make_encoder(fmt: str, tokenizer: ByteTokenizer | HFTokenizer, text_field: str | None, data: str) -> Encoder:
    """The encoder for ``fmt``; refuses a chat format whose tokenizer cannot render chats."""
    if fmt == "chat":
        if tokenizer.chat_template is None:
            raise ConfigError(
                f"{data}: chat data needs a tokenizer with a chat template; {tokenizer.name} has none "
                "(pass --tokenizer DIR with one, or --format text)"
            )
        if not tokenizer.fast:
            raise ConfigError(f"{data}: chat data needs a fast tokenizer (offsets); {tokenizer.name} is not one")
        return ChatEncoder(tokenizer)
    if fmt == "prompt-completion":
        return PromptCompletionEncoder(tokenizer)
    if fmt == "text":
        return TextEncoder(tokenizer, text_field or "text")
    raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
