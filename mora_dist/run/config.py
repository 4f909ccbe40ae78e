"""The launcher's JSON schema (``RunConfig``), ``--set`` overrides, and the checks that run before any process
group exists.

One pydantic model per section (``extra="forbid"``, strict types), the adapter section is the ``MoRAConfig``
dataclass itself. :func:`load_run_config` reads the file, applies ``--set a.b=c`` edits to the raw dict, then
validates everything at once; :func:`check_world` adds the rules that need the world size. Every failure is one
:class:`RunConfigError` listing each bad key with its value and the fix.

Spec: §3 (ReMoRA settings), §4 (tensor-parallel sizes).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from mora_dist.config import MoRAConfig, resolve_mora_type
from mora_dist.data.sources import hub_id, reads_like_hub
from mora_dist.errors import MoRAConfigError
from mora_dist.run.model_shape import MOE_MODEL_TYPES, GPTShape

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


# model.dtype -> the torch dtype of the base weights.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunConfigError(MoRAConfigError):
    """The run config cannot work; the message names every bad key, its value and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSection(_Section):
    """Architecture (from scratch) or a local checkpoint (continual pretraining). Architecture fields left at
    ``None`` take the 250M defaults for a new model and are read from ``pretrained`` otherwise."""

    backend: Literal["hf", "megatron"] = "hf"
    pretrained: str | None = None
    # new Hugging Face models only: a dense Llama, or a mixture of experts (Mixtral, Qwen3-MoE)
    architecture: Literal["llama", "mixtral", "qwen3_moe"] = "llama"
    num_experts: int | None = Field(default=None, gt=1)
    num_experts_per_tok: int | None = Field(default=None, gt=0)
    router_aux_loss_coef: float = Field(default=0.001, ge=0.0)
    hidden_size: int | None = Field(default=None, gt=0)
    num_layers: int | None = Field(default=None, gt=0)
    num_heads: int | None = Field(default=None, gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    vocab_size: int | None = Field(default=None, gt=0)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tensor_model_parallel_size: int = Field(default=1, gt=0)
    # megatron backend without DeepSpeed (deepspeed: null) only: pipeline stages and chunks per stage
    pipeline_model_parallel_size: int = Field(default=1, gt=0)
    virtual_pipeline_model_parallel_size: int | None = Field(default=None, gt=1)
    # megatron-native mixtures of experts only: experts split over expert_model_parallel_size ranks, each
    # expert's weights over expert_tensor_parallel_size (1, or tensor_model_parallel_size)
    expert_model_parallel_size: int = Field(default=1, gt=0)
    expert_tensor_parallel_size: int = Field(default=1, gt=0)
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    gradient_checkpointing: bool = False

    def is_moe(self) -> bool:
        """A mixture of experts: ``architecture`` mixtral / qwen3_moe, or such a ``pretrained`` checkpoint."""
        if self.pretrained is None:
            return self.architecture != "llama"
        shape = _pretrained_shape(self)
        return shape is not None and shape.is_moe

    def arch(self) -> dict[str, int]:
        """Architecture with defaults filled in (new models only; experts: 8, top-2, as Mixtral)."""
        return {
            "hidden_size": self.hidden_size or 768,
            "num_layers": self.num_layers or 24,
            "num_heads": self.num_heads or 16,
            "num_kv_heads": self.num_kv_heads or self.num_heads or 16,
            "intermediate_size": self.intermediate_size or 2560,
            "num_experts": self.num_experts or 8,
            "num_experts_per_tok": self.num_experts_per_tok or 2,
        }


class LoRASection(_Section):
    """A LoRA (or ReLoRA) baseline instead of MoRA. Spec: §3.1."""

    r: int = Field(gt=0)
    lora_alpha: float | None = None
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    merge_compensation: bool = True  # as MoRAConfig.merge_compensation: bf16 merges lose nothing


class RestartSection(_Section):
    """Merge-and-restart settings shared by ReMoRA and ReLoRA. Spec: §3, §3.1.

    ``mora_types`` is the ReMoRA type cycle (ignored by ReLoRA); ``optimizer_reset`` is ``"full"`` (zero the
    moments), ``"random"`` or ``"magnitude"`` pruning with ``prune_ratio``.
    """

    merge_every: int = Field(gt=0)
    mora_types: list[int | str] = [1, 2]
    optimizer_reset: Literal["full", "random", "magnitude"] = "full"
    prune_ratio: float = Field(default=0.999, ge=0.0, le=1.0)


class OptimizerSection(_Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0.0)
    betas: list[float] = Field(default=[0.9, 0.95], min_length=2, max_length=2)
    eps: float = 1e-8
    weight_decay: float = Field(default=0.0, ge=0.0)
    torch_adam: bool | None = None  # None: torch's AdamW where DeepSpeed's fused Adam would need a JIT build
    # megatron-native training (deepspeed: null): megatron-core's DistributedOptimizer instead of its
    # Float16/FP32 optimizer (fp32 main params and moments sharded over the data-parallel ranks)
    use_distributed_optimizer: bool = False


class SchedulerSection(_Section):
    """``cosine`` (one warmup), ``jagged_cosine`` (re-warmup after every merge; needs remora/relora), ``constant``.

    Spec: §3.1.
    """

    name: Literal["cosine", "jagged_cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    restart_warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)


class DataSource(_Section):
    """One corpus. ``path`` is local files (a .txt/.jsonl/.parquet file or folder), ``hf://<dataset id>`` on the
    Hugging Face hub, a local copy of a hub dataset (when ``hub_config`` or ``eval_split`` is set), or with
    ``format="megatron"`` the prefix of a Megatron indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``).

    ``hub_config`` / ``split`` / ``eval_split`` pick the hub dataset's config and splits; with ``eval_split`` the
    first ``eval_blocks`` packed blocks of that split are the held-out set and all of ``split`` trains, otherwise
    the first ``eval_blocks`` blocks of ``split`` are held out.
    """

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    hub_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    format: Literal["auto", "text", "jsonl", "parquet", "megatron"] = "auto"
    text_field: str = "text"
    weight: float = Field(default=1.0, gt=0.0)
    eval_blocks: int = Field(default=16, ge=1)


class DataSection(_Section):
    """Sources and their mixture, tokenizer, packing. ``tokenizer`` is a ``tokenizer.json`` file, a Hugging Face
    tokenizer folder or ``hf://<model id>``; with ``tokenizer_vocab_size`` a missing file is trained from the
    sources. Streaming sources are split over the data-parallel ranks (each rank reads only its part)."""

    sources: list[DataSource] = Field(min_length=1)
    tokenizer: str
    tokenizer_vocab_size: int | None = Field(default=None, gt=0)
    seq_len: int = Field(gt=0)
    streaming: bool = False
    shuffle: bool = True
    shuffle_buffer: int = Field(default=10_000, gt=0)
    num_proc: int = Field(default=1, gt=0)
    cache_dir: str | None = None


class TrainingSection(_Section):
    output_dir: str
    max_steps: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int | None = Field(default=None, gt=0)
    eval_interval: int = Field(default=0, ge=0)
    # Evaluate once before the first step (the starting loss). None: on for continual pretraining
    # (model.pretrained) and whenever eval_interval is set.
    eval_at_start: bool | None = None
    save_interval: int = Field(default=0, ge=0)
    keep_last: int = Field(default=2, gt=0)
    log_interval: int = Field(default=1, gt=0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    seed: int = 1234
    # CPU only: intra-op threads per rank (None: $OMP_NUM_THREADS, else cores / local ranks). Small models run
    # fastest on one thread per rank; more threads than free cores slow every rank down many times over.
    cpu_threads: int | None = Field(default=None, gt=0)
    # Signals that end the run at the next step boundary with a checkpoint (mora_dist/run/preemption.py); [] off.
    exit_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]] = ["SIGTERM", "SIGUSR1"]


class LoggingSection(_Section):
    tensorboard: bool = True
    log_dir: str | None = None
    progress: Literal["line", "none"] = "line"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class RunConfig(_Section):
    """The whole job. ``mora`` xor ``lora`` (neither: full-rank); ``remora`` needs ``mora``, ``relora`` ``lora``.

    Spec: §3.
    """

    model: ModelSection = ModelSection()
    mora: MoRAConfig | None = None
    lora: LoRASection | None = None
    remora: RestartSection | None = None
    relora: RestartSection | None = None
    optimizer: OptimizerSection
    scheduler: SchedulerSection = SchedulerSection()
    deepspeed: dict[str, Any] | str | None = Field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    data: DataSection
    training: TrainingSection
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _cross_section(self, info: ValidationInfo) -> RunConfig:
        problems = _cross_section_problems(self, check_paths=(info.context or {}).get("check_paths", True))
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def method(self) -> str:
        """``"remora"``, ``"mora"``, ``"relora"``, ``"lora"`` or ``"full"``."""
        if self.mora is not None:
            return "remora" if self.remora is not None else "mora"
        if self.lora is not None:
            return "relora" if self.relora is not None else "lora"
        return "full"

    def deepspeed_dict(self) -> dict[str, Any]:
        """The DeepSpeed section as a dict (read from its file when it is a path)."""
        if self.deepspeed is None:  # megatron-native training
            return {}
        if isinstance(self.deepspeed, str):
            return json.loads(Path(self.deepspeed).read_text())
        return copy.deepcopy(self.deepspeed)


def _cross_section_problems(cfg: RunConfig, *, check_paths: bool = True) -> list[str]:
    out: list[str] = []
    _check_restarts(cfg, out)
    _check_native(cfg, out)
    m = cfg.model
    if cfg.mora is not None and cfg.lora is not None:
        out.append("mora and lora are both set: keep one (neither trains the full model)")
    if cfg.remora is not None and cfg.mora is None:
        out.append("remora is set without a mora section: add mora (r, mora_type, target_modules) or use relora")
    if cfg.relora is not None and cfg.lora is None:
        out.append("relora is set without a lora section: add lora (r, target_modules) or use remora")
    if cfg.scheduler.name == "jagged_cosine" and cfg.remora is None and cfg.relora is None:
        out.append("scheduler.name='jagged_cosine' restarts at merges, but neither remora nor relora is set: "
                   "use 'cosine' or add a remora section")
    moe_fields = [k for k in ("num_experts", "num_experts_per_tok") if getattr(m, k) is not None]
    if m.architecture == "llama" and moe_fields:
        out.append(f"model.{moe_fields[0]} is set but model.architecture='llama' has no experts: set "
                   "model.architecture to 'mixtral' or 'qwen3_moe', or remove it")
    _check_megatron_moe(cfg, out)
    if m.architecture != "llama" and m.pretrained is None:
        a = m.arch()
        if a["num_experts_per_tok"] > a["num_experts"]:
            out.append(f"model.num_experts_per_tok={a['num_experts_per_tok']} exceeds model.num_experts="
                       f"{a['num_experts']}: route each token to at most num_experts experts")
    if m.pretrained is not None:
        if check_paths:
            _check_path(out, "model.pretrained", m.pretrained, "a local Hugging Face checkpoint folder", want_dir=True)
        given = [k for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                             "num_experts", "num_experts_per_tok") if getattr(m, k) is not None]
        if m.architecture != "llama":
            given.insert(0, "architecture")
        if given:
            out.append(f"model.{given[0]}={getattr(m, given[0])} is read from model.pretrained={m.pretrained!r}: "
                       f"remove {', '.join('model.' + g for g in given)}")
    else:
        a = m.arch()
        if a["hidden_size"] % a["num_heads"]:
            out.append(f"model.hidden_size={a['hidden_size']} is not divisible by model.num_heads={a['num_heads']}")
        if a["num_heads"] % a["num_kv_heads"]:
            out.append(f"model.num_heads={a['num_heads']} is not divisible by model.num_kv_heads={a['num_kv_heads']}")
    if cfg.mora is not None and cfg.mora.tensor_parallel_grad_sync == "step" and cfg.deepspeed is not None:
        # DeepSpeed reduces gradients inside backward (ZeRO-2/3 in per-parameter hooks), so its loop has no point
        # between the last micro-batch's backward and the optimizer step where M's gradient could be summed once.
        out.append("mora.tensor_parallel_grad_sync='step' is not performed by the DeepSpeed training loop: use "
                   "'backward' (the same gradients; one r_hat x r_hat all-reduce per micro-batch and layer), or a "
                   "Megatron loop that calls mora_dist.parallel.finalize_model_grads")
    if m.backend == "megatron" and cfg.lora is not None:
        out.append("lora is available on backend 'hf' only: set model.backend='hf' or use mora")
    if cfg.remora is not None:

        for i, t in enumerate(cfg.remora.mora_types):
            try:
                resolve_mora_type(t, f"remora.mora_types[{i}]")
            except MoRAConfigError as exc:
                out.append(str(exc))
    for i, s in enumerate(cfg.data.sources):
        _check_source(out, f"data.sources[{i}]", s, check_paths=check_paths)
    names = [s.name for s in cfg.data.sources]
    if len(set(names)) != len(names):
        out.append(f"data.sources names {names} repeat: give every source its own name (it tags eval/<name>/loss)")
    if (check_paths and not cfg.data.tokenizer.startswith("hf://") and not Path(cfg.data.tokenizer).exists()
            and cfg.data.tokenizer_vocab_size is None):
        out.append(f"data.tokenizer={cfg.data.tokenizer!r} does not exist: give a tokenizer.json or tokenizer folder, "
                   "or set data.tokenizer_vocab_size to train one from the sources on first use")
    if isinstance(cfg.deepspeed, str) and check_paths:
        _check_path(out, "deepspeed", cfg.deepspeed, "a DeepSpeed JSON file (or give the section inline)")
        if not out:
            try:
                cfg.deepspeed_dict()
            except json.JSONDecodeError as exc:
                out.append(f"deepspeed={cfg.deepspeed!r} is not valid JSON: {exc}")
    if not out and (check_paths or not isinstance(cfg.deepspeed, str)):
        ds = cfg.deepspeed_dict()
        for key in _BATCH_KEYS:
            if key in ds:
                out.append(f"deepspeed.{key}={ds[key]} is derived from the training section: remove it and set "
                           "training.micro_batch_size / training.global_batch_size")
        if "optimizer" in ds or "scheduler" in ds:
            out.append("deepspeed.optimizer / deepspeed.scheduler are built from the optimizer and scheduler "
                       "sections: remove them from the deepspeed section")
    t = cfg.training
    if t.global_batch_size % t.micro_batch_size:
        out.append(f"training.global_batch_size={t.global_batch_size} is not a multiple of "
                   f"training.micro_batch_size={t.micro_batch_size}: make it micro x accumulation x data-parallel "
                   "size")
    return out


