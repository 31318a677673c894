"""A tokenizer and datasets for the built-in tiny models (vocabulary 256), made locally: no download.

The tokenizer is byte-level: ids 0-247 are the bytes that occur in UTF-8
text (0xF8-0xFF never do), and the free ids 248-255 hold special tokens. Its
chat template renders ``<|user|>`` / ``<|assistant|>`` turns and marks the
assistant's text as generation (what TRL's assistant-only loss reads). The
examples and tests use these with ``tiny-*`` models; real runs use the
model directory's own tokenizer.
"""

from __future__ import annotations

import random
from typing import Any

SPECIAL = {"<|pad|>": 248, "<|bos|>": 249, "<|user|>": 250, "<|assistant|>": 251, "<|eos|>": 255}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|eos|>"
    "{% endgeneration %}"
    "{% else %}<|user|>{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def demo_tokenizer():
    """A ``PreTrainedTokenizerFast`` over bytes with chat template, pad and eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(248)}
    assert set(vocab) <= set(alphabet)
    vocab.update(SPECIAL)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenization emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def arithmetic_chats(num: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt/completion conversations a tiny model can learn: "what is 3 plus 4?" -> "7"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
                "completion": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
            }
        )
    return rows


def preference_pairs(num: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt/chosen/rejected triples (the right sum against a wrong one) for DPO."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = (a + b + rng.randint(1, 5)) % 19
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a + b}."}],
                "rejected": [{"role": "assistant", "content": f"{wrong}."}],
            }
        )
    return rows


def packed_rows(tokenizer, seq_len: int = 64, num_chats: int = 512, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pretraining-style rows: the chats rendered with the template, concatenated, cut into ``seq_len``."""
    ids: list[int] = []
    for chat in arithmetic_chats(num_chats, seed):
        ids += tokenizer.apply_chat_template(chat["prompt"] + chat["completion"], tokenize=True, return_dict=False)
    return [
        {"input_ids": ids[i : i + seq_len], "labels": ids[i : i + seq_len]}
        for i in range(0, len(ids) - seq_len + 1, seq_len)
    ]
