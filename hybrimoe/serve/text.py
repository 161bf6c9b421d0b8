"""One request's generated text: decoded as the tokens come, cut at its first stop string.

A piece that may be the start of a stop string is held back until the next tokens show it is not
one (at most the longest stop string less one character), so a client never sees text that the
stop cuts off; `flush()` hands out what was held once the request ends for another reason.
"""

from __future__ import annotations

from hybrimoe.runtime.generate import TextStream


class TextOutput:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._stream = TextStream(tokenizer)
        self._stop = stop
        self._hold = max(map(len, stop), default=1) - 1  # characters that may start a stop string
        self.text = ""  # everything decoded, up to a stop string when one came
        self._sent = 0  # characters of `text` handed out

    def push(self, token_id: int) -> tuple[str, bool]:
        """(the text now safe to send, whether a stop string ended the request)."""
        self.text += self._stream.push(token_id)
        found = [i for i in (self.text.find(s, max(0, self._sent - len(s))) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            return self.flush(), True
        safe = max(self._sent, len(self.text) - self._hold)
        piece, self._sent = self.text[self._sent : safe], safe
        return piece, False

    def flush(self) -> str:
        piece, self._sent = self.text[self._sent :], len(self.text)
        return piece
