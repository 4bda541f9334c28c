"""The text of each choice as tokens arrive: where it ends, and what may be sent so far."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Choice:
    """One row of a generation: its tokens, its text and how it finished."""

    eos_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    decode: Callable[[list[int]], str]
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    _text: str = ""

    @property
    def text(self) -> str:
        """The answer: decoded tokens, cut before the first stop sequence."""
        return self._text

    def add(self, token: int) -> None:
        if self.finish_reason is not None:
            return
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        text = self.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            text = text[: min(cuts)]
            self.finish_reason = "stop"
        self._text = text

    def finish(self) -> None:
        """The generation ended: a row that did not stop ran out of tokens."""
        if self.finish_reason is None:
            self.finish_reason = "length"

    def delta(self) -> str:
        """New text that can be sent now. While the row runs, an unfinished character and what
        could be the start of a stop sequence are held back."""
        text = self._text
        if self.finish_reason is None:
            if text.endswith("\ufffd"):
                text = text[:-1]
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(self.sent, len(text) - hold)]
        new = text[self.sent :]
        self.sent += len(new)
        return new
