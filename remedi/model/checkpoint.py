"""Checkpoint I/O: the hub layout for backbones, small self-describing files for UPS weights.

Backbones load from a local directory or a hub id (``config.json`` + ``model.safetensors`` or shards
with ``model.safetensors.index.json``). Every shard's header is read and checked against config.json
(names, shapes) before any tensor is; then the model is built on the meta device and the tensors are
assigned straight from safetensors in the target dtype, so host memory peaks near the checkpoint size.

UPS checkpoints hold tensors and plain JSON metadata only; ``.safetensors`` files keep the metadata in
the header (key ``remedi_meta``), any other suffix (``.pt`` as in the user's commands) is a ``torch.save``
dict ``{"state_dict": tensors, "meta": json}`` read back with ``weights_only=True``. The metadata is
readable alone (:func:`read_ups_meta`: the safetensors header, or the ``.pt`` archive memory-mapped so its
tensors are never read), which keeps preflight checks cheap. The metadata records a sha256 of every
tensor (``tensor_sha256``), verified on load along with finiteness. Nothing loaded here can execute code.
Every write goes to a temporary name in the same directory and is renamed into place, so a crash never
leaves a truncated file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import platform
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from remedi.files import atomic_path
from remedi.model.config import LLaDAConfig
from remedi.model.llada import RemeDiLM, UPSHead
from remedi.model.residual import ResidualUPS

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
UPS_META_KEY = "remedi_meta"  # safetensors header key holding the UPS metadata (JSON)
UPS_FILE_NAME = "ups.safetensors"  # the default name of a run's UPS file (safetensors: no pickle on the read path)
CHECKSUM_KEY = "tensor_sha256"  # metadata key: {tensor name: sha256 hex of its raw bytes}
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
              "*.model", "*.tiktoken", "generation_config.json"]


# ------------------------------------------------------------------------------------------- atomic IO
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


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def open_safetensors(path: str | os.PathLike, device: str = "cpu"):
    """``safe_open`` that names the file when its header is truncated or corrupt."""
    try:
        return safe_open(str(path), framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{path} is truncated or corrupt: not a readable safetensors file ({_first_line(e)}); "
                         "download or copy it again") from None


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index (needs a JSON object with a weight_map; "
                             f"{_first_line(e)}); download it again") from None
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


def _fmt_keys(keys: list[str]) -> str:
    return f"{keys[:6]}{'...' if len(keys) > 6 else ''} ({len(keys)})"


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
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    files = _weight_files(model_dir)
    # Headers only: every file's names and shapes are checked before a single tensor is read.
    where: dict[str, Path] = {}
    problems: list[str] = []
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                if key in where:
                    raise ValueError(f"{f}: tensor {key} is also in {where[key].name}; the shards overlap")
                where[key] = f
                if key in expected:
                    shape = tuple(sf.get_slice(key).get_shape())
                    if shape != expected[key]:
                        problems.append(f"{f.name}: {key} has shape {shape}, config.json implies {expected[key]}")
    missing = sorted(set(expected) - set(where))
    unexpected = sorted(set(where) - set(expected))
    if missing or unexpected:
        hint = ""
        if any(k.startswith("model.blocks_upm") for k in unexpected):
            hint = " (the checkpoint has a RemeDi stream UPS: its config.json should say model_type 'RemeDi')"
        raise ValueError(f"{model_dir}: checkpoint does not match config.json{hint}; missing "
                         f"{_fmt_keys(missing)}, unexpected {_fmt_keys(unexpected)}")
    if problems:
        raise ValueError(f"{model_dir}: " + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    state: dict[str, torch.Tensor] = {}
    dev = torch.device(device)
    dev = "cpu" if dev.type == "cpu" else str(dev)  # safetensors accepts "cpu", not "cpu:0"
    for f in files:
        with open_safetensors(f, device=dev) as sf:
            for key in sf.keys():
                state[key] = sf.get_tensor(key).to(dtype)
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
    policy = getattr(model, "ups_policy", None)
    if policy is not None and hasattr(policy, "spec"):  # a residual UPS on top (remedi.model.residual)
        state.update({f"ups_policy.{k}": v for k, v in policy.state_dict().items()})
        meta.update(kind="residual", residual=policy.spec())
    return state, meta


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in C order and its stored dtype (what the file holds)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data if flat.numel() else b"").hexdigest()


def _nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Number of NaN/inf entries, in chunks (no full-size temporary for a 1B-parameter stream)."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def save_ups(path: str | os.PathLike, model: RemeDiLM, extra_meta: Optional[dict[str, Any]] = None) -> Path:
    """Save only the UPS weights with a rebuild recipe (never the frozen backbone).

    The metadata gets ``tensor_sha256`` (a sha256 per tensor, see :func:`tensor_sha256`), which
    :func:`read_ups` verifies; it is computed here and cannot be overridden by ``extra_meta``.
    """
    state, meta = ups_state(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    bad = {k: n for k, n in ((k, _nonfinite(v)) for k, v in tensors.items()) if n}
    if bad:
        log.warning("saving UPS %s with non-finite values (%s); loading it will be refused", path,
                    ", ".join(f"{k}: {n}" for k, n in bad.items()))
    meta = {"format_version": FORMAT_VERSION, **meta, "base_model": getattr(model, "name_or_path", None),
            "versions": versions(), **(extra_meta or {})}
    return write_ups(path, tensors, meta)


def write_ups(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write UPS ``tensors`` with ``meta`` (a free dict) plus their ``tensor_sha256``, atomically, and a card.

    ``.safetensors`` keeps the metadata in the header; any other suffix is a ``torch.save`` dict. The card
    (:func:`ups_card_path`) describes what the metadata records.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**meta, CHECKSUM_KEY: {k: tensor_sha256(tensors[k]) for k in sorted(tensors)}}
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={UPS_META_KEY: json.dumps(meta)})
        else:
            torch.save({"state_dict": tensors, "meta": json.dumps(meta)}, tmp)
    write_model_card(ups_card_path(path), "ups", meta, weights=path.name)
    return path


def reseal_ups(path: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Rewrite a UPS file written before checksums were stored (or convert it: ``out`` with another suffix),
    adding ``tensor_sha256``; the tensors and every other metadata field are kept as they are."""
    state, meta = read_ups(path, verify=False)
    verify_ups_state(state, meta, path)  # a file that fails its own checksum is never re-sealed
    meta.pop(CHECKSUM_KEY, None)
    return write_ups(out or path, state, meta)


