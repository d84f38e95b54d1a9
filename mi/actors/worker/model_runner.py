"""The worker's synchronous core: weights, KV cache, and the per-slot mirror of scheduler state.

The scheduler owns block tables; the worker keeps a mirror that StepPlan diffs update:

    new_slots      -> reset the slot's block count, store its sampling parameters
    block_appends  -> block_tables[slot, count[slot]] = block; count[slot] += 1

Everything per step is built with array ops over the batch (no per-request Python loop).
"""

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from mi.actors.messages import StepPlan, StepResult
from mi.actors.worker.grammar_slots import GrammarSlots
from mi.actors.worker.row_faults import sample_rows_alone
from mi.actors.worker.slot_sampling import SlotSampling, to_device
from mi.convert import load_mi_config
from mi.models.loader import load_model
from mi.models.parallel import TensorParallel
from mi.ops import AttentionMetadata, rotary_cos_sin, rotary_rows
from mi.ops.attention_plan import ScratchBuffer, build_plan
from mi.ops.logprobs import prompt_logprobs
from mi.ops.rotary import is_length_dependent, token_cos_sin
from mi.ops.sampling import SamplerOutput, sample

_GPU_KV_FRACTION = 0.9


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: str
    device: str  # "cpu" or "cuda:N"
    dtype: str  # "float32" | "bfloat16" | "float16"
    block_size: int
    max_num_seqs: int
    max_model_len: int
    num_kv_blocks: int  # 0: size from kv_cache_bytes
    kv_cache_bytes: int  # -1: auto (GPU)
    cpu_linear: str = "onednn"  # "onednn": packed weights on CPU (mi/ops/cpu_linear.py); "torch"


