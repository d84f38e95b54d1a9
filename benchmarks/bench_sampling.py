"""The sampler before and after it raced on candidates, side by side in one run.

    python benchmarks/bench_sampling.py [--repeats 25] [--threads 1] [--vocab 32000 49152]

"old" is the frozen pre-candidate sampler (tests/sampling_oracle.py), "new" is mi.ops.sample.
For each case, batch size and vocabulary: ms per call, min and median of the repeats (old and
new interleaved so that both see the same machine), and old / new of the minima, the figure a
busy machine disturbs least. Logits are 4 * N(0, 1) (at
temperature 0.8, a top_p 0.9 nucleus of ~10 tokens); every row of a batch has the same
parameters and its own seed. Each case also checks that both give the same tokens.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sampling_oracle  # noqa: E402

from mi.ops.sampling import SamplingTensors, sample  # noqa: E402

CASES = {
    "greedy": {"temperature": 0.0},
    "temperature only": {},
    "top_k 50": {"top_k": 50},
    "top_k 50 + top_p 0.9 + min_p 0.05": {"top_k": 50, "top_p": 0.9, "min_p": 0.05},
    "top_p 0.9": {"top_p": 0.9},
    "half temperature only, half top_k 50 + top_p 0.9": {"top_k": 50, "top_p": 0.9, "half": True},
    "everything (+ penalties, bias, logprobs 5)": {"top_k": 50, "top_p": 0.9, "min_p": 0.05, "all": True},
}


def batch(num_rows: int, vocab_size: int, params: dict, gen: torch.Generator):
    params = dict(params)
    everything, half = params.pop("all", False), params.pop("half", False)
    values = {"temperature": 0.8, "top_p": 1.0, "top_k": 0, "min_p": 0.0, **params}
    fields = {
        name: torch.full((num_rows,), value, dtype=torch.int64 if name == "top_k" else torch.float32)
        for name, value in values.items()
    }
    if half:  # the first half of the rows without filters
        fields["top_k"][: num_rows // 2], fields["top_p"][: num_rows // 2] = 0, 1.0
    fields["seeds"] = torch.randint(0, 2**62, (num_rows,), generator=gen)
    fields["positions"] = torch.randint(0, 4096, (num_rows,), generator=gen)
    if everything:
        fields["repetition_penalty"] = torch.full((num_rows,), 1.1)
        fields["presence_penalty"] = torch.full((num_rows,), 0.3)
        fields["frequency_penalty"] = torch.full((num_rows,), 0.3)
        fields["output_counts"] = (torch.rand(num_rows, vocab_size, generator=gen) < 0.004).int()
        fields["prompt_mask"] = torch.rand(num_rows, vocab_size, generator=gen) < 0.004
        rows = torch.arange(num_rows).repeat_interleave(8)
        tokens = torch.randint(0, vocab_size, (8 * num_rows,), generator=gen)
        bias = torch.where(torch.arange(8 * num_rows) % 2 == 0, float("-inf"), 2.0)
        fields["logit_bias"] = (rows, tokens, bias)
        fields["num_top_logprobs"] = 5
    logits = torch.randn(num_rows, vocab_size, generator=gen) * 4
    return logits, SamplingTensors(**fields)


def ms_of(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 49152])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} calls each, ms per call")
    print("| case | V | B | old ms, min / median | new ms, min / median | old / new (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for vocab_size in args.vocab:
        for name, params in CASES.items():
            for num_rows in args.batch:
                logits, st = batch(num_rows, vocab_size, params, gen)
                if not torch.equal(
                    sample(logits, st).token_ids, sampling_oracle.sample(logits, st).token_ids
                ):
                    raise SystemExit(f"{name}, V={vocab_size}, B={num_rows}: old and new tokens differ")
                old, new = [], []
                for _ in range(args.repeats):  # interleaved
                    old.append(ms_of(sampling_oracle.sample, logits, st))
                    new.append(ms_of(sample, logits, st))
                ratio = min(old) / min(new)
                old_ms = f"{min(old):.2f} / {statistics.median(old):.2f}"
                new_ms = f"{min(new):.2f} / {statistics.median(new):.2f}"
                print(f"| {name} | {vocab_size} | {num_rows} | {old_ms} | {new_ms} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
