"""Export a run: the merged model as a Hugging Face checkpoint (safetensors), or the MoRA adapter alone.

Commands::

    python launch/export.py --run runs/remora_tiny --out exported/remora_tiny            # merged, loads with
                                                                                          # AutoModelForCausalLM
    python launch/export.py --run runs/remora_tiny --out exported/adapter --adapter-only  # save_mora, keep the base
    python launch/export.py --run runs/remora_tiny_megatron_tp2 --out exported/tp2        # TP shards -> HF Llama
    python launch/export.py --run runs/remora_tiny --out exported/lora --adapter-only --format peft-lora \
        --since-start             # the whole ReMoRA/ReLoRA run as one PEFT LoRA over the starting weights

``--tag step_0000120`` picks a checkpoint other than ``latest``. ``--format`` (with ``--adapter-only``): ``mora``
(our files, default), ``peft-lora`` (a standard PEFT LoRA, exact for types 1-4 and LoRA) or ``mora-authors``
(the MoRA authors' PEFT fork). The tokenizer of the run is saved alongside.
``--state-dict`` takes the weights from DeepSpeed's ``zero_to_fp32.py`` output instead (a ZeRO-3 checkpoint's
model states hold no weights); keys such as ``...q_proj.base_layer.weight`` and ``...q_proj.mora_M`` are folded
into plain ``...q_proj.weight``::

    python runs/remora_tiny/checkpoints/zero_to_fp32.py runs/remora_tiny/checkpoints fp32/ -t step_0000160
    python launch/export.py --run runs/remora_tiny --tag step_0000160 --state-dict fp32/ --out exported/remora_tiny

Spec: §2.4, §2.5, §4.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mora_dist.errors import MoRAConfigError  # noqa: E402

logger = logging.getLogger("mora_dist.export")


def merge_adapters(model):
    """Fold every MoRA / LoRA ``dW`` into its base layer and put the plain ``nn.Linear`` back. Spec: §2.4."""
    from mora_dist.lora import lora_layers
    from mora_dist.model import mora_layers, unload

    if any(True for _ in mora_layers(model)):
        unload(model, merge=True)
    for name, layer in list(lora_layers(model)):
        layer.merge(reinit=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    model.requires_grad_(True)
    return model


FORMATS = ("mora", "peft-lora", "mora-authors")


def _check_format(cfg, run_dir: str, adapter_only: bool, fmt: str, since_start: bool) -> None:
    """Refuse a combination the export cannot write, before anything is loaded."""
    if fmt not in FORMATS:
        raise MoRAConfigError(f"--format {fmt!r} is not one of {FORMATS}")
    if (fmt != "mora" or since_start) and not adapter_only:
        raise MoRAConfigError("--format and --since-start describe the adapter: add --adapter-only")
    if since_start and fmt != "peft-lora":
        raise MoRAConfigError(f"--since-start writes a PEFT LoRA: use --format peft-lora (got {fmt!r})")
    if not adapter_only:
        return
    if cfg.mora is None and not (fmt == "peft-lora" and cfg.lora is not None):
        raise MoRAConfigError(f"--adapter-only --format {fmt}: run {run_dir!r} trained method={cfg.method!r}, "
                              "which has no such adapter; export the merged model instead")
    if fmt == "mora-authors" and cfg.model.backend == "megatron":
        raise MoRAConfigError("--format mora-authors on backend 'megatron': a MoRA matrix of the fused linear_qkv / "
                              "linear_fc1 is no MoRA of Hugging Face's separate q/k/v or gate/up modules; use "
                              "--format peft-lora (exact, Hugging Face names), --format mora, or the merged model")


def _kept_cycles(run_dir: str, tag: str | None, cfg) -> list:
    """The merge cycles the ReMoRA / ReLoRA callback kept in checkpoint ``tag`` (``[]`` without restarts)."""
    from mora_dist.run.checkpoint import read_client_state
    from mora_dist.training.callbacks import CLIENT_STATE_KEY

    if cfg.remora is None and cfg.relora is None:
        return []
    for key, state in read_client_state(run_dir, tag).get(CLIENT_STATE_KEY, {}).items():
        if key.endswith((":ReMoRACallback", ":ReLoRACallback")):
            cycles = state.get("cycles", [])
            if len(cycles) != len(state["merged_steps"]):
                raise MoRAConfigError(
                    f"--since-start: checkpoint {tag or 'latest'} of {run_dir!r} records {len(state['merged_steps'])} "
                    f"merges but kept {len(cycles)} cycles (written before cycles were kept); export the merged model"
                )
            return cycles
    raise MoRAConfigError(f"--since-start: checkpoint {tag or 'latest'} of {run_dir!r} holds no ReMoRA/ReLoRA state")


def export(run_dir: str, out: str, *, tag: str | None = None, adapter_only: bool = False, fmt: str = "mora",
           since_start: bool = False, state_dict: str | None = None) -> Path:
    """Write the export of ``run_dir`` to ``out``; returns ``out``."""
    from mora_dist.data import load_tokenizer
    from mora_dist.run.checkpoint import read_run_config
    from mora_dist.run.hf import load_hf_run_model

    cfg = read_run_config(run_dir)
    out_path = Path(out)
    _check_format(cfg, run_dir, adapter_only, fmt, since_start)
    cycles = _kept_cycles(run_dir, tag, cfg) if since_start else None
    if cfg.model.backend == "megatron" and fmt == "peft-lora" and state_dict is None:
        from mora_dist.run.megatron.export import export_megatron_peft_lora

        export_megatron_peft_lora(run_dir, out_path, tag=tag, cycles=cycles)
        model = None  # written: the tokenizer follows
    elif cfg.model.backend == "megatron":
        if state_dict is not None:
            raise MoRAConfigError(f"--state-dict reads zero_to_fp32.py output of a Hugging Face backend run; run "
                                  f"{run_dir!r} is backend 'megatron': export it without --state-dict")
        from mora_dist.run.megatron.export import export_megatron_run

        model = export_megatron_run(run_dir, tag=tag, adapter_only=adapter_only)
    else:
        from mora_dist.run.checkpoint import read_state_dict

        weights = read_state_dict(state_dict) if state_dict is not None else None
        _, model = load_hf_run_model(run_dir, tag, state_dict=weights)
    if model is None:
        pass
    elif adapter_only and fmt == "peft-lora":
        from mora_dist.adapters.peft_lora import save_peft_lora

        modules_to_save = cfg.mora.modules_to_save if cfg.mora is not None else cfg.lora.modules_to_save
        save_peft_lora(model, out_path, cycles=cycles, modules_to_save=modules_to_save)
    elif adapter_only:
        from mora_dist.adapters import save_mora

        if cfg.remora is not None:
            logger.warning("--adapter-only on a ReMoRA run: earlier merges live in the base weights of this run's "
                           "checkpoint, not in the adapter; apply it to that base, export the merged model, or "
                           "--format peft-lora --since-start for the whole run over the starting weights")

        save_mora(model, out_path, format=fmt)
    else:
        merge_adapters(model).save_pretrained(str(out_path))
    load_tokenizer(Path(run_dir) / "tokenizer").save_pretrained(str(out_path))
    logger.info("exported %s -> %s", run_dir, out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training.output_dir of the run")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--adapter-only", action="store_true", help="write the MoRA adapter (save_mora) only")
    p.add_argument("--format", default="mora", choices=FORMATS, help="adapter format (with --adapter-only)")
    p.add_argument("--since-start", action="store_true",
                   help="peft-lora of the whole run (kept merge cycles + live adapter) over the starting weights")
    p.add_argument("--state-dict", default=None,
                   help="weights from DeepSpeed's zero_to_fp32.py output (file or folder) instead of the checkpoint's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    try:
        export(args.run, args.out, tag=args.tag, adapter_only=args.adapter_only, fmt=args.format,
               since_start=args.since_start, state_dict=args.state_dict)
    except (MoRAConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
