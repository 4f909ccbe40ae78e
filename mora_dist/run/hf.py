"""The Hugging Face back end: a causal LM (a new Llama from the model section, or ``model.pretrained``) trained by
a DeepSpeed engine (ZeRO 0-3), data parallel over the whole world, and the run's model read back from a
checkpoint for export. Spec: §3, §5.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn

from mora_dist.data import load_tokenizer
from mora_dist.merge import RESIDUAL
from mora_dist.model import set_mora_type, trainable_summary
from mora_dist.run.build import apply_adapters, build_callbacks
from mora_dist.run.checkpoint import read_fp32_masters, read_model_states, read_run_config, saved_mora_type
from mora_dist.run.config import TORCH_DTYPES, RunConfig
from mora_dist.run.deepspeed_engine import build_engine
from mora_dist.run.distributed import device

logger = logging.getLogger(__name__)


def new_model_config(cfg: RunConfig, vocab_size: int, eos_token_id: int) -> transformers.PretrainedConfig:
    """The ``transformers`` config of a new model from the model section: a Llama, or a mixture of experts
    (Mixtral, Qwen3-MoE: ``intermediate_size`` per expert, the router's load-balancing loss added to the
    training loss with weight ``router_aux_loss_coef``)."""
    m, a = cfg.model, cfg.model.arch()
    common = dict(
        vocab_size=vocab_size, hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_layers"], num_attention_heads=a["num_heads"], num_key_value_heads=a["num_kv_heads"],
        max_position_embeddings=cfg.data.seq_len, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )
    if m.architecture == "llama":
        return transformers.LlamaConfig(**common)
    moe = dict(num_experts_per_tok=a["num_experts_per_tok"], output_router_logits=True,
               router_aux_loss_coef=m.router_aux_loss_coef)
    if m.architecture == "mixtral":
        return transformers.MixtralConfig(**common, **moe, num_local_experts=a["num_experts"], sliding_window=None)
    return transformers.Qwen3MoeConfig(**common, **moe, num_experts=a["num_experts"],
                                       moe_intermediate_size=a["intermediate_size"])


def build_hf_model(cfg: RunConfig, vocab_size: int, eos_token_id: int) -> nn.Module:
    """A new model from the model section (or the local checkpoint ``model.pretrained``), adapters applied.

    Seeded by ``training.seed`` so every rank builds the same initial weights.
    """
    m = cfg.model
    torch.manual_seed(cfg.training.seed)
    if m.pretrained is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(m.pretrained, dtype=TORCH_DTYPES[m.dtype])
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        model = transformers.AutoModelForCausalLM.from_config(new_model_config(cfg, vocab_size, eos_token_id))
        model = model.to(TORCH_DTYPES[m.dtype])
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_adapters(cfg, model)



class HFBackend:
    """Hugging Face causal LM, data parallel over the whole world (ZeRO 0-3)."""

    def __init__(self) -> None:
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.dp_group = None

    def build(self, cfg: RunConfig, vocab_size: int, eos_token_id: int, accum: int, *, load_universal: bool = False):
        model = build_hf_model(cfg, vocab_size, eos_token_id)
        logger.info("%s (%s)", trainable_summary(model), cfg.method)
        return build_engine(cfg, model, accum, load_universal=load_universal), build_callbacks(cfg)

    def loss(self, engine: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean next-token loss of ``input_ids: (b, s)`` and the number of predicted tokens ``b * (s - 1)``."""
        input_ids = input_ids.to(device())
        out = engine(input_ids=input_ids, labels=input_ids)
        return out.loss, input_ids.numel() - input_ids.shape[0]


def load_hf_run_model(run_dir: str | os.PathLike, tag: str | None = None, *, state_dict: dict[str, Any] | None = None):
    """``(cfg, model)``: the Hugging Face backend's training model (adapters unmerged) as of checkpoint ``tag``,
    trainable parameters from the fp32 masters in a bf16/fp16 run (:func:`read_fp32_masters`).

    ``state_dict`` (e.g. from :func:`read_state_dict` on ``zero_to_fp32.py`` output, needed under ZeRO-3 where
    the model states file holds no weights) replaces the checkpoint's module weights; the checkpoint still gives
    the MoRA type ReMoRA had reached (its trainable values are fp32 masters already).
    """
    cfg = read_run_config(run_dir)
    states = read_model_states(run_dir, tag)
    eos = load_tokenizer(Path(run_dir) / "tokenizer").eos_token_id
    model = build_hf_model(cfg, cfg.model.vocab_size, eos)
    if state_dict is not None:  # zero_to_fp32.py output: the sharded merge residuals come from the checkpoint
        residuals = {k: v for k, v in states["module"].items() if k.endswith(f".{RESIDUAL}")}
        model.load_state_dict({**residuals, **state_dict}, strict=True)
    else:
        masters = read_fp32_masters(run_dir, tag)  # the exact adapter values merges read, not their bf16 copies
        unexpected = sorted(set(masters) - set(states["module"]))
        if unexpected:
            raise RuntimeError(f"fp32 masters of {run_dir} name parameters the model lacks: {unexpected[:5]}")
        model.load_state_dict({**states["module"], **masters}, strict=True)
    mora_type = saved_mora_type(states)
    if mora_type is not None:
        set_mora_type(model, mora_type)
    return cfg, model.eval()
