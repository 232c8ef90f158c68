"""LLaDA-RemeDi: self-correcting (re-masking) masked diffusion language models on LLaDA."""
import importlib

__all__ = ["CONFIGS", "LLaDAConfig", "get_config", "KVCache", "LLaDAModel", "ModelOutput", "RemeDiLM", "UPSHead",
           "init_weights"]
__version__ = "0.1.0"

# Resolved on first use, so that torch-free parts (remedi.sandbox, remedi.tasks) import without torch.
_LAZY = {"CONFIGS": "remedi.model.config", "LLaDAConfig": "remedi.model.config", "get_config": "remedi.model.config",
         **{name: "remedi.model.llada" for name in ("KVCache", "LLaDAModel", "ModelOutput", "RemeDiLM", "UPSHead",
                                                    "init_weights")}}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'remedi' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
