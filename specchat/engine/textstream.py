"""Incremental detokenisation with stop strings.

Token ids arrive a few at a time; text must come out as soon as it is final.
Two things hold text back: a trailing replacement character (a multi-byte
character split across tokens) and a suffix that could still grow into a stop
string.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already handed out
        self.text = ""  # final text so far (what has been handed out)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> tuple[str, int | None]:
        """Add token ids; return (newly final text, tokens to keep if a stop string ended it)."""
        self._ids.extend(ids)
        full = self._decode(self._ids)
        hit = self._find_stop(full)
        if hit is not None:
            keep_tokens = self._tokens_covering(full[: hit[1]])
            return self._emit(full[: hit[0]]), keep_tokens
        final = len(full)
        while final > self._emitted and full[final - 1] == REPLACEMENT:
            final -= 1
        final = min(final, self._stop_safe_end(full))
        return self._emit(full[:final]), None

    def flush(self) -> str:
        """Everything decoded so far, for a stream that ends here."""
        return self._emit(self._decode(self._ids))

    def _emit(self, upto: str) -> str:
        new = upto[self._emitted :]
        self._emitted = max(self._emitted, len(upto))
        self.text += new
        return new

    def _find_stop(self, full: str) -> tuple[int, int] | None:
        """(start, end) of the earliest stop string in ``full``."""
        hits = [(full.find(s), full.find(s) + len(s)) for s in self._stop if s in full]
        return min(hits) if hits else None

    def _stop_safe_end(self, full: str) -> int:
        """Longest prefix of ``full`` that cannot be the start of a stop string."""
        end = len(full)
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(full)), 0, -1):
                if full.endswith(stop[:k]):
                    end = min(end, len(full) - k)
                    break
        return end

    def _tokens_covering(self, text: str) -> int:
        """Fewest leading tokens whose text contains ``text``."""
        for n in range(1, len(self._ids) + 1):
            if len(self._decode(self._ids[:n])) >= len(text):
                return n
        return len(self._ids)
