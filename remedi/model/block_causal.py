"""The block-causal ("block diffusion") layout of the RemeDi authors' training code.

A generation of G = n_blocks x Lb tokens is decoded block by block (semi-autoregressively): block j is
denoised while it sees the prompt and the finished blocks 0..j-1, never a later block. Training and the
Remask-RL loss reproduce that view for *every* block in one forward pass with the input

    [ prompt (P) | clean answer (G) | noisy answer (G) ]          T = P + 2G

and a boolean attention mask M (query q may attend to key k iff M[q, k]):

    query in           may attend to keys in
    ---------------    -----------------------------------------------------------------
    prompt             the prompt
    clean block c      the prompt, clean blocks 0..c       (itself included, bidirectional)
    noisy block n      the prompt, clean blocks 0..n-1, noisy block n   (never clean block n)

Padding keys (left-padded prompts, ``prompt_mask`` False) are never attended to; a padding query attends
to itself alone, so its row is finite and nothing reads it. Position ids put noisy block n at the same
RoPE positions as clean block n:

    prompt  0 .. P-1  (physical, padding included),   clean  P .. P+G-1,   noisy  P .. P+G-1

so noisy block n gets exactly what block-wise decoding with a KV cache computes for it: the prompt run
alone, then each finished block i < n run against the cache (seeing the prompt and blocks <= i), then
block n against that cache (the clean half plays the cache). Note that this is *not* one bidirectional
pass over [prompt | clean < n | noisy n]: there the prompt and the earlier blocks would attend to later
tokens. :func:`block_causal_forward` returns the logits / UPS scores of the noisy half;
tests/test_block_causal.py checks it against that cached per-block loop, for the head and the stream UPS.

The clean half alone, ``[prompt | blocks 0..j]`` with the clean rows of M, is the exact no-cache form of
block-wise decoding (:func:`prefix_mask`). :func:`block_noise` draws an independent t per block for
block-diffusion SFT (mask each answer token of block n with probability t_n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DEFAULT_BLOCK_LENGTH = 32

_PROMPT, _CLEAN, _NOISY = 0, 1, 2


def _check_lengths(gen_length: int, block_length: int) -> int:
    if block_length < 1 or gen_length < 1 or gen_length % block_length:
        raise ValueError(f"block_length {block_length} must be positive and divide gen_length {gen_length}")
    return gen_length // block_length


def _segments(prompt_len: int, gen_length: int, block_length: int, with_noisy: bool, device):
    """Per position: kind (prompt / clean / noisy) and block index (-1 for the prompt), each (T,)."""
    _check_lengths(gen_length, block_length)
    blk = torch.arange(gen_length, device=device) // block_length  # (G,)
    kinds = [torch.full((prompt_len,), _PROMPT, device=device), torch.full((gen_length,), _CLEAN, device=device)]
    blocks = [torch.full((prompt_len,), -1, device=device), blk]
    if with_noisy:
        kinds.append(torch.full((gen_length,), _NOISY, device=device))
        blocks.append(blk)
    return torch.cat(kinds), torch.cat(blocks)


def block_causal_mask(prompt_len: int, gen_length: int, block_length: int = DEFAULT_BLOCK_LENGTH,
                      prompt_mask: Optional[torch.Tensor] = None, with_noisy: bool = True,
                      batch_size: int = 1, device=None) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask of the table in the module docstring; T = P + 2G (P + G without noisy).

    prompt_mask: (B, P), True/1 at real prompt tokens (None = no padding; B = batch_size then).
    """
    if prompt_mask is not None:
        device = prompt_mask.device
    kind, blk = _segments(prompt_len, gen_length, block_length, with_noisy, device)
    kq, kk = kind[:, None], kind[None, :]  # (T, 1), (1, T)
    bq, bk = blk[:, None], blk[None, :]
    allowed = kk == _PROMPT  # every query sees the prompt; the clauses below all need an answer query
    allowed = allowed | ((kq == _CLEAN) & (kk == _CLEAN) & (bk <= bq))
    allowed = allowed | ((kq == _NOISY) & (kk == _CLEAN) & (bk < bq))
    allowed = allowed | ((kq == _NOISY) & (kk == _NOISY) & (bk == bq))  # (T, T)
    T = kind.shape[0]
    if prompt_mask is None:
        return allowed[None, None].expand(batch_size, 1, T, T)
    real = torch.ones(prompt_mask.shape[0], T, dtype=torch.bool, device=device)
    real[:, :prompt_len] = prompt_mask.to(torch.bool)  # (B, T) keys that exist
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return ((allowed[None] & real[:, None, :] & real[:, :, None]) | eye[None])[:, None]  # (B, 1, T, T)


