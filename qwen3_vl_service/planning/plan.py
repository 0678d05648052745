"""Compatibility and capacity maths: ServiceConfig + GPUs + model facts -> Plan. Pure.

No I/O and no clock: the same inputs give the same plan, so the numbers in
the README can be reproduced with ``--dry-run --gpus 8xH100-80GB``.

Capacity, per GPU (every GPU holds one tensor-parallel rank; vLLM sizes the
KV cache by the smallest):

    budget      = GPU_MEMORY_UTIL x total memory           (vLLM's requested_memory)
    weights     = (checkpoint bytes - vision) / TP + vision (MM_ENCODER_TP_MODE=data:
                  a whole vision-encoder copy per GPU; =weights: checkpoint / TP)
    reserve     = ACTIVATION_RESERVE + CUDA_GRAPH_RESERVE   (0 for graphs with ENFORCE_EAGER)
    KV cache    = budget - weights - reserve
    KV/token    = layers x max(1, kv_heads / TP) x head_dim x 2 (K and V) x KV dtype bytes
    KV tokens   = KV cache / KV per token, rounded down to vLLM's blocks of 16
    concurrency = KV tokens // MAX_MODEL_LEN                (full-length sequences at once)

The per-GPU weight is an approximation: it treats everything but the vision
encoder as split evenly. The embedding and the LM head are split by
vocabulary rows (VocabParallelEmbedding), so they are split too; what stays
replicated besides the vision encoder (norms, the MoE routers: 94 x 4096 x
128 bf16 = 94 MiB, the KV projections when TP > KV heads) is under 0.2 GiB
per GPU. With expert parallelism each GPU holds num_experts / TP whole
experts instead of 1/TP of every expert: the same bytes per GPU.

The reserve is a stated guess, calibrated on a published vLLM 0.15 log of
this model on 8 x H100 80GB (TP 8 + EP, GPU_MEMORY_UTIL 0.90): weights 28.24
GiB, KV cache 40.07 GiB (894,064 tokens), so 3.4 GiB of the 71.7 GiB budget
went to activations and the runtime; since vLLM 0.21 the CUDA graphs are
counted inside the budget too (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qwen3_vl_service.core.findings import Finding, Level
from qwen3_vl_service.core.units import count
from qwen3_vl_service.planning import parallel
from qwen3_vl_service.planning.batch import resolve_batch
from qwen3_vl_service.planning.yarn import native_overrun, plan_yarn

if TYPE_CHECKING:
    from qwen3_vl_service.machine.gpus import Inventory
    from qwen3_vl_service.planning.model import ModelInfo
    from qwen3_vl_service.settings.config import ServiceConfig

MiB = 1024**2
GiB = 1024**3

ACTIVATION_RESERVE = 4 * GiB  # profile-run activation peak, NCCL/cuBLAS workspaces, encoder cache, non-torch
CUDA_GRAPH_RESERVE = 1 * GiB  # captured CUDA graphs (none with ENFORCE_EAGER)
KV_BLOCK = 16  # vLLM's default KV cache block size, in tokens
NODE_GPUS = 8  # GPUs of the usual node (8 x H100/H200): what a fix may ask for without more nodes
# Host memory (RAM) of a running server: the API server and engine core with
# their multimodal processor caches (VLLM_MM_PROCESSOR_CACHE_GB, 4 GiB each),
# plus one worker process per GPU (CUDA context, torch, NCCL buffers).
HOST_BASE = 14 * GiB
HOST_PER_WORKER = 5 * GiB
# Expected load time: read the checkpoint at LOAD_RATE (a network file
# system, all ranks together) plus compile, profile and CUDA graph capture.
LOAD_RATE = 1 * GiB  # bytes per second
LOAD_FIXED_S = 300.0
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
# Below this MAX_TOKENS a Thinking model's reasoning often uses up the whole answer (Qwen's cards
# for its Thinking models suggest output lengths in the tens of thousands of tokens).
THINKING_MIN_TOKENS = 2048
# Preemption is likely when MAX_NUM_SEQS sequences at once leave each fewer KV tokens than a short
# chat turn (a prompt and a short answer): then even short requests outgrow the cache at full load.
PREEMPTION_SHARE = 512


@dataclass(frozen=True)
class RankSlot:
    """One tensor-parallel rank: where it runs and what it holds."""

    rank: int
    cuda_index: int  # the device number the rank opens (position in CUDA_VISIBLE_DEVICES)
    gpu_index: int  # the GPU as nvidia-smi numbers it
    gpu_name: str
    total_bytes: int
    budget_bytes: int
    weights_bytes: int
    reserve_bytes: int
    kv_bytes: int
    kv_tokens: int


@dataclass
class Plan:
    tensor_parallel_size: int
    expert_parallel: bool
    expert_parallel_reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    # Capacity: None when there is nothing to plan against (no GPUs, no config.json).
    weights_total_bytes: int | None = None
    weights_source: str = ""
    vision_bytes: int | None = None
    vision_source: str = ""
    vision_replicated: bool = False
    weights_per_gpu_bytes: int | None = None
    activation_reserve_bytes: int = ACTIVATION_RESERVE
    cuda_graph_reserve_bytes: int = CUDA_GRAPH_RESERVE
    budget_per_gpu_bytes: int | None = None
    kv_bytes_per_gpu: int | None = None
    num_layers: int | None = None
    kv_heads_per_gpu: int | None = None
    head_dim: int | None = None
    kv_dtype: str = ""
    kv_dtype_bytes: int | None = None
    kv_bytes_per_token_per_gpu: int | None = None
    kv_tokens: int | None = None
    max_model_len: int = 0
    # The sequences and batched tokens per step vLLM runs with: the user's MAX_NUM_SEQS and
    # MAX_NUM_BATCHED_TOKENS, else vLLM's own defaults for the device (0: not known, no GPUs).
    max_num_seqs: int = 0
    max_num_seqs_source: str = ""
    max_num_batched_tokens: int = 0
    max_num_batched_tokens_source: str = ""
    max_concurrency: int | None = None
    gpu_memory_util: float = 0.0
    experts_per_gpu: str = ""
    rank_map: tuple[RankSlot, ...] = ()
    host_memory_bytes: int | None = None
    expected_load_s: float | None = None
    # YaRN (ROPE_SCALING=yarn, yarn.py): vLLM's --hf-overrides, the positions it covers, and whether
    # vLLM must be told that MAX_MODEL_LEN may pass the config's length (VLLM_ALLOW_LONG_MAX_MODEL_LEN).
    hf_overrides: dict | None = None
    rope_positions: int | None = None
    allow_long_max_model_len: bool = False

    @property
    def reserve_bytes(self) -> int:
        return self.activation_reserve_bytes + self.cuda_graph_reserve_bytes

    @property
    def has_capacity(self) -> bool:
        return self.kv_tokens is not None

    def formula(self) -> list[str]:
        """The capacity maths with this plan's numbers, one step a line."""
        if not self.has_capacity:
            return []
        g = _gib
        tp = self.tensor_parallel_size
        total = self.rank_map[0].total_bytes if self.rank_map else 0
        w_total = self.weights_total_bytes or 0
        if self.vision_replicated and self.vision_bytes:
            vis = self.vision_bytes
            weights_how = (
                f"({g(w_total)} - {g(vis)} vision) / {tp} + {g(vis)} vision copy (MM_ENCODER_TP_MODE=data); "
                f"{g(w_total)} GiB from {self.weights_source}, vision from {self.vision_source}"
            )
        else:
            weights_how = f"{g(w_total)} / {tp}; {g(w_total)} GiB from {self.weights_source}"
        graphs = g(self.cuda_graph_reserve_bytes) if self.cuda_graph_reserve_bytes else "0 (ENFORCE_EAGER)"
        per_tok = self.kv_bytes_per_token_per_gpu or 0
        lines = [
            f"budget      {self.gpu_memory_util:g} x {g(total)} GiB = "
            f"{g(self.budget_per_gpu_bytes or 0)} GiB per GPU",
            f"weights   - {g(self.weights_per_gpu_bytes or 0)} GiB = {weights_how}",
            f"reserve   - {g(self.reserve_bytes)} GiB = activations and runtime "
            f"{g(self.activation_reserve_bytes)} + CUDA graphs {graphs}",
            f"KV cache  = {g(self.kv_bytes_per_gpu or 0)} GiB per GPU",
            f"KV/token    {self.num_layers} layers x {self.kv_heads_per_gpu} KV head(s) per GPU "
            f"x {self.head_dim} "
            f"x 2 (K,V) x {self.kv_dtype_bytes} B ({self.kv_dtype}) = {per_tok:,} B per GPU",
            f"KV tokens   {g(self.kv_bytes_per_gpu or 0)} GiB / {per_tok:,} B = {self.kv_tokens:,} "
            f"(blocks of {KV_BLOCK})",
            f"at once     {self.kv_tokens:,} // MAX_MODEL_LEN {self.max_model_len:,} = "
            f"{self.max_concurrency} full-length sequences (information: vLLM adds KV blocks as "
            "tokens arrive)",
        ]
        if self.max_num_seqs:
            share = (self.kv_tokens or 0) // self.max_num_seqs
            lines.append(
                f"batch       MAX_NUM_SEQS {self.max_num_seqs} ({self.max_num_seqs_source}): "
                f"{share:,} KV tokens each when all run at once; {self.max_num_batched_tokens:,} "
                f"batched tokens per step ({self.max_num_batched_tokens_source})"
            )
        if self.expert_parallel and self.experts_per_gpu:
            lines.append(f"experts     {self.experts_per_gpu} (expert parallel: same bytes per GPU as TP)")
        return lines


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


