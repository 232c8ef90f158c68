"""Every KV cache of the project, in one place (block-wise decoding, static decoding, rollouts, the RL loss).

A cache is handed to :meth:`remedi.model.llada.LLaDABlock.forward`, which calls
``cache.update(layer, start, k, v)`` with the keys/values of the positions ``[start, start + L)`` it just
computed and attends over what ``update`` returns. Layers are addressed by an integer id (backbone block
i -> i, UPS stream block k -> n_layers + k). The classes differ only in what ``update`` keeps:

* :class:`KVCache` -- the whole sequence; a forward over a slice overwrites it (the sampler's prefix/dual
  caches: a full forward refreshes everything, a block-only forward reuses the rest).
* :class:`EagerUpdateCache` -- a KVCache whose update torch.compile never traces (``SamplerConfig.compile``).
* :class:`StaticKVCache` -- one preallocated buffer per layer, written in place at device-tensor positions
  (the static-buffer / CUDA-graph decoder, :mod:`remedi.decoding.graphs`).
* :class:`GrowingKVCache` -- a forward past the cached length appends (the eager block-causal layout:
  [prompt | finished blocks | current block], so attending to every key is the block-causal view).
* :class:`PrefixCache` -- a fixed prefix computed once, then every forward attends to it and to itself
  without writing it (the RL loss: [prompt | final response] shared by the S step passes).
"""
from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Keys/values of every attention layer over the whole sequence, for block-wise decoding.

    Layers are addressed by an integer id (backbone block i -> i, UPS stream block k -> n_layers + k).
    A forward over positions [start, start+L) overwrites that slice and attends over all T positions:
    a full forward refreshes everything; a block-only forward reuses the rest as it was last computed.
    """

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.k:
            if start != 0:
                raise RuntimeError("KVCache: the first forward through a cache must cover the whole sequence")
            self.k[layer], self.v[layer] = k, v
            return k, v
        ck, cv = self.k[layer], self.v[layer]
        if start == 0 and k.shape[2] == ck.shape[2]:
            self.k[layer], self.v[layer] = k, v  # full refresh: no copy
            return k, v
        ck[:, :, start:start + k.shape[2]] = k
        cv[:, :, start:start + v.shape[2]] = v
        return ck, cv

    def __len__(self) -> int:
        return len(self.k)



class EagerUpdateCache(KVCache):
    """KVCache whose update is never traced by torch.compile.

    Traced, the update's dictionary lookups and ``layer`` / ``start`` integers become guards, so every
    layer and every block start compiles anew until dynamo's recompile limit sends the rest to eager
    (measured on CPU with the tiny config). Left out of the graph, together with
    ``allow_unspec_int_on_nn_module`` (see ``remedi.decoding.sampler._compile_context``), the blocks
    compile a handful of times.
    """

    @torch.compiler.disable
    def update(self, layer, start, k, v):
        return super().update(layer, start, k, v)


class StaticKVCache(KVCache):
    """KV cache with one preallocated (R, H_kv, T, D) buffer per layer, updated in place.

    The positions a forward computes are set in ``pos`` before it runs: None for the whole sequence
    (copied into the buffers), else a (L,) device tensor (written with ``index_copy_``). Attention then
    reads the whole buffer, as with :class:`KVCache` (a key mask hides what a layout must not see). The
    update stays out of torch.compile's graphs (a traced dictionary lookup would recompile per layer).
    """

    def __init__(self, layers, shape, dtype: torch.dtype, device) -> None:
        super().__init__()
        for layer in layers:
            self.k[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[layer] = torch.zeros(shape, dtype=dtype, device=device)
        self.pos: Optional[torch.Tensor] = None

    @torch.compiler.disable
    def update(self, layer, start, k, v):
        ck, cv = self.k[layer], self.v[layer]
        if self.pos is None:
            ck.copy_(k)
            cv.copy_(v)
        else:
            ck.index_copy_(2, self.pos, k)
            cv.index_copy_(2, self.pos, v)
        return ck, cv


class GrowingKVCache(KVCache):
    """A KVCache that grows: a forward over [start, start + L) past the cached length appends.

    Block-wise decoding keeps exactly [prompt | finished blocks | current block] in the cache, so
    attending to every cached key is the block-causal view with no 4-D mask (key padding only).
    """

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.k:  # the first forward through the cache: as KVCache
            return super().update(layer, start, k, v)
        ck, cv = self.k[layer], self.v[layer]
        T, end = ck.shape[2], start + k.shape[2]
        if start > T:
            raise RuntimeError(f"GrowingKVCache: a forward at {start} would leave a gap after {T} cached positions")
        if end > T:
            self.k[layer] = torch.cat([ck[:, :, :start], k], dim=2)
            self.v[layer] = torch.cat([cv[:, :, :start], v], dim=2)
            return self.k[layer], self.v[layer]
        ck[:, :, start:end] = k
        cv[:, :, start:end] = v
        return ck, cv


class PrefixCache(KVCache):
    """Keys/values of a fixed prefix, computed once, then read (never written) by every later forward.

    Filled by one forward while ``frozen`` is False; once frozen, a forward at ``start`` = the cached length
    attends to the stored prefix and to itself, and the prefix is never overwritten, so many passes share
    it. The RL loss uses it for [prompt | final response] (:func:`remedi.rl.loss.clean_prefix_cache`); valid
    only when no trainable parameter acts on the prefix's keys/values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        if not self.frozen:
            return super().update(layer, start, k, v)
        T = self.k[layer].shape[2]
        if start != T:
            raise RuntimeError(f"PrefixCache: a forward at {start} does not follow the {T} cached positions")
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
