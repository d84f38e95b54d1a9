"""The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32) through mi-convert and the
full server equals transformers reading the same file: greedy tokens, chat stopping on the
template's end token, logprobs; at tp 1 and tp 3 (9 query / 3 KV heads); tp 2 is refused."""

import asyncio
import subprocess
import sys

import aiohttp
import pytest
import torch
from hf_reference import post_all
from transformers import AutoModelForCausalLM, AutoTokenizer

from servers import backend_headers, start_backend, start_frontend

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, there was a", "1, 2, 3, 4,"]
MAX_TOKENS = 24
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def _greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=max_new_tokens
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def hf_completions(hf):
    tokenizer, model = hf
    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        generated = _greedy(model, ids, MAX_TOKENS)
        results.append((ids, generated, tokenizer.decode(generated, skip_special_tokens=True)))
    return results


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def served(request, smollm2_converted):
    backend, port = start_backend(smollm2_converted(request.param))
    try:
        frontend, url = start_frontend(port)
    except Exception:
        backend.stop()
        raise
    yield f"http://127.0.0.1:{port}", url
    assert frontend.stop() == 0, frontend.output
    assert backend.stop() == 0, backend.output


def test_greedy_matches_transformers(served, hf_completions):
    backend_url, frontend_url = served
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0} for p in PROMPTS]

    async def both():  # one batch of 8 sequences: half the decode steps of two rounds
        return await asyncio.gather(
            post_all(backend_url + "/v1/generate", bodies),
            post_all(frontend_url + "/v1/completions", bodies),
        )

    backend, frontend = asyncio.run(both())
    for (prompt_ids, ids, text), got, answer, prompt in zip(hf_completions, backend, frontend, PROMPTS):
        assert got["prompt_ids"] == prompt_ids, prompt
        assert got["ids"] == ids, prompt
        assert answer["choices"][0]["text"] == text, prompt
        assert answer["usage"]["completion_tokens"] == len(ids)
    assert "Paris" in hf_completions[0][2]  # a real model, not noise


def test_chat_stops_on_the_templates_end_token(served, hf):
    tokenizer, model = hf
    ids = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = _greedy(model, ids, 48)
    assert expected[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 48}
    [answer] = asyncio.run(post_all(served[1] + "/v1/chat/completions", [body]))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in choice["message"]["content"]
    assert answer["usage"]["prompt_tokens"] == len(ids)


async def _generate(url: str, body: dict) -> dict:
    async with aiohttp.ClientSession(headers=backend_headers()) as session:
        async with session.post(url + "/v1/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def test_logprobs_match_transformers(served, hf):
    _, model = hf
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "logprobs": 5, "prompt_logprobs": 1}
    result = asyncio.run(_generate(served[0], body))
    ids = torch.tensor([result["prompt_ids"] + result["ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    num_prompt = len(result["prompt_ids"])
    for pos, entry in enumerate(result["prompt_logprobs"][1:], start=1):
        assert entry["token_id"] == result["prompt_ids"][pos]
        assert abs(entry["logprob"] - logprobs[pos - 1, entry["token_id"]].item()) < 1e-4
    for i, entry in enumerate(result["logprobs"]):
        row = logprobs[num_prompt - 1 + i]
        assert entry["token_id"] == result["ids"][i] == row.argmax().item()
        assert abs(entry["logprob"] - row[entry["token_id"]].item()) < 1e-4
        top = row.topk(5)
        assert [t for t, _ in entry["top"]] == top.indices.tolist()
        assert max(abs(lp - ref) for (_, lp), ref in zip(entry["top"], top.values.tolist())) < 1e-4


def test_tp2_is_refused_naming_the_head_counts(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "mi.convert", "--path", str(smollm2_gguf), "--out", str(out), "--tp", "2"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "mi-convert: error: tp=2 does not divide num_attention_heads "
        "(num_attention_heads=9, num_key_value_heads=3)"
    ]
    assert list(tmp_path.iterdir()) == []
