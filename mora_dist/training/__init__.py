"""Training-loop pieces: the callback protocol, ReMoRA/ReLoRA callbacks, restarting schedulers, ZeRO state access.

Names load on first use (``remora`` imports DeepSpeed through ``optimizer_state``). Spec: §3, §5.
"""

import importlib

__all__ = [
    "Callback",
    "CallbackList",
    "JaggedCosineLR",
    "ReLoRACallback",
    "ReMoRACallback",
    "RestartedCosineLR",
    "TrainerCallbackAdapter",
]

_LAZY = {
    "Callback": "callbacks",
    "CallbackList": "callbacks",
    "TrainerCallbackAdapter": "hf_trainer",
    "ReMoRACallback": "remora",
    "ReLoRACallback": "remora",
    "JaggedCosineLR": "schedulers",
    "RestartedCosineLR": "schedulers",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mora_dist.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mora_dist.training' has no attribute {name!r}")
