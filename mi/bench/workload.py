"""The benchmark's workload: one `Prompt` per request, from random token ids or a file of prompts.

Invariants:
- Same tokenizer, lengths, seed -> the same prompts (numpy's seeded generator, no global state).
- A random prompt is text (what any OpenAI server takes): random non-special ids are decoded,
  re-encoded and cut to `input_len` ids, and the text of those ids is sent, so a server with the
  same tokenizer sees about `input_len` tokens (plus its BOS); `prompt_len` is our own count.
- A dataset is JSONL or one JSON array; each entry is ShareGPT-style (`conversations`, the first
  human turn is the prompt) or `{"prompt": str}`. A bad entry is a `WorkloadError` naming the
  file and line, never a skipped request.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class WorkloadError(ValueError):
    """A workload that cannot be built (bad file, missing tokenizer); the message is one line."""


@dataclass(frozen=True)
class Prompt:
    text: str
    prompt_len: int | None  # tokens by the benchmark's tokenizer; None without one
    output_len: int  # max_tokens asked for


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer in `path` (an HF or a converted model directory)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"cannot load a tokenizer from {path}: {exc}".splitlines()[0]) from None


def random_prompts(
    tokenizer, num_requests: int, input_len: int, output_len: int, seed: int = 0
) -> list[Prompt]:
    """`num_requests` prompts of about `input_len` random tokens each."""
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise WorkloadError("--num-requests, --input-len and --output-len must be at least 1")
    special = set(tokenizer.all_special_ids)
    candidates = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(seed)
    # Re-encoding decoded random ids merges some of them: draw a margin, then cut to input_len.
    drawn = rng.choice(candidates, size=(num_requests, input_len + input_len // 2 + 8))
    texts = tokenizer.batch_decode(drawn.tolist(), skip_special_tokens=True)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    texts = tokenizer.batch_decode([ids[:input_len] for ids in encoded], skip_special_tokens=True)
    lens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [Prompt(text, n, output_len) for text, n in zip(texts, lens, strict=True)]


def _prompt_of(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("prompt"), str):
        return entry["prompt"]
    turns = entry.get("conversations")
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
                value = turn.get("value")
                return value if isinstance(value, str) else None
    return None


def _entries(path: Path) -> list[tuple[int, object]]:
    """(line number, decoded entry) of a JSONL file, or of a file holding one JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkloadError(f"cannot read the dataset {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}: not a JSON array: {exc}") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entries.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"{path}:{lineno}: not JSON: {exc}") from None
    return entries


def load_dataset(path: str | Path, num_requests: int, output_len: int, tokenizer=None) -> list[Prompt]:
    """`num_requests` prompts from the file, in file order (repeated when the file is shorter)."""
    path = Path(path)
    texts = []
    for lineno, entry in _entries(path):
        text = _prompt_of(entry)
        if not text:
            raise WorkloadError(
                f"{path}:{lineno}: expected {{'prompt': str}} or ShareGPT "
                f"{{'conversations': [{{'from': 'human', 'value': str}}, ...]}}, got {str(entry)[:80]!r}"
            )
        texts.append(text)
    if not texts:
        raise WorkloadError(f"{path}: no prompts")
    texts = list(itertools.islice(itertools.cycle(texts), num_requests))
    if tokenizer is None:
        lens = [None] * len(texts)
    else:
        lens = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [Prompt(text, n, output_len) for text, n in zip(texts, lens, strict=True)]


def describe(prompts: list[Prompt], source: str) -> dict:
    """The workload as it goes into the results JSON."""
    lens = [p.prompt_len for p in prompts if p.prompt_len is not None]
    return {
        "source": source,
        "num_requests": len(prompts),
        "prompt_len_mean": float(np.mean(lens)) if lens else None,
        "prompt_len_min": min(lens) if lens else None,
        "prompt_len_max": max(lens) if lens else None,
        "output_len": sorted({p.output_len for p in prompts}),
        "prompt_lens": [p.prompt_len for p in prompts],
        "first_prompt": prompts[0].text if prompts else None,
    }
