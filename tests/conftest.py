"""Shared fixtures: tiny models (built once per session) and a served Llama model."""
import pytest

from servers import ServedModel, start_backend, start_frontend


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
