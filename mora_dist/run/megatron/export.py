"""Export of a megatron-core run (DeepSpeed-trained or megatron-native, pipeline stages included): every rank's
shard gathered into the TP = 1 layout (``M`` by its shard plan), the TP = 1 adapted model rebuilt in this process
(a MoRA layer at TP = n computes the TP = 1 function, spec §4), then merged into a Hugging Face Llama / Qwen2 or
written as a PEFT LoRA of that Hugging Face twin. The weight mappings live in :mod:`.hf_weights`.

Spec: §2.5, §4.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn

from mora_dist.adapters.files import PREFIX
from mora_dist.adapters.peft_lora import peft_lora_terms, write_peft_lora
from mora_dist.errors import MoRAConfigError
from mora_dist.experts import ADAPTERS
from mora_dist.model import mora_layers, set_mora_type, unload
from mora_dist.parallel.layouts import plan_shard
from mora_dist.run.checkpoint import read_model_states, read_run_config, saved_mora_type
from mora_dist.run.config import RunConfig
from mora_dist.run.distributed import free_port
from mora_dist.run.megatron import hf_weights
from mora_dist.run.megatron.hf_weights import ROW_SPLIT, gather_shards
from mora_dist.run.megatron.model import build_gpt, gpt_shape, init_model_parallel
from mora_dist.run.megatron.native import load_native_run_into
from mora_dist.targeting import plan_modules_to_save


# ---------------------------------------------------------------- export: TP shards -> TP = 1 -> HF Llama
def _gather(key: str, shards: list[torch.Tensor], tp: int, model1: nn.Module, cfg: RunConfig) -> torch.Tensor:
    """One TP = 1 tensor from its ``tp`` shards (``model1``: the TP = 1 adapted model, for ``M``'s plan)."""
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
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)



def load_megatron_run_tp1(run_dir: str | os.PathLike, tag: str | None = None):
    """``(cfg, model)``: the run's adapted GPTModel gathered to TP = 1 in this process (adapters unmerged)."""
    from megatron.core import parallel_state  # megatron-core is heavy: only megatron exports load it

    cfg = read_run_config(run_dir)
    tp = cfg.model.tensor_model_parallel_size
    _single_process_group()
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(1, cfg.training.seed)
    single = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "virtual_pipeline_model_parallel_size": None, "expert_model_parallel_size": 1,
              "expert_tensor_parallel_size": 1}
    cfg1 = cfg.model_copy(update={"model": cfg.model.model_copy(update=single)})
    model = build_gpt(cfg1, cfg.model.vocab_size)
    if cfg.deepspeed is None:  # megatron-native run: dist_checkpointing reshards it to TP = 1, PP = 1
        client_state = load_native_run_into(model, run_dir, tag)
        mora_type = saved_mora_type(client_state)
        if mora_type is not None:
            set_mora_type(model, mora_type)
        return cfg, model.eval()
    states = [read_model_states(run_dir, tag, mp_rank=t) for t in range(tp)]
    mora_type = saved_mora_type(states[0])
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
    shape = gpt_shape(cfg)
    hf = transformers.AutoModelForCausalLM.from_config(shape.hf_config(cfg.data.seq_len))
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = hf.load_state_dict(hf_weights.megatron_to_hf(sd, shape), strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if shape.tie_word_embeddings else set()):
        raise RuntimeError(f"GPTModel -> {type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if shape.tie_word_embeddings:
        hf.tie_weights()  # lm_head reads the embedding
    return hf.eval()



def export_megatron_run(run_dir: str | os.PathLike, *, tag: str | None = None, adapter_only: bool = False):
    """The model ``launch/export.py`` saves: the TP = 1 adapted GPTModel for ``--adapter-only`` (its
    ``save_mora`` writes global, TP-agnostic tensors), else the merged Hugging Face twin (adapters folded; every
    expert of a mixture of experts)."""
    cfg, model = load_megatron_run_tp1(run_dir, tag)
    if adapter_only:
        return model
    return megatron_to_hf(unload(model, merge=True), cfg)



# The Hugging Face modules a Megatron linear becomes: its rows are split by hf_weights.megatron_to_hf (fused qkv
# per query group, fc1 as [gate; up]); its input is shared, and so is a LoRA's A.
_HF_PARTS = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
# An expert's linear becomes its slice of the fused Hugging Face expert parameter, rows in the same order
# (fc1 as [gate; up] in both), so its LoRA terms move unchanged; experts.<ADAPTERS>.<parameter> is the name the
# PEFT writer reads as a fused expert parameter.
_HF_EXPERT_PARAMETERS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}


def _fused_expert_terms(terms: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """The expert terms of ``terms`` (TP = 1, EP = 1 names) stacked per layer and projection into
    ``{model.layers.<i>.mlp.experts.<ADAPTERS>.<parameter>: [(A: (E, r, k), B: (E, d, r))]}``.

    Raises:
        MoRAConfigError: some experts of a projection adapted and others not (PEFT adapts the fused parameter).
    """
    grouped: dict[str, dict[int, Any]] = {}
    for name, factors in terms.items():
        head, _, rest = name.partition(".mlp.experts.local_experts.")
        expert, _, projection = rest.partition(".")
        layer = head.removeprefix("decoder.layers.")
        key = f"model.layers.{layer}.mlp.experts.{ADAPTERS}.{_HF_EXPERT_PARAMETERS[projection]}"
        grouped.setdefault(key, {})[int(expert)] = factors
    out = {}
    for key, per_expert in grouped.items():
        if sorted(per_expert) != list(range(num_experts)):
            parameter = key.replace(f".{ADAPTERS}.", ".")
            raise MoRAConfigError(f"--format peft-lora: only experts {sorted(per_expert)} of {parameter} are "
                                  f"adapted; PEFT adapts all {num_experts} of a fused expert parameter: adapt every "
                                  "expert or export the merged model")
        columns = zip(*(per_expert[e] for e in range(num_experts)))  # the same cycles for every expert
        out[key] = [(torch.stack([a for a, _ in col]), torch.stack([b for _, b in col])) for col in columns]
    return out



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
    cfg, model = load_megatron_run_tp1(run_dir, tag)
    terms = peft_lora_terms(model, cycles=cycles)
    mora_bytes = sum(layer.r_hat**2 * 4 for _, layer in mora_layers(model))
    to_save = plan_modules_to_save(model, cfg.mora.modules_to_save)
    unload(model, merge=False)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    shape = gpt_shape(cfg)
    rows = dict(sd)
    expert_terms = {name: f for name, f in terms.items() if ".mlp.experts.local_experts." in name}
    for name, factors in terms.items():
        if name not in expert_terms:  # experts' rows need no mapping: _fused_expert_terms
            rows[f"{name}.weight"] = torch.cat([B for _, B in factors], dim=1)  # (d, sum of ranks)
    hf_rows = hf_weights.megatron_to_hf(rows, shape)
    hf_terms = _fused_expert_terms(expert_terms, shape.num_experts)
    for name, factors in terms.items():
        if name in expert_terms:
            continue
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
    for hf_key, value in hf_weights.megatron_to_hf(sd, shape).items():
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
