"""The shape of a Llama-shaped model (dense, or a Mixtral / Qwen3-MoE mixture of experts), shared by the config
checks, the megatron-core ``GPTModel`` and its Hugging Face twin: read from a local Hugging Face checkpoint's
``config.json`` (refusing what megatron-core's Llama spec would compute differently) or from the model section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import transformers

from mora_dist.errors import MoRAConfigError

MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", *MOE_MODEL_TYPES)


@dataclass(frozen=True)
class GPTShape:
    """What a Llama-shaped ``GPTModel`` and its Hugging Face twin share."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # a mixture of experts (num_experts > 0): every layer's MLP is top-k of num_experts SwiGLU experts of width
    # moe_intermediate_size; router_pre_softmax: softmax over all experts, then top-k (Qwen3-MoE without
    # norm_topk_prob), else softmax over the top-k logits (Mixtral; Qwen3-MoE with norm_topk_prob)
    model_type: str = "llama"
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    router_pre_softmax: bool = False
    qk_layernorm: bool = False

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GPTShape:
        """Read ``config.json`` of a local Llama / Qwen2 / Mistral checkpoint; refuse what Megatron's Llama spec
        would compute differently (the message names the field)."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise MoRAConfigError(f"model.pretrained={str(path)!r} has no config.json: give a Hugging Face "
                                  "checkpoint folder (saved with save_pretrained)")
        c = json.loads(file.read_text())
        where = f"model.pretrained={str(path)!r}"
        kind = c.get("model_type")
        if kind not in SUPPORTED_MODEL_TYPES:
            raise MoRAConfigError(f"{where}: model_type={kind!r} cannot be imported into the Megatron backend "
                                  f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); use model.backend='hf'")
        lacking = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                               "vocab_size") if k not in c]
        if lacking:
            raise MoRAConfigError(f"{where}: config.json lacks {', '.join(lacking)}: give a checkpoint saved by "
                                  "transformers' save_pretrained")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        problems = {
            "hidden_act": (c.get("hidden_act", "silu"), "silu"),
            "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
            "attention_bias": (bool(c.get("attention_bias", False)), False),
            "mlp_bias": (bool(c.get("mlp_bias", False)), False),
            "use_sliding_window": (bool(c.get("use_sliding_window", False)), False),
        }
        if kind in MOE_MODEL_TYPES:  # every layer sparse, no routing noise, full attention
            problems.update({
                "router_jitter_noise": (float(c.get("router_jitter_noise") or 0.0), 0.0),
                "decoder_sparse_step": (c.get("decoder_sparse_step", 1), 1),
                "mlp_only_layers": (list(c.get("mlp_only_layers") or []), []),
                "sliding_window": (c.get("sliding_window") if kind == "mixtral" else None, None),
            })
        for field, (value, wanted) in problems.items():
            if value != wanted:
                raise MoRAConfigError(f"{where}: {field}={value!r} is not supported by the Megatron backend (needs "
                                      f"{wanted!r}); train this checkpoint with model.backend='hf'")
        heads = c["num_attention_heads"]
        moe = {}
        if kind in MOE_MODEL_TYPES:
            moe = dict(model_type=kind, num_experts=c.get("num_local_experts") or c["num_experts"],
                       experts_per_token=c["num_experts_per_tok"],
                       moe_intermediate_size=c["intermediate_size" if kind == "mixtral" else "moe_intermediate_size"],
                       router_pre_softmax=kind == "qwen3_moe" and not c.get("norm_topk_prob", False),
                       qk_layernorm=kind == "qwen3_moe")
        return cls(
            hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate_size=c["intermediate_size"],
            vocab_size=c["vocab_size"], rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), tie_word_embeddings=bool(c.get("tie_word_embeddings")),
            qkv_bias=kind == "qwen2", **moe,
        )

    def hf_config(self, max_position_embeddings: int):
        """The ``transformers`` config of the twin: Mixtral or Qwen3-MoE for a mixture of experts, Qwen2 when
        q/k/v carry a bias, else Llama."""
        kwargs = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads,
                      num_key_value_heads=self.num_kv_heads, max_position_embeddings=max_position_embeddings,
                      rope_theta=self.rope_theta, rms_norm_eps=self.norm_eps,
                      tie_word_embeddings=self.tie_word_embeddings)
        if self.model_type == "mixtral":
            return transformers.MixtralConfig(head_dim=self.head_dim, num_local_experts=self.num_experts,
                                              num_experts_per_tok=self.experts_per_token, sliding_window=None,
                                              **kwargs)
        if self.model_type == "qwen3_moe":
            return transformers.Qwen3MoeConfig(head_dim=self.head_dim, num_experts=self.num_experts,
                                               num_experts_per_tok=self.experts_per_token,
                                               moe_intermediate_size=self.moe_intermediate_size,
                                               norm_topk_prob=not self.router_pre_softmax, **kwargs)
        if self.qkv_bias:
            return transformers.Qwen2Config(**kwargs)
        return transformers.LlamaConfig(head_dim=self.head_dim, attention_bias=False, mlp_bias=False, **kwargs)

    def qkv_split(self) -> tuple[int, list[int]]:
        per_group = self.num_heads // self.num_kv_heads
        return self.num_kv_heads, [per_group * self.head_dim, self.head_dim, self.head_dim]
