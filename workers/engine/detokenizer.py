"""Incremental detokenization for streaming, with stop strings.

Decoding token by token is not decoding the sequence: a byte-level token may end
halfway through a UTF-8 character, and some decoders change a token's text by what
precedes it (SentencePiece drops the leading space of the first token decoded).
So, as vLLM does, each step decodes a short window twice — the tokens read last
step (vLLM's prefix_offset:read_offset) and the same plus the new ones — and
releases the difference. Text whose decode ends in U+FFFD waits for the token that
completes the character.

The first window holds the last few prompt tokens, so the first output token reads
as it does after the prompt (vLLM does the same). For byte-level BPE (GPT-2, Llama 3,
Qwen) the released text is exactly tokenizer.decode(output_ids); for SentencePiece
it keeps the leading space of the first token, which a bare decode would strip.

Stop strings: released text never holds a stop string or the start of one. The
longest tail that is a prefix of some stop string is held back until the next
tokens show whether it becomes a stop (then it is cut) or not (then it is released).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workers.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output, for decoders whose output depends on
# the previous token (vLLM uses 5 as well).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    text: str  # newly released text; may be ""
    stop_string: str | None  # the stop string matched: the request finishes with "stop"


@dataclass(frozen=True, slots=True)
class DetokenizerState:
    """Everything an IncrementalDetokenizer carries between steps, so a migrated
    request's detokenizer continues where it was without replaying its output."""

    window: tuple[int, ...]
    read_offset: int
    released: str
    pending: str
    stopped: bool


class IncrementalDetokenizer:
    """Turns one request's generated tokens into released text, step by step."""

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        # The window: ids[:read_offset] were read last step (their text is out,
        # released or pending); ids[read_offset:] are unread. Only the window is
        # kept, so memory and decode cost per step do not grow with the output.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._read_offset = len(self._ids)
        self._released: list[str] = []  # chunks of text already released
        self._pending = ""  # decoded but held back (a possible stop string start)
        self._stopped = False

    def state(self) -> DetokenizerState:
        return DetokenizerState(tuple(self._ids), self._read_offset, self.output_text, self._pending,
                                self._stopped)

    @classmethod
    def restore(cls, tokenizer: Any, params: SamplingParams, state: DetokenizerState) -> "IncrementalDetokenizer":
        """The detokenizer whose state() was `state`, for the same sampling params."""
        detok = cls(tokenizer, (), params)
        detok._ids = list(state.window)
        detok._read_offset = state.read_offset
        detok._released = [state.released] if state.released else []
        detok._pending = state.pending
        detok._stopped = state.stopped
        return detok

    @property
    def output_text(self) -> str:
        """All text released so far."""
        return "".join(self._released)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Feeds the tokens generated this step; returns the text now safe to stream."""
        if self._stopped:
            raise RuntimeError("update() after a stop string matched; the request is finished")
        searched_up_to = len(self._pending)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self._pending += self._decode_step()
        return self._release(searched_up_to, final=False)

    def flush(self) -> DetokenizerDelta:
        """Releases everything held back, for a request that ends for another reason.

        Held-back text (a possible start of a stop string, or an incomplete
        character that will now never complete) is real output at the end. A stop
        string completed by that text is still honoured.
        """
        if self._stopped:
            return DetokenizerDelta("", None)
        searched_up_to = len(self._pending)
        if self._read_offset < len(self._ids):
            prefix_text, new_text = self._decode_window()
            self._pending += new_text[len(prefix_text) :]
            self._read_offset = len(self._ids)
        return self._release(searched_up_to, final=True)

    # ---- decoding --------------------------------------------------------------

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last few prompt tokens, or none if the prompt ends mid-character.

        A prompt given as raw token ids may end inside a UTF-8 character; its bytes
        would then merge with the output's first bytes, and the output text would no
        longer be the decode of the output tokens.
        """
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            return []
        return context

    def _decode(self, ids: list[int]) -> str:
        # Clean-up of tokenization spaces rewrites text across token boundaries,
        # which no incremental scheme can reproduce; it is off by default in HF too.
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def _decode_window(self) -> tuple[str, str]:
        return self._decode(self._ids[: self._read_offset]), self._decode(self._ids)

    def _decode_step(self) -> str:
        """New text from the unread tokens, or "" while a character is incomplete."""
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            # Incomplete UTF-8, or a skipped special token: keep the tokens unread.
            return ""
        # Slide: the tokens just read become the next step's prefix.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    # ---- stop strings ------------------------------------------------------------

    def _release(self, searched_up_to: int, final: bool) -> DetokenizerDelta:
        match = self._find_stop(searched_up_to)
        if match is not None:
            at, stop = match
            end = at + len(stop) if self._include_stop else at
            self._stopped = True
            return self._emit(end, stop)
        end = len(self._pending) if final else len(self._pending) - self._held_back_length()
        return self._emit(end, None)

    def _emit(self, end: int, stop: str | None) -> DetokenizerDelta:
        text = self._pending[:end]
        # After a stop, whatever followed it is discarded with the request.
        self._pending = "" if stop is not None else self._pending[end:]
        if text:
            self._released.append(text)
        return DetokenizerDelta(text, stop)

    def _find_stop(self, searched_up_to: int) -> tuple[int, str] | None:
        """Earliest stop string in the pending text that ends in its new part.

        A match ending before `searched_up_to` would have been found a step earlier,
        so the search starts longest_stop - 1 chars before it. Released text never
        contains the start of a match (see _held_back_length), so pending suffices.
        Ties on position go to the first stop string listed.
        """
        begin = max(searched_up_to - self._longest_stop + 1, 0)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = self._pending.find(stop, begin)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _held_back_length(self) -> int:
        """Length of the longest pending tail that some stop string starts with.

        Holding exactly this much is enough: a stop string that completes later
        starts inside a tail of the current text that is a prefix of it.
        """
        for n in range(min(self._longest_stop - 1, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(stop.startswith(tail) for stop in self._stops):
                return n
        return 0


def resumed_detokenizer(tokenizer: Any, request_id: str, prompt_token_ids: Sequence[int],
                        output_token_ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer:
    """A detokenizer in the state the request's own would be in now. Output tokens
    produced elsewhere (a resumed or moved request) are replayed and their text
    dropped, since the client has it; what was held back there (half a UTF-8
    character, the start of a possible stop string) stays held back here. Every
    engine resumes through this, so a stream's text does not depend on which engine
    served which part of it."""
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params)
    if output_token_ids and detok.update(output_token_ids).stop_string is not None:
        raise ValueError(f"request {request_id}: its output already ends in a stop string")
    return detok
