"""The backend's unix socket: where it lives, and the checks both of its ends run on it.

A local client prefers the socket to TCP and sends it the backend's secret, so whoever can put a
socket at that path can collect the secret. Hence (issue 10):

| who                  | what                                                                 |
|----------------------|----------------------------------------------------------------------|
| `mi-backend` start   | `prepare_socket_dir`: creates the directory 0700, or refuses one     |
|                      | that is no directory, someone else's, or open to group/other         |
| the backend's serve  | `bind_private_socket`: replaces a stale socket, binds, chmod 0600,   |
|                      | all before `listen`, so no one connects to a socket not yet private  |
| each client connect  | `socket_problem` (directory and file pass the same checks) and then  |
|                      | `peer_problem` (SO_PEERCRED: the listening process runs as our uid)  |

A directory that fails the checks is refused, never chmod-ed: it may be one the user named with
MI_RUN_DIR (a shared /tmp, a home), whose mode is not ours to change. The directory itself is
`mi.config.socket_dir` (MI_RUN_DIR, else $XDG_RUNTIME_DIR/mi, else ~/.mi/run).

Invariant: a client that finds any check failing uses TCP 127.0.0.1:PORT instead, which only a
process that bound that port (the backend, proven by its own bind) answers.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

from mi.config import socket_dir

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its terminating NUL (Linux)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SocketError(ValueError):
    """The socket's directory or path must not be used; one line that says how to fix it."""


def socket_path(port: int, directory: Path | None = None) -> str:
    """The unix socket a backend serving TCP `port` also listens on (in `socket_dir()` unless
    `directory` is given)."""
    return str((directory or socket_dir()) / f"mi-backend-{port}.sock")


def prepare_socket_dir(directory: Path) -> None:
    """Create `directory` 0700 if absent; raise SocketError if it must not hold the socket."""
    longest = socket_path(65535, directory)
    if len(os.fsencode(longest)) > _UNIX_PATH_MAX:
        raise SocketError(
            f"the socket directory {directory} is too long for a unix socket path "
            f"({_UNIX_PATH_MAX} bytes at most): point MI_RUN_DIR at a shorter one"
        )
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # NOTE: mkdir's mode passes the umask; ours is exactly 0700
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketError(f"cannot create the socket directory {directory}: {exc.strerror}") from None
    problem = _dir_problem(directory)
    if problem:
        raise SocketError(problem)


def bind_private_socket(path: str) -> socket.socket:
    """A unix socket bound at `path` with mode 0600, not yet listening (the server calls listen).
    A file already there is ours (the directory is private) and left by a dead backend: replaced.
    Raises SocketError when the path cannot be used."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise SocketError(f"{path} is a directory, not a stale socket: remove it") from None
    except OSError as exc:
        raise SocketError(f"cannot remove the stale socket {path}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot create the unix socket {path}: {exc.strerror}") from None
    return sock


def socket_problem(path: str) -> str | None:
    """Why a client must not use the socket at `path` (its directory or the file fails the
    checks), or None. Raises FileNotFoundError when there is no socket there."""
    problem = _dir_problem(Path(path).parent)
    if problem:
        return problem
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    return _owner_mode_problem(path, st, "socket")


def peer_problem(sock, expected_uid: int | None = None) -> str | None:
    """Why the process at the other end of the connected unix socket `sock` must not get our
    secret (it runs as another user), or None. `expected_uid`: ours unless given."""
    expected_uid = os.geteuid() if expected_uid is None else expected_uid
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid != expected_uid:
        return f"the process listening on it runs as uid {uid}, not as this user (uid {expected_uid})"
    return None


def _dir_problem(directory: Path) -> str | None:
    try:
        st = directory.stat()
    except OSError as exc:
        return f"cannot reach the socket directory {directory}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"the socket directory {directory} is not a directory: remove it or set MI_RUN_DIR"
    return _owner_mode_problem(directory, st, "socket directory")


def _owner_mode_problem(path: str | Path, st: os.stat_result, kind: str) -> str | None:
    if st.st_uid != os.geteuid():
        return (
            f"the {kind} {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): "
            "remove it, or set MI_RUN_DIR to a directory of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        fix = "700" if kind == "socket directory" else "600"
        return f"the {kind} {path} is open to group/other users (mode {mode:03o}): run `chmod {fix} {path}`"
    return None
