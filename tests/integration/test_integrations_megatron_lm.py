"""The Megatron-LM integration (``mora_dist/integrations/megatron_lm.py``): ``MegatronLMRecipe`` through a stand-in
for Megatron-LM 0.16's ``pretrain()`` (``tests/helpers/megatron_lm.py``: its finalize assignment, ``train_step``,
``--save`` / ``--load``), and the hand-written loop of ``examples/megatron_pretrain_hook.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers.workers import run_workers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "megatron_pretrain_hook.py"


def _run_example() -> dict:
    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"history": module.main()}


def _bf16_run() -> dict:
    """The recipe under ``--bf16``: Float16Module, Megatron's Float16 optimizer with fp32 masters; ReMoRA every
    2 steps. Returns M (module and master) after the merge step."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    from mora_dist import MoRAConfig, mora_layers
    from mora_dist.integrations.megatron_lm import MegatronReMoRA, mora_model_provider
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed, enable_cpu_megatron
    from mora_dist.training import ReMoRACallback
    from mora_dist.training.optimizer_state import megatron as megatron_state

    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dist.init_process_group("gloo")
    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    cpu_model_parallel_seed(1)
    model = mora_model_provider(module.model_provider, MoRAConfig(r_hat=8, mora_type=1,
                                                                  target_modules=["linear_qkv", "linear_fc2"]))()
    model.config.bf16, model.config.params_dtype = True, torch.bfloat16
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), Float16Module(model.config, model))
    optimizer = get_megatron_optimizer(OptimizerConfig(lr=1e-2, bf16=True), [ddp])
    remora = MegatronReMoRA(ReMoRACallback(merge_every=2, type_cycle=(1, 2), restart_warmup=0), [ddp], optimizer)
    data, out = module.batches(), {"merges": []}
    matrices = [layer.mora_M for _, layer in mora_layers(model)]
    for iteration in (1, 2):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        output, loss_func = module.forward_step(data, ddp)
        loss_func(output)[0].backward()
        model.config.finalize_model_grads_func([ddp])
        optimizer.step()
        out["before" if iteration == 1 else "after"] = max(float(M.abs().max()) for M in matrices)
        out["merges"].append((remora.step(iteration) or {}).get("remora/merges"))
    out["module_M"] = max(float(M.abs().max()) for M in matrices)
    out["master_M"] = max(float(megatron_state.get_full(optimizer, M).abs().max()) for M in matrices)
    out["M_dtype"] = str(matrices[0].dtype)
    parallel_state.destroy_model_parallel()
    return out


def test_pretrain_hook_example_trains_and_merges_every_cycle():
    """The wrapped provider adapts the four projections before DDP; finalize_model_grads is installed and
    called; ``remora.step`` merges at iterations 4, 8, 12 with types 1, 2, 1 (a non-zero dW each time) and the
    loss goes down."""
    history = run_workers(_run_example, 1, timeout_s=240)[0]["history"]
    merges = {h["iteration"]: (h["remora/merges"], h["remora/type"]) for h in history if "remora/merges" in h}
    assert merges == {4: (1.0, 1.0), 8: (2.0, 2.0), 12: (3.0, 1.0)}
    assert all(h["remora/delta_norm"] > 0 for h in history if "remora/merges" in h)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05


def test_remora_under_bf16_zeroes_m_in_the_module_and_the_fp32_master():
    """``--bf16``: Float16Module and Megatron's Float16 optimizer (fp32 masters). The merge at iteration 2 leaves
    M = 0 in the module and in the optimizer's master (a master left alone would copy the old M back at the next
    step); M itself stays fp32 under Float16Module."""
    out = run_workers(_bf16_run, 1, timeout_s=240)[0]
    assert out["merges"] == [None, 1.0]
    assert out["after"] > 0 and out["module_M"] == 0.0 and out["master_M"] == 0.0
    assert out["M_dtype"] == "torch.float32"


TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _batches(start_iteration, seq=16, vocab=128):
    """Micro-batches from ``start_iteration`` on: micro-batch ``i`` of an iteration is a function of (iteration,
    i) over all DP ranks, each rank reading its ``--micro-batch-size`` rows (the same global batch at DP 1 with
    two rows as at DP 2 with one)."""
    import itertools

    import torch
    from megatron.core import parallel_state

    from tests.helpers.megatron_lm import ARGS

    dp, rows = parallel_state.get_data_parallel_rank(), ARGS.micro_batch_size
    for iteration in itertools.count(start_iteration):
        for i in range(ARGS.num_microbatches):
            g = torch.Generator().manual_seed(10_000 * iteration + 100 * i)
            data = torch.randint(0, vocab, (rows * parallel_state.get_data_parallel_world_size(), seq + 1),
                                 generator=g)[dp * rows:(dp + 1) * rows]
            yield data[:, :-1], data[:, 1:]


def _pretrain(example, harness, *, iters, grad_sync="step", mora=True, **args):
    """One Megatron-LM ``pretrain()`` (the harness) with the recipe (``mora=False``: the plain model, every
    weight trained); returns what the parent compares."""
    import torch
    from megatron.core import parallel_state

    from mora_dist import MoRAConfig, mora_layers
    from mora_dist.integrations.megatron_lm import MegatronLMRecipe
    from mora_dist.parallel.cpu_shim import cpu_model_parallel_seed
    from mora_dist.training import ReMoRACallback

    harness.reset()
    harness.ARGS.__dict__.update(train_iters=iters, **args)
    cpu_model_parallel_seed(1234)
    recipe = MegatronLMRecipe(MoRAConfig(r_hat=8, mora_type=1, target_modules=TARGETS,
                                         tensor_parallel_grad_sync=grad_sync),
                              ReMoRACallback(merge_every=3, type_cycle=(1, 2), restart_warmup=0),
                              training=harness, check_every=1)

    def provider(pre_process=True, post_process=True):
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            model = example.model_provider(pre_process, post_process)
        else:  # the example's GPTModel split into pipeline stages (what pretrain_gpt.py's config does with --pp)
            model = _pipeline_model(example, pre_process, post_process)
        if harness.ARGS.bf16:
            model.config.bf16, model.config.params_dtype = True, torch.bfloat16
            model.config.pipeline_dtype = torch.bfloat16
        return model

    if not mora:
        recipe.uninstall()
        harness.pretrain(_batches, provider, None, example.forward_step)
        return {"losses": {h["iteration"]: h["loss"] for h in harness.HISTORY}}
    try:
        model, optimizer, _ = harness.pretrain(_batches, recipe.model_provider(provider), None, example.forward_step)
        layers = list(mora_layers(model[0]))
        return {
            "losses": {h["iteration"]: h["loss"] for h in harness.HISTORY},
            # numpy: tensors sent through the result queue would point into this process's shared memory
            "local_M": {name: layer.mora_M.detach().float().numpy().copy() for name, layer in layers},
            "global_M": {name: layer.get_global_M().float().numpy().copy() for name, layer in layers},
            "types": sorted({layer.mora_type for _, layer in layers}),
            "merges": recipe.callback.merges, "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        }
    finally:
        recipe.uninstall()


def _pipeline_model(example, pre_process, post_process):
    import torch
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mora_dist.parallel.cpu_shim import cpu_model_parallel_kwargs

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, normalization="RMSNorm",
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32, **cpu_model_parallel_kwargs())
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=example.VOCAB, max_sequence_length=example.SEQ, pre_process=pre_process,
                    post_process=post_process, position_embedding_type="rope")