# ---------------------------------------------------------------------------


def vision_params(vision: dict, out_hidden: int | None = None) -> int:
    """Parameters of a Qwen3-VL vision tower, from its vision_config (biases and norms included).

    27 blocks of attention (qkv + proj) and MLP at width 1152/4304, the
    patch and position embeddings, and the merger plus one deepstack merger
    per deepstack index (each 4608 -> 4608 -> 4096 for 2x2 merging).
    576 M for Qwen3-VL-235B: 1.07 GiB in bfloat16.
    """
    h = int(vision.get("hidden_size") or 0)
    i = int(vision.get("intermediate_size") or 4 * h)
    depth = int(vision.get("depth") or 0)
    if not (h and depth):
        return 0
    channels = int(vision.get("in_channels") or 3)
    patch = int(vision.get("patch_size") or 16)
    temporal = int(vision.get("temporal_patch_size") or 2)
    merge = int(vision.get("spatial_merge_size") or 2)
    out = int(vision.get("out_hidden_size") or out_hidden or h)
    positions = int(vision.get("num_position_embeddings") or 0)
    deepstack = vision.get("deepstack_visual_indexes") or []
    block = (4 * h * h + 4 * h) + (2 * h * i + i + h) + 4 * h
    mh = h * merge * merge
    merger = mh * mh + mh + mh * out + out + 2 * mh
    embed = channels * temporal * patch * patch * h + h + positions * h
    return depth * block + embed + (1 + len(deepstack)) * merger


