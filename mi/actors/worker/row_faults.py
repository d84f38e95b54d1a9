"""Request-scoped faults in rank 0's sampling: a batch that raises is redone row by row.

Invariants:
- Rows are independent (the sampler is row-local and its noise counter-based), so a row sampled
  alone gets exactly what the batch would have given it: survivors see no difference.
- Only the rows that raise again alone fail (with a fixed reason; the traceback goes to the log).
- When every row raises, the fault is not a request's (a device error, a bug in the batch code):
  the batch's error propagates and fails the replica, as for any engine fault. A batch of one
  row therefore always fails the replica: nothing tells its two kinds of fault apart.
"""

import logging
from collections.abc import Callable

import torch

from mi.ops.sampling import SamplerOutput

log = logging.getLogger("mi.worker")

SAMPLING_FAILED = "The server failed while sampling this request."


def sample_rows_alone(
    num_rows: int, sample_row: Callable[[int], SamplerOutput], batch_error: Exception
) -> SamplerOutput:
    """One SamplerOutput for `num_rows` rows from `sample_row(row)` (a one-row output each), after
    the batch raised `batch_error`; the rows that raise are in `failed_rows`."""
    outputs: list[SamplerOutput | None] = []
    failed: dict[int, str] = {}
    for row in range(num_rows):
        try:
            out = sample_row(row)
        except Exception:
            log.warning(
                "sampling row %d of %d failed alone; failing its request", row, num_rows, exc_info=True
            )
            out, failed[row] = None, SAMPLING_FAILED
        else:
            if out.failed_rows:
                failed[row] = out.failed_rows[0]
        outputs.append(out)
    if all(out is None for out in outputs):
        raise batch_error
    return _stack(outputs, failed)


def _stack(outputs: list[SamplerOutput | None], failed: dict[int, str]) -> SamplerOutput:
    """Rows in order; a row that raised gets token 0 and NaN logprobs (meaningless: it failed)."""
    model = next(out for out in outputs if out is not None)

    def column(name: str) -> torch.Tensor | None:
        like = getattr(model, name)
        if like is None:
            return None
        filler = torch.full_like(like, float("nan") if like.is_floating_point() else 0)
        return torch.cat([filler if out is None else getattr(out, name) for out in outputs])

    return SamplerOutput(
        column("token_ids"), column("logprobs"), column("top_ids"), column("top_logprobs"), failed
    )
