"""A worker's per-slot sampling state, and the batch tensors the sampler takes each step.

The scheduler sends a request's parameters once (StepPlan.new_slots); they live here in arrays
indexed by slot, so a step gathers them with one fancy-index per field.

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
import numpy as np
import torch

from mi.ops.sampling import SamplingTensors

_FIELDS = {  # new_slots key -> (dtype, default)
    "temperature": (np.float32, 1.0), "top_p": (np.float32, 1.0), "top_k": (np.int64, 0),
    "min_p": (np.float32, 0.0), "seed": (np.int64, 0), "repetition_penalty": (np.float32, 1.0),
    "presence_penalty": (np.float32, 0.0), "frequency_penalty": (np.float32, 0.0),
    "logprobs": (np.int64, -1), "prompt_logprobs": (np.int64, -1),
    "num_prompt_tokens": (np.int64, 0), "min_tokens": (np.int64, 0),
}


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _pairs(rows: list, key: str, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens each row's list of [token, value] (or bare token) into (slot, token, value)."""
    counts = np.array([len(row.get(key, ())) for row in rows], dtype=np.int64)
    flat = [item for row in rows for item in row.get(key, ())]
    if not flat:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    items = np.asarray(flat, dtype=np.float64).reshape(len(flat), -1)
    values = items[:, 1].astype(np.float32) if items.shape[1] > 1 else np.full(len(flat), -np.inf, np.float32)
    return np.repeat(slots, counts), items[:, 0].astype(np.int64), values


class SlotSampling:
    def __init__(self, max_num_seqs: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.params = {name: np.full(max_num_seqs, default, dtype=dtype)
                       for name, (dtype, default) in _FIELDS.items()}
        self.is_penalized = np.zeros(max_num_seqs, dtype=bool)
        self.bias = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        self.bans = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        self.output_counts: torch.Tensor | None = None
        self.prompt_mask: torch.Tensor | None = None

    def admit(self, new_slots: list[dict]) -> None:
        """Stores the parameters of (re)admitted requests, resetting their slots."""
        slots = np.array([row["slot"] for row in new_slots], dtype=np.int64)
        for name, (dtype, default) in _FIELDS.items():
            self.params[name][slots] = np.array([row.get(name, default) for row in new_slots],
                                                dtype=dtype)
        p = self.params
        self.is_penalized[slots] = ((p["repetition_penalty"][slots] != 1)
                                    | (p["presence_penalty"][slots] != 0)
                                    | (p["frequency_penalty"][slots] != 0))
        self.bias = self._replace(self.bias, slots, _pairs(new_slots, "logit_bias", slots))
        self.bans = self._replace(self.bans, slots, _pairs(new_slots, "ban_token_ids", slots))
        if self.is_penalized[slots].any() and self.output_counts is None:
            shape = (len(self.is_penalized), self.vocab_size)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        if self.output_counts is not None:
            reset = to_device(slots, self.device)
            self.output_counts[reset] = 0
            self.prompt_mask[reset] = False
            cached = [np.asarray(row.get("cached_token_ids", ()), dtype=np.int64) for row in new_slots]
            lengths = np.array([len(ids) for ids in cached], dtype=np.int64)
            if lengths.sum():
                self.observe(np.repeat(slots, lengths),
                             np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths),
                             np.concatenate(cached))

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
        self.output_counts.index_put_((gen_slots, gen_ids),
                                      torch.ones_like(gen_ids, dtype=torch.int32), accumulate=True)

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
            temperature=to_dev(p["temperature"][slots]), top_p=to_dev(p["top_p"][slots]),
            top_k=to_dev(p["top_k"][slots]), min_p=to_dev(p["min_p"][slots]),
            seeds=to_dev(p["seed"][slots]), positions=to_dev(positions),
            repetition_penalty=to_dev(p["repetition_penalty"][slots]) if penalized else None,
            presence_penalty=to_dev(p["presence_penalty"][slots]) if penalized else None,
            frequency_penalty=to_dev(p["frequency_penalty"][slots]) if penalized else None,
            output_counts=self.output_counts[index] if penalized else None,
            prompt_mask=self.prompt_mask[index] if penalized else None,
            logit_bias=bias, num_top_logprobs=num_logprobs)