def _dtype_bytes(cfg: ServiceConfig, model: ModelInfo) -> tuple[str, int]:
    name = model.dtype if cfg.dtype == "auto" else cfg.dtype
    name = name or "bfloat16"
    return name, DTYPE_BYTES.get(name, 2)


def _kv_dtype(cfg: ServiceConfig, model: ModelInfo) -> tuple[str, int]:
    if cfg.kv_cache_dtype.startswith("fp8"):
        return cfg.kv_cache_dtype, 1
    if cfg.kv_cache_dtype == "bfloat16":
        return "bfloat16", 2
    return _dtype_bytes(cfg, model)  # auto: the model's dtype


def make(cfg: ServiceConfig, inventory: Inventory | None, model: ModelInfo) -> Plan:
    """The plan for CFG on INVENTORY (None: no GPUs to plan against) with MODEL."""
    plan = _make(cfg, inventory, model)
    if model.config_ok and cfg.rope_scaling != "yarn":
        # After the capacity: a context past the native positions names YaRN and what the GPUs hold then.
        native_overrun(cfg, model, plan)
    return plan


def _make(cfg: ServiceConfig, inventory: Inventory | None, model: ModelInfo) -> Plan:
    tp = cfg.tensor_parallel_size
    plan = Plan(
        tensor_parallel_size=tp,
        expert_parallel=cfg.expert_parallel == "on",
        max_model_len=cfg.max_model_len,
        gpu_memory_util=cfg.gpu_memory_util,
    )
    out = plan.findings

    if inventory is not None:
        _gpu_count(cfg, inventory, model, out)
    _answer_length(cfg, out)
    if model.config_ok:
        parallel.decide(cfg, model, plan)
        if cfg.rope_scaling == "yarn":
            plan_yarn(cfg, model, plan)
    else:
        out.append(
            Finding(
                "warn",
                "Parallel",
                "compatibility and capacity not checked: the model's config.json could not be read",
                "fix the Model error above",
            )
        )
        return plan

    weights = model.weights_bytes
    if weights:
        plan.weights_total_bytes = weights
        plan.weights_source = (
            "the index's metadata.total_size" if model.index_total_size else "the shard files"
        )
        if model.planned_from:
            plan.weights_source = "the published total_size (derived; not downloaded yet)"
    if cfg.device == "cpu":
        # The load-time and host-memory figures below are the GPU service's
        # (CUDA graphs, one CUDA worker per GPU); the CPU backend has neither,
        # and the SLURM checks that use them would refuse the demo for nothing.
        _cpu_capacity(cfg, model, plan)
        return plan
    if weights:
        plan.expected_load_s = weights / LOAD_RATE + LOAD_FIXED_S
    plan.host_memory_bytes = HOST_BASE + tp * HOST_PER_WORKER
    if "eager" in _load_strategy(cfg):
        # Each rank reads a whole shard into memory at once (vllm weight_utils, load_strategy eager).
        plan.host_memory_bytes += tp * max((s.size or 0) for s in model.shards or ())
    if inventory is None:
        out.append(
            Finding(
                "warn",
                "Capacity",
                "not planned: no GPUs to plan against",
                "plan with --gpus 8xH100-80GB (or run on the GPU node)",
            )
        )
        return plan
    if not weights:
        out.append(
            Finding(
                "warn", "Capacity", "not planned: the checkpoint's size is unknown", "fix the Model errors"
            )
        )
        return plan
    if inventory.count < tp:
        return plan  # the GPU count error says it all
    _capacity(cfg, inventory, model, plan)
    return plan


