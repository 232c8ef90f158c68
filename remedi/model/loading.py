"""The one place where scripts load a model: backbone + tokenizer + optional UPS and LoRA, validated.

Cheap checks (paths, UPS metadata against config.json, --mask_id against the tokenizer) run before any
weight is read, so a wrong flag fails in a second rather than after loading 16 GB.
"""
from __future__ import annotations

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

REPO_ROOT = Path(__file__).resolve().parents[2]
# The embedded default model shipped in checkpoints/ (see Local_RUN.md); every script falls back to it.
EMBEDDED_MODEL = REPO_ROOT / "checkpoints" / "remedi-tiny-gsm"

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
        from peft import PeftModel

        model.model = PeftModel.from_pretrained(model.model, str(lora_path)).merge_and_unload()
    if ups_head:
        load_ups(ups_head, model)
    return model.eval()


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
