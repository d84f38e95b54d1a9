"""The backend's shared secret (the seed's "certificate file"; where it is: `mi.config.cert_path`).

The backend creates it on first start (mode 0600, in a 0700 directory) and requires it as
`Authorization: Bearer SECRET` on every request but /health; the frontend and the SDK read it.
"""

import hmac
import os
import secrets
from pathlib import Path


def read_secret(path: Path) -> str | None:
    """The secret in `path`, or None when the file does not exist."""
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return None
    return secret or None


def load_or_create_secret(path: Path) -> str:
    """Reads the secret, creating the file first if it is absent (never overwriting one)."""
    secret = read_secret(path)
    if secret is not None:
        return secret
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another backend created it just now
        return load_or_create_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return load_or_create_secret(path)


def is_authorized(header: str | None, secret: str) -> bool:
    """Constant-time check of an `Authorization: Bearer ...` header."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), secret.encode())
