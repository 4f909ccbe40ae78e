"""Recipes for other training codebases: :mod:`.megatron_lm` (Megatron-LM's ``pretrain()``)."""
