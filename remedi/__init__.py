"""LLaDA-RemeDi: self-correcting (re-masking) masked diffusion language models on LLaDA."""
from remedi.model.config import CONFIGS, LLaDAConfig, get_config
from remedi.model.llada import KVCache, LLaDAModel, ModelOutput, RemeDiLM, UPSHead, init_weights

__all__ = ["CONFIGS", "LLaDAConfig", "get_config", "KVCache", "LLaDAModel", "ModelOutput", "RemeDiLM", "UPSHead",
           "init_weights"]
__version__ = "0.1.0"
