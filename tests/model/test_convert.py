"""mi-convert: shards re-assemble to the HF tensors exactly; mi_config.json; CLI refusals.

The expected layouts here are written from docs/format.md, not from mi/convert/sharding.py.
Tiny HF models come from conftest's session-scoped `tiny_model_dirs`.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from mi.convert import ConvertError, convert, kv_heads_of_rank, load_mi_config, padded_vocab_size

ARCH_TPS = [(a, tp) for a in ("llama", "mistral", "qwen2", "qwen3") for tp in (1, 2, 4)]
ARCH_TPS += [("llama", 8), ("qwen3", 8)]
HF_NAMES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _convert(src, out, tp, **kw):
    return convert(src, out, tp, progress=False, **kw)


def check_shards(hf_dir, out, tp):
    """Re-assemble every rank file and compare with the HF tensors (torch.equal)."""
    cfg = load_mi_config(out)["model"]
    hf = load_file(hf_dir / "model.safetensors")
    ranks = [load_file(out / f"rank-{r}.safetensors") for r in range(tp)]
    H, K, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    E, I = cfg["hidden_size"], cfg["intermediate_size"]
    V, Vp = cfg["vocab_size"], cfg["padded_vocab_size"]
    assert Vp % (64 * tp) == 0 and V <= Vp < V + 64 * tp
    Hr, Kr = H // tp, (K // tp if K % tp == 0 else 1)

    def vocab_parallel(name, hf_name):
        full = torch.cat([rank[name] for rank in ranks])
        assert full.shape == (Vp, E)
        assert torch.equal(full[:V], hf[hf_name]) and not full[V:].any()

    vocab_parallel("embed_tokens.weight", "model.embed_tokens.weight")
    if cfg["tie_word_embeddings"]:
        assert all("lm_head.weight" not in rank for rank in ranks)
    else:
        vocab_parallel("lm_head.weight", "lm_head.weight")

    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        replicated = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        if cfg["qk_norm"]:
            replicated += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
        suffixes = ["weight"] + (["bias"] if cfg["attention_bias"] else [])
        for r, rank in enumerate(ranks):
            for name in replicated:
                assert torch.equal(rank[dst + name], hf[src + name])
            kv_heads = list(range(r * Kr, (r + 1) * Kr)) if K % tp == 0 else [r * K // tp]
            # Every q head of this rank belongs to a kv group this rank holds.
            assert all(q // (H // K) in kv_heads for q in range(r * Hr, (r + 1) * Hr))
            for suffix in suffixes:
                qkv = rank[dst + f"self_attn.qkv_proj.{suffix}"]
                assert qkv.shape[0] == (Hr + 2 * Kr) * D
                q, k, v = qkv.split([Hr * D, Kr * D, Kr * D])
                hf_q = hf[src + f"self_attn.q_proj.{suffix}"]
                assert torch.equal(q, hf_q[r * Hr * D : (r + 1) * Hr * D])
                for got, proj in ((k, "k_proj"), (v, "v_proj")):
                    full = hf[src + f"self_attn.{proj}.{suffix}"]
                    assert torch.equal(got, torch.cat([full[h * D : (h + 1) * D] for h in kv_heads]))
            gate, up = rank[dst + "mlp.gate_up_proj.weight"].chunk(2)
            assert gate.shape == (I // tp, E)
            rows = slice(r * I // tp, (r + 1) * I // tp)
            assert torch.equal(gate, hf[src + "mlp.gate_proj.weight"][rows])
            assert torch.equal(up, hf[src + "mlp.up_proj.weight"][rows])
        assert torch.equal(
            torch.cat([rk[dst + "self_attn.o_proj.weight"] for rk in ranks], 1),
            hf[src + "self_attn.o_proj.weight"],
        )
        assert torch.equal(
            torch.cat([rk[dst + "mlp.down_proj.weight"] for rk in ranks], 1), hf[src + "mlp.down_proj.weight"]
        )
        if K % tp == 0:
            for proj in ("k_proj", "v_proj"):
                kv_part = [rk[dst + "self_attn.qkv_proj.weight"][Hr * D :].chunk(2) for rk in ranks]
                got = torch.cat([k_v[proj == "v_proj"] for k_v in kv_part])
                assert torch.equal(got, hf[src + f"self_attn.{proj}.weight"])

    expected = {"embed_tokens.weight", "norm.weight"} | (
        set() if cfg["tie_word_embeddings"] else {"lm_head.weight"}
    )
    for i in range(cfg["num_hidden_layers"]):
        names = [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.qkv_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_up_proj.weight",
            "mlp.down_proj.weight",
        ]
        names += ["self_attn.qkv_proj.bias"] if cfg["attention_bias"] else []
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if cfg["qk_norm"] else []
        expected |= {f"layers.{i}.{n}" for n in names}
    for rank in ranks:
        assert set(rank) == expected
        assert torch.equal(rank["norm.weight"], hf["model.norm.weight"])


def test_vocab_padding_and_kv_head_rules():
    assert [padded_vocab_size(500, tp) for tp in (1, 2, 4, 8)] == [512] * 4
    assert padded_vocab_size(32000, 8) == 32256 and padded_vocab_size(151936, 4) == 152064
    assert padded_vocab_size(128, 2) == 128
    assert [list(kv_heads_of_rank(8, 2, r)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [kv_heads_of_rank(2, 8, r)[0] for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [kv_heads_of_rank(1, 4, r)[0] for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ConvertError, match="num_key_value_heads=6"):
        kv_heads_of_rank(6, 4, 0)


@pytest.mark.parametrize("arch,tp", ARCH_TPS)
def test_shards_reassemble_to_hf(arch, tp, tiny_model_dirs, converted):
    check_shards(tiny_model_dirs(arch), converted(arch, tp), tp)


@pytest.mark.parametrize("arch", list(HF_NAMES))
def test_mi_config(arch, tiny_model_dirs, converted):
    hf_dir, out = tiny_model_dirs(arch), converted(arch, 2)
    config = load_mi_config(out)
    hf = json.loads((hf_dir / "config.json").read_text())
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert set(config) == {
        "format_version",
        "architecture",
        "hf_architecture",
        "tp",
        "dtype",
        "source_sha256",
        "model",
    }
    assert config["format_version"] == 1 and config["tp"] == 2 and config["dtype"] == "float32"
    assert config["architecture"] == arch and config["hf_architecture"] == HF_NAMES[arch]
    assert config["source_sha256"] == hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    model = config["model"]
    assert set(model) == {
        "vocab_size",
        "padded_vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "max_position_embeddings",
        "sliding_window",
        "layer_types",
        "tie_word_embeddings",
        "attention_bias",
        "qk_norm",
        "bos_token_id",
        "eos_token_ids",
        "model_name",
    }
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
    ):
        assert model[key] == hf[key], key
    assert model["padded_vocab_size"] == 512 and model["vocab_size"] == 500
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    assert model["head_dim"] == head_dim
    assert model["rope_theta"] == hf["rope_parameters"]["rope_theta"]
    assert model["rope_scaling"] is None and model["sliding_window"] is None and model["layer_types"] is None
    assert model["attention_bias"] == (arch == "qwen2") and model["qk_norm"] == (arch == "qwen3")
    assert model["eos_token_ids"] == gen["eos_token_id"] and len(model["eos_token_ids"]) == 2
    assert model["model_name"] == hf_dir.name


def test_tokenizer_and_generation_files_copied(tiny_model_dirs, converted):
    hf_dir, out = tiny_model_dirs("qwen2"), converted("qwen2", 2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    a, b = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(out)
    text = "Héllo wörld 🙂  def f():\n\treturn 1"
    assert a(text).input_ids == b(text).input_ids and len(a) == len(b)
    messages = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == b.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_rank_file_metadata(converted):
    with safe_open(str(converted("llama", 2) / "rank-1.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "mi_format_version": "1", "rank": "1", "tp": "2"}


def test_dtype_bfloat16(tiny_model_dirs, tmp_path):
    hf_dir = tiny_model_dirs("qwen3")
    out = _convert(hf_dir, tmp_path / "bf16", 1, dtype="bfloat16")
    assert load_mi_config(out)["dtype"] == "bfloat16"
    hf, rank = load_file(hf_dir / "model.safetensors"), load_file(out / "rank-0.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in rank.values())
    assert torch.equal(rank["norm.weight"], hf["model.norm.weight"].to(torch.bfloat16))
    assert torch.equal(rank["embed_tokens.weight"][:500], hf["model.embed_tokens.weight"].to(torch.bfloat16))


def _assert_same_outputs(a, b, tp):
    for r in range(tp):
        x, y = load_file(a / f"rank-{r}.safetensors"), load_file(b / f"rank-{r}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_bin_source(tiny_model_dirs, converted, tmp_path):
    hf_dir, src = tiny_model_dirs("llama"), tmp_path / "bin-src"
    shutil.copytree(hf_dir, src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    out = _convert(src, tmp_path / "out", 2)
    _assert_same_outputs(out, converted("llama", 2), 2)


def test_sharded_safetensors_with_index(tiny_model_dirs, converted, tmp_path):
    hf_dir, src = tiny_model_dirs("llama"), tmp_path / "sharded"
    shutil.copytree(hf_dir, src)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for n, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, src / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "consolidated.safetensors").write_bytes(b"not listed in the index: never read")
    out = _convert(src, tmp_path / "out", 4)
    _assert_same_outputs(out, converted("llama", 4), 4)
    digest = hashlib.sha256()
    for file in sorted(set(weight_map.values())):
        digest.update((src / file).read_bytes())
    assert load_mi_config(out)["source_sha256"] == digest.hexdigest()


def test_empty_out_dir_is_used_and_force_replaces(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _convert(tiny_model_dirs("llama"), out, 1)
    assert load_mi_config(out)["tp"] == 1
    (out / "stale.txt").write_text("old")
    _convert(tiny_model_dirs("llama"), out, 2, force=True)
    assert load_mi_config(out)["tp"] == 2 and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_mi_config_refuses_other_versions(converted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(converted("llama", 2), out)
    config = json.loads((out / "mi_config.json").read_text())
    (out / "mi_config.json").write_text(json.dumps({**config, "format_version": 2}))
    with pytest.raises(ConvertError, match="format_version 2"):
        load_mi_config(out)
    (out / "mi_config.json").write_text(json.dumps(config))
    (out / "rank-1.safetensors").unlink()
    with pytest.raises(ConvertError, match="rank-1"):
        load_mi_config(out)
    with pytest.raises(ValueError, match="not a converted model"):
        load_mi_config(tmp_path)


def test_api_raises_convert_error(tmp_path):
    with pytest.raises(ConvertError, match="no such file or directory"):
        _convert(tmp_path / "nope", tmp_path / "out", 1)
    assert issubclass(ConvertError, ValueError)


# ---- CLI --------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mi.convert", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_converts(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--path", tiny_model_dirs("qwen2"), "--out", out, "--tp", 2)
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr  # the progress bar
    check_shards(tiny_model_dirs("qwen2"), out, 2)


def small_checkpoint(path, **overrides):
    """A 1-layer random Llama with chosen dims (no tokenizer)."""
    config = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    config.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return path


def _copy(tiny_model_dirs, tmp_path, name="src"):
    return shutil.copytree(tiny_model_dirs("llama"), tmp_path / name)


def _edit_config(src, **changes):
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


def _write(src, name, data: bytes):
    (src / name).write_bytes(data)
    return src


def _drop_tensor(src, name):
    tensors = load_file(src / "model.safetensors")
    del tensors[name]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _truncate(src):
    os.truncate(src / "model.safetensors", (src / "model.safetensors").stat().st_size // 2)
    return src


def _garble_header(src):
    with open(src / "model.safetensors", "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    return src


def _remove(src, name):
    (src / name).unlink()
    return src


def _empty_dir(path):
    path.mkdir()
    return path


MISSING_SHARD_INDEX = json.dumps(
    {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
).encode()

# case id -> (make the source dir: (tiny_model_dirs, tmp_path) -> path, extra args, message part)
ERROR_CASES = {
    "missing_path": (lambda d, t: t / "nope", (), "no such file or directory"),
    "no_config": (lambda d, t: _empty_dir(t / "empty"), (), "no config.json"),
    "bad_config_json": (lambda d, t: _write(_copy(d, t), "config.json", b"{oops"), (), "cannot read"),
    "unsupported_arch": (
        lambda d, t: _edit_config(_copy(d, t), architectures=["GPT2LMHeadModel"], model_type="gpt2"),
        (),
        "unsupported architecture GPT2LMHeadModel; supported: LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ),
    "tp_not_allowed": (lambda d, t: _copy(d, t), ("--tp", 16), "--tp must be between 1 and 8"),
    "tp_not_int": (lambda d, t: _copy(d, t), ("--tp", "two"), "invalid int value"),
    "tp_heads": (
        lambda d, t: small_checkpoint(t / "src", num_attention_heads=4, num_key_value_heads=4),
        ("--tp", 8),
        "tp=8 does not divide num_attention_heads (num_attention_heads=4, num_key_value_heads=4)",
    ),
    "tp_intermediate": (
        lambda d, t: small_checkpoint(t / "src", intermediate_size=100),
        ("--tp", 8),
        "does not divide intermediate_size=100",
    ),
    "tp_kv_heads": (
        lambda d, t: small_checkpoint(
            t / "src", hidden_size=96, num_attention_heads=12, num_key_value_heads=6
        ),
        ("--tp", 4),
        "num_key_value_heads=6",
    ),
    "bad_dtype": (lambda d, t: _copy(d, t), ("--dtype", "int8"), "--dtype must be one of"),
    "truncated": (lambda d, t: _truncate(_copy(d, t)), (), "corrupt or truncated"),
    "corrupt_header": (lambda d, t: _garble_header(_copy(d, t)), (), "corrupt or truncated"),
    "no_weights": (lambda d, t: _remove(_copy(d, t), "model.safetensors"), (), "no weight files"),
    "index_missing_shard": (
        lambda d, t: _write(_copy(d, t), "model.safetensors.index.json", MISSING_SHARD_INDEX),
        (),
        "missing weight files listed in model.safetensors.index.json",
    ),
    "missing_tensor": (
        lambda d, t: _drop_tensor(_copy(d, t), "model.layers.1.mlp.up_proj.weight"),
        (),
        "missing tensor model.layers.1.mlp.up_proj.weight",
    ),
    "shape_mismatch": (
        lambda d, t: _edit_config(_copy(d, t), intermediate_size=512),
        (),
        "has shape [256, 128], config.json implies [512, 128]",
    ),
}


def assert_refused(result, message, out):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mi-convert: error: "), result.stderr
    assert message in lines[0]
    assert not any(".partial-" in p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cli_refuses(case, tiny_model_dirs, tmp_path):
    make, args, message = ERROR_CASES[case]
    src = make(tiny_model_dirs, tmp_path)
    out = tmp_path / "out"
    assert_refused(run_cli("--path", src, "--out", out, *args), message, out)
    assert not out.exists()


def test_cli_refuses_non_empty_out(tiny_model_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_refused(run_cli("--path", tiny_model_dirs("llama"), "--out", out), "not empty", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_failed_force_leaves_good_output_untouched(tiny_model_dirs, tmp_path):
    out = _convert(tiny_model_dirs("llama"), tmp_path / "out", 2)
    before = _snapshot(out)
    bad = _truncate(_copy(tiny_model_dirs, tmp_path))
    assert_refused(run_cli("--path", bad, "--out", out, "--tp", 4, "--force"), "corrupt or truncated", out)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_failure_while_writing_removes_partial_and_keeps_old(tiny_model_dirs, tmp_path, monkeypatch):
    import mi.convert.driver as driver

    out = _convert(tiny_model_dirs("llama"), tmp_path / "out", 2)
    before = _snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(driver, "_copy_aux_files", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _convert(tiny_model_dirs("llama"), out, 4, force=True)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OSError, match="disk full"):
        _convert(tiny_model_dirs("llama"), tmp_path / "new", 1)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _config_variant(tiny_model_dirs, dst, drop=(), **changes):
    src = shutil.copytree(tiny_model_dirs("llama"), dst)
    config = json.loads((src / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_transformers4_style_config(tiny_model_dirs, tmp_path):
    """rope_theta / rope_scaling at the top level and torch_dtype (transformers 4 spelling)."""
    src = _config_variant(
        tiny_model_dirs,
        tmp_path / "v4",
        drop=("rope_parameters", "dtype"),
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        torch_dtype="bfloat16",
    )
    config = load_mi_config(_convert(src, tmp_path / "out", 1))
    assert config["dtype"] == "bfloat16"
    assert config["model"]["rope_theta"] == 500000.0
    assert config["model"]["rope_scaling"] == LLAMA3_SCALING


def test_rope_parameters_scaling_and_dtype_from_tensors(tiny_model_dirs, tmp_path):
    """transformers 5: a non-default rope_parameters becomes rope_scaling; no dtype -> tensors'."""
    src = _config_variant(
        tiny_model_dirs,
        tmp_path / "v5",
        drop=("dtype",),
        rope_parameters={"rope_theta": 500000.0, **LLAMA3_SCALING},
    )
    config = load_mi_config(_convert(src, tmp_path / "out", 1))
    assert config["dtype"] == "float32"
    assert config["model"]["rope_theta"] == 500000.0
    assert config["model"]["rope_scaling"] == LLAMA3_SCALING


def test_hub_cache_model_name_and_eos_fallback(tiny_model_dirs, tmp_path):
    snapshot = tmp_path / "models--org--tiny-llama" / "snapshots" / "0123abcd"
    src = shutil.copytree(tiny_model_dirs("llama"), snapshot)
    (src / "generation_config.json").unlink()
    model = load_mi_config(_convert(src, tmp_path / "out", 1))["model"]
    assert model["model_name"] == "org/tiny-llama"
    hf = json.loads((src / "config.json").read_text())
    assert model["eos_token_ids"] == [hf["eos_token_id"]]
    assert model["bos_token_id"] == hf["bos_token_id"]