def _pretrain_worker(tp, runs, pp=1):
    """``runs``: [(name, kwargs)] of :func:`_pretrain`, in order, on one TP x PP x DP layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mora_dist.errors import MoRAError
    from mora_dist.parallel.cpu_shim import enable_cpu_megatron
    from tests.helpers import megatron_lm as harness

    example = _load_example()
    dist.init_process_group("gloo")
    enable_cpu_megatron()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    out = {}
    for name, kwargs in runs:
        try:
            out[name] = _pretrain(example, harness, **kwargs)
        except MoRAError as exc:
            out[name] = {"error": str(exc)}
    parallel_state.destroy_model_parallel()
    return out


def _load_example():
    spec = importlib.util.spec_from_file_location("megatron_pretrain_hook", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_megatron_lm_train_cannot_drop_the_tp_sum_of_replicated_m():
    """Megatron-LM 0.16's ``train()`` assigns ``config.finalize_model_grads_func`` itself (training.py 2565).
    Through the recipe, TP = 2 with ``tensor_parallel_grad_sync="step"`` and two merges (types 1 -> 2 -> 1)
    equals TP = 1 (losses, every global M) and the TP copies of M agree. A fork that finalizes without the
    config's function (the sum skipped) is stopped by the replica check after the first step, naming a layer."""
    import torch

    one = run_workers(_pretrain_worker, 1, 1, [("run", {"iters": 7})], timeout_s=300)[0]["run"]
    two = run_workers(_pretrain_worker, 2, 2, [("run", {"iters": 7}),
                                               ("fork", {"iters": 2, "finalize_through_config": False})],
                      timeout_s=300)
    assert one["merges"] == 2 and one["types"] == [1]
    for rank in two:
        run = rank["run"]
        assert run["merges"] == 2 and run["types"] == [1]
        for it, loss in one["losses"].items():
            assert abs(run["losses"][it] - loss) < 1e-5, (it, run["losses"][it], loss)
        for name, M in one["global_M"].items():
            assert abs(M).max() > 0, name
            torch.testing.assert_close(torch.tensor(run["global_M"][name]), torch.tensor(M), atol=1e-5, rtol=0,
                                       msg=name)
        assert "after iteration 1 the tensor-parallel copies of M differ in ['decoder.layers." in rank["fork"]["error"]
    for name, M in two[0]["run"]["local_M"].items():  # replicated: the same on both TP ranks
        torch.testing.assert_close(torch.tensor(two[1]["run"]["local_M"][name]), torch.tensor(M), atol=1e-6, rtol=0,
                                   msg=name)


@pytest.mark.parametrize("tp, pp, precision", [(2, 1, {}), (1, 2, {}), (1, 1, {"bf16": True}),
                                               (1, 1, {"bf16": True, "use_distributed_optimizer": True})],
                         ids=["tp2-fp32", "pp2-fp32", "dp2-bf16", "dp2-bf16-distopt"])
def test_megatron_lm_save_load_resumes_the_remora_cycle_exactly(tmp_path, tp, pp, precision):
    """Megatron-LM ``--save`` at iteration 4 (after the type-1 merge at 3) and ``--load``: the resumed run trains
    type 2 with the saved M and moments and merges at 6 as the uninterrupted one does; losses 5-8 and the final
    M match to 1e-5. Catches a resumed run that restarts the type cycle (trains type 1 from a type-2 M) or loses
    the merge count, a pipeline stage without the state (it lives on the first stage), and, in bf16, a save that
    fails on the fp32 M beside the bf16 weights (Float16 optimizer)
    or a resumed merge without the saved bf16 residual."""
    import torch

    save, load = {"save": str(tmp_path / "ckpt"), "save_interval": 4}, {"load": str(tmp_path / "ckpt")}
    runs = [("full", {"iters": 8, **precision}), ("first", {"iters": 4, **save, **precision}),
            ("resumed", {"iters": 8, **load, **precision})]
    for rank in run_workers(_pretrain_worker, 2, tp, runs, pp, timeout_s=400):
        full, resumed = rank["full"], rank["resumed"]
        assert sorted(resumed["losses"]) == [5, 6, 7, 8]
        for it, loss in resumed["losses"].items():
            assert abs(loss - full["losses"][it]) < 1e-5, (it, loss, full["losses"][it])
        assert resumed["merges"] == full["merges"] == 2 and resumed["types"] == full["types"] == [1]
        for name, M in full["global_M"].items():
            torch.testing.assert_close(torch.tensor(resumed["global_M"][name]), torch.tensor(M), atol=1e-5, rtol=0,
                                       msg=name)


