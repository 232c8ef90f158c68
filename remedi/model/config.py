"""LLaDA model configuration: the hub's ``config.json`` keys, validated, plus a registry of named sizes.

Every architectural number the model uses comes from here (LLaDA's hub config: "every value must come from
config.json, not code"). :meth:`LLaDAConfig.from_hf_dict` sorts the keys of a config.json into four kinds:
the numbers read into the dataclass (type-checked, with the key named on a bad value); options whose
value must be the one this implementation computes (anything else is refused, never silently ignored);
keys known not to change the forward pass (accepted quietly); and keys it does not know (accepted with
one warning that names them, since it cannot tell whether they matter).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys whose value must be exactly this for the math implemented in llada.py to be the hub model's.
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
# Values equivalent to the required one: the official config class's defaults. bias_for_layer_norm None
# means "same as include_bias" (resolved in from_hf_dict); multi_query_attention False defers to
# n_kv_heads exactly as None does.
_ALSO_ACCEPTED: dict[str, tuple[Any, ...]] = {"multi_query_attention": (False,)}
# Keys of other config families that would change the math unless unset (null) or off.
_MUST_BE_OFF: dict[str, tuple[Any, ...]] = {
    "rope_scaling": (None,),
    "sliding_window": (None,),
    "tie_word_embeddings": (None, False),
    "attention_bias": (None, False),
    "mlp_bias": (None, False),
    "qk_layernorm": (None, False),
    "partial_rotary_factor": (None, 1, 1.0),
}
# Dropouts must be zero at inference; training LLaDA never used them either.
_ZERO_KEYS = ("attention_dropout", "residual_dropout", "embedding_dropout")
# Keys that do not change the forward pass computed here: initialisation and runtime options of the hub
# code (mlp_ratio only matters without mlp_hidden_size, handled below; alibi_bias_max and
# attention_layer_norm_with_affine only with alibi / attention_layer_norm, which are refused) and the
# bookkeeping keys transformers writes into every config.json.
_HARMLESS_KEYS = frozenset({
    "mlp_ratio", "alibi_bias_max", "attention_layer_norm_with_affine", "block_group_size", "flash_attention",
    "init_device", "init_fn", "init_std", "init_cutoff_factor", "precision", "use_cache", "rope_full_precision",
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "name_or_path", "bos_token_id", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tie_encoder_decoder", "is_encoder_decoder", "is_decoder", "id2label", "label2id",
    "tokenizer_class", "problem_type", "pruned_heads", "chunk_size_feed_forward", "task_specific_params",
    "_attn_implementation_autoset", "initializer_range",
})
# Types of the dataclass fields read from config.json (the names are the hub's keys).
_INT_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
               "max_sequence_length", "mask_token_id", "eos_token_id", "pad_token_id")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
_POSITIVE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                    "embedding_size", "max_sequence_length", "rope_theta", "rms_norm_eps")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _describe(v: Any) -> str:
    return f"{v!r} ({type(v).__name__})"


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
        # Types first, so a string from a hand-edited config.json gets its key named instead of a TypeError.
        problems = []
        for names, ok, cast, kind in ((_INT_FIELDS, _is_int, int, "an integer"),
                                      (_FLOAT_FIELDS, _is_real, float, "a number")):
            for name in names:
                v = getattr(self, name)
                if ok(v):
                    setattr(self, name, cast(v))
                else:
                    problems.append(f"{name} must be {kind}, got {_describe(v)}")
        taps = self.ups_taps
        if isinstance(taps, (str, bytes)) or not hasattr(taps, "__iter__") or not all(_is_int(t) for t in taps):
            problems.append(f"ups_taps must be a list of integer block indices, got {_describe(taps)}")
        else:
            self.ups_taps = tuple(int(t) for t in taps)
        if not isinstance(self.model_type, str):
            problems.append(f"model_type must be a string, got {_describe(self.model_type)}")
        if problems:
            raise ValueError("invalid LLaDA config: " + "; ".join(problems))
        problems = [f"{name} must be positive, got {getattr(self, name)}" for name in _POSITIVE_FIELDS
                    if not getattr(self, name) > 0]
        problems += [f"{name}={getattr(self, name)} is not a token id of the embedding (0 <= id < embedding_size="
                     f"{self.embedding_size})" for name in ("mask_token_id", "eos_token_id", "pad_token_id")
                     if not 0 <= getattr(self, name) < max(self.embedding_size, 1)]
        if problems:
            raise ValueError("invalid LLaDA config: " + "; ".join(problems))
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
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a JSON object of config keys, got {type(raw).__name__}")
        resolved = dict(raw)  # raw itself stays as read, so save_pretrained writes the keys back unchanged
        if "bias_for_layer_norm" in raw and raw["bias_for_layer_norm"] is None:
            # The official config class's default: None means "same as include_bias".
            resolved["bias_for_layer_norm"] = raw.get("include_bias", False)
        for key, want in _REQUIRED_VALUES.items():
            v = resolved.get(key, want)
            if v != want and v not in _ALSO_ACCEPTED.get(key, ()):
                shown = f"{v!r} (null means include_bias={v!r})" if raw.get(key, want) is None else f"{v!r}"
                raise ValueError(
                    f"{source}: unsupported LLaDA option {key}={shown} (this implementation "
                    f"supports only {key}={want!r}); the checkpoint would load but compute something else"
                )
        for key, allowed in _MUST_BE_OFF.items():
            if key in raw and not any(raw[key] is a or (raw[key] == a and type(raw[key]) is type(a))
                                      for a in allowed):
                raise ValueError(
                    f"{source}: {key}={raw[key]!r} is not supported (this implementation computes the model with "
                    f"{key}={allowed[0]!r}); the checkpoint would load but compute something else, so remove "
                    "the key or use a model without it"
                )
        for key in _ZERO_KEYS:
            if raw.get(key, 0.0) not in (0, 0.0, None) or isinstance(raw.get(key), (bool, str)):
                raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (must be 0.0)")
        mt = raw.get("model_type", "llada")
        if not isinstance(mt, str) or mt.lower() not in ("llada", "remedi"):
            raise ValueError(f"{source}: model_type={mt!r} is not a LLaDA/RemeDi config (expected 'llada' or "
                             "'RemeDi')")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "ups_taps", "model_type"}
        missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size") if raw.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        kwargs.setdefault("n_kv_heads", raw["n_heads"])
        kwargs.setdefault("embedding_size", raw["vocab_size"])
        if "mlp_hidden_size" not in kwargs:
            ratio = raw.get("mlp_ratio")
            if ratio is None:
                raise ValueError(f"{source}: needs mlp_hidden_size (or mlp_ratio)")
            if not _is_real(ratio) or not _is_int(raw["d_model"]):
                raise ValueError(f"{source}: mlp_ratio must be a number and d_model an integer to derive "
                                 f"mlp_hidden_size, got mlp_ratio={_describe(ratio)}")
            kwargs["mlp_hidden_size"] = int(ratio * raw["d_model"])
        head_dim = raw.get("head_dim")
        if head_dim is not None and _is_int(raw["d_model"]) and _is_int(raw["n_heads"]) and raw["n_heads"] > 0 \
                and head_dim != raw["d_model"] // raw["n_heads"]:
            raise ValueError(f"{source}: head_dim={head_dim!r} is not supported: this implementation uses "
                             f"d_model / n_heads = {raw['d_model'] // raw['n_heads']}")
        taps = raw.get("ups_taps")
        if taps is None and mt.lower() == "remedi":
            taps = (0, 10, 20, 30)  # fixed in the official RemeDi checkpoints (arXiv:2509.23653)
        known = (names | {"ups_taps", "model_type", "head_dim"} | set(_REQUIRED_VALUES) | set(_MUST_BE_OFF)
                 | set(_ZERO_KEYS))
        unknown = sorted(k for k in raw if k not in known and k not in _HARMLESS_KEYS)
        if unknown:
            log.warning("%s: ignoring keys this implementation does not read: %s; they are kept when the config "
                        "is saved, but if one of them changes the architecture the model will compute something "
                        "else", source, ", ".join(unknown))
        if raw.get("rope_full_precision") is False:
            log.warning("%s: rope_full_precision=false, but this implementation always computes rotary embeddings "
                        "in float32 (logits may differ slightly from the hub code's)", source)
        extra = {k: v for k, v in raw.items() if k not in names | {"ups_taps", "model_type"}}
        try:
            return cls(**kwargs, ups_taps=() if taps is None else taps, model_type=mt, extra=extra)
        except ValueError as e:
            raise ValueError(f"{source}: {e}; fix that value in the file") from None

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
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore the model's config.json") from None
        return cls.from_hf_dict(raw, source=str(path))

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
