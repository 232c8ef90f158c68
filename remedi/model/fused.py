"""Inference-time fused projections for :class:`~remedi.model.llada.LLaDABlock` (issue 23).

A cached decoding step at batch 1 computes ~32 tokens, so its time is the read of the weights plus one
launch per kernel. Fusing q|k|v into one (d -> (H + 2 H_kv) D) product and gate|up (``ff_proj`` |
``up_proj``) into one (d -> 2 F) product reads the same bytes in 2 matmuls instead of 5 per block.

How (no extra memory, no parameter renamed): per block the rows of ``q_proj``/``k_proj``/``v_proj`` are
copied once into one contiguous (N, d) tensor and each parameter's ``.data`` is re-pointed at its rows
of it (likewise ``ff_proj``/``up_proj``). The parameters stay the same objects with the same names and
values, so checkpoints, ``state_dict`` (whose tensors are given their own storage by a hook, so
safetensors can write them), optimisers and in-place edits (``load_state_dict``'s copy, a LoRA merge,
an optimiser step) all keep working, and an in-place edit reaches the fused weight automatically.

When the fused product is used: only with autograd off (``torch.no_grad`` / ``inference_mode``), so a
training forward always takes the separate products and its gradients reach every parameter. When it is
dropped: if a parameter no longer lives in the fused storage (``model.to(...)``, ``load_state_dict(...,
assign=True)``, any ``p.data = ...``) or a projection module was replaced (e.g. wrapped by peft after
fusing), the next model forward (and a new static decoder) notices, warns once and runs unfused; call
``fuse_projections()`` again. So: fuse after loading / merging LoRA, just before decoding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("ff_proj", "up_proj")


@dataclass
class FusedWeights:
    """One block's fused weights and what they were built from (to notice when that changes)."""

    qkv: torch.Tensor  # (Nq + 2 Nkv, d): rows of q_proj, then k_proj, then v_proj
    gate_up: torch.Tensor  # (2 F, d): rows of ff_proj, then up_proj
    qkv_split: tuple[int, ...]
    gate_up_split: tuple[int, ...]
    modules: tuple[nn.Module, ...]  # the five Linear modules, in QKV + GATE_UP order
    ptrs: tuple[int, ...]  # their weights' data pointers into qkv / gate_up


def _peft_layer_error(block_name: str, name: str, module: nn.Module) -> ValueError:
    merged = bool(getattr(module, "merged", False))
    what = "holds merged adapters but is still wrapped" if merged else "has unmerged LoRA adapters"
    return ValueError(f"fuse_projections: {block_name}.{name} is a {type(module).__name__} that {what} (a "
                      f"peft-wrapped model); fusing would bypass the adapter layer. Merge first "
                      f"(model.model = model.model.merge_and_unload()) and fuse after, or decode unfused")


def check_no_unmerged_lora(model: nn.Module) -> None:
    """Raise one ValueError if ``model`` holds a peft LoRA layer whose adapters are not merged into its weights."""
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and not getattr(m, "merged", False):
            raise ValueError(f"fuse_projections: {name} has unmerged LoRA adapters (a peft-wrapped model); the "
                             f"fused products would bypass them. Merge first (model.model = "
                             f"model.model.merge_and_unload()) and fuse after, or decode unfused")


def check_fusable(block: nn.Module, block_name: str = "block") -> None:
    """Raise one ValueError naming the first projection that is not a plain bias-free ``nn.Linear``."""
    for name in QKV + GATE_UP:
        m = getattr(block, name)
        if type(m) is not nn.Linear:
            if hasattr(m, "base_layer") or hasattr(m, "lora_A"):
                raise _peft_layer_error(block_name, name, m)
            raise ValueError(f"fuse_projections: {block_name}.{name} is a {type(m).__name__}, not a plain "
                             f"nn.Linear; only plain projections can be fused")
        if m.bias is not None:
            raise ValueError(f"fuse_projections: {block_name}.{name} has a bias; LLaDA's projections have none")


@torch.no_grad()
def _concat_and_repoint(modules: list[nn.Module]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One contiguous tensor of the modules' weight rows; each weight re-pointed at its rows of it."""
    ws = [m.weight for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        raise ValueError("fuse_projections: the projections of a block differ in dtype, device or input size: "
                         + ", ".join(f"{tuple(w.shape)} {w.dtype} {w.device}" for w in ws))
    fused = torch.cat([w.detach() for w in ws], 0)
    off = 0
    for w in ws:
        n = w.shape[0]
        w.data = fused[off:off + n]  # same Parameter object, now a view of the fused rows
        off += n
    return fused, tuple(w.shape[0] for w in ws)


def fuse_block(block: nn.Module, block_name: str = "block") -> None:
    """Build (or rebuild) ``block._fused``; the projections' weights become views of the fused tensors."""
    check_fusable(block, block_name)
    unfuse_block(block)
    qkv_mods = [getattr(block, n) for n in QKV]
    gu_mods = [getattr(block, n) for n in GATE_UP]
    qkv, qkv_split = _concat_and_repoint(qkv_mods)
    gate_up, gu_split = _concat_and_repoint(gu_mods)
    mods = tuple(qkv_mods + gu_mods)
    block._fused = FusedWeights(qkv, gate_up, qkv_split, gu_split, mods, tuple(m.weight.data_ptr() for m in mods))


@torch.no_grad()
def unfuse_block(block: nn.Module) -> None:
    """Drop the fused tensors; weights still viewing them get their own storage again (same values)."""
    f = getattr(block, "_fused", None)
    block._fused = None
    if f is None:
        return
    for m in f.modules:
        if fused_view(m.weight):
            m.weight.data = m.weight.data.clone()


def fused_view(t: torch.Tensor) -> bool:
    """True if ``t`` is a view into a larger storage (as a fused projection's weight is)."""
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def block_fused_ok(block: nn.Module) -> bool:
    """The block's fused weights still are what its modules compute with (same modules, same storage)."""
    f = block._fused
    names = QKV + GATE_UP
    return all(getattr(block, n) is m and m.weight.data_ptr() == p for n, m, p in zip(names, f.modules, f.ptrs))


def refresh_blocks(blocks) -> int:
    """Drop (with one warning) the fused weights of blocks whose parameters were replaced or whose projections
    were wrapped since fusing; returns how many blocks are still fused."""
    n, dropped = 0, []
    for i, blk in enumerate(blocks):
        if getattr(blk, "_fused", None) is None:
            continue
        if block_fused_ok(blk):
            n += 1
        else:
            blk._fused = None  # the parameters no longer (all) live in it: never read it again
            dropped.append(i)
    if dropped:
        warnings.warn(f"fused projections dropped in {len(dropped)} block(s): their weights were replaced (e.g. "
                      f"model.to(), load_state_dict(assign=True)) or their projections wrapped (peft) after "
                      f"fuse_projections(); running unfused. Call fuse_projections() again after such changes",
                      stacklevel=3)
    return n


def own_storage_state_dict_hook(module, state_dict, prefix, local_metadata):
    """``state_dict`` post-hook: entries viewing a fused tensor get their own storage (safetensors refuses
    tensors that share memory; torch.save would write the whole fused tensor for each)."""
    for name in QKV + GATE_UP:
        for key in (f"{prefix}{name}.weight", f"{prefix}{name}.base_layer.weight"):  # plain / peft-wrapped
            t = state_dict.get(key)
            if t is not None and not isinstance(t, nn.Parameter) and fused_view(t):
                state_dict[key] = t.clone()
    return state_dict