def test_megatron_lm_main_train_keeps_the_finalize_function_it_finds():
    """Megatron-LM main's ``train()`` assigns ``finalize_model_grads`` only where the config has none
    (training.py 4365-4366): the provider's function, with the TP sum, stays. TP = 2 equals TP = 1 there too."""
    import torch

    one = run_workers(_pretrain_worker, 1, 1, [("run", {"iters": 4, "megatron_lm": "main"})], timeout_s=300)[0]
    two = run_workers(_pretrain_worker, 2, 2, [("run", {"iters": 4, "megatron_lm": "main"})], timeout_s=300)
    assert one["run"]["merges"] == 1
    for rank in two:
        for it, loss in one["run"]["losses"].items():
            assert abs(rank["run"]["losses"][it] - loss) < 1e-5, (it, rank["run"]["losses"][it], loss)
    for name, M in two[0]["run"]["local_M"].items():
        assert abs(M).max() > 0, name
        torch.testing.assert_close(torch.tensor(two[1]["run"]["local_M"][name]), torch.tensor(M), atol=1e-6, rtol=0,
                                   msg=name)


def test_megatron_lm_base_checkpoint_loads_without_strictness_flags(tmp_path):
    """A checkpoint Megatron-LM wrote for the plain model (no MoRA keys) loads at the default
    ``--dist-ckpt-strictness`` through ``--pretrained-checkpoint``: the recipe's first loss is the base weights'
    (the plain model's first loss from the same checkpoint) and not a fresh model's. The run's own checkpoints
    say they hold the adapters, so its restart (``--load`` now holds one) resumes M and the cycle exactly: losses
    5-8 equal an uninterrupted run's. Loading the base checkpoint's optimizer state into MoRA's is refused,
    naming ``--finetune``."""
    base, run = str(tmp_path / "base"), str(tmp_path / "run")
    start = {"pretrained_checkpoint": base, "load": run}
    runs = [("base", {"iters": 2, "mora": False, "save": base, "save_interval": 2}),
            ("plain", {"iters": 1, "mora": False, "pretrained_checkpoint": base}),
            ("fresh", {"iters": 1}),
            ("full", {"iters": 8, **start}),
            ("first", {"iters": 4, "save": run, "save_interval": 4, **start}),
            ("resumed", {"iters": 8, **start}),
            ("optimizer", {"iters": 1, "load": base})]
    for rank in run_workers(_pretrain_worker, 2, 2, runs, timeout_s=400):
        first_loss = rank["full"]["losses"][1]
        assert abs(first_loss - rank["plain"]["losses"][1]) < 1e-6, (first_loss, rank["plain"]["losses"][1])
        assert abs(first_loss - rank["fresh"]["losses"][1]) > 1e-3
        assert sorted(rank["resumed"]["losses"]) == [5, 6, 7, 8]
        for it, loss in rank["resumed"]["losses"].items():
            assert abs(loss - rank["full"]["losses"][it]) < 1e-5, (it, loss, rank["full"]["losses"][it])
        assert rank["resumed"]["merges"] == rank["full"]["merges"] == 2
        assert "holds no MoRA adapters" in rank["optimizer"]["error"]
        assert "--finetune" in rank["optimizer"]["error"]


def test_megatron_lm_load_reshards_across_layouts(tmp_path):
    """Megatron-LM's own ``--save`` at TP = 2 and ``--load`` at TP = 1 x DP = 2 (fp32; the same global batch):
    the resumed losses 5-8 (mean over DP ranks) and the final global M equal the uninterrupted TP = 2 run's."""
    import numpy as np

    save = {"save": str(tmp_path / "ckpt"), "save_interval": 4}
    tp2 = run_workers(_pretrain_worker, 2, 2, [("full", {"iters": 8}), ("first", {"iters": 4, **save})],
                      timeout_s=400)
    dp2 = run_workers(_pretrain_worker, 2, 1, [("resumed", {"iters": 8, "micro_batch_size": 1,
                                                            "load": str(tmp_path / "ckpt")})], timeout_s=400)
    full = tp2[0]["full"]
    assert sorted(dp2[0]["resumed"]["losses"]) == [5, 6, 7, 8]
    for it, loss in full["losses"].items():
        if it > 4:
            mean = np.mean([rank["resumed"]["losses"][it] for rank in dp2])
            assert abs(mean - loss) < 1e-5, (it, mean, loss)
    assert dp2[0]["resumed"]["merges"] == full["merges"] == 2
    for name, M in full["global_M"].items():
        np.testing.assert_allclose(dp2[0]["resumed"]["global_M"][name], M, atol=1e-5, rtol=0, err_msg=name)
