"""Checkpoint I/O: the hub layout for backbones, small self-describing files for UPS weights.

Backbones load from a local directory or a hub id (``config.json`` + ``model.safetensors`` or shards
with ``model.safetensors.index.json``). The model is built on the meta device and the tensors are
assigned straight from safetensors in the target dtype, so host memory peaks near the checkpoint size.

UPS checkpoints hold tensors and plain JSON metadata only; ``.safetensors`` files keep the metadata in
the header, any other suffix (``.pt`` as in the user's commands) is a ``torch.save`` dict read back with
``weights_only=True``. Nothing loaded here can execute code. Every write goes to a temporary name in the
same directory and is renamed into place, so a crash never leaves a truncated file.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from remedi.model.config import LLaDAConfig
from remedi.model.llada import RemeDiLM, UPSHead

FORMAT_VERSION = 1
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
              "*.model", "*.tiktoken", "generation_config.json"]


# ------------------------------------------------------------------------------------------- atomic IO
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if is_dir else tmp / path.name
    try:
        yield target
        if is_dir:
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "peft", "accelerate", "safetensors"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


# ------------------------------------------------------------------------------------------- backbone
def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id fetched (config, weights, tokenizer only)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is a directory but has no config.json; expected a hub-layout model folder")
        return p
    if p.exists():
        raise ValueError(f"--model_name {p} is a file; give the model directory (config.json + *.safetensors)")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"model {name!r} is neither an existing directory nor a hub id like GSAI-ML/LLaDA-8B-Base")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception as e:  # network, auth, missing repo: say what was tried
        raise FileNotFoundError(
            f"{name!r} is not a local directory (looked in {Path.cwd()}) and could not be fetched from the "
            f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the path, or download "
            "the model elsewhere and pass its local directory to --model_name"
        ) from e


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")):
        raise ValueError(f"{model_dir} holds only pickle .bin weights; convert them to safetensors first")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def load_pretrained(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: Optional[LLaDAConfig] = None,
) -> RemeDiLM:
    """Load a LLaDA (or official RemeDi, backbone + stream) checkpoint without any remote code."""
    model_dir = resolve_model_dir(name_or_path)
    cfg = config or LLaDAConfig.from_json_file(model_dir / "config.json")
    with torch.device("meta"):
        model = RemeDiLM(cfg)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    dev = torch.device(device)
    dev = "cpu" if dev.type == "cpu" else str(dev)  # safetensors accepts "cpu", not "cpu:0"
    for f in _weight_files(model_dir):
        with safe_open(str(f), framework="pt", device=dev) as sf:
            for key in sf.keys():
                if key not in expected:
                    continue  # reported below with the full list
                t = sf.get_tensor(key)
                if t.shape != expected[key].shape:
                    raise ValueError(f"{f.name}: {key} has shape {tuple(t.shape)}, config.json implies "
                                     f"{tuple(expected[key].shape)}")
                state[key] = t.to(dtype)
    # Collect unexpected keys across files for one precise message.
    present = set()
    for f in _weight_files(model_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            present.update(sf.keys())
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        hint = ""
        if any(k.startswith("model.blocks_upm") for k in unexpected):
            hint = " (the checkpoint has a RemeDi stream UPS: its config.json should say model_type 'RemeDi')"
        raise ValueError(f"{model_dir}: checkpoint does not match config.json{hint}; missing "
                         f"{missing[:6]}{'...' if len(missing) > 6 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
    model.load_state_dict(state, strict=True, assign=True)
    model.name_or_path = str(name_or_path)
    return model.eval()


def save_pretrained(model: RemeDiLM, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                    dtype: Optional[torch.dtype] = None) -> Path:
    """Write the backbone (and stream, if any) in the hub layout, atomically (whole folder)."""
    cfg = model.config
    state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.model.state_dict().items()}
    state = {f"model.{k}": v for k, v in state.items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir, is_dir=True) as tmp:
        # keep anything else already in the folder (tokenizer files, UPS checkpoints)
        if out_dir.is_dir():
            for f in out_dir.iterdir():
                if f.name != "config.json" and not f.name.startswith("model") and f.is_file():
                    shutil.copy2(f, tmp / f.name)
                elif f.is_dir() and not f.name.startswith("."):
                    shutil.copytree(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------- UPS files
def ups_state(model: RemeDiLM) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable UPS tensors (head, or stream incl. bridges) and the metadata describing them."""
    cfg = model.config
    if model.ups_arch == "head":
        head = model.ups_head
        state = {f"ups_head.{k}": v for k, v in head.state_dict().items()}
        meta = {"ups_arch": "head", "ups_width": head.width}
    elif model.ups_arch == "stream":
        names = model.model.stream_parameter_names()
        full = model.model.state_dict()
        state = {f"model.{n}": full[n] for n in names}
        meta = {"ups_arch": "stream", "ups_taps": list(cfg.ups_taps)}
    else:
        raise ValueError("the model has no UPS to save")
    meta.update(hidden_size=cfg.d_model, n_layers=cfg.n_layers, vocab_size=cfg.vocab_size,
                mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id)
    return state, meta


