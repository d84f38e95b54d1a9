"""The backend's `GET /v1/tokenizer` answer -> a Hugging Face tokenizer (frontend and SDK).

The files are written to a private temporary directory that is removed once the tokenizer is
loaded; `AutoTokenizer.from_pretrained` runs without `trust_remote_code`, so nothing in them can
execute code. transformers is imported on first use only (`import mi` stays light).
"""

from __future__ import annotations

import os
import tempfile

from mi.api.backend_answers import TokenizerFiles
from mi.api.errors import ApiError

__all__ = ["load_tokenizer_files"]


def _bad(what: str) -> ApiError:
    return ApiError(502, f"The backend sent invalid tokenizer files ({what}).", code="bad_backend_response")


def load_tokenizer_files(answer: TokenizerFiles):
    """Load the tokenizer from the backend's files; raise ApiError 502 on a bad file name or a
    set of files transformers cannot load."""
    files = answer.files
    for name in files:
        # NOTE: names come from the network: plain file names only, nothing outside the dir.
        if not name or name != os.path.basename(name) or name.startswith(".") or "\0" in name:
            raise _bad(f"file name {name[:80]!r}")
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mi-tokenizer-") as tmp:
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise _bad(type(exc).__name__) from None