def _check_native(cfg: RunConfig, out: list[str]) -> None:
    """megatron-native training (``deepspeed: null``) and the fields only it reads. Spec: §4."""
    m, native = cfg.model, cfg.deepspeed is None
    pp, vpp = m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size
    if native and m.backend != "megatron":
        out.append("deepspeed=null trains with megatron-core's own DDP and optimizer: set model.backend='megatron', "
                   "or give a deepspeed section for backend 'hf'")
    needs = [(pp > 1, f"model.pipeline_model_parallel_size={pp}"),
             (vpp is not None, f"model.virtual_pipeline_model_parallel_size={vpp}"),
             (cfg.optimizer.use_distributed_optimizer, "optimizer.use_distributed_optimizer=true")]
    for given, what in needs:
        if given and not native:
            out.append(f"{what} needs megatron-native training: model.backend='megatron' and no DeepSpeed "
                       "(--set deepspeed=null)")
    if m.pretrained is not None and pp > 1:
        out.append(f"model.pretrained with model.pipeline_model_parallel_size={pp}: importing a Hugging Face "
                   "checkpoint into pipeline stages is not supported; use pipeline_model_parallel_size=1")
    if vpp is not None and pp == 1:
        out.append(f"model.virtual_pipeline_model_parallel_size={vpp} needs model.pipeline_model_parallel_size > 1")
    if native and m.dtype == "float16":
        out.append("model.dtype='float16' is not supported without DeepSpeed (no loss scaling here): use 'bfloat16'")
    if m.backend == "megatron" and m.pretrained is None:
        layers, chunks = m.arch()["num_layers"], pp * (vpp or 1)
        if layers % chunks:
            out.append(f"model.num_layers={layers} is not divisible by pipeline_model_parallel_size x "
                       f"virtual_pipeline_model_parallel_size = {chunks}: every model chunk needs the same layer "
                       "count")


