"""Native PyTorch LLaDA backbone with the two RemeDi Unmasking Policy Stream (UPS) architectures.

Parameter names are the hub checkpoint's (``model.transformer.*``; the official RemeDi stream under
``model.blocks_upm`` / ``model.backprop_*`` / ``model.ln_f_upm`` / ``model.linear_confidence``), so the
real weights load by name with no remote code. The math follows LLaDA (arXiv:2502.09992):

    h = attn_norm(x); q, k, v = proj(h); rope(q, k); att = sdpa(q, k, v)   (bidirectional)
    x = x + attn_out(att); x = x + ff_out(silu(ff_proj(ff_norm(x))) * up_proj(ff_norm(x)))
    logits = ff_out(ln_f(x))                                                (no shift, no tying)

RMSNorm and RoPE run in float32. Positions are physical indices, so with a key-padding mask left and
right padding give the same logits for real tokens (RoPE only sees relative offsets).

Block-wise decoding reuses keys/values through :class:`KVCache`: a forward over the slice
``[start, start + L)`` writes its keys/values into the cache and attends over the whole cached sequence.

For decoding, :meth:`RemeDiLM.fuse_projections` makes each block run one q|k|v product and one gate|up
product whenever autograd is off (same parameters, names and checkpoints; :mod:`remedi.model.fused`); the
separate products stay the reference path and every training forward.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from remedi.model.config import LLaDAConfig
from remedi.model.fused import (FusedWeights, check_fusable, check_no_unmerged_lora, fuse_block,
                                own_storage_state_dict_hook, refresh_blocks, unfuse_block)
from remedi.model.kv_cache import KVCache, StaticKVCache  # KVCache re-exported: remedi.model.llada.KVCache


class RMSNorm(nn.Module):
    """RMSNorm as in the hub model: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, theta: float, start: int, length: int, device: torch.device):
    """(cos, sin), each (length, head_dim), float32, "rotate-half" layout, positions start..start+length-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_tables_at(head_dim: int, theta: float, position_ids: torch.Tensor):
    """(cos, sin), each (B, 1, L, head_dim), float32, for explicit positions ``position_ids`` (B, L).

    Same arithmetic as :func:`rope_tables` (float32 position times inverse frequency), so a row whose ids
    are ``start..start+L-1`` gets bit-identical tables.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                                / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (B, L, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, head_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos/sin (L, D) or (B, 1, L, D); rotation in float32, result in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm LLaMA-style block with hub parameter names (FSDP wraps this class)."""

    def __init__(self, cfg: LLaDAConfig, layer_id: int):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.rope_theta = cfg.rope_theta
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate (SiLU)
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)  # down
        self._fused: Optional[FusedWeights] = None  # inference-time q|k|v and gate|up (remedi.model.fused)
        self._register_state_dict_hook(own_storage_state_dict_hook)

    @property
    def is_fused(self) -> bool:
        return self._fused is not None

    def fuse_projections(self) -> None:
        """One q|k|v and one gate|up product per forward without autograd (see :mod:`remedi.model.fused`)."""
        fuse_block(self, f"block {self.layer_id}")

    def unfuse_projections(self) -> None:
        unfuse_block(self)

    def forward(self, x, rope, attn_mask=None, cache: Optional[KVCache] = None, start: int = 0):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        f = self._fused if not torch.is_grad_enabled() else None  # training forwards: separate products
        if f is None:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        else:
            q, k, v = F.linear(h, f.qkv).split(f.qkv_split, dim=-1)
            if cache is not None and not isinstance(cache, StaticKVCache):
                v = v.contiguous()  # a dict cache may keep v itself: not a view pinning q and k as well
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = k.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, start, k, v)  # (B, Hkv, T, D)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        if f is None:
            return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))
        gate, up = F.linear(h, f.gate_up).split(f.gate_up_split, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


class UPSHead(nn.Module):
    """The lightweight UPS: Linear(d, 1), or Linear(d, w) -> GELU -> Linear(w, 1), on the final hidden."""

    def __init__(self, d_model: int, width: int = 0):
        super().__init__()
        self.d_model, self.width = d_model, width
        if width > 0:
            self.net = nn.Sequential(nn.Linear(d_model, width), nn.GELU(), nn.Linear(width, 1))
        else:
            self.net = nn.Linear(d_model, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = next(self.parameters()).dtype
        return self.net(hidden.to(dtype)).squeeze(-1).float()  # (B, L)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, L, V) over the output slice
    hidden: torch.Tensor  # (B, L, d) after ln_f
    ups_logits: Optional[torch.Tensor] = None  # (B, L) from the stream UPS, else None


class LLaDAModel(nn.Module):
    """The hub's ``model`` module: ``transformer`` (the backbone) and, optionally, the RemeDi stream."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList([LLaDABlock(cfg, i) for i in range(cfg.n_layers)]),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            ff_out=nn.Linear(cfg.d_model, cfg.embedding_size, bias=False),
        ))
        self.gradient_checkpointing = False
        self._n_fused = 0  # blocks with fused projections (checked at every forward while > 0)
        if cfg.ups_taps:
            self._build_stream(cfg)

    # ------------------------------------------------------------------------------------------ stream
    def _build_stream(self, cfg: LLaDAConfig) -> None:
        n, d = len(cfg.ups_taps), cfg.d_model
        self.blocks_upm = nn.ModuleList([LLaDABlock(cfg, cfg.n_layers + k) for k in range(n)])
        self.backprop_norms = nn.ModuleList([RMSNorm(d, cfg.rms_norm_eps) for _ in range(n)])
        self.backprop_linears = nn.ModuleList([nn.Linear(d, d, bias=True) for _ in range(n)])
        self.ln_f_upm = RMSNorm(d, cfg.rms_norm_eps)
        self.linear_confidence = nn.Linear(d, 1, bias=True)
        self.reset_stream_parameters()

    @torch.no_grad()
    def reset_stream_parameters(self) -> None:
        """Zero bridges (the backbone's outputs are unchanged at init); trunc-normal confidence head."""
        for lin in self.backprop_linears:
            lin.weight.zero_()
            lin.bias.zero_()
        nn.init.trunc_normal_(self.linear_confidence.weight, std=0.02)
        self.linear_confidence.bias.zero_()

    @property
    def has_stream(self) -> bool:
        return bool(self.config.ups_taps)

    def stream_parameter_names(self) -> list[str]:
        prefixes = ("blocks_upm.", "backprop_norms.", "backprop_linears.", "ln_f_upm.", "linear_confidence.")
        return [n for n, _ in self.named_parameters() if n.startswith(prefixes)]

    # ------------------------------------------------------------------------------ fused projections
    def all_blocks(self) -> list[LLaDABlock]:
        """Backbone blocks, then the stream's."""
        return list(self.transformer.blocks) + list(getattr(self, "blocks_upm", []))

    def fuse_projections(self) -> int:
        """Fuse every block's q|k|v and gate|up for inference (:mod:`remedi.model.fused`); returns the count."""
        blocks = self.all_blocks()
        for blk in blocks:  # all checked before any is changed
            check_fusable(blk, f"block {blk.layer_id}")
        for blk in blocks:
            blk.fuse_projections()
        self._n_fused = len(blocks)
        return self._n_fused

    def unfuse_projections(self) -> None:
        for blk in self.all_blocks():
            blk.unfuse_projections()
        self._n_fused = 0

    def refresh_fused(self) -> int:
        """Drop fused weights that no longer match the parameters (warns); returns the blocks still fused."""
        if self._n_fused:
            self._n_fused = refresh_blocks(self.all_blocks())
        return self._n_fused

    # ----------------------------------------------------------------------------------------- forward
    def _run(self, block, x, rope, mask, cache, start):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, mask, cache, start, use_reentrant=False)
        return block(x, rope, mask, cache, start)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        start: int = 0,
        out_slice: Optional[slice] = None,
        compute_logits: bool = True,
        position_ids: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """Run positions [start, start + L) of the sequence.

        input_ids: (B, L). attention_mask: (B, T) key-padding mask over the WHOLE sequence (1 = real
        token), or a boolean (B, 1, L, T) mask (True = query may attend to key) for layouts such as the
        block-causal one of :mod:`remedi.model.block_causal`; or None. Without a cache, start must be 0
        and L == T. out_slice selects, within the computed positions, where logits/UPS are produced (saves
        the vocabulary projection elsewhere). position_ids: (B, L) RoPE positions of the computed tokens;
        None = the physical indices start..start+L-1.
        """
        cfg = self.config
        B, L = input_ids.shape
        if self._n_fused:
            self.refresh_fused()
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a KVCache holding the other positions")
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype != torch.bool or attention_mask.shape[:3] != (B, 1, L):
                raise ValueError(f"a 4-D attention_mask must be bool (B, 1, L, T) = ({B}, 1, {L}, T), got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
            mask = attention_mask  # (B, 1, L, T) query x key
        elif attention_mask is not None:
            mask = attention_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, T) keys
            if bool(mask.all()):
                mask = None  # lets SDPA pick the flash kernel
        x = self.transformer.wte(input_ids)  # (B, L, d)
        if position_ids is not None:
            if position_ids.shape != (B, L):
                raise ValueError(f"position_ids must be (B, L) = ({B}, {L}), got {tuple(position_ids.shape)}")
            rope = rope_tables_at(cfg.head_dim, cfg.rope_theta, position_ids.to(x.device))
        else:
            rope = rope_tables(cfg.head_dim, cfg.rope_theta, start, L, x.device)
        taps = {t: k for k, t in enumerate(cfg.ups_taps)}
        u = None
        for i, block in enumerate(self.transformer.blocks):
            x = self._run(block, x, rope, mask, cache, start)
            if i in taps:
                k = taps[i]
                u = x if u is None else x + u
                u = self._run(self.blocks_upm[k], u, rope, mask, cache, start)
                x = x + self.backprop_linears[k](self.backprop_norms[k](u))
        if out_slice is not None:
            x = x[:, out_slice]
            u = u[:, out_slice] if u is not None else None
        hidden = self.transformer.ln_f(x)
        logits = self.lm_head(hidden) if compute_logits else hidden.new_empty(0)
        ups = None
        if u is not None:
            ups = self.linear_confidence(self.ln_f_upm(u)).squeeze(-1).float()  # (B, L)
        return ModelOutput(logits=logits, hidden=hidden, ups_logits=ups)


    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token logits of final hidden states (..., d) -> (..., vocab_size); callers that need only some
        positions (the training loss: the masked ones) pass just those rows and skip the rest of the
        vocabulary projection."""
        logits = self.transformer.ff_out(hidden)
        if self.config.embedding_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding rows of the embedding are never tokens
        return logits


class RemeDiLM(nn.Module):
    """Backbone (TPS) plus an optional UPS; ``forward`` gives token logits and UPS logits per position.

    ``ups_arch`` is "stream" when the config has taps, "head" when a :class:`UPSHead` is attached,
    else None. The head reads a detached final hidden state, so its loss never reaches the backbone.
    """

    def __init__(self, cfg: LLaDAConfig, ups_head: Optional[UPSHead] = None):
        super().__init__()
        self.model = LLaDAModel(cfg)
        self.ups_head = ups_head
        # a scorer on top of the head/stream for the ``ups`` source (a residual UPS, remedi.model.residual; the
        # slip oracle, remedi.policy.slip), or None; the decoders pass it to decide()/policy_decide()
        # (remedi.decoding.step.ups_scorer)
        self.ups_policy = None

    @property
    def config(self) -> LLaDAConfig:
        return self.model.config

    @property
    def ups_arch(self) -> Optional[str]:
        if self.model.has_stream:
            return "stream"
        return "head" if self.ups_head is not None else None

    def attach_head(self, head: UPSHead) -> None:
        if self.model.has_stream:
            raise ValueError("this model already has a stream UPS; a head UPS cannot be attached as well")
        if head.d_model != self.config.d_model:
            raise ValueError(f"UPS head hidden size {head.d_model} != backbone d_model {self.config.d_model}")
        self.ups_head = head

    @property
    def backbone(self) -> "LLaDAModel":
        """The LLaDAModel itself, also while LoRA training has wrapped ``self.model`` in a peft model."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @contextlib.contextmanager
    def without_peft(self):
        """Inside the block ``self.model`` is the plain LLaDAModel (what the checkpoint writers expect)."""
        wrapped = self.model
        self.model = self.backbone
        try:
            yield self
        finally:
            self.model = wrapped

    @property
    def ups_description(self) -> str:
        """What ranks positions, for logs: the UPS architecture, and the policy attached on top of it, if any."""
        if self.ups_policy is None:
            return self.ups_arch or "none"
        on_top = "residual policy" if hasattr(self.ups_policy, "spec") else type(self.ups_policy).__name__
        return f"{self.ups_arch} + {on_top}"

    def ups_modules(self) -> list[nn.Module]:
        """The UPS's modules: a residual UPS policy's g when one with weights is attached (what trains then;
        the head/stream under it stays fixed), else the head, or the stream's blocks, bridges, final norm and
        output (also under LoRA)."""
        if self.ups_policy is not None and any(True for _ in self.ups_policy.parameters()):
            return [self.ups_policy]
        if self.ups_head is not None:
            return [self.ups_head]
        mm = self.backbone
        if mm.has_stream:
            return [mm.blocks_upm, mm.backprop_norms, mm.backprop_linears, mm.ln_f_upm, mm.linear_confidence]
        return []

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations. Set on the backbone: under
        LoRA an attribute set on the peft wrapper would not reach it."""
        self.backbone.gradient_checkpointing = enabled

    def forward(self, input_ids, attention_mask=None, **kw) -> ModelOutput:
        out = self.model(input_ids, attention_mask, **kw)
        if self.ups_head is not None:
            out.ups_logits = self.ups_head(out.hidden.detach())
        return out

    def fuse_projections(self) -> "RemeDiLM":
        """Inference-time fusion: per block one q|k|v product and one gate|up product (``ff_proj`` | ``up_proj``)
        whenever autograd is off. Parameter names, values and checkpoints are unchanged, no memory is added
        and in-place weight updates stay in effect; see :mod:`remedi.model.fused`. Call it after loading and
        after merging LoRA (an unmerged peft model is refused); weights replaced later (``.to()``,
        ``load_state_dict(assign=True)``) drop the fusion with a warning. Combine with ``compile_blocks``
        (which then also fuses the RMSNorm and RoPE arithmetic) in either order."""
        check_no_unmerged_lora(self.model)
        self.backbone.fuse_projections()
        return self

    def unfuse_projections(self) -> "RemeDiLM":
        """Undo :meth:`fuse_projections` (the weights get their own storage again)."""
        self.backbone.unfuse_projections()
        return self

    @property
    def fused_blocks(self) -> int:
        """How many blocks currently run fused projections (after checking they are still valid)."""
        return self.backbone.refresh_fused()

    def compile_blocks(self, **kwargs) -> "RemeDiLM":
        """torch.compile every transformer block (backbone and stream) in place.

        Blocks of one class share compiled code, so this costs one compilation per input shape. What it
        gains on a GPU is measured in BENCHMARKS.md.
        """
        blocks = list(self.model.transformer.blocks) + list(getattr(self.model, "blocks_upm", []))
        for blk in blocks:
            blk.compile(**{"dynamic": False, **kwargs})
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
    """Random init for tests and from-scratch training (normal std for matrices, ones for norms).

    Output projections are scaled by 1/sqrt(2 * n_layers) as is usual for pre-norm stacks. Stream
    bridges stay zero so that the backbone is unchanged by a freshly added stream.
    """
    n_layers = None
    for m in model.modules():
        if isinstance(m, LLaDAModel):
            n_layers = m.config.n_layers
    scale = 1.0 / math.sqrt(2 * n_layers) if n_layers else 1.0
    for name, p in model.named_parameters():
        if "backprop_linears" in name:
            p.zero_()
        elif name.endswith("norm.weight") or "norms." in name or "ln_f" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            s = std * scale if name.endswith(("attn_out.weight", "ff_out.weight")) and "transformer.ff_out" not in name else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(s).to(p.dtype))