def _load_strategy(cfg: ServiceConfig) -> str:
    args = list(cfg.extra_vllm_args)
    for i, a in enumerate(args):
        if a.startswith("--safetensors-load-strategy"):
            if "=" in a:
                return a.split("=", 1)[1]
            return args[i + 1] if i + 1 < len(args) else ""
    return ""


def _gpu_count(cfg: ServiceConfig, inventory: Inventory, model: ModelInfo, out: list[Finding]) -> None:
    tp = cfg.tensor_parallel_size
    n = inventory.count
    if n < tp:
        options = [t for t in parallel.valid_tps(model, n) if model.config_ok] if n else []
        lower = f", or TENSOR_PARALLEL_SIZE={options[-1]} if the model fits" if options else ""
        out.append(
            Finding(
                "error",
                "GPUs",
                f"Requested {tp} GPUs but only {n} available (TENSOR_PARALLEL_SIZE={tp}; {inventory.source})",
                f"get {tp} GPUs (salloc --gpus-per-node={tp}; check CUDA_VISIBLE_DEVICES){lower}",
            )
        )
    if n > tp:
        used = ",".join(str(g.index) for g in inventory.gpus[:tp])
        out.append(
            Finding(
                "ok",
                "GPUs",
                f"TENSOR_PARALLEL_SIZE={tp} uses {tp} of the {n} GPUs: {used}",
                "set CUDA_VISIBLE_DEVICES to choose others",
            )
        )
    names = {g.name for g in inventory.gpus[:tp]}
    if len(names) > 1:
        out.append(
            Finding(
                "warn",
                "GPUs",
                f"the GPUs differ ({', '.join(sorted(names))}): every rank runs at the pace of the slowest",
                "use GPUs of one kind (CUDA_VISIBLE_DEVICES)",
            )
        )
    _fp8_capability(model, inventory, tp, out)
    _free_memory(cfg, inventory, tp, out)