def _check_megatron_moe(cfg: RunConfig, out: list[str]) -> None:
    """Mixtures of experts on the megatron backend: megatron-native training, expert layout. Spec: §4."""
    m = cfg.model
    ep, etp, tp = m.expert_model_parallel_size, m.expert_tensor_parallel_size, m.tensor_model_parallel_size
    shape = _pretrained_shape(m)
    kind = m.architecture if shape is None else shape.model_type
    if kind not in MOE_MODEL_TYPES:
        for key, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
            if value != 1:
                out.append(f"model.{key}={value} needs experts: set model.architecture to 'mixtral' or 'qwen3_moe' "
                           "(or give a mixture-of-experts model.pretrained)")
        return
    if m.backend != "megatron":
        if ep != 1 or etp != 1:
            out.append("model.expert_model_parallel_size / expert_tensor_parallel_size are read by "
                       "model.backend='megatron' only: remove them, or set model.backend='megatron'")
        return
    if cfg.deepspeed is not None:
        what = f"model.architecture={kind!r}" if shape is None else f"model.pretrained={m.pretrained!r} ({kind})"
        out.append(f"{what} on model.backend='megatron' trains with megatron-core's "
                   "own DDP and optimizer (they reduce and shard expert weights over the expert groups): set "
                   "deepspeed=null")
    if m.pipeline_model_parallel_size != 1:
        out.append(f"model.pipeline_model_parallel_size={m.pipeline_model_parallel_size} with experts is not "
                   "supported yet: use 1")
    if etp not in (1, tp):
        out.append(f"model.expert_tensor_parallel_size={etp} must be 1 or model.tensor_model_parallel_size={tp}")
    positions = cfg.data.seq_len - 1  # a block of seq_len tokens predicts its last seq_len - 1
    if tp > 1 and positions % tp:
        out.append(f"model.tensor_model_parallel_size={tp} with experts runs sequence parallel, which splits the "
                   f"data.seq_len - 1 = {positions} predicted positions over TP: set data.seq_len to 1 + a multiple "
                   f"of {tp} (e.g. {positions - positions % tp + tp + 1})")
    experts = m.arch()["num_experts"] if shape is None else shape.num_experts
    if experts % ep:
        field = "model.num_experts" if shape is None else f"model.pretrained={m.pretrained!r}: num_experts"
        out.append(f"{field}={experts} is not divisible by model.expert_model_parallel_size={ep}: every "
                   "expert-parallel rank holds the same number of experts")


