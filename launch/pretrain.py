"""Pretraining and continual pretraining with MoRA / ReMoRA (or LoRA / ReLoRA / full-rank baselines).

Commands::

    deepspeed launch/pretrain.py --config configs/remora_tiny.json                 # 2-core CPU, ~2 minutes
    python launch/pretrain.py --config configs/remora_tiny.json --set training.max_steps=4   # one process
    deepspeed --num_gpus 2 launch/pretrain.py --config configs/remora_tiny.json
    deepspeed launch/pretrain.py --config configs/remora_250m.json   # C4 + T5 tokenizer streamed from the hub
    deepspeed --hostfile hosts launch/pretrain.py --config configs/remora_250m.json --set data.sources.0.path=/c4 \
        --set data.tokenizer=/models/t5-base                                   # local copies instead
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/remora_250m_megatron_tp2.json
    torchrun --nproc-per-node 4 launch/pretrain.py --config configs/remora_tiny_megatron_native.json  # no DeepSpeed
    deepspeed launch/pretrain.py --config configs/remora_tiny.json --resume        # continue after a kill

``--set key.sub=value`` overrides any field (JSON values; lists indexed as ``data.sources.0.weight``). The
config is validated, against the world size too, before any process group exists; ``--check`` stops there and
prints each rank's memory and communication plan (``--check --world-size 64 --nodes 8 --gpu-memory 80``:
``mora_dist.run.plan``).
Outputs go to ``training.output_dir``: ``config.json`` (resolved), ``tokenizer/``, ``checkpoints/`` (atomic, the
last ``keep_last`` kept) and ``tensorboard/``. Export with ``launch/export.py``. Every local data file is sampled
before anything starts (``mora_dist.data.validate``); a bad record met later stops every rank, reported once by
the rank that read it (``mora_dist.run.failures``). The run ends with a summary of what it did and where it is.

Spec: §3, §4, §5.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mora_dist.errors import MoRAConfigError  # noqa: E402
from mora_dist.run.checkpoint import clean_stale, list_checkpoints, resume_tag  # noqa: E402
from mora_dist.run.config import RunConfig, RunConfigError, check_world, load_run_config  # noqa: E402
from mora_dist.run.reshard import add_universal, check_resume_dp, load_module_state  # noqa: E402

logger = logging.getLogger("mora_dist.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="JSON run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.max_steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in output_dir (the newest complete one if 'latest' is "
                        "missing); an error if there is none")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --check: the world size to validate for (default: $WORLD_SIZE or 1)")
    p.add_argument("--nodes", type=int, default=None,
                   help="with --check: the nodes the world size spans, for the memory plan (default 1)")
    p.add_argument("--gpu-memory", default=None, metavar="GIB",
                   help="with --check: GiB per GPU; the memory plan says whether the run fits (exit code 3 if not)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> tuple[RunConfig, int]:
    """Everything that can be checked before a process group: the config, the world size, the data, the output
    dir."""
    from mora_dist.data.validate import check_sources

    cfg = load_run_config(args.config, args.set)
    world = args.world_size if args.check and args.world_size else int(os.environ.get("WORLD_SIZE", "1"))
    accum = check_world(cfg, world)
    from mora_dist.data.hub import check_hub

    check_hub(cfg)  # hf:// sources / tokenizer: fail here, not on every rank, when the hub is out of reach
    check_sources(cfg.data.sources)
    ckpt_dir = Path(cfg.training.output_dir) / "checkpoints"
    if not args.resume and list_checkpoints(ckpt_dir):
        raise RunConfigError(f"training.output_dir={cfg.training.output_dir!r} already holds checkpoints: pass "
                             "--resume to continue that run, or choose a new output_dir")
    if args.resume and not list_checkpoints(ckpt_dir):
        raise RunConfigError(f"--resume: {ckpt_dir} holds no complete checkpoint (no step_* folder); start a new "
                             "run without --resume, or set training.output_dir to the run to continue")
    if args.resume and not args.check:
        check_resume_dp(cfg, ckpt_dir, world // cfg.model.tensor_model_parallel_size)  # refuses what cannot follow
    return cfg, accum


def check_plan(args: argparse.Namespace, cfg: RunConfig) -> int:
    """``--check``: print each rank's memory and communication plan (:mod:`mora_dist.run.plan`); 3 when
    ``--gpu-memory`` is given and the run does not fit, 2 on a bad flag."""
    from mora_dist.run.plan import parse_memory, plan_hf, render_expert_layout

    try:
        gpu = parse_memory(args.gpu_memory) if args.gpu_memory is not None else None
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.model.backend != "hf":
            if gpu is not None or args.nodes is not None:
                raise RunConfigError(f"--gpu-memory / --nodes: the memory plan covers model.backend='hf' only; "
                                     f"drop them for backend={cfg.model.backend!r}")
            if cfg.model.is_moe():
                print(render_expert_layout(cfg, world))
            print(f"memory plan: not available for backend={cfg.model.backend!r} (it covers backend='hf')")
            return 0
        plan = plan_hf(cfg, world, args.nodes or 1)
    except MoRAConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.render(gpu))
    return 3 if gpu is not None and not plan.fits(gpu) else 0


def setup_logging(cfg: RunConfig, rank: int) -> None:
    level = getattr(logging, cfg.logging.level) if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s] [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # megatron-core warns at import and build about fused CUDA kernels it cannot use on CPU: once is enough.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def write_run_files(cfg: RunConfig, tokenizer, vocab_size: int) -> None:
    """Rank 0: the resolved config (vocab size filled in) and the tokenizer, which export reads."""
    out = Path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = cfg.model_dump(mode="json")
    values["model"]["vocab_size"] = vocab_size
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(values, indent=2))
    os.replace(tmp, out / "config.json")
    tokenizer.save_pretrained(str(out / "tokenizer"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.check and (args.nodes is not None or args.gpu_memory is not None):
        print("error: --nodes and --gpu-memory plan a run: use them with --check", file=sys.stderr)
        return 2
    try:
        cfg, accum = validate(args)
    except MoRAConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"config OK: method={cfg.method}, backend={cfg.model.backend}, gradient_accumulation_steps={accum}")
        return check_plan(args, cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch.distributed as dist

    from mora_dist.run.distributed import init_distributed
    from mora_dist.run.failures import PeerFailed
    from mora_dist.run.preemption import EXIT_PREEMPTED, Preempted

    out = Path(cfg.training.output_dir)
    created = not out.exists()
    single = init_distributed(cpu_threads=cfg.training.cpu_threads)
    rank = dist.get_rank()
    setup_logging(cfg, rank)
    if single:
        logger.info("no launcher found (no RANK/WORLD_SIZE): running as one process")
    try:
        train(args, cfg, accum, rank)
    except (MoRAConfigError, PeerFailed) as exc:
        # A data problem met by some rank (all ranks agreed to stop, see mora_dist.run.failures): the rank that
        # met it says so, last; the others leave quietly. A run that never reached a checkpoint leaves nothing.
        if rank == 0 and created and not list_checkpoints(out / "checkpoints"):
            shutil.rmtree(out, ignore_errors=True)
        if not isinstance(exc, PeerFailed):
            print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)  # no interpreter teardown: engine threads and the process group must not hang the exit
    except Preempted as exc:
        if rank == 0:
            logger.warning("%s (exit code %d)", exc, EXIT_PREEMPTED)
        dist.barrier()  # every rank's part of the checkpoint is written before any rank leaves
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PREEMPTED)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def train(args: argparse.Namespace, cfg: RunConfig, accum: int, rank: int) -> None:
    import datasets
    import torch.distributed as dist

    from mora_dist.run import build, loop

    if rank != 0:
        datasets.disable_progress_bars()  # rank 0 shows tokenisation progress
    backend = loop.make_backend(cfg)
    tokenizer = build.build_tokenizer(cfg)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    if rank == 0:
        write_run_files(cfg, tokenizer, vocab_size)
        clean_stale(Path(cfg.training.output_dir) / "checkpoints")
    ckpt_dir = Path(cfg.training.output_dir) / "checkpoints"
    # Another data-parallel size than the checkpoint's: rank 0 adds its universal form, every rank loads that.
    universal = args.resume and check_resume_dp(cfg, ckpt_dir, backend.dp_size)
    if universal and rank == 0:
        add_universal(ckpt_dir / resume_tag(ckpt_dir))
    dist.barrier()
    engine, callbacks = backend.build(cfg, vocab_size, tokenizer.eos_token_id, accum,
                                      **({"load_universal": True} if universal else {}))
    if universal:
        load_module_state(engine, ckpt_dir / resume_tag(ckpt_dir))
    trainer = loop.Trainer(cfg, engine, callbacks, backend, resume=args.resume)
    start = time.perf_counter()
    trainer.run(tokenizer)
    logger.info("finished %d steps in %.1fs", trainer.step - trainer.start_step, time.perf_counter() - start)
    out = cfg.training.output_dir
    logger.info("%s", trainer.summary(f"python launch/export.py --run {out} --out exported/{Path(out).name}"))


if __name__ == "__main__":
    sys.exit(main())
