"""A worker's per-slot sampling state, and the batch tensors the sampler takes each step.

The scheduler sends a request's parameters once (StepPlan.new_slots, a `SamplingParams` each);
they live here in arrays indexed by slot, so a step gathers them with one fancy-index per field.
In these arrays `logprobs` and `prompt_logprobs` are -1 where the message says None (not asked),
so a batch's largest request is one `max()`.

Penalties need to know which tokens a request has seen. The counts are derived from the tokens
the worker computes: a token at position p < num_prompt_tokens is a prompt token, any later one
a generated token. Every generated token except the newest is an input of some step (decode feeds
the last sampled token back), so counts are exact at sampling time — and stay exact after a
preemption, whose recompute feeds the same tokens again into freshly reset rows. Tokens served
from the prefix cache are never inputs, so the scheduler names them once on admission
(`cached_token_ids` of a penalized request).

    dense, lazily allocated when the first penalized request arrives:
        output_counts [max_num_seqs, V] int32     prompt_mask [max_num_seqs, V] bool
    sparse, one row per (slot, token) pair:
        logit bias    (slot, token, bias)         min_tokens bans (slot, token) of EOS / stop ids
"""

from operator import attrgetter

import numpy as np
import torch

from mi.actors.messages import NewSlot
from mi.ops.sampling import SamplingTensors

_PARAMS = {  # SamplingParams field -> dtype of its per-slot array
    "temperature": np.float32,
    "top_p": np.float32,
    "top_k": np.int64,
    "min_p": np.float32,
    "seed": np.int64,
    "repetition_penalty": np.float32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "min_tokens": np.int64,
}
_NUM_LOGPROBS = ("logprobs", "prompt_logprobs")  # int | None -> int64, -1 for None
_EMPTY_TABLE = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # torch.from_numpy takes unaligned memory without a word (the ring's arrays are unaligned
    # views), and its kernels may assume alignment: copy those, as well as non-contiguous ones.
    flags = array.flags
    if not (flags.c_contiguous and flags.aligned):
        array = array.copy(order="C")
    return torch.from_numpy(array).to(device)


def _table(slots: np.ndarray, token_ids: list[np.ndarray], values: list[np.ndarray]):
    """(slot, token, value) rows from each slot's tokens and values."""
    if not token_ids:
        return _EMPTY_TABLE
    counts = np.array([len(ids) for ids in token_ids], dtype=np.int64)
    return (
        np.repeat(slots, counts),
        np.concatenate(token_ids).astype(np.int64),
        np.concatenate(values).astype(np.float32),
    )