def _pretrained_shape(m: ModelSection) -> GPTShape | None:
    """The shape of ``model.pretrained`` on the megatron backend, where it reads as one (its problems are reported
    by the world checks); the Hugging Face backend reads any checkpoint transformers reads."""
    if m.backend != "megatron" or m.pretrained is None or not Path(m.pretrained, "config.json").is_file():
        return None
    try:
        return GPTShape.from_pretrained(m.pretrained)
    except MoRAConfigError:
        return None


def _check_restarts(cfg: RunConfig, out: list[str]) -> None:
    """ReMoRA/ReLoRA vs the scheduler and the model's first MoRA type. Spec: §3, §3.1."""
    restart = cfg.remora or cfg.relora
    key = "remora" if cfg.remora is not None else "relora"
    s, t = cfg.scheduler, cfg.training
    if cfg.remora is not None and cfg.mora is not None and cfg.remora.mora_types:

        try:
            first = resolve_mora_type(cfg.remora.mora_types[0], "remora.mora_types[0]")
        except MoRAConfigError:
            first = cfg.mora.mora_type  # reported with the other type errors
        if first != cfg.mora.mora_type:
            out.append(f"mora.mora_type={cfg.mora.mora_type} but remora.mora_types={cfg.remora.mora_types} starts "
                       f"with {first}: the model is built with the first type of the cycle; make them equal")
    if (cfg.remora is not None and cfg.mora is not None and cfg.model.backend == "megatron"
            and cfg.mora.tensor_parallel_sharding == "auto" and len({str(x) for x in cfg.remora.mora_types}) > 1):
        out.append(f"remora.mora_types={cfg.remora.mora_types} on backend 'megatron' with "
                   "mora.tensor_parallel_sharding='auto': the types split M differently over TP ranks, so M cannot "
                   "change type in place; set mora.tensor_parallel_sharding='replicate'")
    if restart is None or s.name != "jagged_cosine":
        return
    T = restart.merge_every
    if t.max_steps % T and t.max_steps > T:  # a trial shorter than one cycle runs the first steps of one cycle
        out.append(f"training.max_steps={t.max_steps} is not a multiple of {key}.merge_every={T}: the jagged "
                   f"cosine ends at the end of a cycle; use {-(-t.max_steps // T) * T}")
    if s.warmup_steps > T:
        out.append(f"scheduler.warmup_steps={s.warmup_steps} exceeds {key}.merge_every={T}: the first merge "
                   "would come before the warmup ends")
    if s.restart_warmup_steps >= T:
        out.append(f"scheduler.restart_warmup_steps={s.restart_warmup_steps} must be below {key}.merge_every={T}")
    if s.min_lr_ratio <= 0:
        out.append("scheduler.min_lr_ratio=0 is not allowed with 'jagged_cosine': use a floor in (0, 1], e.g. 0.1")


