"""``launch/pretrain.py`` + ``launch/export.py`` end to end, through the real ``deepspeed`` launcher on CPU
(2 ranks, gloo, ZeRO-2), read back from TensorBoard event files."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import transformers

from mora_dist.run.checkpoint import latest_tag
from mora_dist.run.distributed import free_port
from mora_dist.run.hf import load_hf_run_model
from tests.helpers.launch import (
    FAST,
    RUN_TIMEOUT_S,
    TINY,
    env,
    export_in_process,
    kill_after_checkpoint,
    launch_cmd,
    rank_processes,
    raw_scalar_steps,
    run,
    scalars,
    start,
    wait_for_checkpoint,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    start = time.perf_counter()
    run(2, TINY, [*FAST, f"training.output_dir={out}"])
    return out, time.perf_counter() - start


def test_tiny_remora_run_learns_merges_and_exports_a_plain_transformers_model(tiny_run, tmp_path):
    """Catches: merges not happening or not logged, eval not improving, and an export that drops dW, uses the
    wrong MoRA type after ReMoRA's switches, or does not load in plain transformers."""
    out, seconds = tiny_run
    s = scalars(out)
    assert sorted(s["remora/merges"].items()) == [(20, 1.0), (40, 2.0), (60, 3.0), (80, 4.0)]
    ev = s["eval/loss"]
    assert ev[80] < ev[0] - 1.5 and ev[80] < ev[40], ev
    assert {"eval/plays/loss", "eval/poems/loss", "train/grad_norm", "train/tokens_per_second", "train/lr",
            "train/tokens_seen", "remora/delta_norm"} <= set(s)
    assert s["train/tokens_seen"][80] == 80 * 16 * 128
    assert latest_tag(out / "checkpoints") == "step_0000080"

    # step 70: after 3 merges (type now 2) with a non-zero M, so the export must fold the current dW.
    _, model = load_hf_run_model(out, "step_0000070")
    M = [m for n, m in model.named_parameters() if n.endswith("mora_M")]
    assert max(float(m.detach().abs().max()) for m in M) > 0
    export_in_process("--run", str(out), "--out", str(tmp_path / "hf"), "--tag", "step_0000070")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok(["Friends, Romans, countrymen, lend me your ears"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(hf, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
    assert type(hf).__name__ == "LlamaForCausalLM"
    print(f"tiny run (80 steps, 2 ranks) took {seconds:.1f}s")


def test_remora_run_exports_as_one_peft_lora_over_the_starting_weights(tiny_run, tmp_path):
    """``--adapter-only --format peft-lora --since-start`` at step 70 (cycles of types 1 -> 2 -> 1 merged, a live
    type-2 adapter) on the run's starting weights gives the checkpoint's logits. Catches cycles not kept in the
    checkpoint, kept from the wrong copy of M, or exported with the wrong type. Spec: §2.5."""
    import peft

    from mora_dist.data import load_tokenizer
    from mora_dist.model import unload
    from mora_dist.run.hf import build_hf_model

    out, _ = tiny_run
    export_in_process("--run", str(out), "--out", str(tmp_path / "lora"), "--tag", "step_0000070",
                      "--adapter-only", "--format", "peft-lora", "--since-start")
    cfg, model = load_hf_run_model(out, "step_0000070")
    eos = load_tokenizer(out / "tokenizer").eos_token_id
    start = unload(build_hf_model(cfg, cfg.model.vocab_size, eos), merge=False).eval()
    served = peft.PeftModel.from_pretrained(start, str(tmp_path / "lora")).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
    torch.testing.assert_close(_logits(served, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_relora_run_exports_as_one_peft_lora_over_the_starting_weights(tmp_path):
    """A 1-rank ReLoRA run (merges at 4 and 8, alpha / r = 2) exported at step 10 with ``--since-start``: the
    ReLoRA path of the CLI (cycles read from the ReLoRACallback state, LoRA modules_to_save). Spec: §2.5."""
    import peft

    from mora_dist.data import load_tokenizer
    from mora_dist.lora import lora_layers
    from mora_dist.run.hf import build_hf_model

    out = tmp_path / "run"
    lora = '{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"], "modules_to_save": ["lm_head"]}'
    run(1, TINY, ["mora=null", "remora=null", f"lora={lora}", 'relora={"merge_every": 4}', "training.max_steps=12",
                  "training.eval_interval=12", "training.save_interval=10", "training.global_batch_size=8",
                  "scheduler.warmup_steps=2", "scheduler.restart_warmup_steps=1", f"training.output_dir={out}"])
    export_in_process("--run", str(out), "--out", str(tmp_path / "lora"), "--tag", "step_0000010",
                      "--adapter-only", "--format", "peft-lora", "--since-start")
    cfg, model = load_hf_run_model(out, "step_0000010")
    start = build_hf_model(cfg, cfg.model.vocab_size, load_tokenizer(out / "tokenizer").eos_token_id)
    for name, layer in list(lora_layers(start)):  # the plain starting model
        parent, _, child = name.rpartition(".")
        setattr(start.get_submodule(parent), child, layer.base_layer)
    served = peft.PeftModel.from_pretrained(start.eval(), str(tmp_path / "lora")).eval()
    assert served.peft_config["default"].r == 12  # two merged cycles and the live adapter, rank 4 each
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32))
    torch.testing.assert_close(_logits(served, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_preempted_and_killed_run_resumes_on_the_same_loss_curve(tiny_run, tmp_path):
    """Two warnings of a scheduler and a crash. SIGUSR1 to every rank under the ``deepspeed`` launcher (SLURM's
    ``--signal=USR1@90``), and again 50 ms later, into the save; then, resumed under ``torchrun``, SIGTERM to
    ``torchrun`` alone, which passes it on to the ranks. Each time the run saves the step it is at (not a periodic
    checkpoint: those are every 10 steps) and stops, the ``deepspeed`` launcher with exit code 75. Resumed again,
    the whole process group is SIGKILLed after a periodic checkpoint (no clean-up); the last resume follows the
    uninterrupted run's losses, merges and eval, and logs each step once. Catches a signal that kills the ranks
    (nothing saved since the last periodic checkpoint), ranks that stop at different steps (the save hangs), a
    second signal that breaks the save, a resume that repeats or skips samples, loses or repeats a merge or
    restarts the schedule, and a checkpoint half-written when the process group was killed."""
    from mora_dist.run.preemption import EXIT_PREEMPTED

    ref = scalars(tiny_run[0])
    out = tmp_path / "run"
    sets = [*FAST, f"training.output_dir={out}"]
    proc = start(launch_cmd(2, TINY, sets), tmp_path / "first.log")
    wait_for_checkpoint(proc, out, "step_0000010")
    ranks = rank_processes(proc)
    assert len(ranks) == 2, ranks
    for delay in (0.0, 0.05):
        time.sleep(delay)
        for rank in ranks:
            with contextlib.suppress(psutil.Error):  # a rank may be gone already
                rank.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=RUN_TIMEOUT_S) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-4000:]
    first = latest_tag(out / "checkpoints")
    assert "step_0000011" <= first < "step_0000080" and int(first[-7:]) % 10, first
    assert f"stopped on SIGUSR1 after step {int(first[-7:])}" in (tmp_path / "first.log").read_text()

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), *launch_cmd(2, TINY, sets, "--resume")[7:]]
    proc = start(torchrun, tmp_path / "second.log")
    wait_for_checkpoint(proc, out, f"step_{(int(first[-7:]) // 10 + 1) * 10:07d}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=RUN_TIMEOUT_S) != 0
    second = latest_tag(out / "checkpoints")
    log = (tmp_path / "second.log").read_text()
    assert f"stopped on SIGTERM after step {int(second[-7:])}" in log, log[-4000:]
    assert second < "step_0000080" and int(second[-7:]) % 10, second

    killed_at = kill_after_checkpoint(launch_cmd(2, TINY, sets, "--resume"), out,
                                      f"step_{(int(second[-7:]) // 10 + 1) * 10:07d}")
    assert second < killed_at < "step_0000080", killed_at
    run(2, TINY, sets, "--resume")
    got = scalars(out)
    assert sorted(got["train/loss"]) == list(range(1, 81))
    for step in range(1, 81):
        assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-5, abs=1e-6), step
    assert sorted(got["remora/merges"].items()) == [(20, 1.0), (40, 2.0), (60, 3.0), (80, 4.0)]
    assert got["eval/loss"][80] == pytest.approx(ref["eval/loss"][80], rel=1e-5)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    steps = raw_scalar_steps(out)["train/loss"]
    assert sorted(steps) == list(range(1, 81)), "a step the killed run logged after its checkpoint is in twice"


ZERO3_BF16 = [
    "training.max_steps=20", "remora.merge_every=10", "training.eval_interval=10", "training.save_interval=10",
    "training.keep_last=10", "scheduler.warmup_steps=5", "scheduler.restart_warmup_steps=2",
    "deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
    "model.dtype=bfloat16", "data.sources.0.eval_blocks=17", "data.sources.1.eval_blocks=17",
]


def test_zero3_bf16_run_with_odd_eval_blocks_finishes_and_resumes_without_latest(tmp_path):
    """ZeRO-3 (every weight partitioned) in bf16 at 2 ranks with 17 eval blocks per source (9 and 8 per rank).
    Catches the ZeRO-3 evaluation deadlock, a resume that silently restarts at step 0 when ``latest`` is gone,
    and a resume that is not exact at ZeRO-3 in bf16 (partitioned fp32 master, merge count, type cycle)."""
    out = tmp_path / "run"
    sets = [*ZERO3_BF16, f"training.output_dir={out}"]
    run(2, TINY, sets)
    ref = scalars(out)
    assert sorted(ref["remora/merges"].items()) == [(10, 1.0), (20, 2.0)]
    assert set(ref["eval/loss"]) == {0, 10, 20}
    ckpt = out / "checkpoints"
    shutil.rmtree(ckpt / "step_0000020")
    (ckpt / "latest").unlink()
    proc = run(2, TINY, sets, "--resume")
    assert "resuming from the newest complete checkpoint step_0000010" in proc.stdout + proc.stderr
    got = scalars(out)
    for step in range(11, 21):
        assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-5, abs=1e-6), step
    assert got["eval/loss"][20] == pytest.approx(ref["eval/loss"][20], rel=1e-5)
    assert got["remora/merges"][20] == 2.0 and latest_tag(ckpt) == "step_0000020"
    assert all(0 < v < 1 for v in ref["remora/merge_residual"].values())  # bf16 base, partitioned