# ------------------------------------------------------------------------------------------- model cards
def ups_card_path(path: str | os.PathLike) -> Path:
    """The model card written beside a UPS file: ``ups_head.pt`` -> ``ups_head.md``."""
    return Path(path).with_suffix(".md")


def _md_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and str(name).count("/") == 1 and not str(name).startswith((".", "/", "~")) \
        and not Path(str(name)).exists()


def model_card(kind: str, meta: dict[str, Any], weights: str = "") -> str:
    """A model card (README-style markdown with hub front matter) from a save's metadata.

    ``kind``: "ups" (a UPS head/stream file) or "lora" (a peft adapter folder). ``meta`` holds what the run
    recorded: ``base_model``, the UPS architecture, ``args`` (every flag), ``train``/``rl`` (step, dataset)
    and measured ``results``/``metrics`` when the caller has them. Nothing is invented: what is absent is left out.
    """
    args = meta.get("args") or {}
    progress = meta.get("train") or meta.get("rl") or {}
    base = meta.get("base_model") or args.get("model_name")
    script = args.get("script") or ("train_remask_rl" if "rl" in meta else "")
    if kind == "lora":
        what = f"a peft LoRA adapter (r={meta.get('r')}, alpha={meta.get('lora_alpha')}) on the LLaDA backbone's " \
               "block linears, trained with Remask SFT's TPS loss" + (" and RL" if "rl" in meta else "")
        tags = ["llada", "remedi", "lora", "masked-diffusion"]
    else:
        arch = meta.get("ups_arch")
        shape = f"MLP width {meta.get('ups_width')}" if arch == "head" else f"taps {meta.get('ups_taps')}"
        what = f"a RemeDi Unmasking Policy Stream ({arch}, {shape}; hidden size {meta.get('hidden_size')}), the " \
               "per-position confidence that decides which tokens stay and which are masked again"
        if meta.get("kind"):
            what += f"; kind {meta['kind']}"
        tags = ["llada", "remedi", "ups", "masked-diffusion"]
    front = ["---", "library_name: " + ("peft" if kind == "lora" else "remedi")]
    if _is_hub_id(base):
        front.append(f"base_model: {base}")
    front += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    lines = [f"# {'LoRA adapter' if kind == 'lora' else 'UPS'} for {base or 'a LLaDA model'}", "",
             f"What this is: {what}. Written by LLaDA-RemeDi" + (f" ({script}.py)" if script else "") + ".", ""]
    lines += ["## Base model", "", f"`{base}`" if base else "not recorded", ""]
    data = {k: progress.get(k) for k in ("dataset",) if progress.get(k)}
    data.update({k: args[k] for k in ("dataset", "subset", "split", "max_examples", "seq_len", "arith_n")
                 if args.get(k) not in (None, "") and k not in data})
    lines += ["## Data", ""] + ([f"- {k}: `{_md_value(v)}`" for k, v in data.items()] or ["not recorded"]) + [""]
    steps = {k: v for k, v in progress.items() if k != "dataset"}
    if steps:
        lines += ["## Training", ""] + [f"- {k}: {_md_value(v)}" for k, v in steps.items()] + [""]
    results = meta.get("results") or meta.get("metrics")
    lines += ["## Results", ""]
    if isinstance(results, dict) and results:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_md_value(v)} |" for k, v in results.items()]
    else:
        lines += ["No measured results were given with this save; evaluate it with `remedi-eval` (below)."]
    lines += [""]
    if args:
        lines += ["## Arguments", "", "| flag | value |", "|---|---|"]
        lines += [f"| --{k} | {_md_value(v)} |" for k, v in args.items() if v is not None and k != "script"]
        lines += [""]
    use = f"remedi-eval --model_name {base or 'MODEL'} "
    use += f"--lora_path {weights or 'THIS_FOLDER'}" if kind == "lora" else f"--ups_head {weights or 'THIS_FILE'}"
    lines += ["## Use", "", "```bash", use, "```", ""]
    ver = meta.get("versions") or versions()
    lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in ver.items()), ""]
    return "\n".join(front + lines)


