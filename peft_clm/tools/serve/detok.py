"""Incremental detokenization of one generated sequence, with stop strings.

Tokens arrive one at a time; the text handed out so far must always be a prefix of the final text, so:

- a token that ends in the middle of a multi-byte character (byte-level BPE splits emoji and CJK characters over
  several tokens) decodes to U+FFFD; nothing is released until the character is complete. Decoding a window that
  starts a few tokens back (`prefix_offset`) keeps the spaces and merges that depend on the previous token, the
  scheme of text-generation-inference and vLLM;
- text that could be the beginning of a stop string is held back until it is known not to be one, and the text
  ends before the first stop string found (the stop string itself is not returned, as in OpenAI's API).
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDecoder:
    """Decode one sequence token by token.

    Example:
        ```py
        >>> dec = IncrementalDecoder(tokenizer, stop=["\\n\\n"])
        >>> pieces = [dec.add(t) for t in token_ids]      # text released at each step
        >>> pieces.append(dec.finish())                    # the rest, at the end of the sequence
        >>> "".join(pieces) == dec.text                    # also tokenizer.decode(token_ids) when no stop hit
        True
        ```
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this are already in `_decoded`
        self._decoded = ""  # all complete text so far (stop strings not yet cut)
        self._released = 0  # characters of `_decoded` handed out
        self.stop = tuple(s for s in stop if s)
        self.stopped = False  # a stop string was found: the text is final

    @property
    def text(self) -> str:
        """The text handed out so far (the whole answer once `finish()` or a stop string ended it)."""
        return self._decoded[: self._released]

    def add(self, token_id: int) -> str:
        """Take one token; return the text that can be released now (often '', e.g. mid-character)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new = self._decode(self.ids[self.prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self._decoded += new[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the sequence: release everything left (an unfinished character comes out as U+FFFD, as a
        whole-sequence decode shows it)."""
        if not self.stopped:
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            new = self._decode(self.ids[self.prefix_offset :])
            if len(new) > len(prefix):
                self._decoded += new[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _release(self, final: bool) -> str:
        end = len(self._decoded)
        if self.stop and not self.stopped:
            # Released text is never part of a stop string (see the hold-back below), so a match starts after it.
            hits = [i for i in (self._decoded.find(s, self._released) for s in self.stop) if i >= 0]
            if hits:
                self._decoded = self._decoded[: min(hits)]
                self.stopped = True
                end = len(self._decoded)
            elif not final:
                end -= self._held_back()
        out = self._decoded[self._released : end]
        self._released = max(self._released, end)
        return out

    def _held_back(self) -> int:
        # The longest tail of the text that is the beginning of some stop string (it may become one).
        text = self._decoded
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text) - self._released), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest
