"""The megatron-core backend: a Llama-shaped ``GPTModel`` (local spec, RMSNorm, SwiGLU, RoPE, GQA) split over
``tensor_model_parallel_size`` ranks, trained by DeepSpeed over the data-parallel groups, and its export (also of
runs trained natively by :mod:`mora_dist.run.megatron_native`, pipeline stages included).

With ``model.pretrained`` (continual pretraining) a local Hugging Face Llama / Qwen2 checkpoint is loaded into
every rank's shards first. Export gathers every rank's shard into the TP = 1 layout (``M`` by its shard plan),
rebuilds the TP = 1 adapted model in this process (a MoRA layer at TP = n computes the TP = 1 function, spec
§4), merges ``dW`` and maps the names back to Hugging Face. Both mappings live in
:mod:`mora_dist.run.hf_megatron`.

Spec: §4.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mora_dist.run import build
from mora_dist.run.config import RunConfig

logger = logging.getLogger(__name__)


class _DeepSpeedMPU:
    """The ``mpu`` interface DeepSpeed reads, answered from megatron-core's ``parallel_state`` (TP only)."""

    def __init__(self) -> None:
        from megatron.core import parallel_state as ps

        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.ps.get_data_parallel_world_size()


def init_model_parallel(tp: int, seed: int, *, pp: int = 1, vpp: int | None = None) -> None:
    """megatron-core's parallel state over the existing process group, CPU shim when CUDA is absent, seeds."""
    from megatron.core import parallel_state

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_model_parallel_seed(seed)


def gpt_shape(cfg: RunConfig, vocab_size: int | None = None):
    """The model's :class:`~mora_dist.run.hf_megatron.GPTShape`: read from ``model.pretrained`` for continual
    pretraining, else from the model section (``vocab_size``: the tokenizer's, for new models)."""
    from mora_dist.run.hf_megatron import GPTShape

    m = cfg.model
    if m.pretrained is not None:
        return GPTShape.from_pretrained(m.pretrained)
    a = m.arch()
    return GPTShape(hidden_size=a["hidden_size"], num_layers=a["num_layers"], num_heads=a["num_heads"],
                    num_kv_heads=a["num_kv_heads"], head_dim=a["hidden_size"] // a["num_heads"],
                    intermediate_size=a["intermediate_size"], vocab_size=vocab_size or m.vocab_size,
                    rope_theta=m.rope_theta, norm_eps=1e-5, tie_word_embeddings=m.tie_word_embeddings)


def build_gpt(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The GPTModel of the model section, adapters applied (one pipeline stage). The CPU init draws every global
    weight in the same order at any TP size, so TP = 1 and TP = n start from the same function. With
    ``model.pretrained`` the Hugging Face weights are loaded into this rank's shards before the adapters are
    applied."""
    return build_gpt_chunks(cfg, vocab_size)[0]


def build_gpt_chunks(cfg: RunConfig, vocab_size: int) -> list[nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage; one without virtual pipeline), adapters
    applied over all of them (names global across stages, :mod:`mora_dist.parallel.pipeline`)."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.errors import MoRAConfigError
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs
    from mora_dist.run.hf_megatron import load_hf_into_gpt

    m = cfg.model
    shape = gpt_shape(cfg, vocab_size)
    if m.pretrained is not None and vocab_size > shape.vocab_size:
        raise MoRAConfigError(f"the tokenizer has {vocab_size} tokens but model.pretrained={m.pretrained!r} embeds "
                              f"{shape.vocab_size}: use the checkpoint's own tokenizer as data.tokenizer")
    extra = cpu_model_parallel_kwargs() if not torch.cuda.is_available() else {}
    native = cfg.deepspeed is None  # megatron-native: Float16Module casts an fp32-built model to bf16
    dtype = build._DTYPES[m.dtype]
    vpp = m.virtual_pipeline_model_parallel_size
    config = TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim, ffn_hidden_size=shape.intermediate_size,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=shape.qkv_bias,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps,
        tensor_model_parallel_size=m.tensor_model_parallel_size,
        pipeline_model_parallel_size=m.pipeline_model_parallel_size, virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=dtype, params_dtype=torch.float32 if native else dtype,
        bf16=native and m.dtype == "bfloat16", hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        **extra,
    )
    torch.manual_seed(cfg.training.seed)
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=shape.vocab_size, max_sequence_length=cfg.data.seq_len, position_embedding_type="rope",
            rotary_base=int(shape.rope_theta), share_embeddings_and_output_weights=shape.tie_word_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp,
        ))
    if m.pretrained is not None:  # one chunk: the config refuses model.pretrained with pipeline stages
        load_hf_into_gpt(chunks[0], m.pretrained, shape, tp=m.tensor_model_parallel_size,
                         rank=parallel_state.get_tensor_model_parallel_rank())
    build.apply_adapters(cfg, nn.ModuleList(chunks))  # a ModuleList of chunks reads as the model (pipeline.py)
    return chunks


def causal_inputs(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, position_ids, mask, labels)`` of ``input_ids: (b, s)``: predict tokens 1..s-1 from 0..s-2, causal
    mask ``(1, 1, s-1, s-1)`` with True = masked (megatron's own default mask is built on CUDA)."""
    ids, labels = input_ids[:, :-1], input_ids[:, 1:]
    b, s = ids.shape
    position_ids = torch.arange(s, device=ids.device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=ids.device), 1)[None, None]
    return ids, position_ids, mask, labels


def gpt_loss(model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of ``input_ids: (b, s)`` (predicting tokens 1..s-1, as the HF backend does)."""
    ids, position_ids, mask, labels = causal_inputs(input_ids)
    per_token = model(ids, position_ids, mask, labels=labels)  # (b, s)
    return per_token.float().mean(), labels.numel()


class MegatronBackend:
    """megatron-core tensor parallelism inside, DeepSpeed (ZeRO over the data-parallel groups) outside."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron.core import parallel_state

        init_model_parallel(cfg.model.tensor_model_parallel_size, cfg.training.seed)
        self.mpu = _DeepSpeedMPU()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()

    def build(self, cfg: RunConfig, vocab_size: int, eos_token_id: int, accum: int):
        model = build_gpt(cfg, vocab_size).to(build.device())
        from mora_dist.model import trainable_summary

        logger.info("%s (%s, TP=%d)", trainable_summary(model), cfg.method, cfg.model.tensor_model_parallel_size)
        return build.build_engine(cfg, model, accum, mpu=self.mpu), build.build_callbacks(cfg)

    def loss(self, engine: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        return gpt_loss(engine, input_ids.to(build.device()))


# ---------------------------------------------------------------- export: TP shards -> TP = 1 -> HF Llama
def _gather(key: str, shards: list[torch.Tensor], tp: int, model1: nn.Module, cfg: RunConfig) -> torch.Tensor:
    """One TP = 1 tensor from its ``tp`` shards (``model1``: the TP = 1 adapted model, for ``M``'s plan)."""
    from mora_dist.parallel.layouts import plan_shard
    from mora_dist.run.hf_megatron import ROW_SPLIT, gather_shards

    module_name, _, leaf = key.rpartition(".")
    short = module_name.split(".")[-1]
    if tp == 1:
        return shards[0]
    if leaf == "mora_M":
        layer = model1.get_submodule(module_name)
        kind = "column" if short in ROW_SPLIT else "row"
        stride = 2 if short == "linear_fc1" else 1
        full = torch.zeros(layer.r_hat, layer.r_hat, dtype=shards[0].dtype)
        for t, shard in enumerate(shards):
            plan = plan_shard(kind, layer.in_features, layer.out_features, layer.r_hat, layer.mora_type,
                              tp_size=tp, tp_rank=t, stride=stride, sharding=cfg.mora.tensor_parallel_sharding,
                              where=module_name)
            if plan.m_dim is None:  # replicated: every rank holds the same global matrix
                return shards[0]
            full.index_copy_(plan.m_dim, plan.m_ids, shard)
        return full
    if leaf == "mora_base_residual":  # the bf16 merge residual has the base weight's shape and split
        return gather_shards(f"{module_name}.weight", shards)
    return gather_shards(key, shards)


def _single_process_group() -> None:
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group("gloo", rank=0, world_size=1)


def load_megatron_run_tp1(run_dir: str | os.PathLike, tag: str | None = None):
    """``(cfg, model)``: the run's adapted GPTModel gathered to TP = 1 in this process (adapters unmerged)."""
    from megatron.core import parallel_state

    from mora_dist.model import set_mora_type
    from mora_dist.run.checkpoint import current_mora_type, read_model_states, read_run_config

    cfg = read_run_config(run_dir)
    tp = cfg.model.tensor_model_parallel_size
    if cfg.deepspeed is None:  # megatron-native run: every pipeline stage's file, names global
        from mora_dist.run.megatron_native import read_native_module_states

        tp, states = read_native_module_states(run_dir, tag)
    else:
        states = [read_model_states(run_dir, tag, mp_rank=t) for t in range(tp)]
    _single_process_group()
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(1, cfg.training.seed)
    single = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "virtual_pipeline_model_parallel_size": None}
    cfg1 = cfg.model_copy(update={"model": cfg.model.model_copy(update=single)})
    model = build_gpt(cfg1, cfg.model.vocab_size)
    mora_type = current_mora_type(states[0])
    if mora_type is not None:
        set_mora_type(model, mora_type)
    modules = [s["module"] for s in states]
    full = {k: _gather(k, [m[k] for m in modules], tp, model, cfg)
            for k in modules[0] if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(full, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"TP={tp} checkpoint does not fit the TP=1 model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return cfg, model.eval()


def megatron_to_hf(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """The Hugging Face twin (Llama, or Qwen2 for checkpoints with q/k/v biases) of the merged TP = 1 GPTModel."""
    import transformers

    from mora_dist.run import hf_megatron

    shape = gpt_shape(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(shape.hf_config(cfg.data.seq_len))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = hf.load_state_dict(hf_megatron.megatron_to_hf(sd, shape), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if shape.tie_word_embeddings else set()):
        raise RuntimeError(f"GPTModel -> {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if shape.tie_word_embeddings:
        hf.tie_weights()  # lm_head reads the embedding
    return hf.eval()


def export_megatron_run(run_dir: str | os.PathLike, *, tag: str | None = None, adapter_only: bool = False):
    """The model ``launch/export.py`` saves: the TP = 1 adapted GPTModel for ``--adapter-only`` (its
    ``save_mora`` writes global, TP-agnostic tensors), else the merged Hugging Face Llama (adapters folded)."""
    from mora_dist.model import unload

    cfg, model = load_megatron_run_tp1(run_dir, tag)
    if adapter_only:
        return model
    return megatron_to_hf(unload(model, merge=True), cfg)


# The Hugging Face modules a Megatron linear becomes: its rows are split by hf_megatron.megatron_to_hf (fused qkv
# per query group, fc1 as [gate; up]); its input is shared, and so is a LoRA's A.
_HF_PARTS = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}


def export_megatron_peft_lora(run_dir: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None,
                              cycles: list | None = None) -> dict[str, Any]:
    """The run's MoRA adapter (with ``cycles``: its whole update since the start) as a PEFT LoRA for the Hugging
    Face twin of the model: each ``B`` goes through the weight mapping, so its rows split exactly as the weight's,
    and the parts of a fused module share its ``A``; ``modules_to_save`` under their Hugging Face names.

    Raises:
        MoRAConfigError: a type-6 layer or cycle, or an adapted / fully trained module without a Hugging Face
            counterpart (nothing is written).

    Spec: §2.5, §4.
    """
    from mora_dist.adapter_io import PREFIX
    from mora_dist.errors import MoRAConfigError
    from mora_dist.export_formats import peft_lora_terms, write_peft_lora
    from mora_dist.model import mora_layers, unload
    from mora_dist.run import hf_megatron
    from mora_dist.targeting import plan_modules_to_save

    cfg, model = load_megatron_run_tp1(run_dir, tag)
    terms = peft_lora_terms(model, cycles=cycles)
    mora_bytes = sum(layer.r_hat**2 * 4 for _, layer in mora_layers(model))
    to_save = plan_modules_to_save(model, cfg.mora.modules_to_save)
    unload(model, merge=False)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shape = gpt_shape(cfg)
    rows = dict(sd)
    for name, factors in terms.items():
        rows[f"{name}.weight"] = torch.cat([B for _, B in factors], dim=1)  # (d, sum of ranks)
    hf_rows = hf_megatron.megatron_to_hf(rows, shape)
    hf_terms = {}
    for name, factors in terms.items():
        layer, _, sub = name.removeprefix("decoder.layers.").partition(".")
        if not layer.isdigit() or sub not in _HF_PARTS:
            raise MoRAConfigError(f"--format peft-lora: adapted module {name!r} has no Hugging Face counterpart; "
                                  f"adapt only {sorted(_HF_PARTS)} or export the merged model")
        A = torch.cat([a for a, _ in factors], dim=0)
        for part in _HF_PARTS[sub]:
            hf_terms[f"model.layers.{layer}.{part}"] = [(A, hf_rows[f"model.layers.{layer}.{part}.weight"])]
    # Fully trained tensors move 1:1, so megatron_to_hf hands back the very tensor: match them by storage.
    source = {(v.data_ptr(), tuple(v.shape)): k for k, v in sd.items()}
    extra, found = {}, set()
    for hf_key, value in hf_megatron.megatron_to_hf(sd, shape).items():
        key = source.get((value.data_ptr(), tuple(value.shape)))
        if key is not None and any(key.startswith(f"{m}.") for m in to_save):
            extra[PREFIX + hf_key] = value
            found.add(key)
    lost = [k for k in sd if any(k.startswith(f"{m}.") for m in to_save) and k not in found]
    if lost:
        raise MoRAConfigError(f"--format peft-lora: trained tensors {lost[:3]} have no one-to-one Hugging Face "
                              "counterpart (a fused norm?); export the merged model instead")
    hf = megatron_to_hf(model, cfg)  # the base's Hugging Face twin: module names for target_modules
    names = sorted({key[len(PREFIX):].rpartition(".")[0] for key in extra})
    return write_peft_lora(out, hf_terms, model=hf, extra=extra, modules_to_save=names,
                           dropout=float(cfg.mora.dropout), mora_bytes=mora_bytes + sum(
                               t.numel() * t.element_size() for t in extra.values()))