def write_model_card(path: str | os.PathLike, kind: str, meta: dict[str, Any], weights: str = "") -> Path:
    """Write :func:`model_card` to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(model_card(kind, meta, weights), encoding="utf-8")
    return path


def save_lora(peft_model, out_dir: str | os.PathLike, base_model: Optional[str] = None,
              meta: Optional[dict[str, Any]] = None, **save_kwargs) -> Path:
    """``peft_model.save_pretrained`` plus what peft cannot know about the native model.

    ``adapter_config.json`` gets ``base_model_name_or_path`` (the model the run used; peft reads it from a
    transformers config, which the native LLaDAModel does not have) and loses ``auto_mapping`` (it names this
    toolkit's module path, which ``AutoPeftModel`` cannot build from); ``README.md`` becomes a real card
    (:func:`model_card`) instead of peft's blank template. ``save_kwargs`` go to peft (e.g. ``state_dict``).
    Writes into ``out_dir`` as is: callers that need atomicity pass a temporary folder (``atomic_path``).
    """
    out = Path(out_dir)
    # The adapters never touch the embedding: say so, or peft ("auto") reloads the base config through
    # transformers (LLaDAConfig has no from_pretrained) and may ask the hub whether it exists.
    save_kwargs.setdefault("save_embedding_layers", False)
    peft_model.save_pretrained(str(out), **save_kwargs)
    conf_file = out / "adapter_config.json"
    conf = json.loads(conf_file.read_text())
    conf.pop("auto_mapping", None)
    if base_model is not None:
        conf["base_model_name_or_path"] = str(base_model)
    conf_file.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    card_meta = {"base_model": conf.get("base_model_name_or_path"), "r": conf.get("r"),
                 "lora_alpha": conf.get("lora_alpha"), **(meta or {})}
    (out / "README.md").write_text(model_card("lora", card_meta, "THIS_FOLDER"), encoding="utf-8")
    return out


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with a message naming the file for each way it can fail.

    ``mmap=True`` maps the archive's tensors instead of reading them (only the small pickle is read).
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    is_zip = zipfile.is_zipfile(path)
    size = path.stat().st_size
    if not magic:
        raise ValueError(f"{path} is not a readable UPS checkpoint: the file is empty (truncated); copy it again "
                         "or re-save it")
    if magic == b"PK\x03\x04" and not is_zip:
        raise ValueError(f"{path} is not a readable UPS checkpoint: it is truncated or corrupt (a torch.save "
                         f"archive without its end record, {size} bytes); copy it again or re-save it")
    if not is_zip and magic[:1] != b"\x80":
        raise ValueError(f"{path} is not a readable UPS checkpoint: not a torch.save file (neither a zip archive "
                         "nor a pickle); give a .pt or .safetensors file written by save_ups")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        # torch's message is boilerplate (incl. advice to load unsafely) around one line with the reason
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith(
            ("Weights only load failed", "Check the documentation", "Please file an issue"))]
        reason = lines[0][:200] if lines else "not plain tensors and data"
        raise ValueError(f"{path} is not a readable UPS checkpoint: weights_only loading refused its contents "
                         f"({reason}); only tensors and plain data load, as save_ups writes them") from None
    except Exception as e:  # torch raises RuntimeError/OSError/EOFError for damaged archives
        raise ValueError(f"{path} is not a readable UPS checkpoint: it is truncated or corrupt "
                         f"({_first_line(e, 200)}); copy it again or re-save it") from None


def _parse_meta(text: Any, path: Path) -> dict[str, Any]:
    if text is None:
        raise ValueError(f"{path} has no UPS metadata ({UPS_META_KEY!r} in a safetensors header, 'meta' in a .pt "
                         "file): not a UPS checkpoint written by save_ups")
    try:
        meta = json.loads(text) if isinstance(text, (str, bytes)) else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the UPS metadata is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the UPS metadata is not a JSON object; the file is corrupt")
    arch = meta.get("ups_arch")
    if arch not in ("head", "stream"):
        raise ValueError(f"{path}: metadata has no valid ups_arch (found {arch!r}; expected 'head' or 'stream')")
    if not isinstance(meta.get("hidden_size"), int):
        raise ValueError(f"{path}: metadata hidden_size must be an integer (found {meta.get('hidden_size')!r})")
    width = meta.get("ups_width", 0)
    if arch == "head" and not (isinstance(width, int) and width >= 0):
        raise ValueError(f"{path}: metadata ups_width must be a non-negative integer (found {width!r})")
    taps = meta.get("ups_taps")
    if arch == "stream" and not (isinstance(taps, list) and taps and all(isinstance(t, int) for t in taps)
                                 and taps == sorted(set(taps)) and taps[0] >= 0):
        raise ValueError(f"{path}: metadata ups_taps must be a non-empty, strictly increasing list of block "
                         f"indices (found {taps!r})")
    sums = meta.get(CHECKSUM_KEY)
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        raise ValueError(f"{path}: metadata {CHECKSUM_KEY} must map tensor names to sha256 hex strings")
    return meta


def _ups_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"UPS checkpoint not found: {path}")
    return path


def read_ups_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a UPS checkpoint, without reading its tensors (for preflight checks).

    ``.safetensors``: the JSON header only. ``.pt``: the archive is memory-mapped, so only its small
    pickle is read (files from any version of save_ups). Does not verify the tensors: :func:`read_ups` does.
    """
    path = _ups_file(path)
    if path.suffix == ".safetensors":
        with open_safetensors(path) as sf:
            return _parse_meta((sf.metadata() or {}).get(UPS_META_KEY), path)
    blob = _torch_load(path, mmap=True)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ValueError(f"{path} is not a UPS checkpoint written by this toolkit (no state_dict/meta)")
    return _parse_meta(blob.get("meta"), path)


def verify_ups_state(state: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse tensors that differ from the checksums stored at save time, or that hold NaN/inf."""
    sums = meta.get(CHECKSUM_KEY)
    if sums is None:
        # a note, not a warning: files written before save_ups stored checksums (the shipped ones now carry one)
        log.info("%s has no tensor checksum (%s; written before save_ups stored one): loading it without an "
                 "integrity check", path, CHECKSUM_KEY)
    else:
        if set(sums) != set(state):
            raise ValueError(f"{path} is corrupt: its tensors {_fmt_keys(sorted(state))} are not the ones recorded "
                             f"at save time {_fmt_keys(sorted(sums))}; copy it again or re-save it")
        for k in sorted(state):
            if tensor_sha256(state[k]) != sums[k]:
                raise ValueError(f"{path} is corrupt: tensor {k} does not match the sha256 recorded when it was "
                                 f"saved (metadata {CHECKSUM_KEY}); copy the file again or re-save it")
    for k in sorted(state):
        n = _nonfinite(state[k])
        if n:
            raise ValueError(f"{path}: UPS tensor {k} holds {n} non-finite values (NaN/inf) of "
                             f"{state[k].numel()}; the run that saved it diverged: use an earlier checkpoint or "
                             "retrain it")


def read_ups(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a UPS checkpoint's tensors and metadata (safe loaders only).

    With ``verify`` (the default) the tensors are checked against the stored ``tensor_sha256`` and for
    NaN/inf (:func:`verify_ups_state`).
    """
    path = _ups_file(path)
    if path.suffix == ".safetensors":
        with open_safetensors(path) as sf:
            meta = _parse_meta((sf.metadata() or {}).get(UPS_META_KEY), path)
            state = {k: sf.get_tensor(k) for k in sf.keys()}
    else:
        blob = _torch_load(path)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            raise ValueError(f"{path} is not a UPS checkpoint written by this toolkit (no state_dict/meta)")
        meta = _parse_meta(blob.get("meta"), path)
        state = blob["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: state_dict is not a mapping of tensor names to tensors")
    if verify:
        verify_ups_state(state, meta, path)
    return state, meta


def check_ups_compatible(meta: dict[str, Any], cfg: LLaDAConfig, path: str = "UPS checkpoint") -> None:
    """Fail before any weight is touched when a UPS checkpoint cannot belong to this backbone.

    ``meta`` is what :func:`read_ups_meta` returns (cheap: no tensor is read).
    """
    if meta.get("hidden_size") != cfg.d_model:
        raise ValueError(f"{path} was trained on a backbone with hidden size {meta.get('hidden_size')}, "
                         f"but this model has d_model={cfg.d_model}; use a UPS trained on this base model")
    if meta["ups_arch"] == "stream":
        taps = tuple(meta.get("ups_taps", ()))
        if max(taps, default=-1) >= cfg.n_layers:
            raise ValueError(f"{path}: stream taps {taps} do not fit a backbone with {cfg.n_layers} blocks")


def load_ups(path: str | os.PathLike, model: RemeDiLM) -> dict[str, Any]:
    """Attach the UPS stored at ``path`` to ``model`` (adds the head or stream if absent). Returns meta.

    Everything that can be refused (metadata, compatibility, checksum, NaN/inf, tensor names and shapes)
    is checked before the model is changed.
    """
    meta = read_ups_meta(path)
    cfg = model.config
    check_ups_compatible(meta, cfg, str(path))
    if meta["ups_arch"] == "head":
        if model.model.has_stream:
            raise ValueError(f"{path} holds a head UPS, but the model already has a stream UPS "
                             f"(taps {cfg.ups_taps}); load it into a plain LLaDA backbone")
    else:
        if model.ups_head is not None:
            raise ValueError(f"{path} holds a stream UPS, but the model has a head UPS attached")
        if model.model.has_stream and tuple(cfg.ups_taps) != tuple(meta["ups_taps"]):
            raise ValueError(f"{path}: stream taps {tuple(meta['ups_taps'])} != the model's taps {cfg.ups_taps}")
    state, meta = read_ups(path)
    ref = next(model.parameters())
    policy = None
    if meta.get("kind") == "residual":  # checked here, attached after the base UPS (remedi.model.residual)
        pol = {k.removeprefix("ups_policy."): state.pop(k) for k in sorted(state) if k.startswith("ups_policy.")}
        policy = build_residual(meta.get("residual"), pol, cfg.d_model, path).to(ref.device)
    if meta["ups_arch"] == "head":
        head = UPSHead(cfg.d_model, int(meta.get("ups_width", 0))).to(ref.device)
        sd = {k.removeprefix("ups_head."): v for k, v in state.items()}
        _load_exact(head, sd, path)
        model.attach_head(head)
    else:
        taps = tuple(meta["ups_taps"])
        sub = {k.removeprefix("model."): v for k, v in state.items()}
        with torch.device("meta"):  # the stream's names and shapes, to check before touching the model
            probe = RemeDiLM(cfg.replace(ups_taps=taps)).model
        want = {n: tuple(probe.get_parameter(n).shape) for n in probe.stream_parameter_names()}
        problems = [f"missing {sorted(set(want) - set(sub))[:4]}"] if set(want) - set(sub) else []
        problems += [f"unexpected {sorted(set(sub) - set(want))[:4]}"] if set(sub) - set(want) else []
        problems += [f"{k}: {tuple(v.shape)} vs {want[k]}" for k, v in sub.items()
                     if k in want and tuple(v.shape) != want[k]]
        if problems:
            raise ValueError(f"{path}: stream UPS tensors do not match taps {taps} on this backbone: "
                             + "; ".join(problems[:6]))
        if not model.model.has_stream:
            add_stream(model, taps)
        model.model.load_state_dict({k: v.to(ref.dtype) for k, v in sub.items()}, strict=False)
    if policy is not None:
        model.ups_policy = policy
    return meta


def build_residual(spec: dict, state: dict[str, torch.Tensor], d_model: int, path) -> ResidualUPS:
    """The residual UPS a UPS file describes (``meta['residual']`` and its ``ups_policy.*`` tensors, prefix
    removed), checked: architecture, names and shapes. Raises ValueError naming the file."""
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: metadata 'residual' must be an object (the policy's spec)")
    if spec.get("d_model") != d_model:
        raise ValueError(f"{path}: the residual UPS was built for hidden size {spec.get('d_model')}, this model has "
                         f"{d_model}; use a policy made for this base model")
    table = state.get("type_table")
    if table is None:
        raise ValueError(f"{path}: the residual UPS has no ups_policy.type_table tensor; the file is incomplete")
    try:
        policy = ResidualUPS(d_model, table, anchor=spec["anchor"], features=spec["features"],
                             hidden_rank=int(spec.get("hidden_rank", 0)), g=spec.get("g", "linear"),
                             attn_dim=int(spec.get("attn_dim", 8)), unmask_only=bool(spec.get("unmask_only")),
                             seed=int(spec.get("seed", 0)),  # a spec without hide_threshold (older files): none
                             hide_threshold=0.0 if spec.get("hide_threshold") else None)  # tau: from the tensors
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the residual UPS spec is not valid ({e}); re-save it") from None
    _load_exact(policy, state, path)  # the names/shapes check every UPS part gets
    return policy


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