def _check_source(out: list[str], key: str, s: DataSource, *, check_paths: bool) -> None:
    """One data source: its kind (local files, hub, local copy of a hub dataset, Megatron prefix) and paths."""

    hub_like = reads_like_hub(s.path, s.hub_config, s.eval_split)
    if s.format == "megatron":
        if hub_like:
            out.append(f"{key} ({s.name!r}): format='megatron' reads a local .bin/.idx prefix; remove "
                       f"hub_config/eval_split and give a local path (got path={s.path!r})")
        elif check_paths:
            for suffix in (".bin", ".idx"):
                if not Path(s.path + suffix).is_file():
                    out.append(f"{key}.path={s.path!r}: {s.path + suffix} does not exist: give the prefix of a "
                               "Megatron indexed dataset (corpus_text_document for corpus_text_document.bin/.idx)")
                    break
    elif hub_like:
        if s.format != "auto":
            out.append(f"{key}.format={s.format!r}: a hub dataset (or a local copy of one) gives its own format; "
                       "remove format, or drop hub_config/eval_split to read plain files")
        if hub_id(s.path) is None and check_paths and not Path(s.path).is_dir():
            out.append(f"{key}.path={s.path!r} does not exist: give a local copy of the hub dataset (a folder) "
                       f"or hf://<dataset id>")
        if s.eval_split is not None and s.eval_split == s.split:
            out.append(f"{key}.eval_split={s.eval_split!r} equals split: hold out another split (e.g. 'validation')"
                       " or remove eval_split to hold out the first eval_blocks blocks of the training split")
    elif check_paths:
        _check_path(out, f"{key}.path", s.path, "a text/JSONL/Parquet file or a folder of them")


