"""LLaDA-RemeDi: self-correcting (re-masking) masked diffusion language models on LLaDA."""
from remedi.model.config import CONFIGS, LLaDAConfig, get_config
from remedi.model.llada import KVCache, LLaDAModel, ModelOutput, RemeDiLM, UPSHead, init_weights



def load(model_name=None, **kwargs):
    """Load a model for notebooks (default: the embedded tiny model): ``m = remedi.load()``, then
    ``m.generate("question", sources=["entropy", "ups"])`` -> {source: Decoded(text, nfe, remasks, trajectory)}.
    See :func:`remedi.session.load`."""
    from remedi.session import load as _load

    return _load(model_name, **kwargs)


__all__ = ["load", "CONFIGS", "LLaDAConfig", "get_config", "KVCache", "LLaDAModel", "ModelOutput", "RemeDiLM", "UPSHead",
           "init_weights"]
__version__ = "0.1.0"
