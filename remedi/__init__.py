"""LLaDA-RemeDi: self-correcting (re-masking) masked diffusion language models on LLaDA."""
import importlib



def load(model_name=None, **kwargs):
    """Load a model for notebooks (default: the embedded tiny model): ``m = remedi.load()``, then
    ``m.generate("question", sources=["entropy", "ups"])`` -> {source: Decoded(text, nfe, remasks, trajectory)}.
    See :func:`remedi.session.load`."""
    from remedi.session import load as _load

    return _load(model_name, **kwargs)


__all__ = ["load", "CONFIGS", "LLaDAConfig", "get_config", "KVCache", "LLaDAModel", "ModelOutput", "RemeDiLM", "UPSHead",
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