def _resume_copy(src, tag: str, dst):
    """A run folder holding only checkpoint ``tag`` of ``src`` (as if the run had been stopped there)."""
    import shutil

    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    return dst


def test_resume_at_another_data_parallel_size_continues_the_same_curve(tiny_run, tmp_path):
    """Catches a DP change that loses the optimizer state or the merged base weights (DeepSpeed's universal load
    restores only trainable parameters), reorders the global samples, or shifts a merge: the DP=2 run stopped
    at step 60 and resumed on 1 rank follows the uninterrupted DP=2 losses for the next 20 steps and merges at
    step 80 as it did; that DP=1 run's step 70 resumed on 2 ranks does the same for its last 10 steps."""
    ref = scalars(tiny_run[0])
    one = _resume_copy(tiny_run[0], "step_0000060", tmp_path / "dp1")
    run(1, TINY, [*FAST, f"training.output_dir={one}"], "--resume")
    two = _resume_copy(one, "step_0000070", tmp_path / "dp2")
    run(2, TINY, [*FAST, f"training.output_dir={two}"], "--resume")
    for out, first in ((one, 61), (two, 71)):
        got = scalars(out)
        assert sorted(got["train/loss"]) == list(range(first, 81))
        for step in range(first, 81):
            assert got["train/loss"][step] == pytest.approx(ref["train/loss"][step], rel=1e-4), (out.name, step)
        assert sorted(got["remora/merges"].items()) == [(80, 4.0)]
        assert got["eval/loss"][80] == pytest.approx(ref["eval/loss"][80], rel=1e-4)
    assert (one / "checkpoints" / "step_0000060" / "zero").is_dir()  # the universal form, added once


