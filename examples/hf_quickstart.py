"""MoRA on a Hugging Face causal LM in a plain PyTorch loop: adapt, train, save the adapter, merge, export.

Runs offline on a CPU in seconds (a tiny Llama built from a config, random tokens)::

    python examples/hf_quickstart.py --out /tmp/mora_quickstart

With a real checkpoint, load it with ``AutoModelForCausalLM.from_pretrained`` instead of ``tiny_llama()``.
"""

from __future__ import annotations

import argparse
import logging

import torch
import transformers

from mora_dist import MoRAConfig, apply_mora, load_mora, merge_mora, save_mora, trainable_summary, unload

logger = logging.getLogger("hf_quickstart")


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="mora_quickstart")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    model = tiny_llama()
    apply_mora(model, MoRAConfig(r=8, mora_type="rope", target_modules="all-linear"))
    logger.info(trainable_summary(model))
    batch = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(batch, labels=batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            logger.info("step %d loss %.4f", step, loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(batch).logits

    save_mora(model, f"{args.out}/adapter")  # adapter_config.json + adapter_model.safetensors
    torch.manual_seed(0)
    reloaded = load_mora(tiny_llama().eval(), f"{args.out}/adapter")  # the same base, adapter loaded
    merge_mora(model)  # W += dW, M = 0
    plain = unload(model)  # a plain transformers model again
    plain.save_pretrained(f"{args.out}/merged")
    exported = transformers.AutoModelForCausalLM.from_pretrained(f"{args.out}/merged").eval()
    with torch.no_grad():
        gaps = {"reloaded_adapter": (reloaded(batch).logits - trained).abs().max().item(),
                "merged_export": (exported(batch).logits - trained).abs().max().item()}
    logger.info("max |logit difference| after reload and after merge+export: %s", gaps)
    return {"first_loss": losses[0], "final_loss": losses[-1], **gaps}


if __name__ == "__main__":
    main()
