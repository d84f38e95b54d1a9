"""Incremental, UTF-8 safe detokenization with stop strings, for one request.

Decoding token by token is wrong for byte-level BPE (a character may span tokens) and for
tokenizers that drop a leading space when a token is decoded alone. So each step decodes a short
window ending at the newest token and emits only what the window adds, holding back text that
ends in an incomplete character. Stop strings are matched on the emitted text; text that might
be the start of a stop string is held back until it is known not to be one.
"""

from dataclasses import dataclass, field

# Tokens of left context re-decoded with each step (enough for any merge rule to settle).
_CONTEXT_TOKENS = 5


@dataclass
class TextStream:
    tokenizer: object
    prompt_ids: list[int]
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    include_stop_str: bool = False  # keep the matched stop string at the end of `text`
    ids: list[int] = field(default_factory=list)  # prompt context + generated
    text: str = ""  # generated text accepted so far (before stop-string truncation)
    sent_len: int = 0  # characters of `text` already handed out
    stopped: bool = False  # a stop string matched; `text` ends right before it

    def __post_init__(self):
        self.ids = list(self.prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: list[int]) -> None:
        """Appends generated ids; extends `text` by whatever complete characters they add."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        self._check_stop()

    def flush(self) -> None:
        """At the end of generation: accept whatever is left, incomplete characters included."""
        if self.stopped:
            return
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self.ids)
        self._check_stop()

    def _check_stop(self) -> None:
        if not self.stop or self.stopped:
            return
        longest = max(map(len, self.stop))
        window_start = max(0, self.sent_len - longest + 1)
        hits = [(i, len(s)) for i, s in ((self.text.find(s, window_start), s) for s in self.stop) if i >= 0]
        if hits:
            start, length = min(hits)
            self.text = self.text[: start + length if self.include_stop_str else start]
            self.stopped = True

    def take_delta(self, final: bool) -> str:
        """The next piece of text to send. Unless final, holds back a tail that may still turn
        into a stop string."""
        end = len(self.text)
        if self.stop and not final and not self.stopped:
            end = max(self.sent_len, end - (max(map(len, self.stop)) - 1))
        delta = self.text[self.sent_len : end]
        self.sent_len = end
        return delta