def _fp8_capability(model: ModelInfo, inventory: Inventory, tp: int, out: list[Finding]) -> None:
    """FP8 kernels against the GPUs' compute capability."""
    for g in inventory.gpus[:tp]:
        cc = g.compute_capability
        if cc is None or model.quant_method != "fp8":
            continue
        if cc < (8, 0):
            out.append(
                Finding(
                    "error",
                    "GPUs",
                    f"GPU {g.index} ({g.name}) has compute capability {cc[0]}.{cc[1]}: "
                    "vLLM's FP8 kernels need 8.0 or newer",
                    "use H100/H200 (9.0) GPUs",
                )
            )
            break
        if cc < (8, 9):
            out.append(
                Finding(
                    "warn",
                    "GPUs",
                    f"GPU {g.index} ({g.name}) has compute capability {cc[0]}.{cc[1]}: no FP8 tensor cores, "
                    "vLLM falls back to the slower weight-only FP8 (Marlin) kernels",
                    "use H100/H200 (9.0) GPUs for full speed",
                )
            )
            break


def _free_memory(cfg: ServiceConfig, inventory: Inventory, tp: int, out: list[Finding]) -> None:
    # vLLM refuses to start when a GPU has less free memory than it asks for
    # (vllm/v1/worker/utils.py request_memory: "Free memory on device ... is
    # less than desired GPU memory utilization").
    for g in inventory.gpus[:tp]:
        want = math.ceil(g.total_bytes * cfg.gpu_memory_util)
        if g.free_bytes >= want:
            continue
        held = (
            ", ".join(f"pid {p.pid} {p.name} {p.used_bytes // MiB:,} MiB" for p in g.processes)
            or "no process visible"
        )
        util = math.floor(g.free_bytes / g.total_bytes * 100) / 100
        kill = " ".join(str(p.pid) for p in g.processes)
        out.append(
            Finding(
                "error",
                "GPUs",
                f"GPU {g.index} has {_gib(g.free_bytes)} GiB free, vLLM asks for {_gib(want)} GiB "
                f"(GPU_MEMORY_UTIL={cfg.gpu_memory_util:g} x {_gib(g.total_bytes)} GiB); held by {held}",
                (f"stop them (kill {kill})" if kill else "free the GPU")
                + (f" or lower GPU_MEMORY_UTIL to {util:g} (less KV cache)" if util > 0.3 else ""),
            )
        )


def _answer_length(cfg: ServiceConfig, out: list[Finding]) -> None:
    """MAX_TOKENS caps the thinking too: vLLM caps every request's max_tokens to it."""
    if cfg.reasoning_parser and cfg.max_tokens < THINKING_MIN_TOKENS:
        out.append(
            Finding(
                "warn",
                "Answers",
                f"MAX_TOKENS={cfg.max_tokens} caps the reasoning as well as the answer (REASONING_PARSER="
                f"{cfg.reasoning_parser}), and no request can ask for more: a Thinking model often "
                "reasons past it and then ends with finish_reason 'length' and no answer",
                f"raise MAX_TOKENS to {THINKING_MIN_TOKENS} or more (balanced: 8192) unless the answers "
                "are meant to be cut",
            )
        )


