"""Models and the cached per-block reference of the block-causal tests (shared with the RL tests)."""
import pytest
import torch

from remedi.model.block_causal import (block_causal_forward, block_causal_mask, block_causal_positions,
                                       block_noise, prefix_mask)
from remedi.model.config import get_config
from remedi.model.llada import KVCache, RemeDiLM, UPSHead, init_weights


def make(arch: str, seed: int = 0) -> RemeDiLM:
    cfg = get_config("test-tiny")
    if arch == "stream":
        cfg = cfg.replace(ups_taps=(0, 2))
    m = RemeDiLM(cfg)
    init_weights(m, std=0.2, generator=torch.Generator().manual_seed(seed))
    if arch == "head":
        head = UPSHead(cfg.d_model, 16)
        init_weights(head, std=0.2, generator=torch.Generator().manual_seed(seed + 1))
        m.attach_head(head)
    else:  # live bridges: the stream changes the backbone's hidden states, so its path is tested too
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            for lin in m.model.backprop_linears:
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
    return m.eval()


def cached_reference(m, prompt, pm, blocks):
    """Block-wise decoding with a KV cache, the slow way: outputs of the last of ``blocks``.

    The prompt runs alone, then each block in turn, every forward with the ordinary key-padding mask over
    what is cached so far ([prompt | earlier blocks | this block]); so block i's keys/values are computed
    seeing only the prompt and blocks <= i. Only the standard KVCache and 2-D masks are used: this is
    independent of the 4-D mask and position ids under test. (A single bidirectional forward over
    [prompt | clean < j | noisy j] is not the reference: there the prompt and earlier blocks would attend
    to later tokens, which a decoder holding their cached keys never computes.)
    """
    B, P = prompt.shape
    x = torch.cat([prompt, *blocks], 1)
    T = x.shape[1]
    real = torch.ones(B, T, dtype=torch.long) if pm is None else torch.cat([pm.long(), torch.ones(B, T - P).long()], 1)
    cache = KVCache()
    m(x, cache=cache)  # allocates the cache; every slice is overwritten below before it is attended to
    lo, out = 0, None
    for piece in [prompt, *blocks]:
        hi = lo + piece.shape[1]
        visible = real.clone()
        visible[:, hi:] = 0  # nothing later than this piece is visible
        out = m(x[:, lo:hi], visible, cache=cache, start=lo)
        lo = hi
    return out