def test_bf16_remora_run_reports_merge_residual_and_exports_from_the_fp32_masters(tmp_path):
    """A bf16 ReMoRA run (2 ranks, ZeRO-2): ``remora/merge_residual`` reaches TensorBoard at every merge, the
    checkpoint carries each layer's compensation buffer, and export reads M from the fp32 masters (not the bf16
    module copy in the model states) and writes the nearest bf16 to W + residual + dW. Catches a merge metric
    that is never logged, an export that drops the residual, and one that merges the bf16 copy of M."""
    from safetensors.torch import load_file

    from mora_dist.merge import RESIDUAL
    from mora_dist.model import mora_layers
    from mora_dist.run.checkpoint import read_model_states

    out = tmp_path / "run"
    run(2, TINY, ["model.dtype=bfloat16", "training.max_steps=20", "remora.merge_every=10",
                  "training.eval_interval=20", "training.save_interval=15", "scheduler.warmup_steps=5",
                  f"training.output_dir={out}"])
    residual = scalars(out)["remora/merge_residual"]
    assert sorted(residual) == [10, 20] and all(0 < v < 1 for v in residual.values()), residual

    tag = "step_0000015"  # one merge done, M non-zero again
    _, model = load_hf_run_model(out, tag)
    module_states = read_model_states(out, tag)["module"]
    name, layer = next(iter(mora_layers(model)))
    stored_M = module_states[f"{name}.mora_M"]
    assert stored_M.dtype == torch.bfloat16  # DeepSpeed's bf16 module copy
    assert not torch.equal(layer.mora_M.detach(), stored_M.float())  # the model holds the fp32 master instead
    res = getattr(layer, RESIDUAL)
    assert res is not None and float(res.abs().max()) > 0
    W = layer.base_layer.weight.double()
    exact = W + res.double() + layer.delta_weight().double()
    export_in_process("--run", str(out), "--out", str(tmp_path / "hf"), "--tag", tag)
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))[f"{name}.weight"].double()
    _, exponent = torch.frexp(exact.abs())
    half_step = torch.ldexp(torch.ones_like(exact), exponent - 9)
    assert bool(((exported - exact).abs() <= half_step * (1 + 1e-6)).all())


