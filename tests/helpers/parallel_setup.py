"""Shared setup of the megatron-core worker processes of the tensor-parallel tests (gloo on CPU; NCCL on one GPU
per rank where a test asks for CUDA)."""

from __future__ import annotations

import os
import warnings

import torch


def init_megatron(tp: int, *, seed: int = 1234, device: str = "cpu", ep: int = 1,
                  etp: int | None = None) -> torch.device:
    """Process group, megatron-core model parallel state with TP = ``tp`` (expert parallel ``ep``, expert TP ``etp``,
    default ``tp``) and seeds; returns this rank's device.

    ``device="cpu"``: gloo, the CPU shim and its RNG tracker. ``device="cuda"``: GPU ``LOCAL_RANK`` made current
    (megatron allocates its collectives' buffers on ``torch.cuda.current_device()``), NCCL, megatron's own CUDA
    RNG tracker (the CPU shim is not used: :func:`enable_cpu_megatron` patches nothing when CUDA is available),
    and TF32 off for torch's matmuls and cuDNN so fp32 results can be held to fp32 tolerances.
    """
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.distributed.init_process_group("nccl", device_id=local)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        return local
    if device != "cpu":
        raise ValueError(f"init_megatron: device={device!r}; use 'cpu' or 'cuda'")
    torch.distributed.init_process_group("gloo")
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=etp)
    cpu_model_parallel_seed(seed)
    return torch.device("cpu")


def close_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def init_normal(std: float = 0.5):
    """Megatron ``init_method``: a function of the master weight, so every TP size draws the same global weight."""
    return lambda tensor: torch.nn.init.normal_(tensor, std=std)


def portable(obj):
    """Tensors as numpy arrays (pickled by value: torch would pass shared-memory handles that die with the
    worker). Nested dicts/lists/tuples are converted recursively; :func:`restore` undoes it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(portable(v) for v in obj)
    return obj


def restore(obj):
    import numpy as np

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(restore(v) for v in obj)
    return obj


def tiny_gpt(tp: int = 1, *, bf16: bool = False, num_layers: int = 2, vocab_size: int = 96, seq: int = 16):
    """A tiny megatron-core GPTModel (GQA, SwiGLU, RoPE, local spec) built on CPU; bf16 params if ``bf16``
    (wrap it in ``Float16Module`` as megatron's training does). Call after :func:`init_megatron`."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        tensor_model_parallel_size=tp, gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, **cpu_model_parallel_kwargs(),
    )
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab_size,
                    max_sequence_length=seq, position_embedding_type="rope")


def gpt_batch(step: int, batch: int, seq: int, vocab_size: int = 96):
    """Token ids, position ids, causal mask (True = masked) and labels of one seeded batch ``[batch, seq]``."""
    ids = torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(step))
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)
    return ids[:, :-1], position_ids, mask, ids[:, 1:]


MORA_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def megatron_mora_training(kind: str, *, seed: int = 0, lr: float = 1e-2, mora_dtype: str = "float32",
                           freeze_first_M: bool = False):
    """A tiny MoRA GPTModel (type 1) as megatron trains it: ``kind`` "fp32" (FP32Optimizer), "float16" (bf16
    Float16Module + Float16OptimizerWithFloat16Params) or "distributed" (bf16 + DistributedOptimizer); returns
    ``(ddp, optimizer)``. ``freeze_first_M`` leaves layer 0's ``linear_qkv.mora_M`` out of the optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from mora_dist import MoRAConfig, apply_mora

    bf16, distributed = kind != "fp32", kind == "distributed"
    torch.manual_seed(seed)
    model = tiny_gpt(bf16=bf16)
    config = model.config
    apply_mora(model, MoRAConfig(r=4, target_modules=MORA_TARGETS, mora_type=1, mora_dtype=mora_dtype))
    if freeze_first_M:
        model.decoder.layers[0].self_attention.linear_qkv.mora_M.requires_grad_(False)
    if bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=distributed), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=lr, weight_decay=0.0, bf16=bf16, use_distributed_optimizer=distributed), [ddp])
    return ddp, optimizer


def megatron_train_step(ddp, optimizer, step: int, batch: int = 4, seq: int = 8) -> tuple[float, float]:
    """One optimizer step on this data-parallel rank's part of the seeded batch ``step``; returns its loss and the
    optimizer's global gradient norm."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    ids, pos, mask, labels = gpt_batch(step, batch, seq)
    part = slice(rank * batch // dp, (rank + 1) * batch // dp)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(ids[part], pos[part], mask, labels=labels[part]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    if not ok:
        raise RuntimeError(f"megatron optimizer skipped step {step}")
    return float(loss), float(grad_norm)
