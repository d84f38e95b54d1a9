"""The backend's `GET /v1/tokenizer` answer -> a Hugging Face tokenizer (frontend and SDK).

The files are written to a private temporary directory that is removed once the tokenizer is
loaded; `AutoTokenizer.from_pretrained` runs without `trust_remote_code`, so nothing in them can
execute code. transformers is imported on first use only (`import mi` stays light).
"""

from __future__ import annotations

import os
import tempfile

from mi.api.errors import ApiError

__all__ = ["load_tokenizer_files"]

_MAX_FILES = 32


def _bad(what: str) -> ApiError:
    return ApiError(502, f"The backend sent invalid tokenizer files ({what}).", code="bad_backend_response")


def load_tokenizer_files(body: object):
    """Load the tokenizer from `{"files": {name: text}}`; raise ApiError 502 on a bad answer."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, dict) or not files or len(files) > _MAX_FILES:
        raise _bad("no files")
    for name, text in files.items():
        # NOTE: names come from the network: plain file names only, nothing outside the dir.
        if not isinstance(name, str) or not name or name != os.path.basename(name) \
                or name.startswith(".") or "\0" in name or not isinstance(text, str):
            raise _bad(f"file name {str(name)[:80]!r}")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mi-tokenizer-") as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise _bad(type(exc).__name__) from None
