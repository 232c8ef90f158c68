"""An independent, deliberately plain LLaDA forward written from the LLaDA paper and hub code, for checking modeling.py.

It reads the hub-named state dict directly and loops over heads; nothing is shared with the library.
"""
from __future__ import annotations

import torch


def rms(x, w, eps):
    xf = x.double()
    y = xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return w.double() * y


def rope(x, pos, theta):
    # x: (T, D) for one head; rotate-half layout: pairs (i, i + D/2)
    T, D = x.shape
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        freq = theta ** (-(2 * i) / D)
        ang = pos.double() * freq
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * c - b * s
        out[:, i + half] = b * c + a * s
    return out


def forward(sd: dict, cfg, ids: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) in float64 for the plain backbone."""
    p = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    B, T = ids.shape
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    pos = torch.arange(T)
    outs = []
    for b in range(B):
        x = p["transformer.wte.weight"][ids[b]]
        for i in range(cfg.n_layers):
            pre = f"transformer.blocks.{i}."
            h = rms(x, p[pre + "attn_norm.weight"], cfg.rms_norm_eps)
            q, k, v = h @ p[pre + "q_proj.weight"].T, h @ p[pre + "k_proj.weight"].T, h @ p[pre + "v_proj.weight"].T
            heads = []
            for hh in range(H):
                kvh = hh // (H // Hkv)
                qh = rope(q[:, hh * D:(hh + 1) * D], pos, cfg.rope_theta)
                kh = rope(k[:, kvh * D:(kvh + 1) * D], pos, cfg.rope_theta)
                vh = v[:, kvh * D:(kvh + 1) * D]
                scores = qh @ kh.T / D ** 0.5
                if key_mask is not None:
                    scores = scores.masked_fill(~key_mask[b].bool()[None, :], float("-inf"))
                heads.append(torch.softmax(scores, -1) @ vh)
            x = x + torch.cat(heads, -1) @ p[pre + "attn_out.weight"].T
            h = rms(x, p[pre + "ff_norm.weight"], cfg.rms_norm_eps)
            g, u = h @ p[pre + "ff_proj.weight"].T, h @ p[pre + "up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ p[pre + "ff_out.weight"].T
        x = rms(x, p["transformer.ln_f.weight"], cfg.rms_norm_eps)
        outs.append(x @ p["transformer.ff_out.weight"].T)
    return torch.stack(outs)