def _check_path(out: list[str], key: str, value: str, what: str, *, want_dir: bool = False) -> None:
    p = Path(value)
    if not p.exists():
        out.append(f"{key}={value!r} does not exist: give {what}")
    elif want_dir and not (p / "config.json").is_file():
        out.append(f"{key}={value!r} has no config.json: give {what} (saved with save_pretrained)")


def check_world(cfg: RunConfig, world_size: int) -> int:
    """Rules that need the world size (read from the launcher's ``WORLD_SIZE`` before any process group);
    returns the gradient accumulation steps.

    Raises:
        RunConfigError: TP size vs world size or heads, or a batch size that does not divide.
    """
    out: list[str] = []
    m, t = cfg.model, cfg.training
    tp = m.tensor_model_parallel_size
    if m.backend == "hf" and tp != 1:
        out.append(f"model.tensor_model_parallel_size={tp} needs model.backend='megatron' (the 'hf' backend is "
                   "data-parallel only): set it to 1 or switch the backend")
    pp = m.pipeline_model_parallel_size
    if world_size % (tp * pp):
        sizes = f"model.tensor_model_parallel_size={tp}" + (f" x model.pipeline_model_parallel_size={pp}" if pp > 1
                                                             else "")
        out.append(f"{sizes} does not divide the world size {world_size}: use a divisor of {world_size} or launch a "
                   f"multiple of {tp * pp} processes")
    if m.backend == "megatron" and m.pretrained is None:
        a = m.arch()
        for key in ("num_heads", "num_kv_heads"):
            if a[key] % tp:
                out.append(f"model.{key}={a[key]} is not divisible by model.tensor_model_parallel_size={tp}")
    elif m.backend == "megatron" and Path(m.pretrained, "config.json").is_file():
        try:
            shape = GPTShape.from_pretrained(m.pretrained)
        except MoRAConfigError as exc:
            out.append(str(exc))
        else:
            for key in ("num_heads", "num_kv_heads", "vocab_size"):
                if getattr(shape, key) % tp:
                    out.append(f"model.pretrained={m.pretrained!r}: {key}={getattr(shape, key)} is not divisible by "
                               f"model.tensor_model_parallel_size={tp}; choose a TP size that divides it")
    dp = max(1, world_size // (tp * pp))
    per_step = t.micro_batch_size * dp
    accum = t.gradient_accumulation_steps
    if accum is not None and accum * per_step != t.global_batch_size:
        out.append(f"training.global_batch_size={t.global_batch_size} != micro_batch_size {t.micro_batch_size} x "
                   f"gradient_accumulation_steps {accum} x data-parallel size {dp}: fix one of them "
                   f"(or drop gradient_accumulation_steps to derive it)")
    elif accum is None and t.global_batch_size % per_step:
        out.append(f"training.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size "
                   f"{t.micro_batch_size} x data-parallel size {dp} = {per_step}: use a multiple of {per_step}")
    steps = accum if accum is not None else t.global_batch_size // max(per_step, 1)
    if m.virtual_pipeline_model_parallel_size is not None and steps % pp:
        out.append(f"{steps} micro-batches per step (global_batch_size / (micro_batch_size x data-parallel size "
                   f"{dp})) is not a multiple of model.pipeline_model_parallel_size={pp}, which megatron's "
                   "interleaved (virtual pipeline) schedule needs: change training.global_batch_size")
    if out:
        raise RunConfigError("invalid run config:\n  - " + "\n  - ".join(out))
    return steps


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` edits to a raw config dict (values parsed as JSON, else kept as strings).

    ``data.sources.0.weight=0.5`` indexes lists. Returns a new dict; the input is not changed.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"--set {item!r}: write it as section.key=value, e.g. training.max_steps=20")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RunConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                                         f"{part!r} is not an index in it")
                part = int(part)
            elif not isinstance(node, dict):
                raise RunConfigError(f"--set {item!r}: {'.'.join(parts[:i])} is a value, not a section")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def _format_errors(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            section = _lookup(raw, err["loc"][:-1])
            known = _known_keys(err["loc"][:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean {'.'.join(loc[:-1] + close)!r}?" if close else f"known keys: {sorted(known)}"
            lines.append(f"{key}: unknown key (value {section.get(loc[-1]) if isinstance(section, dict) else '?'!r}); "
                         f"{hint}")
        elif err["type"] == "value_error" and not loc:
            lines.extend(err["msg"].removeprefix("Value error, ").splitlines())
        elif err["type"] == "value_error":
            lines.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "missing":
            lines.append(f"{key}: required key is missing; add it to the config or pass --set {key}=...")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r}); fix the value's type or range")
    return "invalid run config:\n  - " + "\n  - ".join(lines)


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _known_keys(loc: tuple) -> list[str]:

    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        for c in candidates:
            for inner in (c, *getattr(c, "__args__", ())):
                if isinstance(inner, type) and (issubclass(inner, BaseModel) or dataclasses.is_dataclass(inner)):
                    model = inner
                    break
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    if dataclasses.is_dataclass(model):
        return [f.name for f in dataclasses.fields(model)]
    return []


def validate_run_config(raw: dict[str, Any], *, check_paths: bool = True) -> RunConfig:
    """Validate a raw config dict; every problem in one :class:`RunConfigError`. ``check_paths=False`` skips the
    file checks (export reads a finished run's config on a machine that may not hold its corpus)."""
    try:
        return RunConfig.model_validate_json(json.dumps(raw), context={"check_paths": check_paths})
    except ValidationError as exc:
        raise RunConfigError(_format_errors(exc, raw)) from None


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read ``path`` (JSON), apply ``--set`` overrides, validate. Relative paths inside the file stay relative
    to the working directory (the repository root for the shipped configs)."""
    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"--config {str(path)!r} does not exist: give the path of a JSON run config")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise RunConfigError(f"--config {str(path)!r} is not valid JSON: {exc}") from None
    return validate_run_config(apply_overrides(raw, overrides or []))
