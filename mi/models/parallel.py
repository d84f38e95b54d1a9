"""The tensor-parallel group one worker belongs to.

Model layers call `all_reduce` / `all_gather` through this object; with tp=1 they are no-ops, so
the single-rank path never touches torch.distributed.
"""
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when size > 1
    profile: bool = False  # accumulate wall time spent in collectives (CPU: they are synchronous)
    collective_seconds: float = 0.0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            start = time.perf_counter() if self.profile else 0.0
            dist.all_reduce(x, group=self.group)
            if self.profile:
                self.collective_seconds += time.perf_counter() - start
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size] in rank order."""
        if self.size == 1:
            return x
        start = time.perf_counter() if self.profile else 0.0
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        if self.profile:
            self.collective_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=-1)