def _capacity(cfg: ServiceConfig, inventory: Inventory, model: ModelInfo, plan: Plan) -> None:
    """Weights, reserve and KV cache per GPU (see the module doc), and the verdict on them."""
    weights = _weights_per_gpu(cfg, model, plan)
    if cfg.enforce_eager:
        plan.cuda_graph_reserve_bytes = 0
    per_token = _kv_per_token(cfg, model, plan)
    reserve = plan.reserve_bytes
    slots = []
    for rank, g in enumerate(inventory.gpus[: cfg.tensor_parallel_size]):
        budget = math.ceil(g.total_bytes * cfg.gpu_memory_util)
        kv = budget - weights - reserve
        tokens = (max(kv, 0) // per_token) // KV_BLOCK * KV_BLOCK if per_token else 0
        slots.append(
            RankSlot(rank, rank, g.index, g.name, g.total_bytes, budget, weights, reserve, kv, tokens)
        )
    plan.rank_map = tuple(slots)
    smallest = min(slots, key=lambda s: s.kv_bytes)
    plan.budget_per_gpu_bytes = smallest.budget_bytes
    plan.kv_bytes_per_gpu = smallest.kv_bytes
    plan.kv_tokens = smallest.kv_tokens
    plan.max_concurrency = plan.kv_tokens // cfg.max_model_len
    resolve_batch(cfg, plan, inventory.gpus[0])
    if smallest.kv_bytes <= 0:
        plan.findings.append(_does_not_fit(cfg, inventory, model, smallest))
    elif plan.kv_tokens < cfg.max_model_len:
        plan.findings.append(_one_sequence_does_not_fit(cfg, inventory, model, plan, smallest))
    else:
        plan.findings.append(_concurrency(cfg, plan, smallest))


def _weights_per_gpu(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> int:
    """The weights one GPU holds (the heaviest rank's); fills in the vision encoder's part."""
    tp = cfg.tensor_parallel_size
    total = plan.weights_total_bytes or 0
    # The vision encoder: exact from the shard headers, else estimated from vision_config.
    vision = model.vision_bytes
    plan.vision_source = "the shard headers"
    if not vision and model.vision:
        vision = vision_params(dict(model.vision), model.hidden_size) * 2  # bfloat16, not quantized
        plan.vision_source = "an estimate from vision_config (bf16)"
    vision = min(vision or 0, total)
    plan.vision_bytes = vision or None
    plan.vision_replicated = bool(vision) and tp > 1 and cfg.mm_encoder_tp_mode == "data"
    weights = (total - vision) / tp + vision if plan.vision_replicated else total / tp
    if plan.expert_parallel and model.num_experts and model.num_experts % tp:
        # The heaviest rank holds one expert more than the even share.
        _, wbytes = ("fp8", 1) if model.quant_method == "fp8" else _dtype_bytes(cfg, model)
        experts_bytes = min(
            total,
            (model.num_hidden_layers or 0)
            * model.num_experts
            * 3
            * (model.hidden_size or 0)
            * (model.moe_intermediate_size or 0)
            * wbytes,
        )
        weights += experts_bytes * (math.ceil(model.num_experts / tp) / model.num_experts - 1 / tp)
    plan.weights_per_gpu_bytes = int(weights)
    return plan.weights_per_gpu_bytes


def _kv_per_token(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> int:
    """KV cache bytes per token on one GPU; fills in the factors for the formula."""
    kv_name, kv_bytes = _kv_dtype(cfg, model)
    layers = model.num_hidden_layers or 0
    kv_heads_per_gpu = max(1, (model.num_key_value_heads or 1) // cfg.tensor_parallel_size)
    head_dim = model.head_dim or 0
    per_token = layers * kv_heads_per_gpu * head_dim * 2 * kv_bytes
    plan.num_layers, plan.kv_heads_per_gpu, plan.head_dim = layers, kv_heads_per_gpu, head_dim
    plan.kv_dtype, plan.kv_dtype_bytes = kv_name, kv_bytes
    plan.kv_bytes_per_token_per_gpu = per_token
    return per_token


def _more_gpus(model: ModelInfo, tp: int, inventory: Inventory) -> int | None:
    """The next tensor-parallel size (8, 16) that the heads allow and one node can give, if any.

    One TP group never spans nodes here (replicas and data parallelism do), so "use 16 GPUs"
    is no fix on the usual 8-GPU nodes; a node seen (or described) with more may say so.
    """
    heads = model.num_attention_heads or 1
    node = max(inventory.count, NODE_GPUS)
    return next((t for t in (8, 16) if tp < t <= node and heads % t == 0), None)


def _does_not_fit(cfg: ServiceConfig, inventory: Inventory, model: ModelInfo, smallest: RankSlot) -> Finding:
    g = _gib
    more = _more_gpus(model, cfg.tensor_parallel_size, inventory)
    return Finding(
        "error",
        "Capacity",
        f"the model does not fit: {g(smallest.weights_bytes)} GiB weights + {g(smallest.reserve_bytes)} GiB "
        f"reserve per GPU exceed the {g(smallest.budget_bytes)} GiB budget "
        f"(GPU_MEMORY_UTIL={cfg.gpu_memory_util:g} x {g(smallest.total_bytes)} GiB)",
        (f"use {more} GPUs (TENSOR_PARALLEL_SIZE={more})" if more else "use more or larger GPUs")
        + " or raise GPU_MEMORY_UTIL",
    )


def _one_sequence_does_not_fit(
    cfg: ServiceConfig, inventory: Inventory, model: ModelInfo, plan: Plan, smallest: RankSlot
) -> Finding:
    g = _gib
    tokens = smallest.kv_tokens
    per_token = plan.kv_bytes_per_token_per_gpu or 0
    kv_bytes = plan.kv_dtype_bytes or 1
    weights, reserve = smallest.weights_bytes, smallest.reserve_bytes
    need_one = math.ceil(cfg.max_model_len / KV_BLOCK) * KV_BLOCK * per_token
    fixes = [f"lower MAX_MODEL_LEN to {tokens} or less"]
    if kv_bytes > 1:
        fp8_tokens = tokens * kv_bytes  # same bytes, one byte per element
        if fp8_tokens >= cfg.max_model_len:
            fixes.append(f"set KV_CACHE_DTYPE=fp8 (holds {fp8_tokens:,} tokens)")
    util = math.ceil((weights + reserve + need_one) / smallest.total_bytes * 100) / 100
    if util <= 0.95:
        fixes.append(f"raise GPU_MEMORY_UTIL to {util:g}")
    more = _more_gpus(model, cfg.tensor_parallel_size, inventory)
    if more:
        fixes.append(f"use {more} GPUs")
    bigger = _bigger_gpu(need_one, weights + reserve, cfg.gpu_memory_util, smallest.total_bytes)
    if bigger:
        fixes.append(f"use {cfg.tensor_parallel_size} x {bigger}")
    return Finding(
        "error",
        "Capacity",
        f"one sequence of MAX_MODEL_LEN={cfg.max_model_len:,} needs {g(need_one)} GiB "
        "of KV cache per GPU, "
        f"only {g(smallest.kv_bytes)} GiB ({tokens:,} tokens) are left after "
        f"{g(weights)} GiB weights and {g(reserve)} GiB reserve; vLLM would fail after loading "
        "('To serve at least one request with the model's max seq len ...')",
        ", or ".join(fixes),
    )


def _concurrency(cfg: ServiceConfig, plan: Plan, smallest: RankSlot) -> Finding:
    """The capacity verdict: full-length sequences as information; a warning when, with
    MAX_NUM_SEQS sequences at once, each gets too little of the cache (preemption likely)."""
    concurrency = plan.max_concurrency or 0
    seqs = plan.max_num_seqs
    shown = f"auto: {seqs}, {plan.max_num_seqs_source}" if not cfg.max_num_seqs else str(seqs)
    share = smallest.kv_tokens // seqs if seqs else smallest.kv_tokens
    summary = (
        f"KV cache {_gib(smallest.kv_bytes)} GiB per GPU = {smallest.kv_tokens:,} tokens: "
        f"{count(concurrency, 'sequence')} of MAX_MODEL_LEN={cfg.max_model_len:,} at once; "
        f"MAX_NUM_SEQS={shown}"
    )
    if share >= min(PREEMPTION_SHARE, cfg.max_model_len) or seqs <= concurrency:
        return Finding("ok", "Capacity", f"{summary} ({share:,} tokens each when all run at once)")
    # The largest count that still leaves every sequence a short chat turn's worth of cache.
    fits = max(concurrency, smallest.kv_tokens // PREEMPTION_SHARE, 1)
    return Finding(
        "warn",
        "Capacity",
        f"{summary}: with {seqs} sequences at once each gets {share:,} KV tokens, less than a short "
        f"chat turn ({PREEMPTION_SHARE}); vLLM will preempt running requests and recompute them later",
        f"set MAX_NUM_SEQS={fits} or less, or free KV cache (KV_CACHE_DTYPE=fp8, GPU_MEMORY_UTIL, more GPUs)",
    )


# Larger GPUs to name in a capacity fix: (name, bytes as NVML reports them; gpus.py's table).
_BIGGER = (("H200-141GB", 143_771 * MiB), ("B200-180GB", 183_359 * MiB))


def _bigger_gpu(need_kv: int, fixed: int, util: float, total: int) -> str:
    """The first larger GPU on which one sequence fits (same weights and reserve per GPU), or ""."""
    for name, size in _BIGGER:
        if size > total and math.floor(size * util) - fixed >= need_kv:
            return name
    return ""


def _cpu_capacity(cfg: ServiceConfig, model: ModelInfo, plan: Plan) -> None:
    """DEVICE=cpu: the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (vLLM's CPU backend), not a GPU's share."""
    space = cfg.vllm_env.get("VLLM_CPU_KVCACHE_SPACE", "")
    try:
        gib = float(space)
    except ValueError:
        gib = 0.0
    _, kv_bytes = _kv_dtype(cfg, model)
    per_token = (model.num_hidden_layers or 0) * (model.num_key_value_heads or 1) * (model.head_dim or 0)
    per_token *= 2 * kv_bytes
    if gib <= 0 or not per_token:
        if not cfg.max_num_seqs:
            plan.findings.append(
                Finding(
                    "warn",
                    "Capacity",
                    "MAX_NUM_SEQS=auto on the CPU backend without VLLM_CPU_KVCACHE_SPACE: "
                    "vLLM's default applies",
                    "set VLLM_CPU_KVCACHE_SPACE (GiB) in the config file",
                )
            )
        return
    tokens = int(gib * GiB) // per_token // KV_BLOCK * KV_BLOCK
    full = tokens // cfg.max_model_len
    if full < 1:
        plan.findings.append(
            Finding(
                "error",
                "Capacity",
                f"VLLM_CPU_KVCACHE_SPACE={space} GiB holds {tokens:,} tokens, less than one sequence of "
                f"MAX_MODEL_LEN={cfg.max_model_len:,}",
                f"raise VLLM_CPU_KVCACHE_SPACE or lower MAX_MODEL_LEN to {tokens} or less",
            )
        )
        return
    plan.max_concurrency = full
    resolve_batch(cfg, plan, None)
    plan.findings.append(
        Finding(
            "ok",
            "Capacity",
            f"CPU KV cache VLLM_CPU_KVCACHE_SPACE={space} GiB = {tokens:,} tokens: "
            f"{count(full, 'sequence')} of MAX_MODEL_LEN={cfg.max_model_len:,} at once ("
            f"MAX_NUM_SEQS={_seqs_note(cfg, plan)})",
        )
    )


def _seqs_note(cfg: ServiceConfig, plan: Plan) -> str:
    """How MAX_NUM_SEQS came to be: the user's number, or vLLM's default."""
    if cfg.max_num_seqs:
        return str(cfg.max_num_seqs)
    return f"auto: {plan.max_num_seqs}, {plan.max_num_seqs_source}"


__all__ = ["Finding", "Level", "Plan", "RankSlot", "make", "vision_params"]