def prefix_mask(prompt_len: int, gen_length: int, block_length: int = DEFAULT_BLOCK_LENGTH,
                prompt_mask: Optional[torch.Tensor] = None, batch_size: int = 1, device=None) -> torch.Tensor:
    """(B, 1, P+G, P+G): the clean rows only, [prompt | blocks 0..n_blocks-1] (exact no-cache decoding)."""
    return block_causal_mask(prompt_len, gen_length, block_length, prompt_mask, with_noisy=False,
                             batch_size=batch_size, device=device)


def block_causal_positions(prompt_len: int, gen_length: int, batch_size: int, with_noisy: bool = True,
                           device=None) -> torch.Tensor:
    """(B, T) RoPE positions: 0..P+G-1, then the noisy half again at P..P+G-1."""
    pos = torch.arange(prompt_len + gen_length, device=device)
    if with_noisy:
        pos = torch.cat([pos, torch.arange(prompt_len, prompt_len + gen_length, device=device)])
    return pos[None].expand(batch_size, -1)


@dataclass
class BlockCausalBatch:
    input_ids: torch.Tensor  # (B, T) = [prompt | clean | noisy]
    attention_mask: torch.Tensor  # (B, 1, T, T) bool
    position_ids: torch.Tensor  # (B, T)
    prompt_len: int
    gen_length: int

    @property
    def noisy(self) -> slice:
        return slice(self.prompt_len + self.gen_length, self.prompt_len + 2 * self.gen_length)

    @property
    def clean(self) -> slice:
        return slice(self.prompt_len, self.prompt_len + self.gen_length)


def build_block_causal(prompt: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor,
                       block_length: int = DEFAULT_BLOCK_LENGTH,
                       prompt_mask: Optional[torch.Tensor] = None) -> BlockCausalBatch:
    """Assemble the layout. prompt (B, P) left-padded, clean and noisy (B, G), prompt_mask (B, P) or None."""
    B, P = prompt.shape
    if clean.shape != noisy.shape or clean.shape[0] != B:
        raise ValueError(f"clean {tuple(clean.shape)} and noisy {tuple(noisy.shape)} must both be (B={B}, G)")
    G = clean.shape[1]
    ids = torch.cat([prompt, clean, noisy], dim=1)  # (B, P + 2G)
    mask = block_causal_mask(P, G, block_length, prompt_mask, batch_size=B, device=prompt.device)
    pos = block_causal_positions(P, G, B, device=prompt.device)
    return BlockCausalBatch(ids, mask, pos, P, G)


def block_causal_forward(model, prompt: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor,
                         block_length: int = DEFAULT_BLOCK_LENGTH, prompt_mask: Optional[torch.Tensor] = None,
                         compute_logits: bool = True):
    """Run ``model`` (a RemeDiLM, or a wrapper with its forward) on the layout; outputs of the noisy half.

    Returns the model's ``ModelOutput`` sliced to the noisy half: logits (B, G, V) (the vocabulary
    projection runs only there), hidden (B, G, d), ups_logits (B, G) for the head or the stream.
    """
    lay = build_block_causal(prompt, clean, noisy, block_length, prompt_mask)
    return model(lay.input_ids, lay.attention_mask, position_ids=lay.position_ids, out_slice=lay.noisy,
                 compute_logits=compute_logits)


def block_noise(answer: torch.Tensor, block_length: int, mask_id: int, generator: torch.Generator,
                eps: float = 1e-3, answer_mask: Optional[torch.Tensor] = None):
    """Masked-diffusion noise with an independent t per block (block-diffusion SFT).

    For each row and block n: t_n ~ U(eps, 1); each answer token of the block is masked with probability
    t_n (LLaDA's rho(t) = t with the floor eps). answer (B, G); answer_mask (B, G) bool limits the noise to
    real answer tokens (None = all).

    Returns (noisy (B, G), masked (B, G) bool, p_mask (B, G) = t of the token's block, for the 1/t weight).
    """
    B, G = answer.shape
    nb = _check_lengths(G, block_length)
    t = eps + (1 - eps) * torch.rand((B, nb), generator=generator, device=generator.device)  # (B, nb)
    p = t.repeat_interleave(block_length, dim=1).to(answer.device)  # (B, G)
    u = torch.rand((B, G), generator=generator, device=generator.device).to(answer.device)
    masked = u < p
    if answer_mask is not None:
        masked &= answer_mask.to(torch.bool)
    return torch.where(masked, torch.full_like(answer, mask_id), answer), masked, p
