"""How one Hugging Face tensor set is cut into `tp` rank files (pure: no file access).

Rank r of tp, with H heads, K kv heads, head_dim D, hidden E, intermediate I, vocab V:

  name (no "model." prefix)              shape on rank r        taken from the HF tensors
  embed_tokens.weight / lm_head.weight   [V'/tp, E]             rows r*V'/tp.. of the padded matrix
  layers.i.self_attn.qkv_proj.weight     [(H/tp + 2*Kr)*D, E]   q rows of heads r*H/tp.., k, v rows
  layers.i.self_attn.qkv_proj.bias       [(H/tp + 2*Kr)*D]      same rows (qwen2)
  layers.i.self_attn.o_proj.weight       [E, H/tp*D]            columns of this rank's q heads
  layers.i.mlp.gate_up_proj.weight       [2*I/tp, E]            gate rows shard, then up rows shard
  layers.i.mlp.down_proj.weight          [E, I/tp]              columns r*I/tp..
  norms (incl. qwen3 q_norm / k_norm)    unchanged              replicated

V' = ceil(V / (64*tp)) * 64*tp; rows V.. V'-1 are zeros. lm_head exists only when untied.
KV heads: K % tp == 0 -> Kr = K/tp (heads r*Kr..); tp % K == 0 -> Kr = 1, head r*K//tp
(replicated on tp/K consecutive ranks); anything else is refused.
"""

from __future__ import annotations

import dataclasses

from mi.convert.spec import ConvertError, ModelSpec

# Any degree the model's dims divide; 3 and 6 serve models with 9 or 3 KV heads (SmolLM2).
TP_CHOICES = (1, 2, 3, 4, 5, 6, 7, 8)
VOCAB_MULTIPLE = 64  # per rank

Span = tuple[int, int]  # [start, stop)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows or columns of one source tensor (both None: the whole tensor)."""

    name: str
    rows: Span | None = None
    cols: Span | None = None


@dataclasses.dataclass(frozen=True)
class ShardTensor:
    """One tensor of a rank file: `pieces` concatenated on dim 0, then `pad_rows` zero rows."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    pad_rows: int = 0


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def kv_heads_of_rank(num_kv_heads: int, tp: int, rank: int) -> range:
    """The kv heads rank `rank` holds (see the module docstring)."""
    if num_kv_heads % tp == 0:
        per_rank = num_kv_heads // tp
        return range(rank * per_rank, (rank + 1) * per_rank)
    if tp % num_kv_heads == 0:
        head = rank * num_kv_heads // tp
        return range(head, head + 1)
    raise ConvertError(f"tp={tp} does not fit num_key_value_heads={num_kv_heads}: one must divide the other")


def check_tp_choice(tp: int) -> None:
    if tp not in TP_CHOICES:
        raise ConvertError(f"--tp must be between {TP_CHOICES[0]} and {TP_CHOICES[-1]} (got {tp})")


def check_tp(spec: ModelSpec, tp: int) -> None:
    check_tp_choice(tp)
    heads = f"num_attention_heads={spec.num_attention_heads}, num_key_value_heads={spec.num_key_value_heads}"
    if spec.num_attention_heads % tp:
        raise ConvertError(f"tp={tp} does not divide num_attention_heads ({heads})")
    try:
        kv_heads_of_rank(spec.num_key_value_heads, tp, 0)
    except ConvertError:
        raise ConvertError(
            f"tp={tp} does not fit the KV heads ({heads}): tp and num_key_value_heads must divide one another"
        ) from None
    if spec.intermediate_size % tp:
        raise ConvertError(f"tp={tp} does not divide intermediate_size={spec.intermediate_size}")


def source_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the conversion reads, with the shape it must have."""
    E, D, I = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_attention_heads * D, spec.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, E), "model.norm.weight": (E,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, E)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (E,),
                p + "post_attention_layernorm.weight": (E,),
                p + "self_attn.q_proj.weight": (q, E),
                p + "self_attn.k_proj.weight": (kv, E),
                p + "self_attn.v_proj.weight": (kv, E),
                p + "self_attn.o_proj.weight": (E, q),
                p + "mlp.gate_proj.weight": (I, E),
                p + "mlp.up_proj.weight": (I, E),
                p + "mlp.down_proj.weight": (E, I),
            }
        )
        if spec.attention_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return shapes