def test_plain_python_runs_one_process_and_a_streamed_resume_logs_each_step_once(tmp_path):
    """Catches: ``python launch/pretrain.py`` without a launcher failing on MPI discovery; a resume that leaves
    the interrupted run's later steps in TensorBoard a second time; a summary that counts the restored steps
    or does not say where the results are; a streamed corpus that resumes by re-reading the stream instead of
    from the position saved in the checkpoint, or not exactly (the losses after the resume differ)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "launch/pretrain.py", "--config", TINY, "--set", "training.max_steps=4",
           "--set", "training.save_interval=2", "--set", "training.eval_interval=2", "--set",
           "data.sources.0.eval_blocks=4", "--set", "data.sources.1.eval_blocks=4", "--set",
           "data.streaming=true", "--set", "data.shuffle_buffer=8", "--set", f"training.output_dir={out}"]
    plain_env = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    first = subprocess.run(cmd, capture_output=True, text=True, env=plain_env, timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    assert "eval " in first.stderr and "(plays " in first.stderr  # per-source eval on the progress line
    assert "running as one process" in first.stderr
    ref = scalars(out)["train/loss"]
    # As if killed after logging step 4 but before its checkpoint was complete.
    ckpt = out / "checkpoints"
    shutil.rmtree(ckpt / "step_0000004")
    (ckpt / "latest").write_text("step_0000002")
    second = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=plain_env,
                            timeout=RUN_TIMEOUT_S)
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]
    assert second.stderr.count("resumed at its saved position") == 2, second.stderr[-4000:]  # both sources
    got = scalars(out)["train/loss"]
    assert [got[s] for s in (3, 4)] == pytest.approx([ref[s] for s in (3, 4)], rel=1e-5)
    steps = raw_scalar_steps(out)
    assert sorted(steps["train/loss"]) == [1, 2, 3, 4], steps["train/loss"]
    assert sorted(steps["eval/plays/loss"]) == [0, 2, 4], steps["eval/plays/loss"]
    summary = second.stderr[second.stderr.index("run summary:"):]
    for text in ("ran steps 3..4 (2 in this run) of 4", "last train loss", "last eval loss", "plays ",
                 "merges done: 0", f"{out / 'config.json'}", f"{ckpt}", f"tensorboard --logdir {out / 'tensorboard'}",
                 f"python launch/export.py --run {out}"):
        assert text in summary, summary


def test_zero_to_fp32_output_exports_to_a_plain_model(tiny_run, tmp_path):
    """Catches: DeepSpeed's zero_to_fp32.py state dict (``base_layer`` / ``mora_M`` keys) with no way to a plain
    model, or one folded with the wrong MoRA type (step 70 is after three ReMoRA switches)."""
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    out, _ = tiny_run
    convert_zero_checkpoint_to_fp32_state_dict(str(out / "checkpoints"), str(tmp_path / "fp32"), tag="step_0000070")
    export_in_process("--run", str(out), "--tag", "step_0000070", "--state-dict", str(tmp_path / "fp32"),
                      "--out", str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    _, model = load_hf_run_model(out, "step_0000070")
    ids = torch.tensor([[5, 17, 99, 3, 250, 8]])
    torch.testing.assert_close(_logits(hf, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)
