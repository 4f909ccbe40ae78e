"""The public API: every eager name in ``__all__`` and every lazy Megatron/DeepSpeed name resolves."""

import importlib

import mora_dist


def test_every_public_name_resolves():
    for name in mora_dist.__all__:
        assert getattr(mora_dist, name) is not None, name
    for name, module in mora_dist._LAZY.items():
        assert getattr(mora_dist, name) is getattr(importlib.import_module(module), name), name