def _vocab_shard(spec: ModelSpec, tp: int, rank: int, src: str, dst: str) -> ShardTensor:
    rows_per_rank = padded_vocab_size(spec.vocab_size, tp) // tp
    start = min(rank * rows_per_rank, spec.vocab_size)
    stop = min((rank + 1) * rows_per_rank, spec.vocab_size)
    pieces = (Piece(src, rows=(start, stop)),) if stop > start else ()
    num_pad = rows_per_rank - (stop - start)
    return ShardTensor(dst, (rows_per_rank, spec.hidden_size), pieces, num_pad)


def rank_plan(spec: ModelSpec, tp: int, rank: int) -> list[ShardTensor]:
    """The tensors of rank file `rank`, in file order."""
    check_tp(spec, tp)
    E, D, I = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q_heads = spec.num_attention_heads // tp
    q_rows = (rank * q_heads * D, (rank + 1) * q_heads * D)
    kv = kv_heads_of_rank(spec.num_key_value_heads, tp, rank)
    kv_rows = (kv.start * D, kv.stop * D)
    qkv_len = (q_heads + 2 * len(kv)) * D
    inter = (rank * I // tp, (rank + 1) * I // tp)

    plan = [_vocab_shard(spec, tp, rank, "model.embed_tokens.weight", "embed_tokens.weight")]
    for i in range(spec.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        plan += [
            ShardTensor(dst + "input_layernorm.weight", (E,), (Piece(src + "input_layernorm.weight"),)),
            ShardTensor(
                dst + "self_attn.qkv_proj.weight",
                (qkv_len, E),
                (
                    Piece(attn + "q_proj.weight", rows=q_rows),
                    Piece(attn + "k_proj.weight", rows=kv_rows),
                    Piece(attn + "v_proj.weight", rows=kv_rows),
                ),
            ),
        ]
        if spec.attention_bias:
            plan.append(
                ShardTensor(
                    dst + "self_attn.qkv_proj.bias",
                    (qkv_len,),
                    (
                        Piece(attn + "q_proj.bias", rows=q_rows),
                        Piece(attn + "k_proj.bias", rows=kv_rows),
                        Piece(attn + "v_proj.bias", rows=kv_rows),
                    ),
                )
            )
        if spec.qk_norm:
            plan += [
                ShardTensor(dst + f"self_attn.{n}.weight", (D,), (Piece(attn + f"{n}.weight"),))
                for n in ("q_norm", "k_norm")
            ]
        plan += [
            ShardTensor(
                dst + "self_attn.o_proj.weight",
                (E, q_heads * D),
                (Piece(attn + "o_proj.weight", cols=q_rows),),
            ),
            ShardTensor(
                dst + "post_attention_layernorm.weight",
                (E,),
                (Piece(src + "post_attention_layernorm.weight"),),
            ),
            ShardTensor(
                dst + "mlp.gate_up_proj.weight",
                (2 * (inter[1] - inter[0]), E),
                (
                    Piece(src + "mlp.gate_proj.weight", rows=inter),
                    Piece(src + "mlp.up_proj.weight", rows=inter),
                ),
            ),
            ShardTensor(
                dst + "mlp.down_proj.weight",
                (E, inter[1] - inter[0]),
                (Piece(src + "mlp.down_proj.weight", cols=inter),),
            ),
        ]
    plan.append(ShardTensor("norm.weight", (E,), (Piece("model.norm.weight"),)))
    if not spec.tie_word_embeddings:
        plan.append(_vocab_shard(spec, tp, rank, "lm_head.weight", "lm_head.weight"))
    return plan
