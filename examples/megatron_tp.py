"""A megatron-core training loop adopting MoRA with one call after its model provider (tensor parallel).

Everything else is Megatron's own: ``DistributedDataParallel`` (gradient buffers, ``main_grad``), gradient
accumulation under ``no_sync``, ``finalize_model_grads`` and, on GPUs, ``get_megatron_optimizer``. (On CPU the
loop steps a torch AdamW on ``main_grad``: megatron's optimizer wrappers allocate on ``"cuda"``.)
Runs on CPU (gloo, the CPU shim) or on GPUs (nccl)::

    torchrun --nproc-per-node 2 examples/megatron_tp.py --tp 2            # 2 processes, TP = 2
    torchrun --nproc-per-node 4 examples/megatron_tp.py --tp 2 --steps 20 # TP = 2 x DP = 2
    python examples/megatron_tp.py --tp 1                                  # single process

It trains a tiny GPT (GQA, SwiGLU, RoPE) on a fixed random batch, saves the adapter (global tensors, loadable at
any TP size) and merges it into the base weights.

Spec: §4.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

import torch
import torch.nn.functional as F

from mora_dist import MoRAConfig, apply_mora, merge_mora, save_mora, trainable_summary

VOCAB, SEQ, BATCH = 128, 32, 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (divides the process count)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--mora-type", default="sharing_block", help="2 shards M like the base; 6 (rope) replicates")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", default="mora_megatron_adapter")
    return parser.parse_args()


def setup(tp: int) -> None:
    """Process group, megatron's model-parallel state and seeds; the CPU shim only when CUDA is absent."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    from megatron.core import parallel_state, tensor_parallel

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    enable_cpu_megatron()  # no-op on a GPU machine
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    else:
        cpu_model_parallel_seed(1234)


def model_provider(tp: int):
    """An ordinary megatron-core model provider (local spec: norms are separate modules, as MoRA needs)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    extra = {} if torch.cuda.is_available() else cpu_model_parallel_kwargs()
    config = TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        tensor_model_parallel_size=tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **extra,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )


def batch(device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A fixed random micro-batch (the same on every rank: tensor-parallel ranks must see the same tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return {
        "tokens": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).to(device),
        "attention_mask": torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None].to(device),
    }


class MainGradAdamW(torch.optim.AdamW):
    """AdamW reading Megatron DDP's gradient buffers (``param.main_grad``), as megatron's FP32 optimizer does."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = p.main_grad
        return super().step(closure)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', 0)}] %(message)s")
    setup(args.tp)
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = model_provider(args.tp)
    # The one MoRA call: wrap the four Megatron targets; everything but the square matrices is frozen.
    apply_mora(
        model,
        MoRAConfig(
            r=args.r,
            mora_type=args.mora_type,
            target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
        ),
    )
    logging.info(trainable_summary(model))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    if torch.cuda.is_available():
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, bf16=False, fp16=False), [ddp])
    else:  # megatron's optimizer wrappers allocate on "cuda"; on CPU step a torch AdamW on DDP's main_grad
        optimizer = MainGradAdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    micro_batches = [batch(device, seed) for seed in range(args.micro_batches)]
    for step in range(args.steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        total = 0.0
        for i, data in enumerate(micro_batches):  # gradient accumulation, DP reduction on the last one
            with ddp.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                loss = ddp(data["tokens"], data["position_ids"], data["attention_mask"], labels=data["labels"])
                loss = loss.float().mean() / len(micro_batches)
                loss.backward()
            total += loss.item()
        finalize_model_grads([ddp])  # Megatron's own: DP all-reduce of the buffers, layer-norm grads, ...
        optimizer.step()
        logging.info("step %d loss %.4f", step, total)
    save_mora(model, args.out)  # collective: gathers sharded matrices; rank 0 writes global tensors
    merge_mora(model)  # every rank folds its own dW shard into its base shard, no communication
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
