"""Shared-memory all-reduce / all-gather across real processes."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from mi.shm.allreduce import ShmCollectives

_CHILD = r"""
import json, sys
import numpy as np
from mi.shm.allreduce import ShmCollectives
desc, rank, seed = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
c = ShmCollectives.attach(desc, rank)
rng = np.random.default_rng(seed)
sums = []
for step in range(200):
    n = int(rng.integers(1, 5000))                       # same sizes on every rank (shared seed)
    local = np.random.default_rng(seed * 1000 + step * 10 + rank).standard_normal(n).astype(np.float32)
    c.all_reduce(local)
    sums.append(local)
gathered = c.all_gather(np.full((2, 3), rank, dtype=np.float32))
np.save(sys.stdout.buffer, np.concatenate(sums + [gathered.reshape(-1)]))
"""


def test_all_reduce_and_all_gather_across_processes():
    num_ranks, seed = 3, 7
    print(f"seed {seed}")
    coll = ShmCollectives.create(num_ranks, 5000 * 4)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(coll.describe()), str(r), str(seed)],
            stdout=subprocess.PIPE,
            pass_fds=coll.fds(),
        )
        for r in range(num_ranks)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        outputs.append(np.load(io.BytesIO(out)))
    coll.close()
    # Every rank holds bitwise the same result (tensor-parallel ranks must not drift).
    for other in outputs[1:]:
        assert np.array_equal(outputs[0], other)
    rng = np.random.default_rng(seed)
    offset = 0
    for step in range(200):
        n = int(rng.integers(1, 5000))
        parts = [
            np.random.default_rng(seed * 1000 + step * 10 + r).standard_normal(n).astype(np.float32)
            for r in range(num_ranks)
        ]
        np.testing.assert_allclose(outputs[0][offset : offset + n], sum(parts), rtol=1e-6, atol=1e-6)
        offset += n
    assert outputs[0][offset:].reshape(2, 3 * num_ranks).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2


def test_fits_and_bad_descriptions():
    coll = ShmCollectives.create(2, 100)
    assert coll.fits(np.zeros(32, np.float32)) and not coll.fits(np.zeros(33, np.float32))
    with pytest.raises(ValueError):
        ShmCollectives.attach({"mem_fd": coll.fds()[0]}, 0)
    with pytest.raises(ValueError):
        ShmCollectives.attach(coll.describe(), 2)
    with pytest.raises(ValueError):
        ShmCollectives.attach({**coll.describe(), "slot_bytes": 4096}, 0)
    coll.close()
