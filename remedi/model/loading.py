"""The one place where scripts load a model: backbone + tokenizer + optional UPS and LoRA, validated.

Cheap checks (paths, UPS metadata against config.json, --mask_id against the tokenizer) run before any
weight is read, so a wrong flag fails in a second rather than after loading 16 GB.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from remedi.model.checkpoint import check_ups_compatible, load_pretrained, load_ups, read_ups_meta, resolve_model_dir
from remedi.model.config import LLaDAConfig
from remedi.model.llada import RemeDiLM

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (absent for an installed wheel: do not rely on it)
# The embedded default model (see Local_RUN.md), package data of remedi so an installed wheel has it too; every
# script falls back to it. checkpoints/remedi-tiny-gsm in a checkout is a symlink to this folder.
EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "embedded" / "remedi-tiny-gsm"

MASK_TOKEN, EOS_TOKEN, EOT_TOKEN, BOS_TOKEN = "<|mdm_mask|>", "<|endoftext|>", "<|eot_id|>", "<|startoftext|>"

LORA_AUTO_TARGET = r".*blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)$"
"""peft target for ``--lora_target auto``: every linear of every backbone block, never the LM head
(whose name, ``transformer.ff_out``, would otherwise match ``ff_out``)."""


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids resolved from the tokenizer (and checked against config.json)."""

    mask: int
    eos: int
    pad: int
    eot: Optional[int] = None
    bos: Optional[int] = None


def _token_id(tokenizer, token: str) -> Optional[int]:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id and token != tokenizer.unk_token:
        return None
    return int(tid)


def resolve_special_ids(tokenizer, cfg: LLaDAConfig, mask_id: Optional[int] = None) -> SpecialIds:
    mask = _token_id(tokenizer, MASK_TOKEN)
    if mask is None:
        mask = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else cfg.mask_token_id
    if mask != cfg.mask_token_id:
        raise ValueError(f"the tokenizer's mask token has id {mask}, config.json says mask_token_id="
                         f"{cfg.mask_token_id}: the tokenizer and weights do not belong together")
    if mask_id is not None and mask_id != mask:
        raise ValueError(f"--mask_id {mask_id} disagrees with this model's mask token {MASK_TOKEN} = {mask}; "
                         f"pass --mask_id {mask} or leave the flag out (it is read from the tokenizer)")
    eos = _token_id(tokenizer, EOS_TOKEN)
    if eos is None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else cfg.pad_token_id
    return SpecialIds(mask=mask, eos=eos, pad=pad, eot=_token_id(tokenizer, EOT_TOKEN),
                      bos=_token_id(tokenizer, BOS_TOKEN))


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json, meets model_type "llada" (which transformers has no class for) and
    # warns that the types differ; the tokenizer itself is standard, so that warning is noise here.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise FileNotFoundError(f"no usable tokenizer in {model_dir} ({type(e).__name__}: {e}); the model folder "
                                "needs tokenizer.json/tokenizer_config.json as on the hub") from e
    finally:
        hf_logging.set_verbosity(level)


def default_chat(model_name: str) -> bool:
    """Instruct checkpoints are prompted through their chat template, base ones with plain text."""
    return "instruct" in str(model_name).lower()


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    if not text or not text.strip():
        raise ValueError("empty prompt: give a non-empty --prompt (or a non-empty line in --prompts_file)")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat needs a tokenizer with a chat template; this one has none (use --no_chat)")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"--dtype {dtype!r}: choose one of auto, {', '.join(table)}")
    return table[dtype]


# ------------------------------------------------------------------------------------------- LoRA adapters
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPlan:
    """A peft LoRA folder read without its tensors: its config and how its keys map onto the native model."""

    path: Path
    config: dict
    key_map: dict[str, str]  # key in the file -> key in the state dict of peft wrapping the native LLaDAModel
    modules: tuple[str, ...]  # native module names the adapter changes (``transformer.blocks.0.q_proj``, ...)
    layout: str  # "native" (this toolkit's, peft on LLaDAModel) or "hub" (peft on the hub's LLaDAModelLM)


def native_lora_key(key: str) -> Optional[str]:
    """The key a LoRA tensor gets when peft wraps the native ``LLaDAModel``, from any LLaDA layout.

    Native adapters hold ``base_model.model.transformer.blocks.N.q_proj.lora_A.weight``; adapters trained on the
    hub's remote-code ``LLaDAModelLM`` (d1, dllm) hold ``base_model.model.model.transformer.blocks.N...``: both
    name the same module below ``transformer.``, which is where the two models' names agree (the weights map the
    same way, see :func:`remedi.model.checkpoint.load_pretrained`). None for a key with no ``transformer.`` part.
    """
    i = key.find("transformer.")
    if i < 0 or (i and key[i - 1] != "."):
        return None
    return _PEFT_PREFIX + key[i:]


