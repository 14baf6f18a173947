"""Token ids -> text, one token at a time, and stop strings found in that text.

Decoding a token alone loses context (a SentencePiece word's leading space, a UTF-8 character split across
byte tokens), so each step decodes a short window twice, with and without the new token, and keeps the
difference. The window starts with a few prompt tokens so the first generated word keeps its leading space.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Text of one request's generated tokens, built token by token so stop strings can end it."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.max_stop_len = max((len(s) for s in stop), default=0)
        self.window = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.read_offset = len(self.window)   # window[:read_offset] is context already turned into text
        self.text = ""
        self.stopped = False

    def append(self, token_id: int, check_stop: bool = True) -> bool:
        """Decode one more token. True when a stop string completed; the text is then cut before it."""
        self.window.append(token_id)
        before = self._decode(self.window[: self.read_offset])
        after = self._decode(self.window)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False   # a special token or part of a character: wait for more tokens
        new_text = after[len(before):]
        self.text += new_text
        self.window = self.window[self.read_offset:]
        self.read_offset = len(self.window)
        return check_stop and self._cut_at_stop(len(new_text))

    def _cut_at_stop(self, num_new_chars: int) -> bool:
        # A stop string may span tokens: search from where one ending in the new text could begin.
        start = max(0, len(self.text) - num_new_chars - self.max_stop_len + 1)
        hits = [pos for s in self.stop if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        self.stopped = True
        return True

    def flush(self) -> str:
        """The final text once the request has ended. Tokens still waiting for the rest of a character become text
        as decoding the whole completion at once makes them (a trailing U+FFFD), so a stop string that never
        matched leaves the text as it is without one; after a stop string, the cut text."""
        if not self.stopped and self.read_offset < len(self.window):
            before = self._decode(self.window[: self.read_offset])
            after = self._decode(self.window)
            if after.startswith(before):
                self.text += after[len(before):]
            self.read_offset = len(self.window)   # flushed: a second call adds nothing
        return self.text

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def decode_completion(tokenizer, prompt_token_ids: list[int], completion_ids: list[int]) -> str:
    """The text of a whole completion at once, with the same prompt context the incremental path uses."""
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    before = tokenizer.decode(context, skip_special_tokens=True)
    after = tokenizer.decode(context + list(completion_ids), skip_special_tokens=True)
    if not after.startswith(before):   # a tokenizer whose decode is not prefix-stable: decode alone
        return tokenizer.decode(list(completion_ids), skip_special_tokens=True)
    return after[len(before):]
