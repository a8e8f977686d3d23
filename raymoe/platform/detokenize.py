"""Streaming text out of generated tokens: incremental detokenization and stop strings (no torch here).

`IncrementalDetokenizer` follows vLLM's method: decode a short window of recent tokens, ``ids[prefix:]``, and
the part of it already shown, ``ids[prefix:read]``; the text they differ by is new. While that text ends in
U+FFFD (a token that ends mid-character: byte-level BPE splits emoji and CJK characters over tokens), nothing is
released; once it is complete, the offsets move up. Decoding a window rather than one token keeps what depends
on the neighbours right (a SentencePiece ``▁`` that is a space only inside a word sequence, merges that change
how a token reads), and the window starts with the prompt's last tokens, so the first reply token is decoded in
context. The concatenated pieces are the whole reply's text: a stream and the non-streamed completion are the
same text (the engine builds the latter from the same pieces).

`StopStrings` matches stop strings on that text: a suffix that could begin a stop string is held back until
the next piece decides; a match ends the text before the stop string, so it never reaches the client, also
when it spans tokens. `TextStream` chains the two.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens that start the window (vLLM uses the same few)


class IncrementalDetokenizer:
    """Text of tokens pushed one call at a time (see the module docstring)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-CONTEXT_TOKENS:]
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def _window_texts(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        shown = dec(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        return shown, dec(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)

    def push(self, ids: Sequence[int]) -> str:
        """Add tokens; returns the text that became final with them (possibly "")."""
        out = []
        for t in ids:
            self.ids.append(int(t))
            shown, full = self._window_texts()
            if len(full) > len(shown) and not full.endswith(REPLACEMENT):
                out.append(full[len(shown):])
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return "".join(out)

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD); call once, at the end."""
        shown, full = self._window_texts()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(shown):] if len(full) > len(shown) else ""


class StopStrings:
    """Stop-string matching over pushed text (see the module docstring)."""

    def __init__(self, stops: Sequence[str]):
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        self.stops = list(stops)
        self.held = ""

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text to release, whether a stop string matched). After a match nothing more is released."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0 if final else self._held_suffix(buf)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(buf[-n:]) for s in self.stops):
                return n
        return 0


class TextStream:
    """Tokens in, released text out: `IncrementalDetokenizer` then `StopStrings`."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stops = StopStrings(stop)
        self.stopped = False

    def push(self, ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """(released text, whether a stop string matched: the reply ends here). ``final``: the reply ends with
        these tokens, release everything."""
        if self.stopped:
            return "", True
        text = self.detok.push(ids) + (self.detok.flush() if final else "")
        out, self.stopped = self.stops.push(text, final)
        return out, self.stopped
