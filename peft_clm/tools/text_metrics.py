"""Transparent, automatic metrics of the preference dimensions (training never sees them, except that the best-of-N
formal pairs pick their chosen side by `casualness`).

- `word_count`: words in an answer (the concise dimension: lower is more concise).
- `casualness`: casual markers minus formal markers per 100 words (the formal dimension: lower is more formal).
  Markers are the fixed word lists `CASUAL_WORDS` and `FORMAL_WORDS`, contractions ('s only where it stands for
  "is", "has" or "us": `S_CONTRACTION_HOSTS`), '!' and emoji.

Every metric in `METRICS` is lower = more aligned (`ALIGNED_DIRECTION`). Fluency, whatever the dimension:
`is_degenerate` (a repeated word 4-gram, or no words), `distinct_n`, and `fluency` over a set of answers.
"""

from __future__ import annotations

import math
import re
from typing import Optional


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
# the words whose 's is "is", "has" or "us" ("it's", "there's", "let's"); after any other word 's is read as a
# possessive ("Earth's crust"), which is no more casual than "the crust of the Earth", so `casualness` does not count
# it ("everyone's" stays ambiguous: "everyone's here" and "everyone's needs" read alike). The
# formal rewrite rules of `scripts/build_preference_data.py` expand the same words' 's, so a change here changes
# their output too.
S_CONTRACTION_HOSTS = ("it", "that", "there", "here", "what", "who", "where", "how", "he", "she", "this", "everything",
                       "something", "nothing", "everyone", "let")
_WORD = re.compile(r"[A-Za-z']+")
_CONTRACTION = re.compile(rf"\b(?:\w+'(?:re|ve|ll|d|t|m)|(?:{'|'.join(S_CONTRACTION_HOSTS)})'s)\b", re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def word_count(text: str) -> float:
    """Number of words."""
    return float(len(words(text)))


def casualness(text: str) -> float:
    """(casual words + contractions + '!' + emoji - formal words) per 100 words; a possessive 's is no contraction.

    Example:
        ```py
        >>> casualness("It's huge!"), casualness("The Earth's crust is approximately 35 km thick.")
        (150.0, -14.285714285714286)
        ```
    """
    tokens = [w.lower() for w in words(text)]
    if not tokens:
        return 0.0
    casual = sum(t in CASUAL_WORDS for t in tokens) + len(_CONTRACTION.findall(text)) + text.count("!")
    casual += sum(1 for ch in text if ord(ch) >= 0x1F300)
    formal = sum(t in FORMAL_WORDS for t in tokens)
    return 100.0 * (casual - formal) / len(tokens)


METRICS = {"words": word_count, "casualness": casualness}
DIMENSION_METRIC = {"concise": "words", "formal": "casualness"}
# the sign of the change from alpha 0 to alpha 1 that an aligned adapter should make: shorter, more formal
ALIGNED_DIRECTION = {"words": -1, "casualness": -1}


# ---------------------------------------------------------------------------------------------------------------
# Fluency: what a user meets when the knob is pushed too far (loops, empty answers), independent of the dimension.

DEGENERATE_NGRAM = 4
DEGENERATE_REPEATS = 3


_WORD_OR_NUMBER = re.compile(r"[A-Za-z']+|\d+(?:[.,]\d+)*")


def _lower_words(text: str, numbers: bool = False) -> list[str]:
    if numbers:  # every number one symbol: "1.1, 1.2, 1.3" is a loop of "#"
        return ["#" if t[0].isdigit() else t.lower() for t in _WORD_OR_NUMBER.findall(text)]
    return [w.lower() for w in words(text)]


def max_ngram_repeats(text: str, n: int = DEGENERATE_NGRAM, numbers: bool = False) -> int:
    """How often the most frequent word n-gram of `text` occurs (overlapping occurrences count; case and
    punctuation ignored); 0 when the text has fewer than n words. With `numbers`, numbers count as words too, each
    read as the same symbol "#".

    Example:
        ```py
        >>> max_ngram_repeats("ensure the windowsill ensure the windowsill ensure the windowsill", 3)
        3
        >>> max_ngram_repeats("2017 Federal Law: 2017-2018 Federal Law: 2017-2018 Federal Law", 4, numbers=True)
        2
        ```
    """
    ws = _lower_words(text, numbers)
    counts: dict[tuple, int] = {}
    for i in range(len(ws) - n + 1):
        key = tuple(ws[i : i + n])
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values(), default=0)


