"""Local tokenizers and small data files for the data tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = "alice bob carol has gives apples books one two three four five more now at the market hello there friend"


def make_tokenizer(path: Path, chat_template: str | None = CHAT_TEMPLATE, vocab_size: int = 120) -> Path:
    """A small BPE tokenizer (vocabulary <= 256, so the tiny models take it), saved like a model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator([WORDS] * 20 + ["0 1 2 3 4 5 6 7 8 9 . , ? !"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chats(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"alice has {i % 5} apples"},
                {"role": "assistant", "content": "bob gives " + "one " * (i % 3) + "more"},
                {"role": "user", "content": "now ?"},
                {"role": "assistant", "content": f"alice has {i % 5 + 1} apples"},
            ]
        }
        for i in range(n)
    ]


def texts(n: int) -> list[dict]:
    return [{"text": f"alice has {i % 7} books. bob gives " + "more " * (i % 11) + "now."} for i in range(n)]


def prompt_completions(n: int) -> list[dict]:
    return [{"prompt": f"carol has {i % 4} apples.", "completion": f" now she has {i % 4 + 1}."} for i in range(n)]
