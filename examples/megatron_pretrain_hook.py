"""MoRA / ReMoRA in a hand-written Megatron loop (the pieces ``MegatronLMRecipe`` installs into Megatron-LM's
``pretrain()``), marked ``# + mora``.

For Megatron-LM's own ``pretrain_gpt.py`` use :class:`mora_dist.integrations.megatron_lm.MegatronLMRecipe`
(``docs/megatron.md`` gives the three-line diff). A loop of your own adds what this file marks: wrap the model
provider (MoRA, and a ``finalize_model_grads_func`` that keeps the tensor-parallel sum of replicated ``M``
gradients), build ``MegatronReMoRA`` once the optimizer exists, and call ``remora.step(iteration)`` after
``optimizer.step()``. ``main`` runs that with megatron-core: ``DistributedDataParallel``,
``get_megatron_optimizer`` (``FP32Optimizer``), micro-batches under ``no_sync``, ``config.finalize_model_grads_func``
as a schedule calls it, ``optimizer.step()``. ``model_provider`` and ``forward_step`` are a script's own,
unchanged. Runs on CPU in one process::

    python examples/megatron_pretrain_hook.py

Spec: §3, §4.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from mora_dist import MoRAConfig  # + mora
from mora_dist.integrations.megatron_lm import MegatronReMoRA, mora_model_provider  # + mora
from mora_dist.training import ReMoRACallback  # + mora

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES, STEPS = 128, 16, 2, 2, 12


def model_provider(pre_process: bool = True, post_process: bool = True, **_):
    """The script's provider, unchanged: a tiny Llama-shaped GPTModel."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, **cpu_model_parallel_kwargs())
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
                    position_embedding_type="rope")


def forward_step(data_iterator, model):
    """The script's forward step, unchanged: ``(output, loss_func)``."""
    ids, labels = next(data_iterator)
    position_ids = torch.arange(SEQ).expand_as(ids)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    output = model(ids, position_ids, mask, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


def batches():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (MICRO_BATCH * MICRO_BATCHES, SEQ + 1), generator=g)
    while True:
        for i in range(MICRO_BATCHES):
            chunk = data[i * MICRO_BATCH : (i + 1) * MICRO_BATCH]
            yield chunk[:, :-1], chunk[:, 1:]


def main() -> list[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    cpu_model_parallel_seed(1234)

    provider = mora_model_provider(model_provider, MoRAConfig(  # + mora
        r_hat=8, mora_type=1, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))

    # -- what pretrain() does with the provider (get_model, setup_model_and_optimizer) --
    model = provider(pre_process=True, post_process=True)
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=2e-2, weight_decay=0.0, clip_grad=1.0), [ddp])

    remora = MegatronReMoRA(ReMoRACallback(merge_every=4, type_cycle=(1, 2), restart_warmup=0),  # + mora
                            [ddp], optimizer)

    # -- train_step (megatron-core's forward_backward_no_pipelining, written out) --
    data, history = batches(), []
    for iteration in range(1, STEPS + 1):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = []
        for i in range(MICRO_BATCHES):
            with ddp.no_sync() if i < MICRO_BATCHES - 1 else contextlib.nullcontext():
                output, loss_func = forward_step(data, ddp)
                loss, reported = loss_func(output)
                (loss / MICRO_BATCHES).backward()
            losses.append(reported)
        model.config.finalize_model_grads_func([ddp])  # installed by mora_model_provider
        ok, grad_norm, _ = optimizer.step()
        logs = remora.step(iteration) or {}  # + mora
        loss = sum(float(x["lm loss"]) for x in losses) / len(losses)
        history.append({"iteration": iteration, "loss": loss, "grad_norm": float(grad_norm), **logs})
        print(f"iteration {iteration:2d} | loss {loss:.4f}" + (f" | merged type {logs['remora/type']:.0f}"
                                                               if logs else ""))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