def is_degenerate(
    text: str, n: int = DEGENERATE_NGRAM, repeats: int = DEGENERATE_REPEATS, numbers: bool = False
) -> bool:
    """True for an answer that has stopped being language: a word n-gram (default 4) occurring `repeats` (default
    3) or more times, or no word at all. With `numbers`, numbers are words too, each the same symbol, so that a
    loop in numbers fires ("1.1, 1.2, 1.3, 1.4, 1.5, 1.6", "Law: 2017-2018 Law: 2017-2018 ..."); the sweeps count
    letter words only (their figures were measured so), the domain data's builder both ways.

    Why 4-grams occurring 3+ times: a loop of period p words ("windowsill windowsill ...", "a b a b ...", a
    repeated sentence) repeats every 4-gram inside it, so it fires once the loop has run 4 + 2p words (6 for a
    one-word loop), inside a 48-token answer for any loop of up to ~15 words. Fluent text does not do this: among
    the 960 chosen and rejected answers of the original `data/` (SmolLM2's own answers of up to 62 words) no
    answer has a 4-gram (or a 3-gram) three times, while looser thresholds fire on fluent answers that restate a
    phrase: a 4-gram twice fires on 5 of them, a 2-gram three times on 3 ("the water cycle ... the water
    cycle"). 4 words rather than 3 keeps common phrases ("one of the") from adding up over longer answers. An
    empty answer counts as degenerate too: over-optimised DPO makes the model stop at once, which a user meets as
    a broken answer. Sweeps report the rate at alpha 0 beside every other alpha, so what counts is the rise.

    Example:
        ```py
        >>> is_degenerate("To ensure your basil thrives, ensure windowsill windowsill windowsill windowsill "
        ...               "windowsill windowsill")
        True
        >>> is_degenerate("Basil likes sun, so put it on a windowsill and water it when the soil is dry.")
        False
        ```
    """
    if not words(text):
        return True
    return max_ngram_repeats(text, n, numbers) >= repeats


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct-n of one answer (Li et al., 2016): distinct word n-grams / all word n-grams, in [0, 1]; 1.0 for a
    text too short to repeat anything (fewer than n words). Sweeps report the mean over answers, so the figure
    judges each answer on its own and does not depend on how many prompts are swept.

    Example:
        ```py
        >>> distinct_n("the cat sat on the cat sat", 2)   # 6 bigrams, 4 distinct
        0.6666666666666666
        ```
    """
    ws = _lower_words(text)
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def fluency(answers: list[str], base_nll: Optional[list[float]] = None) -> dict:
    """Fluency of a set of answers: `degenerate_rate` (fraction with `is_degenerate`), `distinct2` (mean
    distinct-2), and, given each answer's mean per-token negative log-likelihood under the base model
    (`peft_clm.tools.preference.answer_nll`), `base_nll` (their mean over the non-empty answers; nan if none).

    Example:
        ```py
        >>> fluency(["It rains.", "go go go go go go go go"])["degenerate_rate"]
        0.5
        ```
    """
    if not answers:
        raise ValueError("fluency() needs at least one answer.")
    out = {
        "degenerate_rate": sum(map(is_degenerate, answers)) / len(answers),
        "distinct2": sum(distinct_n(a, 2) for a in answers) / len(answers),
    }
    if base_nll is not None:
        finite = [v for v in base_nll if math.isfinite(v)]
        out["base_nll"] = sum(finite) / len(finite) if finite else float("nan")
    return out
