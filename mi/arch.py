"""The one architecture check of the backend: it runs only where its memory ordering holds.

The rings (mi/shm/ring.py) and the shared-memory all-reduce publish data with plain stores: the
bytes first, then the position or flag that says they are there, and a reader trusts the bytes
once it sees that position. That is correct only under x86-64's total store order; on a weakly
ordered CPU (aarch64, POWER, RISC-V) a reader may see the position before the bytes. Until
those writes get explicit fences, `mi-backend` refuses to start anywhere else (issue 10).
"""

import platform

_ORDERED_MACHINES = frozenset({"x86_64", "amd64"})  # platform.machine(): Linux / Windows, BSD


def host_machine() -> str:
    """This host's machine name (`platform.machine()`); a test replaces it to take the refusal path."""
    return platform.machine()


def check_memory_ordering() -> None:
    """Raise ValueError (one line, naming the reason) unless this host is x86-64."""
    machine = host_machine()
    if machine.lower() not in _ORDERED_MACHINES:
        raise ValueError(
            f"this host is {machine or 'an unknown architecture'}, not x86-64: the backend's shared-memory "
            "rings and all-reduce rely on x86-64 store ordering and have no explicit memory fences "
            "yet, so they could read torn messages here (issue 10); refusing to start"
        )
