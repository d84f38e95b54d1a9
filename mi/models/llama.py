"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3), tensor parallel inside its layers.

Reads top-down: config, attention, MLP, decoder layer, model. Module attribute names equal the
keys of a converted `rank-{r}.safetensors` (see docs/format.md), so loading is
`load_state_dict(..., assign=True)`: the weights arrive already sliced for this rank, with q/k/v
fused into `qkv_proj` and gate/up into `gate_up_proj`.

Shapes: N = tokens in the step (all sequences packed), E = hidden, H/K = this rank's query/KV
heads, D = head dim, I = this rank's intermediate size, V' = this rank's vocab shard.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mi.models.parallel import TensorParallel
from mi.ops import AttentionMetadata, apply_rotary, paged_attention, rms_norm, silu_and_mul, write_kv_cache
from mi.ops.cpu_linear import PackedLinear, pack_linears


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    padded_vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    # Sliding-window attention: the window, and which layers use it ("sliding_attention" /
    # "full_attention" per layer; None: every layer, when there is a window).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None

    @classmethod
    def from_mi_config(cls, model: dict) -> "ModelConfig":
        fields = cls.__dataclass_fields__
        optional = ("sliding_window", "layer_types")  # absent from models converted before them
        values = {name: model[name] for name in fields if name not in optional}
        values["sliding_window"] = model.get("sliding_window")
        layer_types = model.get("layer_types")
        values["layer_types"] = tuple(layer_types) if layer_types else None
        return cls(**values)

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def num_kv_heads_per_rank(self, tp: int) -> int:
        # tp > num_kv_heads: each rank holds one replicated KV head (see docs/format.md).
        return max(1, self.num_key_value_heads // tp)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, window: int | None = None):
        super().__init__()
        self.tp = tp
        self.window = window
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads_per_rank(tp.size)
        self.head_dim = cfg.head_dim
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, qkv_rows, bias=cfg.attention_bias)  # column-parallel
        self.o_proj = nn.Linear(self.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)  # row-parallel
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [N, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [N, K, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        rotary_index = meta.positions if meta.rotary_index is None else meta.rotary_index
        q, k = apply_rotary(q, k, rotary_index, cos_sin, meta.rotary_rows)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window)  # [N, H, D]
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, q_size)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        shard = cfg.intermediate_size // tp.size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * shard, bias=False)  # column-parallel
        self.down_proj = nn.Linear(shard, cfg.hidden_size, bias=False)  # row-parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, window: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp, window)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def forward(self, x, kv_cache, meta, cos_sin):
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, meta, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [rank * V', (rank + 1) * V') of the (padded) vocabulary."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.shard_size = cfg.padded_vocab_size // tp.size
        self.weight = nn.Parameter(torch.empty(self.shard_size, cfg.hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local_ids = token_ids - self.tp.rank * self.shard_size
        is_local = (local_ids >= 0) & (local_ids < self.shard_size)
        out = F.embedding(local_ids.clamp(0, self.shard_size - 1), self.weight)
        return self.tp.all_reduce(out * is_local[:, None])


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.cfg = cfg
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding(cfg, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, tp, cfg.layer_window(i)) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None  # tied: the embedding is the head (until pack_for_cpu)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size // tp.size, bias=False)

    def pack_for_cpu(self) -> None:
        """Every linear layer, the LM head included, in oneDNN's layout (mi/ops/cpu_linear.py).
        A tied head gets a packed copy of the embedding: the lookup needs the plain rows."""
        if self.lm_head is None:
            self.lm_head = PackedLinear(self.embed_tokens.weight, None)
        pack_linears(self)

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids [N] -> final hidden states [N, E]."""
        x = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, kv_cache, meta, cos_sin)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, E] -> logits [S, vocab_size] (padding columns dropped)."""
        if self.lm_head is None:
            local_logits = F.linear(hidden, self.embed_tokens.weight)
        else:
            local_logits = self.lm_head(hidden)
        logits = self.tp.all_gather_last_dim(local_logits)  # [S, V'] per rank
        return logits[:, : self.cfg.vocab_size]
