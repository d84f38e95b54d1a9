"""mi-bench's pure parts: metrics on synthetic timestamps, workload parsing, the load generator's
arrivals and concurrency, the flags, and the results JSON / plot helpers."""

import asyncio
import json
import math
import sys

import numpy as np
import pytest

from mi.bench import report
from mi.bench.__main__ import main
from mi.bench.cli import loads, parse_args
from mi.bench.load import Load, arrival_offsets, run_load
from mi.bench.metrics import RequestRecord, summarize
from mi.bench.roofline import measured_rates
from mi.bench.workload import Prompt, WorkloadError, load_dataset, random_prompts

# -- metrics -------------------------------------------------------------------------------------


def _records():
    return [
        # 4 tokens by usage in 3 chunks; prompt 10
        RequestRecord(start=0.0, end=3.0, chunk_times=[1.0, 1.5, 2.5], output_tokens=4, prompt_tokens=10),
        # no usage: its 2 chunks are its tokens; prompt 6
        RequestRecord(start=0.5, end=2.5, chunk_times=[2.0, 2.25], prompt_tokens=6),
        RequestRecord(start=1.0, end=1.2, error="HTTP 500: boom"),
    ]


def test_summary_of_synthetic_timestamps_is_exact():
    s = summarize(_records())
    approx = pytest.approx
    assert (s["num_requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["duration_s"] == approx(3.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (16, 6)
    assert s["request_throughput"] == approx(2 / 3)
    assert s["output_throughput"] == approx(2.0)
    assert s["total_token_throughput"] == approx(22 / 3)
    # TTFT: 1.0 s and 1.5 s
    assert s["ttft_ms"] == approx({"mean": 1250.0, "p50": 1250.0, "p90": 1450.0, "p99": 1495.0})
    # TPOT: (2.5 - 1.0) / 3 = 0.5 s and (2.25 - 2.0) / 1 = 0.25 s
    assert s["tpot_ms"] == approx({"mean": 375.0, "p50": 375.0, "p90": 475.0, "p99": 497.5})
    # ITL: gaps 0.5, 1.0 (first request) and 0.25 (second); none across the two requests
    assert s["itl_ms"] == approx({"mean": 1750.0 / 3, "p50": 500.0, "p90": 900.0, "p99": 990.0})
    assert s["e2el_ms"] == approx({"mean": 2500.0, "p50": 2500.0, "p90": 2900.0, "p99": 2990.0})


def test_summary_without_a_completed_request_has_no_latencies():
    s = summarize([RequestRecord(start=0.0, end=1.0, error="refused"), RequestRecord(start=0.0, end=2.0)])
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (0, 2, 0)
    assert s["errors"] == {"refused": 1, "no output tokens": 1}
    assert s["output_throughput"] == 0.0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert s[key] == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_a_one_token_request_has_no_tpot_and_no_itl():
    s = summarize([RequestRecord(start=0.0, end=0.5, chunk_times=[0.25], output_tokens=1)])
    assert s["ttft_ms"]["p50"] == pytest.approx(250.0)
    assert s["tpot_ms"]["mean"] is None and s["itl_ms"]["mean"] is None


# -- workload ------------------------------------------------------------------------------------


def test_dataset_reads_sharegpt_and_plain_lines_in_order(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"conversations": [{"from": "system", "value": "x"}, {"from": "human", "value": "first?"}]},
        {"prompt": "second"},
        {"conversations": [{"from": "user", "value": "third"}, {"from": "gpt", "value": "answer"}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    prompts = load_dataset(path, num_requests=5, output_len=7)
    assert [p.text for p in prompts] == ["first?", "second", "third", "first?", "second"]
    assert {p.output_len for p in prompts} == {7} and prompts[0].prompt_len is None


def test_dataset_may_be_one_json_array(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    assert [p.text for p in load_dataset(path, 2, 4)] == ["hi", "hi"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": ', "prompts.jsonl:2: not JSON"),
        ('{"text": "no prompt field"}', "prompts.jsonl:2: expected {'prompt': str} or ShareGPT"),
        ('{"conversations": [{"from": "gpt", "value": "no human turn"}]}', "prompts.jsonl:2: expected"),
        ('"a bare string"', "prompts.jsonl:2: expected"),
    ],
)
def test_a_bad_dataset_line_is_a_clear_error(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(WorkloadError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_dataset(path, 2, 4)


def test_an_empty_or_missing_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(WorkloadError, match="no prompts"):
        load_dataset(tmp_path / "empty.jsonl", 1, 1)
    with pytest.raises(WorkloadError, match="cannot read the dataset"):
        load_dataset(tmp_path / "absent.jsonl", 1, 1)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from mi.models.tiny import build_tokenizer

    return build_tokenizer()


def test_random_prompts_are_seeded_and_about_input_len_tokens(tiny_tokenizer):
    prompts = random_prompts(tiny_tokenizer, 16, 32, 5, seed=3)
    assert prompts == random_prompts(tiny_tokenizer, 16, 32, 5, seed=3)
    assert prompts != random_prompts(tiny_tokenizer, 16, 32, 5, seed=4)
    assert len({p.text for p in prompts}) == 16
    for p in prompts:
        assert p.prompt_len == len(tiny_tokenizer(p.text, add_special_tokens=False).input_ids)
        assert 30 <= p.prompt_len <= 34 and p.output_len == 5
        assert not set(tiny_tokenizer(p.text).input_ids[1:]) & set(tiny_tokenizer.all_special_ids)


# -- the load generator --------------------------------------------------------------------------


def test_poisson_arrivals_are_seeded_and_start_at_zero():
    offsets = arrival_offsets(1000, 4.0, seed=1)
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    assert np.array_equal(offsets, arrival_offsets(1000, 4.0, seed=1))
    assert offsets[-1] / 999 == pytest.approx(0.25, rel=0.1)  # mean gap 1 / rate
    assert not arrival_offsets(3, math.inf, seed=1).any()


def _max_in_flight(load: Load, num_prompts: int) -> tuple[int, list]:
    in_flight = peak = 0

    async def send(prompt):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return RequestRecord(start=0.0, end=1.0, chunk_times=[0.5], prompt_tokens=int(prompt.text))

    prompts = [Prompt(str(i), i, 1) for i in range(num_prompts)]
    records = asyncio.run(run_load(send, prompts, load, progress=False))
    return peak, [r.prompt_tokens for r in records]


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight():
    peak, order = _max_in_flight(Load(concurrency=3), 10)
    assert peak == 3 and order == list(range(10))


def test_an_infinite_rate_sends_everything_at_once():
    peak, order = _max_in_flight(Load(), 10)
    assert peak == 10 and order == list(range(10))


# -- flags and outputs ---------------------------------------------------------------------------


def test_serve_is_the_default_command_and_load_values_are_lists():
    args = parse_args(["--base-url", "http://x:1", "--concurrency", "1", "4"])
    assert args.command == "serve" and loads(args) == [Load(concurrency=1), Load(concurrency=4)]
    args = parse_args(["serve", "--request-rate", "2", "inf"])
    assert loads(args) == [Load(request_rate=2.0), Load(request_rate=math.inf)]
    assert [load.label for load in loads(args)] == ["2 req/s", "all at once"]
    assert loads(parse_args([])) == [Load()]


@pytest.mark.parametrize("flags", [["--concurrency", "0"], ["--request-rate", "0"], ["--no-such-flag"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(flags)
    assert exc.value.code == 2


def test_rate_and_concurrency_together_are_refused(capsys):
    assert main(["--request-rate", "1", "--concurrency", "2"]) == 2
    assert "--request-rate or --concurrency, not both" in capsys.readouterr().err


def test_random_prompts_without_a_tokenizer_are_refused(capsys):
    assert main(["--base-url", "http://127.0.0.1:9"]) == 2
    assert "random prompts need --tokenizer DIR" in capsys.readouterr().err


def test_a_bad_dataset_fails_before_sending(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("not json\n")
    assert main(["--dataset", str(tmp_path / "d.jsonl"), "--base-url", "http://127.0.0.1:9"]) == 2
    assert "d.jsonl:1: not JSON" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(report.PlotError, match=r"pip install 'mlinference\[bench\]'"):
        report.require_matplotlib()
    assert main(["--plot", "out.png", "--base-url", "http://127.0.0.1:9"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_arguments_turn_an_infinite_rate_into_a_string(tmp_path):
    args = parse_args(["--request-rate", "inf", "3"])
    report.write_json(tmp_path / "r.json", {"args": report.arguments(args)})
    assert json.loads((tmp_path / "r.json").read_text())["args"]["request_rate"] == ["inf", 3.0]


def test_measured_rates_come_from_mean_tpot():
    results = {
        "command": "serve",
        "points": [
            {"load": {"label": "concurrency 1"}, "tpot_ms": {"mean": 50.0}},
            {"load": {"label": "concurrency 8"}, "tpot_ms": {"mean": None}},
        ],
    }
    assert measured_rates(results) == [{"source": "serve: concurrency 1", "tok_s": 20.0}]
