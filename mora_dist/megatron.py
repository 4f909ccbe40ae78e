"""Deprecated location of the Megatron-LM recipe: import from :mod:`mora_dist.integrations.megatron_lm` (or take
``MegatronReMoRA`` and ``mora_model_provider`` from ``mora_dist`` itself)."""

import warnings

from mora_dist.integrations.megatron_lm import MegatronReMoRA, mora_model_provider

__all__ = ["MegatronReMoRA", "mora_model_provider"]

warnings.warn("mora_dist.megatron moved to mora_dist.integrations.megatron_lm; this alias will be removed",
              DeprecationWarning, stacklevel=2)