def kv_block_bytes(model_cfg: dict, tp: int, block_size: int, dtype: torch.dtype) -> int:
    num_kv_heads = max(1, model_cfg["num_key_value_heads"] // tp)
    per_token = 2 * model_cfg["num_hidden_layers"] * num_kv_heads * model_cfg["head_dim"]
    return per_token * block_size * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, tp: TensorParallel):
        self.cfg = cfg
        self.tp = tp
        self.device = torch.device(cfg.device)
        self.dtype = dtype = getattr(torch, cfg.dtype)
        model_cfg = load_mi_config(cfg.model_dir)["model"]
        self.model = load_model(cfg.model_dir, tp, self.device, dtype, cfg.cpu_linear)
        self.rope = (
            model_cfg["head_dim"],
            model_cfg["rope_theta"],
            model_cfg.get("rope_scaling"),
            model_cfg["max_position_embeddings"],
        )
        self.cos_sin = rotary_cos_sin(
            model_cfg["head_dim"],
            cfg.max_model_len,
            model_cfg["rope_theta"],
            model_cfg.get("rope_scaling"),
            self.device,
            model_cfg["max_position_embeddings"],
        )
        self.rope_by_length = is_length_dependent(model_cfg.get("rope_scaling"))
        layer_windows = {self.model.cfg.layer_window(i) for i in range(self.model.cfg.num_hidden_layers)}
        self.window = max((w for w in layer_windows if w is not None), default=None)
        self.has_full_layers = None in layer_windows

        kv_bytes = cfg.kv_cache_bytes
        if kv_bytes < 0:  # auto: most of what the weights left free on the GPU
            kv_bytes = int(torch.cuda.mem_get_info(self.device)[0] * _GPU_KV_FRACTION)
        self.num_kv_blocks = cfg.num_kv_blocks or kv_bytes // kv_block_bytes(
            model_cfg, tp.size, cfg.block_size, dtype
        )
        if self.num_kv_blocks < 1:
            raise ValueError("the KV cache budget is smaller than one block; raise --kv-cache-memory")
        self.num_kv_heads = model_cfg["num_key_value_heads"] // tp.size or 1
        self.head_dim = model_cfg["head_dim"]
        self.attention_scratch = ScratchBuffer()
        shape = (self.num_kv_blocks, cfg.block_size, self.num_kv_heads, model_cfg["head_dim"])
        # Zeroed, not empty: masked-out keys still meet V rows in the matmul, and garbage NaNs there
        # would poison the output (0 * NaN = NaN).
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=self.device),
                torch.zeros(shape, dtype=dtype, device=self.device),
            )
            for _ in range(model_cfg["num_hidden_layers"])
        ]

        max_blocks_per_seq = -(-cfg.max_model_len // cfg.block_size)
        self.block_tables = np.zeros((cfg.max_num_seqs, max_blocks_per_seq), dtype=np.int64)
        self.num_slot_blocks = np.zeros(cfg.max_num_seqs, dtype=np.int64)
        self.sampling = SlotSampling(cfg.max_num_seqs, model_cfg["vocab_size"], self.device)
        # Only rank 0 samples, so only it follows structured-output grammars.
        self.grammar = (
            GrammarSlots(cfg.model_dir, cfg.max_num_seqs, model_cfg["vocab_size"], model_cfg["eos_token_ids"])
            if tp.rank == 0
            else None
        )

    def apply_diffs(self, plan: StepPlan) -> None:
        if self.grammar is not None and len(plan.freed_slots):
            self.grammar.free(plan.freed_slots.astype(np.int64))
        if plan.new_slots:
            self.num_slot_blocks[[new.slot for new in plan.new_slots]] = 0
            self.sampling.admit(plan.new_slots)
            if self.grammar is not None:
                self.grammar.admit(plan.new_slots)
        appends = plan.block_appends
        if len(appends):
            slots, blocks = appends[:, 0].astype(np.int64), appends[:, 1]
            # Rank of each append among earlier appends to the same slot in this plan.
            order = np.argsort(slots, kind="stable")
            sorted_slots = slots[order]
            starts = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
            group_start = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
            rank = np.arange(len(order)) - group_start
            self.block_tables[sorted_slots, self.num_slot_blocks[sorted_slots] + rank] = blocks[order]
            np.add.at(self.num_slot_blocks, slots, 1)

    def _metadata(self, plan: StepPlan) -> tuple[AttentionMetadata, torch.Tensor, np.ndarray, ...]:
        """Attention metadata and the step's rotary table, plus per row the sequence length after
        this step, and per new token its row, slot and position."""
        slots = plan.slots.astype(np.int64)
        num_new = plan.num_new_tokens.astype(np.int64)
        num_computed = plan.num_computed_tokens.astype(np.int64)
        seq_lens = num_computed + num_new
        num_tokens = int(num_new.sum())
        token_seq_idx = np.repeat(np.arange(len(slots)), num_new)
        query_starts = np.cumsum(num_new) - num_new
        token_query_idx = np.arange(num_tokens) - query_starts[token_seq_idx]
        positions = num_computed[token_seq_idx] + token_query_idx
        block_size = self.cfg.block_size
        token_slots = slots[token_seq_idx]
        token_blocks = self.block_tables[token_slots, positions // block_size]
        slot_mapping = token_blocks * block_size + positions % block_size
        max_seq_len = int(seq_lens.max())
        tables = self.block_tables[slots, : -(-max_seq_len // block_size)]

        dev = lambda a: to_device(a, self.device)  # noqa: E731
        token_positions = dev(positions)
        cos_sin, rotary_index = self.cos_sin, None
        if self.rope_by_length:  # a table per token: as HF, prompt tokens see the prompt's length
            lengths = np.maximum(self.sampling.params["num_prompt_tokens"][token_slots], positions + 1)
            cos_sin = token_cos_sin(*self.rope, token_positions, torch.from_numpy(lengths))
            rotary_index = dev(np.arange(num_tokens))
        plan_of = functools.partial(
            build_plan,
            num_new,
            seq_lens,
            tables,
            block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
            self.attention_scratch,
        )
        plan = rows = window_plan = None
        if self.device.type == "cpu":  # the references' per-step tables; triton reads blocks in place
            rows = rotary_rows(cos_sin, token_positions if rotary_index is None else rotary_index, self.dtype)
            plan = plan_of() if self.has_full_layers else None
            # the sliding-window layers' own boxes, from each sequence's first visible key
            window_plan = plan_of(window=self.window) if self.window is not None else None
        meta = AttentionMetadata(
            slot_mapping=dev(slot_mapping),
            block_tables=dev(tables),
            seq_lens=dev(seq_lens),
            token_seq_idx=dev(token_seq_idx),
            token_query_idx=dev(token_query_idx),
            positions=token_positions,
            max_query_len=int(num_new.max()),
            max_seq_len=max_seq_len,
            plan=plan,
            rotary_rows=rows,
            rotary_index=rotary_index,
            window_plan=window_plan,
        )
        return meta, cos_sin, seq_lens, token_seq_idx, token_slots, positions

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Runs one forward pass. Rank 0 returns the sampled ids (rows with do_sample) and the
        logprobs asked for; other ranks return None."""
        self.apply_diffs(plan)
        if len(plan.slots) == 0:
            return StepResult(**_empty_result(plan.step_id))
        meta, cos_sin, seq_lens, token_seq_idx, token_slots, positions = self._metadata(plan)
        self.sampling.observe(token_slots, positions, plan.input_ids)
        if self.grammar is not None:
            self.grammar.observe(token_slots, positions, plan.input_ids)
        input_ids = to_device(plan.input_ids.astype(np.int64), self.device)
        hidden = self.model(input_ids, self.kv_caches, meta, cos_sin)

        sample_rows = np.flatnonzero(plan.do_sample)
        last_token_idx = np.cumsum(plan.num_new_tokens.astype(np.int64))[sample_rows] - 1
        # NOTE: every rank computes logits (the vocab-parallel head all-gathers); only rank 0 samples.
        logits = self.model.compute_logits(hidden[to_device(last_token_idx, self.device)])
        prompt_token_idx = np.flatnonzero(plan.prompt_logprobs_rows[token_seq_idx])
        prompt_logits = None
        if len(prompt_token_idx):
            prompt_logits = self.model.compute_logits(hidden[to_device(prompt_token_idx, self.device)])
        if self.tp.rank != 0:
            return None

        slots = plan.slots[sample_rows].astype(np.int64)
        # The sampled token's position (= sequence length so far) keys its random noise.
        out = self._sample(logits, slots, seq_lens[sample_rows])
        result = _empty_result(plan.step_id, _numpy(out.token_ids, np.int32))
        result["failed_rows"] = sample_rows[list(out.failed_rows)].astype(np.int32)
        result["failure_reasons"] = list(out.failed_rows.values())
        if out.logprobs is not None:
            result["logprobs"] = _numpy(out.logprobs, np.float32)
            result["top_ids"] = _numpy(out.top_ids, np.int32)
            result["top_logprobs"] = _numpy(out.top_logprobs, np.float32)
        if prompt_logits is not None:
            row_slots = token_slots[prompt_token_idx]
            k = max(0, int(self.sampling.params["prompt_logprobs"][row_slots].max()))
            targets = to_device(plan.prompt_targets.astype(np.int64), self.device)
            values, top_ids, top_logprobs = prompt_logprobs(prompt_logits, targets, k)
            result["prompt_logprobs"] = _numpy(values, np.float32)
            result["prompt_top_ids"] = _numpy(top_ids, np.int32)
            result["prompt_top_logprobs"] = _numpy(top_logprobs, np.float32)
        return StepResult(**result)

    def _sample(self, logits: torch.Tensor, slots: np.ndarray, positions: np.ndarray) -> SamplerOutput:
        """The batch's tokens; if sampling the batch raises, its rows alone (row_faults.py).
        Rows whose grammar cannot continue fail too (their token is not used)."""
        masks = self.grammar.masks(slots) if self.grammar is not None and len(slots) else None
        bitmask = None if masks is None else (masks.rows, masks.bitmask)
        try:
            out = sample(
                logits, dataclasses.replace(self.sampling.tensors(slots, positions), token_bitmask=bitmask)
            )
        except Exception as exc:
            batch_error = exc
        else:
            if masks is not None and masks.failed_rows:
                out.failed_rows.update(masks.failed_rows)
            return out
        num_top_logprobs = int(self.sampling.params["logprobs"][slots].max())
        constrained = {} if masks is None else {row: i for i, row in enumerate(masks.rows.tolist())}

        def sample_row(row: int) -> SamplerOutput:
            one = slice(row, row + 1)
            st = self.sampling.tensors(slots[one], positions[one])
            i = constrained.get(row)
            row_mask = None if i is None else (torch.zeros(1, dtype=torch.int64), masks.bitmask[i : i + 1])
            # Every row's logprobs as wide as the batch's, so the rows stack.
            return sample(
                logits[one],
                dataclasses.replace(st, num_top_logprobs=num_top_logprobs, token_bitmask=row_mask),
            )

        out = sample_rows_alone(len(slots), sample_row, batch_error)
        if masks is not None:
            out.failed_rows.update(masks.failed_rows)
        return out


def _numpy(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor.cpu().numpy().astype(dtype, copy=False)


def _empty_result(step_id: int, token_ids: np.ndarray | None = None) -> dict:
    none_f = np.zeros(0, dtype=np.float32)
    return dict(
        step_id=step_id,
        token_ids=token_ids if token_ids is not None else np.zeros(0, dtype=np.int32),
        logprobs=none_f,
        top_ids=np.zeros((0, 0), np.int32),
        top_logprobs=np.zeros((0, 0), np.float32),
        prompt_logprobs=none_f,
        prompt_top_ids=np.zeros((0, 0), np.int32),
        prompt_top_logprobs=np.zeros((0, 0), np.float32),
        failed_rows=np.zeros(0, np.int32),
        failure_reasons=[],
    )
