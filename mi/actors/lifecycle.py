"""Process plumbing shared by the backend's child actors."""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), then close the race
    where the parent died before the request was made."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's teardown still kills its children
    if os.getppid() != parent_pid:
        sys.exit(1)


def ignore_interrupts() -> None:
    """Children are stopped by the supervisor (a Shutdown message, then SIGKILL), not by the
    terminal's Ctrl-C reaching the whole process group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
