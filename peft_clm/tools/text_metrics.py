"""Transparent, automatic metrics of the preference dimensions (training never sees them).

- `word_count`: words in an answer (the concise dimension: lower is more concise).
- `casualness`: casual markers minus formal markers per 100 words (the formal dimension: lower is more formal).
  Markers are the fixed word lists `CASUAL_WORDS` and `FORMAL_WORDS`, contractions, '!' and emoji.
"""

from __future__ import annotations

import re


CASUAL_WORDS = {
    "hey", "hi", "yeah", "yep", "nope", "gonna", "wanna", "gotta", "kinda", "sorta", "awesome", "cool", "super",
    "totally", "lol", "omg", "dude", "buddy", "stuff", "pretty", "basically", "literally", "y'know", "ya", "wow",
    "okay", "ok", "cuz", "tbh", "btw", "folks", "guys", "crazy", "huge", "fun", "amazing",
}
FORMAL_WORDS = {
    "therefore", "furthermore", "moreover", "consequently", "however", "thus", "hence", "additionally",
    "significant", "significantly", "essential", "approximately", "respectively", "regarding", "whereas",
    "primarily", "substantial", "facilitate", "subsequently", "notably", "individuals", "utilize", "comprises",
}
_WORD = re.compile(r"[A-Za-z']+")
_CONTRACTION = re.compile(r"\b\w+'(s|re|ve|ll|d|t|m)\b", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def word_count(text: str) -> float:
    """Number of words."""
    return float(len(words(text)))


def casualness(text: str) -> float:
    """(casual words + contractions + '!' + emoji - formal words) per 100 words."""
    tokens = [w.lower() for w in words(text)]
    if not tokens:
        return 0.0
    casual = sum(t in CASUAL_WORDS for t in tokens) + len(_CONTRACTION.findall(text)) + text.count("!")
    casual += sum(1 for ch in text if ord(ch) >= 0x1F300)
    formal = sum(t in FORMAL_WORDS for t in tokens)
    return 100.0 * (casual - formal) / len(tokens)


METRICS = {"words": word_count, "casualness": casualness}
DIMENSION_METRIC = {"concise": "words", "formal": "casualness"}
