"""The three commands exist as console scripts, bin/ wrappers and `python -m` modules."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "mi-convert": "mi.convert",
    "mi-backend": "mi.backend.launch",
    "mi-frontend": "mi.frontend.launch",
}


@pytest.mark.parametrize("name", COMMANDS)
def test_each_spelling_shows_help(name):
    spellings = [[str(REPO / "bin" / name)], [sys.executable, "-m", COMMANDS[name]]]
    script = shutil.which(name, path=str(Path(sys.executable).parent))
    assert script, f"console script {name} is not installed next to {sys.executable}"
    spellings.append([script])
    for argv in spellings:
        result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (argv, result.stderr)
        assert "usage:" in result.stdout
        assert "--help" in result.stdout


def test_unknown_flag_is_an_error():
    result = subprocess.run(
        [sys.executable, "-m", "mi.backend.launch", "--model", "x", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr
