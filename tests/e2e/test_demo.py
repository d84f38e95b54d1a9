"""scripts/demo.sh (the README's quick start) answers a factual question with the real model.

The suite's own environment stands in for the one scripts/setup.sh builds (MI_DEMO_SETUP=0), and
the session's SmolLM2 file for the pip install (MI_DEMO_GGUF), so the venv is left as it is.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from servers import REPO


def _demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=REPO,
        env={**os.environ, "PATH": path, "MI_DEMO_SETUP": "0", "MI_DEMO_DIR": str(tmp_path / "demo"), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.real_model
def test_demo_answers_the_capital_of_france(smollm2_gguf, tmp_path):
    result = _demo(tmp_path, MI_DEMO_GGUF=str(smollm2_gguf))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Q: What is the capital of France?" in lines
    [answer] = [line for line in lines if line.startswith("A: ")]
    assert "Paris" in answer
    [streamed] = [line for line in lines if line.startswith("The three primary colors are")]
    assert len(streamed) > len("The three primary colors are") + 20  # the streamed pieces arrived
    assert lines[-1].startswith("== done")


def test_demo_refuses_an_unknown_model(tmp_path):
    result = _demo(tmp_path, MI_DEMO_MODEL="gpt-5")
    assert result.returncode == 2
    assert result.stderr.strip() == "MI_DEMO_MODEL must be smollm2 (the default) or tiny, not 'gpt-5'"
