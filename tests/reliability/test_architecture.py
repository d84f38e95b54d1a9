"""`mi-backend` refuses to start on a CPU without x86-64 store ordering (mi/arch.py): its rings
and shared-memory all-reduce have no explicit fences yet. The real entry point runs in a fresh
interpreter whose `mi.arch.host_machine` reports another machine."""

import subprocess
import sys

import pytest

from servers import REPO, free_port

_MAIN_ON = """
import sys
import mi.arch
mi.arch.host_machine = lambda: sys.argv[1]
from mi.backend.launch import main
sys.exit(main(sys.argv[2:]))
"""


def _backend_on(machine: str, model_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _MAIN_ON, machine, "--model", str(model_dir), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", "i686", ""])
def test_backend_refuses_a_host_that_is_not_x86_64(machine, tmp_path):
    result = _backend_on(machine, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mi-backend: error: this host is "), result.stderr
    for needle in (machine, "x86-64 store ordering", "memory fences", "issue 10", "refusing to start"):
        assert needle in lines[0]


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "amd64"])
def test_backend_starts_its_checks_on_x86_64(machine, tmp_path):
    result = _backend_on(machine, tmp_path)
    # past the architecture check, on to the model (there is none here)
    assert result.returncode == 2 and "is not a converted model" in result.stderr, result.stderr
    assert "store ordering" not in result.stderr
