"""The built-in corpus: generated, not downloaded.

Short English sentences about people counting things, with simple arithmetic
that a tiny model can learn, so the loss of the default job visibly falls.
It is one document (a stream of stories), which makes its rows the
fixed-length windows the default job has always trained on.
"""

from __future__ import annotations

import random

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
_THINGS = ["apples", "books", "coins", "shells", "stones", "cards", "pens", "cups"]
_PLACES = ["the market", "the library", "the park", "the harbor", "the school", "the garden"]


def builtin_corpus(num_stories: int = 4000, seed: int = 0) -> str:
    """Deterministic synthetic stories (about 600 KB for the default size)."""
    rng = random.Random(seed)
    stories = []
    for _ in range(num_stories):
        a, b = rng.sample(_NAMES, 2)
        thing, place = rng.choice(_THINGS), rng.choice(_PLACES)
        n, m = rng.randint(2, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            story = f"{a} has {n} {thing}. {b} gives {a} {m} more {thing} at {place}. now {a} has {n + m} {thing}.\n"
        else:
            total = n + m
            story = f"{a} has {total} {thing}. {a} gives {m} {thing} to {b} at {place}. now {a} has {n} {thing}.\n"
        stories.append(story)
    return "".join(stories)
