"""The tensor-parallel group one worker belongs to.

Model layers call `all_reduce` / `all_gather` through this object; with tp=1 they are no-ops, so
the single-rank path never touches torch.distributed. On CPU, collectives go through a shared
memory segment (`mi.shm.allreduce`) when the tensor fits its slots, and through torch.distributed
(gloo) otherwise; the choice depends only on shape and dtype, so every rank makes the same one.
"""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mi.shm.allreduce import ShmCollectives

_SHM_DTYPES = (torch.float32, torch.float16)


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when size > 1
    shm: ShmCollectives | None = None  # CPU only
    profile: bool = False  # accumulate wall time spent in collectives (CPU: they are synchronous)
    collective_seconds: float = 0.0

    def _use_shm(self, x: torch.Tensor) -> bool:
        return (
            self.shm is not None
            and x.device.type == "cpu"
            and x.dtype in _SHM_DTYPES
            and x.is_contiguous()
            and x.numel() * x.element_size() <= self.shm.slot_bytes
        )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            start = time.perf_counter() if self.profile else 0.0
            if self._use_shm(x):
                self.shm.all_reduce(x.numpy())
            else:
                dist.all_reduce(x, group=self.group)
            if self.profile:
                self.collective_seconds += time.perf_counter() - start
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size] in rank order."""
        if self.size == 1:
            return x
        start = time.perf_counter() if self.profile else 0.0
        x = x.contiguous()
        if self._use_shm(x):
            out = torch.from_numpy(self.shm.all_gather(x.numpy()))
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.group)
            out = torch.cat(parts, dim=-1)
        if self.profile:
            self.collective_seconds += time.perf_counter() - start
        return out
