"""`python -m mi.bench` against the real servers of the session (the tiny Llama): serve through the
frontend (completions and chat), offline straight to the backend, an unreachable server,
roofline, and compare (mi and HF; the other peers are not installed here)."""

import json
import subprocess
import sys

import pytest
import torch

from servers import REPO, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS = ("mean", "p50", "p90", "p99")


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    quiet = [] if args[0] == "roofline" else ["--no-progress"]  # roofline has no progress bar
    return subprocess.run(
        [sys.executable, "-m", "mi.bench", *args, *quiet],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def check_point(point: dict, num_requests: int, output_len: int) -> None:
    """Every figure of a point, with the values a run of `num_requests` x `output_len` must give."""
    assert (point["num_requests"], point["completed"], point["failed"]) == (num_requests, num_requests, 0)
    assert point["errors"] == {}
    assert point["total_output_tokens"] == num_requests * output_len
    assert point["total_input_tokens"] >= num_requests  # at least BOS each
    assert point["duration_s"] > 0
    assert point["output_throughput"] == pytest.approx(point["total_output_tokens"] / point["duration_s"])
    assert point["request_throughput"] == pytest.approx(num_requests / point["duration_s"])
    assert point["total_token_throughput"] > point["output_throughput"]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = point[key]
        assert set(stats) == set(STATS)
        assert all(stats[s] > 0 for s in STATS), (key, stats)
        assert stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert point["ttft_ms"]["p99"] <= point["e2el_ms"]["p99"]
    assert len(point["requests"]) == num_requests
    assert all(r["output_tokens"] == output_len and r["error"] is None for r in point["requests"])


def test_serve_through_the_frontend_writes_every_figure_and_a_plot(served_model, tmp_path):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    result = bench(
        "serve",
        "--base-url", served_model.frontend_url + "/v1",
        "--tokenizer", str(served_model.hf_dir),
        "--num-requests", "4", "--input-len", "8", "--output-len", "8",
        "--concurrency", "2", "4", "--ignore-eos",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["command"] == "serve"
    assert doc["args"]["concurrency"] == [2, 4] and doc["args"]["ignore_eos"] is True
    assert doc["workload"]["num_requests"] == 4 and doc["workload"]["output_len"] == [8]
    assert all(7 <= n <= 10 for n in doc["workload"]["prompt_lens"])
    assert [p["load"] for p in doc["points"]] == [
        {"label": "concurrency 2", "request_rate": None, "concurrency": 2},
        {"label": "concurrency 4", "request_rate": None, "concurrency": 4},
    ]
    for point in doc["points"]:
        check_point(point, 4, 8)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "Output token throughput (tok/s):" in result.stdout and "P99 ITL:" in result.stdout


def test_serve_chat_on_a_sharegpt_dataset_at_a_poisson_rate(served_model, tmp_path):
    dataset = tmp_path / "sharegpt.jsonl"
    lines = [
        {"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(2)
    ]
    dataset.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "chat.json"
    result = bench(
        "--base-url", served_model.frontend_url, "--endpoint", "chat",
        "--dataset", str(dataset), "--num-requests", "3", "--output-len", "5",
        "--request-rate", "50", "--ignore-eos", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["workload"]["source"] == f"dataset {dataset}"
    (point,) = doc["points"]
    assert point["load"] == {"label": "50 req/s", "request_rate": 50.0, "concurrency": None}
    check_point(point, 3, 5)


def test_offline_goes_straight_to_the_backend(served_model, tmp_path):
    out = tmp_path / "offline.json"
    result = bench(
        "offline", "--backend", str(served_model.backend_port),  # the tokenizer comes from it
        "--num-requests", "4", "--input-len", "8", "--output-len", "8",
        "--concurrency", "2", "--ignore-eos", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["command"] == "offline"
    (point,) = doc["points"]
    check_point(point, 4, 8)
    assert all(r["prompt_tokens"] >= 8 for r in point["requests"])  # the prompt ids with BOS


def test_an_unreachable_server_counts_failed_requests_and_exits_1(served_model, tmp_path):
    out = tmp_path / "down.json"
    result = bench(
        "--base-url", f"http://127.0.0.1:{free_port()}", "--tokenizer", str(served_model.hf_dir),
        "--num-requests", "3", "--input-len", "4", "--output-len", "4", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 1
    assert "mi-bench: 3 of 3 requests failed; first error: ClientConnectorError" in result.stderr
    (point,) = json.loads(out.read_text())["points"]
    assert (point["completed"], point["failed"], point["total_output_tokens"]) == (0, 3, 0)
    ((message, count),) = point["errors"].items()
    assert count == 3 and "Cannot connect" in message
    assert point["ttft_ms"]["p50"] is None


def test_requests_the_server_refuses_are_counted_with_its_message(served_model, tmp_path):
    out = tmp_path / "refused.json"
    result = bench(
        "--base-url", served_model.frontend_url, "--tokenizer", str(served_model.hf_dir),
        "--num-requests", "2", "--input-len", "4", "--output-len", "4000", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 1
    (point,) = json.loads(out.read_text())["points"]
    assert (point["completed"], point["failed"], sum(point["errors"].values())) == (0, 2, 2)
    for message in point["errors"]:  # the message names each prompt's own length
        assert message.startswith("HTTP 400: ") and "maximum context length is 2048 tokens" in message


def test_roofline_measures_this_machine_and_the_model(served_model, tmp_path):
    out = tmp_path / "roofline.json"
    result = bench(
        "roofline", "--model", str(served_model.mi_dir), "--measured", "100",
        "--gemv-size", "1024", "--gemm-size", "128", "--repeats", "3", "--threads", "1",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["num_threads"] == 1
    assert doc["gemv"]["bytes"] == 1024 * 1024 * 4 and doc["gemv"]["gb_per_s"] > 0
    assert doc["gemm"]["gflop_per_s"] > 0
    # Every weight but the input embedding, float32, as the converted rank file holds them
    # (the vocabulary padded to 512 rows).
    from safetensors.torch import load_file

    tensors = load_file(served_model.mi_dir / "rank-0.safetensors")
    expected = sum(t.numel() * 4 for name, t in tensors.items() if name != "embed_tokens.weight")
    assert doc["model"]["bytes_per_token"] == expected
    assert doc["roofline_tok_s"] == pytest.approx(doc["gemv"]["gb_per_s"] * 1e9 / expected)
    ((measured),) = doc["measured"]
    assert measured["fraction_of_roofline"] == pytest.approx(100 / doc["roofline_tok_s"])
    assert "roofline batch-1 decode:" in result.stdout


def test_roofline_of_an_hf_model_with_tied_embeddings_reads_the_embedding(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = tiny_model_dirs("qwen2")  # tie_word_embeddings: no lm_head tensor
    out = tmp_path / "r.json"
    result = bench(
        "roofline",
        "--model",
        str(hf_dir),
        "--gemv-size",
        "256",
        "--gemm-size",
        "64",
        "--repeats",
        "3",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    doc = json.loads(out.read_text())
    assert doc["model"]["tied_embeddings"] is True
    assert doc["model"]["bytes_per_token"] == 4 * sum(p.numel() for p in model.parameters())


def test_roofline_needs_a_model_for_a_measured_rate():
    result = bench("roofline", "--measured", "10")
    assert result.returncode == 2 and "--measured and --results need --model" in result.stderr


def test_compare_runs_mi_and_hf_and_reports_the_peers_not_run(tiny_model_dirs, tmp_path):
    out = tmp_path / "compare.json"
    result = bench(
        "compare", "--model", str(tiny_model_dirs("llama")), "--hf",
        "--llamacpp-python", sys.executable, "--gguf", str(tmp_path / "absent.gguf"),  # no llama_cpp here
        "--num-requests", "2", "--input-len", "4", "--output-len", "4", "--concurrency", "2",
        "--ignore-eos", "--work-dir", str(tmp_path / "work"), "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(out.read_text())
    systems = doc["systems"]
    for name in ("mi", "mi offline"):
        (point,) = systems[name]
        assert (point["completed"], point["total_output_tokens"]) == (2, 8)
    (hf,) = systems["HF"]
    assert hf["total_output_tokens"] == 8 and hf["output_throughput"] > 0 and hf["batch_size"] == 2
    assert systems["vLLM"] == "not run (no --vllm-python)"
    assert systems["llama.cpp"] == f"not run (failed to start: see {tmp_path / 'work'})"
    assert "llama.cpp exited (1)" in result.stderr and "No module named" in result.stderr
    assert "| random tokens, 4 -> 4, concurrency 2 | output tok/s (higher is better) |" in result.stdout
    assert "| not run | not run |" in result.stdout  # the vLLM and llama.cpp cells
    assert "mi / HF" in result.stdout and "serve / offline output tok/s, concurrency 2:" in result.stdout
    assert (tmp_path / "work" / "mi-backend.log").is_file() and (tmp_path / "work" / "mi-tp1").is_dir()


def test_sigterm_stops_the_servers_compare_started(tiny_model_dirs, tmp_path):
    """A benchmark stopped with SIGTERM (a CI timeout, `kill`) leaves no mi-backend behind."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen(
        [sys.executable, "-m", "mi.bench", "compare", "--model", str(tiny_model_dirs("llama")),
         "--num-requests", "1000", "--input-len", "4", "--output-len", "64", "--concurrency", "1",
         "--ignore-eos", "--work-dir", str(tmp_path / "work"), "--no-progress"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        servers = []
        while time.monotonic() < deadline and len(servers) < 2:
            servers = [
                child
                for child in psutil.Process(proc.pid).children(recursive=True)
                if any(name in " ".join(child.cmdline()) for name in ("mi.backend", "mi.frontend"))
            ]
            time.sleep(0.5)
        assert len(servers) == 2, "compare did not start mi-backend and mi-frontend"
        time.sleep(2)  # let the load run
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, proc.stderr.read()
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, f"still running after compare exited: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
