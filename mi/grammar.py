"""Structured-output constraints compiled with xgrammar, for the supervisor (which refuses what
does not compile with a 400 before the request runs) and the worker that samples (which masks
the logits of constrained rows, mi/actors/worker/grammar_slots.py).

Why xgrammar: its compiler precomputes, per grammar state, which tokens of the vocabulary are
allowed, so the per-token work is a bitmask fill (~0.1 ms on a 49k vocabulary) and one masked
fill of the logits, with a CPU kernel and the same path on GPU; vLLM and SGLang use it. Measured
on SmolLM2's 49,152-token vocabulary: the tokenizer table takes ~1 s to build (once per process,
in the background from the first constrained request), a JSON schema compiles in ~20 ms, a regex
in ~40 ms, and both are cached by their text.

Choices: JSON follows the schema in xgrammar's strict mode (no properties beyond those listed
unless the schema allows them, as OpenAI's strict mode) with one space after `,` and `:` and no
other whitespace — free whitespace lets a model pad forever; `json_object` is an object of any
JSON values; `choice` is a grammar of the strings as literals.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from mi.api.errors import ApiError
from mi.api.structured import StructuredOutputs

__all__ = ["GrammarCompiler", "GrammarError"]

_ANY_OBJECT = '{"type": "object", "additionalProperties": true}'
_CACHED_FUTURES = 256
# xgrammar prefixes its messages with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a check
# that failed): neither belongs in an error body.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarError(ApiError):
    """A constraint the grammar library cannot compile: 400 naming the field."""


def _message(exc: Exception) -> str:
    text = _LOG_PREFIX.sub("", str(exc).strip()).strip()
    return (text[:300] or type(exc).__name__).rstrip(".")


class GrammarCompiler:
    """Compiles `StructuredOutputs` for one model's tokenizer, in a background thread.

    `compile` returns a Future of xgrammar's CompiledGrammar (or of a GrammarError); futures are
    kept per constraint, so the same schema compiles once per process."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mi-grammar")
        self._compiler = self._pool.submit(self._load, model_dir, vocab_size, list(stop_token_ids))
        self._compiled: OrderedDict[bytes, Future] = OrderedDict()

    @staticmethod
    def _load(model_dir: str, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # vocab_size: the logits' width (padded); ids past the tokenizer's are never allowed.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        return xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, constraint: StructuredOutputs) -> Future:
        key = constraint.cache_key()
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._pool.submit(self._compile, constraint)
            if len(self._compiled) > _CACHED_FUTURES:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return future

    def _compile(self, c: StructuredOutputs):
        compiler = self._compiler.result()
        kind = c.kind
        try:
            if kind == "json":
                schema = c.json if isinstance(c.json, str) else json.dumps(c.json)
                return compiler.compile_json_schema(schema, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(c.regex)
            if kind == "choice":
                literals = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in c.choice)
                return compiler.compile_grammar(f"root ::= {literals}")
            return compiler.compile_grammar(c.grammar)
        except (RuntimeError, ValueError, TypeError) as exc:
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            raise GrammarError(
                400,
                f"The {what} of 'structured_outputs.{kind}' cannot be compiled: {_message(exc)}.",
                f"structured_outputs.{kind}",
                code="invalid_value",
            ) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
