"""mi-bench's clients against fake servers in this process: what a record holds for each kind of
answer (usage or counted chunks, HTTP errors, error events, cut and malformed streams), and the
server starters' refusals."""

import asyncio
import sys

import pytest
from aiohttp import web

from mi.bench.offline import BackendClient
from mi.bench.openai_client import OpenAIClient, Target
from mi.bench.servers import ServerError, start_llamacpp, start_vllm
from mi.bench.workload import Prompt

PROMPT = Prompt("hello", 2, 3)


def _sse(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


ANSWERS = {
    # path: (status, body)
    "usage": (
        200,
        _sse(
            b'{"choices":[{"index":0,"text":"a"}]}',
            b'{"choices":[{"index":0,"text":"bc","finish_reason":"length"}]}',
            b'{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}',
            b"[DONE]",
        ),
    ),
    "no-usage": (
        200,
        _sse(
            b'{"choices":[{"text":"a"}]}',
            b'{"choices":[{"text":""}]}',
            b'{"choices":[{"text":"b"}]}',
            b"[DONE]",
        ),
    ),
    "chat": (
        200,
        _sse(
            b'{"choices":[{"delta":{"role":"assistant","content":""}}]}',
            b'{"choices":[{"delta":{"content":"x"}}]}',
            b'{"choices":[{"delta":{"content":"y"}}]}',
            b"[DONE]",
        ),
    ),
    "http-error": (400, b'{"error":{"message":"max_tokens is too large","type":"invalid_request_error"}}'),
    "http-error-text": (502, b"Bad Gateway"),
    "error-event": (200, _sse(b'{"choices":[{"text":"a"}]}', b'{"error":{"message":"backend died"}}')),
    "cut": (200, _sse(b'{"choices":[{"text":"a"}]}')),
    "malformed": (200, _sse(b"{not json")),
}


@pytest.fixture
def fake_server():
    """Its loop, and the URL of a server answering POST /<case>/v1/completions with ANSWERS[case]."""
    loop = asyncio.new_event_loop()

    async def handler(request: web.Request) -> web.Response:
        status, body = ANSWERS[request.match_info["case"]]
        return web.Response(status=status, body=body, content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/{case}/v1/completions", handler)
    app.router.add_post("/{case}/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    yield loop, f"http://127.0.0.1:{port}"
    loop.run_until_complete(runner.cleanup())
    loop.close()


def _send(fake_server, case: str, endpoint: str = "completions"):
    loop, url = fake_server

    async def go():
        async with OpenAIClient(Target(f"{url}/{case}/v1", endpoint=endpoint)) as client:
            return await client.send(PROMPT)

    return loop.run_until_complete(go())


def test_usage_counts_the_tokens_and_each_text_chunk_is_a_timestamp(fake_server):
    record = _send(fake_server, "usage")
    assert record.error is None
    assert (record.output_tokens, record.num_output_tokens, record.prompt_tokens) == (3, 3, 5)
    assert (
        len(record.chunk_times) == 2
        and record.start < record.chunk_times[0] < record.chunk_times[1] <= record.end
    )


def test_without_usage_the_text_chunks_are_counted(fake_server):
    record = _send(fake_server, "no-usage")
    assert record.error is None and record.output_tokens is None
    assert record.num_output_tokens == 2 and record.prompt_tokens == 2  # the workload's count


def test_chat_deltas_count_and_the_role_chunk_does_not(fake_server):
    record = _send(fake_server, "chat", endpoint="chat")
    assert record.error is None and len(record.chunk_times) == 2


@pytest.mark.parametrize(
    "case, error",
    [
        ("http-error", "HTTP 400: max_tokens is too large"),
        ("http-error-text", "HTTP 502: Bad Gateway"),
        ("error-event", "stream error: backend died"),
        ("cut", "the stream ended before [DONE]"),
        ("malformed", "malformed SSE event: b'{not json'"),
    ],
)
def test_a_failing_request_is_a_record_with_its_error(fake_server, case, error):
    assert _send(fake_server, case).error == error


def test_a_refused_connection_is_a_record_too():
    from mi.bench.servers import free_port

    async def go():
        async with OpenAIClient(Target(f"http://127.0.0.1:{free_port()}")) as client:
            return await client.send(PROMPT)

    record = asyncio.run(go())
    assert record.error.startswith("ClientConnectorError: Cannot connect") and record.end >= record.start


def test_the_offline_client_records_an_unreachable_backend(tmp_path):
    from mi.bench.servers import free_port

    async def go():
        async with BackendClient(f"127.0.0.1:{free_port()}", cert=str(tmp_path / "cert")) as client:
            return await client.send(PROMPT)

    record = asyncio.run(go())
    assert record.error.startswith("BackendUnavailable: ") and not record.chunk_times


@pytest.mark.parametrize(
    "start, args, module",
    [(start_vllm, ("model-dir",), "vllm"), (start_llamacpp, ("model.gguf",), "llama_cpp")],
)
def test_a_peer_that_cannot_start_is_a_server_error_with_its_log(tmp_path, start, args, module):
    with pytest.raises(ServerError, match=rf"(?s)exited \(1\) before 200 on .*No module named '?{module}'?"):
        start(sys.executable, *args, tmp_path)
