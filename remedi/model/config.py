"""LLaDA model configuration: the hub's ``config.json`` keys, validated, plus a registry of named sizes.

Every architectural number the model uses comes from here (LLADA.md: "every value must come from
config.json, not code"). Options of the OLMo-style config that this implementation does not support are
rejected by :meth:`LLaDAConfig.from_hf_dict` with the key named, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys whose value must be exactly this for the math implemented in modeling.py to be the hub model's.
_REQUIRED_VALUES: dict[str, Any] = {
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "weight_tying": False,
    "block_type": "llama",
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "rope": True,
    "attention_layer_norm": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "bias_for_layer_norm": False,
    "layer_norm_with_affine": True,
    "clip_qkv": None,
    "multi_query_attention": None,
}
# Dropouts must be zero at inference; training LLaDA never used them either.
_ZERO_KEYS = ("attention_dropout", "residual_dropout", "embedding_dropout")


@dataclass
class LLaDAConfig:
    """Architecture of a LLaDA backbone (and, optionally, of its RemeDi UPS stream)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    # RemeDi stream UPS: backbone blocks after which the UPS blocks are tapped. Empty = no stream.
    # The official RemeDi checkpoints use (0, 10, 20, 30) with model_type "RemeDi".
    ups_taps: tuple[int, ...] = ()
    model_type: str = "llada"
    # Everything else found in config.json, kept so that save_pretrained writes it back unchanged.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ups_taps = tuple(int(t) for t in self.ups_taps)
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            problems.append("head_dim must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} < vocab_size={self.vocab_size}")
        if list(self.ups_taps) != sorted(set(self.ups_taps)) or any(
            not 0 <= t < self.n_layers for t in self.ups_taps
        ):
            problems.append(
                f"ups_taps={self.ups_taps} must be strictly increasing block indices in [0, {self.n_layers})"
            )
        if problems:
            raise ValueError("invalid LLaDA config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # ----------------------------------------------------------------------------------------------
    # hub config.json <-> dataclass
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LLaDAConfig":
        """Build from a hub ``config.json`` dict, refusing options this implementation does not run."""
        for key, want in _REQUIRED_VALUES.items():
            if key in raw and raw[key] != want:
                raise ValueError(
                    f"{source}: unsupported LLaDA option {key}={raw[key]!r} (this implementation "
                    f"supports only {key}={want!r}); the checkpoint would load but compute something else"
                )
        for key in _ZERO_KEYS:
            if raw.get(key, 0.0) not in (0, 0.0, None):
                raise ValueError(f"{source}: {key}={raw[key]} is not supported (must be 0.0)")
        mt = raw.get("model_type", "llada")
        if mt.lower() not in ("llada", "remedi"):
            raise ValueError(f"{source}: model_type={mt!r} is not a LLaDA/RemeDi config")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "ups_taps", "model_type"}
        missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        kwargs.setdefault("n_kv_heads", raw["n_heads"])
        kwargs.setdefault("embedding_size", raw["vocab_size"])
        if "mlp_hidden_size" not in raw:
            if "mlp_ratio" not in raw:
                raise ValueError(f"{source}: needs mlp_hidden_size (or mlp_ratio)")
            kwargs["mlp_hidden_size"] = int(raw["mlp_ratio"] * raw["d_model"])
        taps = raw.get("ups_taps")
        if taps is None and mt.lower() == "remedi":
            taps = (0, 10, 20, 30)  # fixed in the official RemeDi checkpoints (REMEDI.md)
        extra = {k: v for k, v in raw.items() if k not in names | {"ups_taps", "model_type"}}
        return cls(**kwargs, ups_taps=tuple(taps or ()), model_type=mt, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        out["ups_taps"] = list(self.ups_taps)
        if not self.ups_taps:
            del out["ups_taps"]
        out["model_type"] = "RemeDi" if self.ups_taps and self.model_type.lower() == "remedi" else self.model_type
        # Make the file self-describing for other readers (the hub code reads these).
        for key, want in _REQUIRED_VALUES.items():
            out.setdefault(key, want)
        out.setdefault("architectures", ["LLaDAModelLM"])
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "LLaDAConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_hf_dict(json.loads(path.read_text()), source=str(path))

    def replace(self, **changes: Any) -> "LLaDAConfig":
        return dataclasses.replace(self, **changes)


# Named sizes. The tiny ones keep the real token ids out of the way on purpose: library code must take
# special ids from the config/tokenizer, and tests with other ids catch a literal that slipped in.
CONFIGS: dict[str, LLaDAConfig] = {
    "llada-8b": LLaDAConfig(),
    # For unit tests: fast on CPU, GQA-free like the 8B, but small odd sizes to catch shape bugs.
    "test-tiny": LLaDAConfig(
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=96, vocab_size=97,
        embedding_size=97, max_sequence_length=256, rope_theta=10000.0,
        mask_token_id=96, eos_token_id=95, pad_token_id=95,
    ),
    # The embedded model shipped in checkpoints/ (vocab set by its tokenizer at build time).
    "remedi-tiny": LLaDAConfig(
        d_model=192, n_layers=6, n_heads=6, n_kv_heads=6, mlp_hidden_size=512, vocab_size=1024,
        embedding_size=1024, max_sequence_length=512, rope_theta=10000.0,
        mask_token_id=0, eos_token_id=1, pad_token_id=1,
    ),
}


def get_config(name: str, **overrides: Any) -> LLaDAConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; named configs: {sorted(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)