class SlotSampling:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.params = {name: np.zeros(max_num_seqs, dtype=dtype) for name, dtype in _PARAMS.items()}
        self.params.update({name: np.full(max_num_seqs, -1, np.int64) for name in _NUM_LOGPROBS})
        self.params["num_prompt_tokens"] = np.zeros(max_num_seqs, dtype=np.int64)
        self.is_penalized = np.zeros(max_num_seqs, dtype=bool)
        self.bias = _EMPTY_TABLE
        self.bans = _EMPTY_TABLE
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None

    def admit(self, new_slots: list[NewSlot]) -> None:
        """Stores the parameters of (re)admitted requests, resetting their slots."""
        slots = np.array([new.slot for new in new_slots], dtype=np.int64)
        sampling = [new.params for new in new_slots]
        p = self.params
        for name, dtype in _PARAMS.items():
            p[name][slots] = np.array(list(map(attrgetter(name), sampling)), dtype=dtype)
        for name in _NUM_LOGPROBS:
            p[name][slots] = [-1 if n is None else n for n in map(attrgetter(name), sampling)]
        p["num_prompt_tokens"][slots] = [new.num_prompt_tokens for new in new_slots]
        self.is_penalized[slots] = (
            (p["repetition_penalty"][slots] != 1)
            | (p["presence_penalty"][slots] != 0)
            | (p["frequency_penalty"][slots] != 0)
        )
        biases = [params.logit_bias for params in sampling]
        self.bias = self._replace(
            self.bias,
            slots,
            _table(
                slots,
                [np.fromiter(bias.keys(), np.int64, len(bias)) for bias in biases],
                [np.fromiter(bias.values(), np.float32, len(bias)) for bias in biases],
            ),
        )
        bans = [new.ban_token_ids for new in new_slots]
        self.bans = self._replace(
            self.bans, slots, _table(slots, bans, [np.full(len(ids), -np.inf, np.float32) for ids in bans])
        )
        if self.is_penalized[slots].any() and self.output_counts is None:
            shape = (len(self.is_penalized), self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        if self.output_counts is not None:
            reset = to_device(slots, self.device)
            self.output_counts[reset] = 0
            self.prompt_mask[reset] = False
            cached = [new.cached_token_ids for new in new_slots]
            lengths = np.array([len(ids) for ids in cached], dtype=np.int64)
            if lengths.sum():
                self.observe(
                    np.repeat(slots, lengths),
                    np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths),
                    np.concatenate(cached).astype(np.int64),
                )

    @staticmethod
    def _replace(table, slots, new):
        keep = ~np.isin(table[0], slots)
        return tuple(np.concatenate((old[keep], add)) for old, add in zip(table, new))

    def observe(self, token_slots: np.ndarray, positions: np.ndarray, input_ids: np.ndarray) -> None:
        """Counts this step's input tokens of penalized slots (before sampling from them)."""
        if self.output_counts is None:
            return
        watched = self.is_penalized[token_slots]
        if not watched.any():
            return
        slots, positions, ids = token_slots[watched], positions[watched], input_ids[watched]
        is_prompt = positions < self.params["num_prompt_tokens"][slots]
        dev = self.device
        self.prompt_mask[to_device(slots[is_prompt], dev), to_device(ids[is_prompt], dev)] = True
        gen_slots, gen_ids = to_device(slots[~is_prompt], dev), to_device(ids[~is_prompt], dev)
        self.output_counts.index_put_(
            (gen_slots, gen_ids), torch.ones_like(gen_ids, dtype=torch.int32), accumulate=True
        )

    def _sparse_rows(self, table, slot_to_row: np.ndarray):
        """The entries of `table` whose slot maps to a batch row (>= 0), as (row, token, value)
        tensors; None if there are none."""
        rows = slot_to_row[table[0]]
        hit = rows >= 0
        if not hit.any():
            return None
        return tuple(to_device(a, self.device) for a in (rows[hit], table[1][hit], table[2][hit]))

    def tensors(self, slots: np.ndarray, positions: np.ndarray) -> SamplingTensors:
        """Sampling tensors for the rows `slots`, whose new token goes at `positions`."""
        p = self.params
        to_dev = lambda a: to_device(a, self.device)  # noqa: E731
        penalized = self.is_penalized[slots].any()
        index = to_dev(slots) if penalized else None
        slot_to_row = np.full(len(self.is_penalized), -1, dtype=np.int64)
        slot_to_row[slots] = np.arange(len(slots))
        bias = self._sparse_rows(self.bias, slot_to_row)
        # EOS / stop ids stay banned only while a row has generated fewer than min_tokens.
        below_min = positions - p["num_prompt_tokens"][slots] < p["min_tokens"][slots]
        slot_to_row[slots[~below_min]] = -1
        bans = self._sparse_rows(self.bans, slot_to_row)
        if bias is not None and bans is not None:
            bias = tuple(torch.cat(pair) for pair in zip(bias, bans))
        else:
            bias = bias or bans
        num_logprobs = int(p["logprobs"][slots].max()) if len(slots) else -1
        return SamplingTensors(
            temperature=to_dev(p["temperature"][slots]),
            top_p=to_dev(p["top_p"][slots]),
            top_k=to_dev(p["top_k"][slots]),
            min_p=to_dev(p["min_p"][slots]),
            seeds=to_dev(p["seed"][slots]),
            positions=to_dev(positions),
            repetition_penalty=to_dev(p["repetition_penalty"][slots]) if penalized else None,
            presence_penalty=to_dev(p["presence_penalty"][slots]) if penalized else None,
            frequency_penalty=to_dev(p["frequency_penalty"][slots]) if penalized else None,
            output_counts=self.output_counts[index] if penalized else None,
            prompt_mask=self.prompt_mask[index] if penalized else None,
            logit_bias=bias,
            num_top_logprobs=num_logprobs,
        )