def _lora_module(key: str) -> str:
    """``base_model.model.transformer.blocks.0.q_proj.lora_A.weight`` -> ``transformer.blocks.0.q_proj``."""
    name = key.removeprefix(_PEFT_PREFIX)
    for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector"):
        if part in name:
            return name.split(part)[0]
    return name.rsplit(".", 1)[0]


def lora_plan(lora_path: str | os.PathLike, cfg: LLaDAConfig) -> LoraPlan:
    """Check a peft LoRA folder against a backbone without reading its tensors (config JSON, safetensors header).

    Every adapter tensor must name a linear module of this backbone (after mapping the hub layout), with the
    shapes the module implies; an adapter that matches no module is refused here, before any weight loads.
    """
    from remedi.model.checkpoint import open_safetensors

    folder = Path(lora_path)
    conf_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not conf_file.is_file():
        raise FileNotFoundError(f"--lora_path {lora_path} has no {ADAPTER_CONFIG} (expected a peft LoRA folder, "
                                "e.g. written by train_remask_lora.py --save_lora_dir)")
    try:
        conf = json.loads(conf_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{conf_file} is not valid JSON ({e}); the adapter folder is damaged: copy it again") from None
    if not isinstance(conf, dict) or conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{conf_file}: not a LoRA adapter config (peft_type "
                         f"{conf.get('peft_type') if isinstance(conf, dict) else conf!r}); only peft LoRA is supported")
    if not weights.is_file():
        hint = " (pickle adapter_model.bin is not read: convert it to safetensors)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"--lora_path {lora_path} has no {ADAPTER_WEIGHTS}{hint}")
    with open_safetensors(weights) as sf:
        shapes = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
    with torch.device("meta"):
        native = RemeDiLM(cfg).model
    linears = {n: tuple(m.weight.shape) for n, m in native.named_modules() if isinstance(m, torch.nn.Linear)}
    key_map, unknown, bad_shape = {}, [], []
    for k, shape in shapes.items():
        nk = native_lora_key(k)
        mod = _lora_module(nk) if nk else None
        if mod not in linears:
            unknown.append(k)
            continue
        out_f, in_f = linears[mod]
        if (".lora_A." in nk and shape[1:] != (in_f,)) or (".lora_B." in nk and shape[:1] != (out_f,)):
            bad_shape.append(f"{k} {shape} on {mod} {(out_f, in_f)}")
        key_map[k] = nk
    if not key_map:
        raise ValueError(f"--lora_path {lora_path}: the adapter matches no module of this model (keys like "
                         f"{sorted(shapes)[:2]}); expected peft LoRA keys for LLaDA's block linears "
                         "(...transformer.blocks.N.q_proj.lora_A.weight)")
    if unknown or bad_shape:
        raise ValueError(f"--lora_path {lora_path} does not fit this model: "
                         + "; ".join(([f"no module for {unknown[:3]} ({len(unknown)} keys)"] if unknown else [])
                                     + bad_shape[:3]) + "; was it trained on another base model?")
    layout = "native" if all(k == v for k, v in key_map.items()) else "hub"
    modules = tuple(sorted({_lora_module(v) for v in key_map.values()}))
    return LoraPlan(path=folder, config=conf, key_map=key_map, modules=modules, layout=layout)


def load_lora(inner: torch.nn.Module, lora_path: str | os.PathLike, is_trainable: bool = False,
              plan: Optional[LoraPlan] = None):
    """Wrap the native ``LLaDAModel`` in a peft ``PeftModel`` holding the adapter at ``lora_path``.

    Reads adapters of this toolkit and of the hub's ``LLaDAModelLM`` (see :func:`native_lora_key`): the
    adapter goes on exactly the modules its tensors name, every tensor is loaded (checked: none left over,
    none missing), so an adapter never loads as a silent no-op.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    plan = plan or lora_plan(lora_path, inner.config)
    fields = set(getattr(LoraConfig, "__dataclass_fields__", {}))
    drop = ("auto_mapping", "peft_type", "base_model_name_or_path")  # peft would rename the last with a warning
    conf = {k: v for k, v in plan.config.items() if k in fields and k not in drop}
    if plan.layout != "native":  # the hub names do not match here: target exactly the modules in the file
        conf.update(target_modules=list(plan.modules), layers_pattern=None, layers_to_transform=None)
        for key in ("rank_pattern", "alpha_pattern"):
            conf[key] = {(native_lora_key("." + p) or p).removeprefix(_PEFT_PREFIX): v
                         for p, v in (conf.get(key) or {}).items()}
    conf.update(inference_mode=not is_trainable, task_type=None)  # a bare PeftModel: LLaDAModel is no HF LM class
    pm = get_peft_model(inner, LoraConfig(**conf))
    pm.peft_config["default"].base_model_name_or_path = plan.config.get("base_model_name_or_path")
    state = {plan.key_map[k]: v for k, v in load_file(str(plan.path / ADAPTER_WEIGHTS)).items()}
    wanted = {k for k in pm.state_dict() if ".lora_" in k}
    result = set_peft_model_state_dict(pm, state)
    missing = sorted(k for k in getattr(result, "missing_keys", []) if k in wanted)
    unexpected = sorted(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(f"--lora_path {lora_path}: the adapter's tensors do not fill the modules its config targets "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the adapter_config.json does not "
                         "belong to these weights")
    if not is_trainable:
        for p in pm.parameters():
            p.requires_grad_(False)
    c = pm.peft_config["default"]
    log.info("LoRA adapter %s loaded: %d modules, r=%s, alpha=%s%s", lora_path, len(plan.modules), c.r, c.lora_alpha,
             " (hub LLaDAModelLM layout, mapped onto the native model)" if plan.layout != "native" else "")
    return pm


@dataclass
class Loaded:
    model: RemeDiLM
    tokenizer: object
    ids: SpecialIds
    model_dir: Path
    ups_meta: Optional[dict] = None


def preflight(model_name: str, ups_head: Optional[str] = None, lora_path: Optional[str] = None):
    """Cheap checks before any weights load: returns (model_dir, config, ups_meta).

    Reads config.json, the UPS file's metadata (never its tensors) and the LoRA folder's adapter_config.
    """
    model_dir = resolve_model_dir(model_name)
    cfg = LLaDAConfig.from_json_file(model_dir / "config.json")
    meta = None
    if ups_head:
        meta = read_ups_meta(ups_head)
        check_ups_compatible(meta, cfg, str(ups_head))
    if lora_path:
        check_adapter_config(lora_path)
        lora_plan(lora_path, cfg)
    return model_dir, cfg, meta


def check_adapter_config(lora_path: str | os.PathLike) -> dict:
    """A peft LoRA folder's adapter_config.json, read and checked before any weight loads (a torn or hand-edited
    file would otherwise fail only inside peft, after the backbone has loaded)."""
    import json

    f = Path(lora_path) / "adapter_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"--lora_path {lora_path} has no adapter_config.json (expected a peft LoRA folder "
                                "written by train_remask_lora.py --save_lora_dir)")
    try:
        raw = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is damaged (not valid JSON: {e}); re-copy the LoRA folder or retrain it") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA" or not isinstance(raw.get("r"), int):
        raise ValueError(f"{f} is not a peft LoRA config (needs peft_type \"LORA\" and an integer r); re-copy the "
                         "LoRA folder written by train_remask_lora.py --save_lora_dir")
    return raw


def load_model(model_dir: Path, cfg: LLaDAConfig, ups_head: Optional[str] = None, lora_path: Optional[str] = None,
               device: Optional[str] = None, dtype: Optional[str] = None) -> RemeDiLM:
    """Backbone from ``model_dir``, LoRA merged (if any), UPS attached (if any), eval mode; after preflight."""
    dev = pick_device(device)
    model = load_pretrained(model_dir, dtype=pick_dtype(dtype, dev), device=dev)
    if lora_path:
        model.model = load_lora(model.model, lora_path).merge_and_unload()
        log.info("LoRA adapter %s loaded and merged into the backbone: %s", lora_path, _adapter_summary(lora_path))
    if ups_head:
        load_ups(ups_head, model)
    return model.eval()


def _adapter_summary(lora_path) -> str:
    """Rank, alpha and target modules from a peft folder's adapter_config.json (what the log says was merged)."""
    try:
        cfg = json.loads((Path(lora_path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "(no readable adapter_config.json)"
    targets = cfg.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    return f"rank {cfg.get('r')}, alpha {cfg.get('lora_alpha')}, modules {targets}"


def load_for_inference(model_name: str, ups_head: Optional[str] = None, lora_path: Optional[str] = None,
                       device: Optional[str] = None, dtype: Optional[str] = None,
                       mask_id: Optional[int] = None) -> Loaded:
    """Preflight, tokenizer and :func:`load_model` in one call (benchmarks, tests; scripts use a Session)."""
    model_dir, cfg, meta = preflight(model_name, ups_head, lora_path)
    tokenizer = load_tokenizer(model_dir)
    ids = resolve_special_ids(tokenizer, cfg, mask_id)
    model = load_model(model_dir, cfg, ups_head, lora_path, device, dtype)
    model.name_or_path = str(model_name)
    return Loaded(model=model, tokenizer=tokenizer, ids=ids, model_dir=model_dir, ups_meta=meta)