def save_ups(path: str | os.PathLike, model: RemeDiLM, extra_meta: Optional[dict[str, Any]] = None) -> Path:
    """Save only the UPS weights with a rebuild recipe (never the frozen backbone)."""
    state, meta = ups_state(model)
    meta = {"format_version": FORMAT_VERSION, **meta, "base_model": getattr(model, "name_or_path", None),
            "versions": versions(), **(extra_meta or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"remedi_meta": json.dumps(meta)})
        else:
            torch.save({"state_dict": tensors, "meta": json.dumps(meta)}, tmp)
    return path


def read_ups(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a UPS checkpoint's tensors and metadata (safe loaders only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UPS checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            meta = json.loads((sf.metadata() or {}).get("remedi_meta", "{}"))
            state = {k: sf.get_tensor(k) for k in sf.keys()}
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a readable UPS checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError(f"{path} is not a UPS checkpoint written by this toolkit (no state_dict/meta)")
        state, meta = blob["state_dict"], json.loads(blob.get("meta") or "{}")
    if meta.get("ups_arch") not in ("head", "stream"):
        raise ValueError(f"{path}: metadata has no valid ups_arch (found {meta.get('ups_arch')!r})")
    return state, meta


def check_ups_compatible(meta: dict[str, Any], cfg: LLaDAConfig, path: str = "UPS checkpoint") -> None:
    """Fail before any weight is touched when a UPS checkpoint cannot belong to this backbone."""
    if meta.get("hidden_size") != cfg.d_model:
        raise ValueError(f"{path} was trained on a backbone with hidden size {meta.get('hidden_size')}, "
                         f"but this model has d_model={cfg.d_model}; use a UPS trained on this base model")
    if meta["ups_arch"] == "stream":
        taps = tuple(meta.get("ups_taps", ()))
        if max(taps, default=-1) >= cfg.n_layers:
            raise ValueError(f"{path}: stream taps {taps} do not fit a backbone with {cfg.n_layers} blocks")


def load_ups(path: str | os.PathLike, model: RemeDiLM) -> dict[str, Any]:
    """Attach the UPS stored at ``path`` to ``model`` (adds the head or stream if absent). Returns meta."""
    state, meta = read_ups(path)
    cfg = model.config
    check_ups_compatible(meta, cfg, str(path))
    ref = next(model.parameters())
    if meta["ups_arch"] == "head":
        if model.model.has_stream:
            raise ValueError(f"{path} holds a head UPS, but the model already has a stream UPS "
                             f"(taps {cfg.ups_taps}); load it into a plain LLaDA backbone")
        head = UPSHead(cfg.d_model, int(meta.get("ups_width", 0))).to(ref.device)
        sd = {k.removeprefix("ups_head."): v for k, v in state.items()}
        _load_exact(head, sd, path)
        model.attach_head(head)
    else:
        if model.ups_head is not None:
            raise ValueError(f"{path} holds a stream UPS, but the model has a head UPS attached")
        taps = tuple(meta["ups_taps"])
        if not model.model.has_stream:
            add_stream(model, taps)
        elif tuple(cfg.ups_taps) != taps:
            raise ValueError(f"{path}: stream taps {taps} != the model's taps {cfg.ups_taps}")
        sub = {k.removeprefix("model."): v.to(ref.dtype) for k, v in state.items()}
        missing = set(model.model.stream_parameter_names()) - set(sub)
        if missing:
            raise ValueError(f"{path}: stream checkpoint lacks {sorted(missing)[:4]}")
        model.model.load_state_dict(sub, strict=False)
    return meta


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    expected = module.state_dict()
    problems = sorted(set(expected) ^ set(state))
    problems += [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
                 if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"{path}: UPS tensors do not match the architecture in its metadata: {problems[:6]}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def add_stream(model: RemeDiLM, taps: tuple[int, ...]) -> None:
    """Give a plain backbone a freshly initialised stream UPS (zero bridges) at ``taps``."""
    from remedi.model.llada import init_weights

    if model.ups_head is not None or model.model.has_stream:
        raise ValueError("model already has a UPS")
    ref = next(model.parameters())
    model.model.config = model.config.replace(ups_taps=tuple(taps))
    model.model._build_stream(model.model.config)
    stream = [m for n, m in model.model.named_children() if n != "transformer"]
    for m in stream:
        m.to(device=ref.device, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for m in model.model.blocks_upm:
        init_weights(m, generator=g)
    model.model.reset_stream_parameters()
    for m in stream:
        m.to(dtype=ref.dtype)
