"""Hugging Face Llama / Qwen2 / Mixtral / Qwen3-MoE <-> megatron-core ``GPTModel`` weights, both directions
(continual pretraining imports, export writes), and the split of a TP = 1 tensor into one rank's shard and back.

Megatron's TP = 1 layout (local-spec names; the TE spec keeps the norms inside the fused layers):
- ``linear_qkv.weight: ((h + 2 g) hd, hidden)`` per query group ``[q_g (h/g heads); k_g; v_g]`` (bias alike);
- ``linear_fc1.weight: (2 ffn, hidden)`` as ``[gate; up]``;
- ``input_layernorm.weight`` (TE: ``self_attention.linear_qkv.layer_norm_weight``), ``pre_mlp_layernorm.weight``
  (TE: ``mlp.linear_fc1.layer_norm_weight``), ``decoder.final_layernorm.weight``;
- ``embedding.word_embeddings.weight``; ``output_layer.weight`` unless the embeddings are tied;
- a mixture of experts: ``mlp.router.weight: (E, hidden)`` and per expert ``e``
  ``mlp.experts.local_experts.<e>.linear_fc1.weight: (2 ffn, hidden)`` as ``[gate; up]`` and ``linear_fc2``, where
  Hugging Face keeps (in memory) ``mlp.gate.weight`` and the fused ``mlp.experts.gate_up_proj: (E, 2 ffn, hidden)``
  and ``down_proj: (E, hidden, ffn)``, and on disk one module per expert (Mixtral's
  ``block_sparse_moe.experts.<e>.w1/w3/w2``, Qwen3-MoE's ``mlp.experts.<e>.gate_proj/up_proj/down_proj``);
  Qwen3-MoE's ``self_attn.q_norm`` / ``k_norm`` are ``self_attention.q_layernorm`` / ``k_layernorm``.
Tensor parallelism splits column-parallel rows (``linear_qkv``, gated ``linear_fc1`` with partition stride 2, the
vocabulary of ``word_embeddings`` and ``output_layer``) in Megatron's chunk pattern and row-parallel columns
(``linear_proj``, ``linear_fc2``); norms and the router are replicated. Expert parallelism gives expert-parallel
rank ``r`` the experts ``r E / EP ...`` as its ``local_experts.0 ...``, each split over the expert-TP group as above.

Spec: §4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from mora_dist.errors import MoRAConfigError
from mora_dist.parallel.layouts import partition_ids
from mora_dist.run.model_shape import GPTShape

ROW_SPLIT = ("linear_qkv", "linear_fc1", "output_layer", "word_embeddings")  # column-parallel / vocab-parallel
COL_SPLIT = ("linear_proj", "linear_fc2")  # row-parallel
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _fused_experts(hf: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """``hf`` with its experts in the in-memory layout of transformers 5 (``mlp.gate``, fused ``gate_up_proj`` /
    ``down_proj``), whichever layout it was saved in."""
    out = {}
    for key, value in hf.items():  # Mixtral's on-disk block name
        out[key.replace(".block_sparse_moe.", ".mlp.")] = value
    names = {"mixtral": ("w1", "w3", "w2"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}[shape.model_type]
    for i in range(shape.num_layers):
        experts = f"model.layers.{i}.mlp.experts."
        if experts + "gate_up_proj" in out:
            continue
        gate, up, down = ([out.pop(f"{experts}{e}.{n}.weight") for e in range(shape.num_experts)] for n in names)
        out[experts + "gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        out[experts + "down_proj"] = torch.stack(down)
    return out


def _experts_to_megatron(hf: dict[str, torch.Tensor], src: str, dst: str, shape: GPTShape) -> dict[str, torch.Tensor]:
    out = {dst + "mlp.router.weight": hf[src + "mlp.gate.weight"]}
    gate_up, down = hf[src + "mlp.experts.gate_up_proj"], hf[src + "mlp.experts.down_proj"]
    for e in range(shape.num_experts):
        out[f"{dst}mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]  # [gate; up] as megatron's
        out[f"{dst}mlp.experts.local_experts.{e}.linear_fc2.weight"] = down[e]
    if shape.qk_layernorm:
        out[dst + "self_attention.q_layernorm.weight"] = hf[src + "self_attn.q_norm.weight"]
        out[dst + "self_attention.k_layernorm.weight"] = hf[src + "self_attn.k_norm.weight"]
    return out


def hf_to_megatron(hf: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """TP = 1 ``GPTModel`` state dict (local-spec names, global expert indices) from a Hugging Face state dict
    (in memory or as saved)."""
    groups, sizes = shape.qkv_split()
    if shape.is_moe:
        hf = _fused_experts(hf, shape)
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not shape.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(shape.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for leaf in ("weight", "bias") if shape.qkv_bias else ("weight",):
            q, k, v = (hf[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv")
            # [q; k; v] per query group: (g, rows_per_group, ...) then flattened
            parts = [t.reshape(groups, n, *t.shape[1:]) for t, n in zip((q, k, v), sizes)]
            out[f"{dst}self_attention.linear_qkv.{leaf}"] = torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])
        out.update({
            dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
            dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
            dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
        })
        if shape.is_moe:
            out.update(_experts_to_megatron(hf, src, dst, shape))
        else:
            out.update({
                dst + "mlp.linear_fc1.weight": torch.cat([hf[src + "mlp.gate_proj.weight"],
                                                          hf[src + "mlp.up_proj.weight"]]),  # [gate; up]
                dst + "mlp.linear_fc2.weight": hf[src + "mlp.down_proj.weight"],
            })
    return out


def megatron_to_hf(sd: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """Hugging Face state dict (in-memory layout) from a TP = 1 ``GPTModel`` state dict (local- or TE-spec names,
    merged weights, all experts)."""
    groups, sizes = shape.qkv_split()
    sd = dict(sd)
    for i in range(shape.num_layers):
        for te_name, local in _TE_NORMS.items():
            if f"decoder.layers.{i}.{te_name}" in sd:
                sd[f"decoder.layers.{i}.{local}"] = sd.pop(f"decoder.layers.{i}.{te_name}")
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if not shape.tie_word_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for leaf in ("weight", "bias") if shape.qkv_bias else ("weight",):
            qkv = sd[f"{src}self_attention.linear_qkv.{leaf}"]
            rest = qkv.shape[1:]
            q, k, v = qkv.reshape(groups, sum(sizes), *rest).split(sizes, dim=1)  # per query group [q_g; k_g; v_g]
            for name, t in zip("qkv", (q, k, v)):
                out[f"{dst}self_attn.{name}_proj.{leaf}"] = t.reshape(-1, *rest)
        out.update({
            dst + "self_attn.o_proj.weight": sd[src + "self_attention.linear_proj.weight"],
            dst + "input_layernorm.weight": sd[src + "input_layernorm.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "pre_mlp_layernorm.weight"],
        })
        if shape.is_moe:
            experts = f"{src}mlp.experts.local_experts."
            out.update({
                dst + "mlp.gate.weight": sd[src + "mlp.router.weight"],
                dst + "mlp.experts.gate_up_proj": torch.stack([sd[f"{experts}{e}.linear_fc1.weight"]
                                                               for e in range(shape.num_experts)]),
                dst + "mlp.experts.down_proj": torch.stack([sd[f"{experts}{e}.linear_fc2.weight"]
                                                            for e in range(shape.num_experts)]),
            })
            if shape.qk_layernorm:
                out[dst + "self_attn.q_norm.weight"] = sd[src + "self_attention.q_layernorm.weight"]
                out[dst + "self_attn.k_norm.weight"] = sd[src + "self_attention.k_layernorm.weight"]
        else:
            gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # [gate; up]
            out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                        dst + "mlp.down_proj.weight": sd[src + "mlp.linear_fc2.weight"]})
    return {k: v.contiguous() for k, v in out.items()}


def _split_dim(key: str) -> tuple[int | None, int]:
    """(split dim, partition stride) of a base tensor by its module name; None for replicated tensors."""
    module, _, leaf = key.rpartition(".")
    short = module.split(".")[-1]
    stride = 2 if short == "linear_fc1" else 1
    if short in ROW_SPLIT and leaf in ("weight", "bias"):
        return 0, stride
    if short in COL_SPLIT and leaf == "weight":
        return 1, 1
    return None, 1


def shard_for_rank(key: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the TP = 1 tensor ``key`` (replicated tensors whole)."""
    dim, stride = _split_dim(key)
    if dim is None or tp == 1:
        return full
    return full.index_select(dim, partition_ids(full.shape[dim], tp, rank, stride=stride)).contiguous()


