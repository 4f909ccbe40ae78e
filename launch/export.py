"""Export a run: the merged model as a Hugging Face checkpoint (safetensors), or the MoRA adapter alone.

Commands::

    python launch/export.py --run runs/remora_tiny --out exported/remora_tiny            # merged, loads with
                                                                                          # AutoModelForCausalLM
    python launch/export.py --run runs/remora_tiny --out exported/adapter --adapter-only  # save_mora, keep the base
    python launch/export.py --run runs/remora_tiny_megatron_tp2 --out exported/tp2        # TP shards -> HF Llama

``--tag step_0000120`` picks a checkpoint other than ``latest``. The tokenizer of the run is saved alongside.
Spec: §2.4, §4.
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


def export(run_dir: str, out: str, *, tag: str | None = None, adapter_only: bool = False) -> Path:
    """Write the export of ``run_dir`` to ``out``; returns ``out``."""
    from mora_dist.data import load_tokenizer
    from mora_dist.run.checkpoint import load_hf_run_model, read_run_config

    cfg = read_run_config(run_dir)
    out_path = Path(out)
    if adapter_only and cfg.mora is None:
        raise MoRAConfigError(f"--adapter-only: run {run_dir!r} trained method={cfg.method!r}, which has no MoRA "
                              "adapter; export the merged model instead")
    if cfg.model.backend == "megatron":
        from mora_dist.run.megatron import export_megatron_run

        model = export_megatron_run(run_dir, tag=tag, adapter_only=adapter_only)
    else:
        _, model = load_hf_run_model(run_dir, tag)
    if adapter_only:
        from mora_dist.adapter_io import save_mora

        if cfg.remora is not None:
            logger.warning("--adapter-only on a ReMoRA run: earlier merges live in the base weights of this run's "
                           "checkpoint, not in the adapter; apply it to that base, or export the merged model")

        save_mora(model, out_path)
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    try:
        export(args.run, args.out, tag=args.tag, adapter_only=args.adapter_only)
    except (MoRAConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
