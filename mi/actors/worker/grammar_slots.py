"""Rank 0's grammar state per slot: an xgrammar matcher per constrained request, and the
token bitmask of the rows a step samples.

The matcher follows the tokens the worker computes, as the penalty counts do (slot_sampling.py):
a generated token is an input of a later step (decode feeds the sampled token back), or, after a
preemption or a prefix-cache hit, part of the `cached_token_ids` of the slot's admission. So a
(re)admitted request gets a fresh matcher, which accepts its generated tokens again as they come
in; by the time the request samples, it has accepted every token before the one being sampled.
Nothing depends on the sampler's output, and preemption, prefix caching and n > 1 need no case
of their own.

Unconstrained rows pay one boolean gather per step. Constrained rows are the only Python loop:
accepting their new token and filling their bitmask row (~0.1 ms each), which xgrammar offers
per matcher. A grammar compiles in the background from admission (mi/grammar.py); a row that
samples before its grammar is ready waits for it (a prefill usually outlasts the compile, and
the supervisor compiled the same constraint already, so a schema seen before is cached there but
not here: the first use in a worker pays its ~20 ms).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from mi.actors.messages import NewSlot
from mi.grammar import GrammarCompiler

log = logging.getLogger("mi.worker")

GRAMMAR_FAILED = "The output could not follow its structured_outputs constraint."


@dataclass
class _SlotGrammar:
    compiled: Future
    is_json: bool
    pending: list[int] = field(default_factory=list)  # generated tokens not yet accepted
    matcher: object | None = None
    failed: bool = False


@dataclass(frozen=True)
class StepMasks:
    rows: torch.Tensor  # [M] int64: batch rows that are constrained
    bitmask: torch.Tensor  # [M, ceil(V / 32)] int32: xgrammar's allowed-token bits
    failed_rows: dict[int, str]  # batch row -> why its grammar cannot continue


class GrammarSlots:
    def __init__(self, model_dir: str, max_num_seqs: int, vocab_size: int, eos_token_ids: list[int]):
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._compiler: GrammarCompiler | None = None  # started by the first constrained request
        self._bitmask: torch.Tensor | None = None
        words = np.zeros(-(-vocab_size // 32), dtype=np.uint32)
        for token in self._eos_token_ids:
            words[token // 32] |= np.uint32(1 << (token % 32))
        self._eos_only = torch.from_numpy(words.view(np.int32))  # the bitmask row allowing EOS alone
        self._json_safe: torch.Tensor | None = None  # see _json_safe_row
        self.is_constrained = np.zeros(max_num_seqs, dtype=bool)
        self._num_prompt = np.zeros(max_num_seqs, dtype=np.int64)
        self._slots: dict[int, _SlotGrammar] = {}

    def admit(self, new_slots: list[NewSlot]) -> None:
        for new in new_slots:
            constraint = new.params.structured_outputs
            self._slots.pop(new.slot, None)
            self.is_constrained[new.slot] = constraint is not None
            if constraint is None:
                continue
            if self._compiler is None:
                self._compiler = GrammarCompiler(self._model_dir, self._vocab_size, self._eos_token_ids)
            self._num_prompt[new.slot] = new.num_prompt_tokens
            self._slots[new.slot] = _SlotGrammar(
                self._compiler.compile(constraint),
                constraint.kind in ("json", "json_object"),
                new.cached_token_ids[new.num_prompt_tokens :].tolist(),
            )

    def free(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            self._slots.pop(slot, None)
        self.is_constrained[slots] = False

    def observe(self, token_slots: np.ndarray, positions: np.ndarray, input_ids: np.ndarray) -> None:
        """Queues this step's generated input tokens of constrained slots for their matchers."""
        watched = self.is_constrained[token_slots]
        if not watched.any():
            return
        watched &= positions >= self._num_prompt[token_slots]
        for slot, token in zip(token_slots[watched].tolist(), input_ids[watched].tolist()):
            self._slots[slot].pending.append(token)

    def masks(self, slots: np.ndarray) -> StepMasks | None:
        """The bitmask rows for the constrained ones among the rows sampling `slots`."""
        rows = np.flatnonzero(self.is_constrained[slots])
        if len(rows) == 0:
            return None
        import xgrammar as xgr

        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(len(self.is_constrained), self._vocab_size)
        bitmask = self._bitmask[: len(rows)]
        failed = {}
        for i, row in enumerate(rows.tolist()):
            state = self._slots[int(slots[row])]
            if not self._advance(state) or state.matcher.is_terminated():
                # Nothing may follow: allow only EOS (a failed row is reported, its token unused).
                bitmask[i] = self._eos_only
                if state.failed:
                    failed[row] = GRAMMAR_FAILED
                continue
            state.matcher.fill_next_token_bitmask(bitmask, i)
            if state.is_json:
                bitmask[i] &= self._json_safe_row(state)
        return StepMasks(torch.from_numpy(rows.astype(np.int64)), bitmask, failed)

    def _json_safe_row(self, state: _SlotGrammar) -> torch.Tensor:
        """The bitmask row of every token without a raw control character (bytes 0x00-0x1f).

        NOTE: xgrammar 0.2's JSON schema grammar lets a string with minLength or maxLength hold
        raw control characters ([^"\\\r\n]), which JSON forbids (json.loads refuses them). Our
        JSON has no whitespace but single spaces, so such a token is never valid JSON output."""
        if self._json_safe is None:
            vocab = state.compiled.result().tokenizer_info.decoded_vocab
            words = np.zeros(len(self._eos_only), dtype=np.uint32)
            for token, piece in enumerate(vocab[: self._vocab_size]):
                if not any(byte < 0x20 for byte in piece):
                    words[token // 32] |= np.uint32(1 << (token % 32))
            words |= self._eos_only.numpy().view(np.uint32)
            self._json_safe = torch.from_numpy(words.view(np.int32))
        return self._json_safe

    def _advance(self, state: _SlotGrammar) -> bool:
        """Feeds the pending tokens to the slot's matcher (made on first use); False once it
        cannot follow them (a token the grammar does not allow, or a grammar that failed)."""
        if state.failed:
            return False
        try:
            if state.matcher is None:
                import xgrammar as xgr

                state.matcher = xgr.GrammarMatcher(state.compiled.result())
            for token in state.pending:
                if state.matcher.is_terminated() and token in self._eos_token_ids:
                    continue  # EOS again after the grammar ended (ignore_eos)
                if not state.matcher.accept_token(token):
                    raise ValueError(f"token {token} is not allowed here")
        except Exception as exc:  # the supervisor compiled the same constraint: not expected
            log.warning("structured output of a request cannot continue: %s", exc)
            state.failed = True
            return False
        finally:
            state.pending.clear()
        return True

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.close()