def gather_shards(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The TP = 1 tensor ``key`` from its per-rank shards (inverse of :func:`shard_for_rank`)."""
    dim, stride = _split_dim(key)
    tp = len(shards)
    if dim is None or tp == 1:
        return shards[0]
    size = sum(s.shape[dim] for s in shards)
    full = torch.empty(*(size if d == dim else n for d, n in enumerate(shards[0].shape)), dtype=shards[0].dtype)
    for t, shard in enumerate(shards):
        full.index_copy_(dim, partition_ids(size, tp, t, stride=stride), shard)
    return full


def _local_key(key: str, ep_offset: int) -> str:
    """The global-index name of this rank's tensor ``key`` (its ``local_experts.<i>`` is expert ``ep_offset + i``)."""
    head, found, rest = key.partition(".local_experts.")
    if not found or not ep_offset:
        return key
    index, _, tail = rest.partition(".")
    return f"{head}.local_experts.{ep_offset + int(index)}.{tail}"


def load_hf_into_gpt(model: torch.nn.Module, path: str | Path, shape: GPTShape) -> None:
    """Copy a local Hugging Face checkpoint into this rank's (un-adapted) ``GPTModel`` shard, strictly: dense
    tensors split over TP, this expert-parallel rank's experts split over expert TP."""
    from megatron.core import parallel_state as ps  # megatron runs only

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise MoRAConfigError(f"model.pretrained={str(path)!r} holds no *.safetensors weights: save the checkpoint "
                              "with save_pretrained (safetensors)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    if shape.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    full = hf_to_megatron(hf, shape)
    offset = ps.get_expert_model_parallel_rank() * (shape.num_experts // ps.get_expert_model_parallel_world_size())
    own = {_local_key(k, offset): k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(full))
    unexpected = sorted(k for k in set(full) - set(own) if ".local_experts." not in k)  # others: other EP ranks'
    if missing or unexpected:
        raise MoRAConfigError(f"model.pretrained={str(path)!r} does not fit the Megatron model: missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]}")
    params = model.state_dict()
    with torch.no_grad():
        for key, local in own.items():
            if ".local_experts." in key:
                tp, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
            else:
                tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            value = shard_for_rank(key, full[key], tp, rank)
            if value.shape != params[local].shape:
                raise MoRAConfigError(f"model.pretrained: {key} has shape {tuple(value.shape)} on this rank, "
                                      f"the model expects {tuple(params[local].shape)}")
            params[local].copy_(value.to(params[local].dtype))
