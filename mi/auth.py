"""The backend's shared secret (the seed's "certificate file"; where it is: `mi.config.cert_path`).

The backend creates it on first start (mode 0600, in a 0700 directory) and requires it as
`Authorization: Bearer SECRET` on every request but /health; the frontend and the SDK read it.

Invariants: a secret file is never overwritten, and appears whole (written under a private name,
then hard-linked into place). `check_cert` is what `mi-backend` and `mi-frontend` run at start:

| the file / its directory               | verdict                                              |
|----------------------------------------|------------------------------------------------------|
| absent                                 | fine (the backend creates it; a client waits for it) |
| empty, unreadable, not a regular file  | CertError                                            |
| owned by another user                  | CertError                                            |
| any group/other permission bit         | CertError: chmod 600                                 |
| directory writable by group/other      | CertError: chmod 700 (others could swap the file)    |
| directory readable by group/other      | a warning: chmod 700                                 |

A readable directory only warns: `--cert` / `MI_CERT` are documented to take any path, and a cert
kept in an ordinary 0755 directory (a home, /etc/mi) is still safe while the file itself is 0600;
such a directory shows others only the file's name.
"""

import hmac
import os
import secrets
import stat
from pathlib import Path


class CertError(ValueError):
    """A cert file that must not be used; the message is one line and says how to fix it."""


def read_secret(path: Path) -> str | None:
    """The secret in `path`, or None when the file does not exist or is empty (a client's view:
    it sends no secret and the backend answers 401)."""
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    return secret or None


def check_cert(path: Path) -> list[str]:
    """Raise CertError if the cert file at `path` must not be used; return the warnings to print."""
    warnings = _check_directory(path.parent)
    if os.path.lexists(path):
        _check_file(path)
        _read(path)
    return warnings


def load_or_create_secret(path: Path) -> str:
    """The secret in `path`, creating the file first if it is absent (never overwriting one).
    Raises CertError as `check_cert` does, OSError when the file cannot be created."""
    if not os.path.lexists(path):
        _create(path)
    check_cert(path)
    return _read(path)


def is_authorized(header: str | None, secret: str) -> bool:
    """Constant-time check of an `Authorization: Bearer ...` header."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), secret.encode())


def _check_directory(directory: Path) -> list[str]:
    try:
        mode = stat.S_IMODE(directory.stat().st_mode)
    except FileNotFoundError:
        return []  # created 0700 with the file
    except OSError as exc:
        raise CertError(f"cannot reach the cert directory {directory}: {exc.strerror}") from None
    if mode & 0o022:
        raise CertError(
            f"the cert directory {directory} is writable by group/other users (mode {mode:03o}), who "
            f"could replace the secret: run `chmod 700 {directory}` or keep the cert elsewhere"
        )
    if mode & 0o077:
        return [
            f"the cert directory {directory} is readable by group/other users (mode {mode:03o}); "
            f"run `chmod 700 {directory}`"
        ]
    return []


def _check_file(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise CertError(f"cannot read the cert file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CertError(f"the cert file {path} is not a regular file: remove it and start the backend again")
    if st.st_uid != os.geteuid():
        raise CertError(
            f"the cert file {path} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}): "
            "remove it, or point --cert / MI_CERT at a file of your own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CertError(
            f"the cert file {path} is open to group/other users (mode {mode:03o}): run `chmod 600 {path}`"
        )


def _read(path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise CertError(f"the cert file {path} is not text: remove it and start the backend again") from None
    except OSError as exc:
        raise CertError(f"cannot read the cert file {path}: {exc.strerror}") from None
    if not secret:
        raise CertError(
            f"the cert file {path} is empty: remove it (the backend then creates a new secret) "
            "or write the backend's secret into it"
        )
    return secret


def _create(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        # NOTE: link, not rename: a file another backend put there meanwhile is kept, not replaced.
        os.link(private, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(private)
