"""LLaDA's Monte-Carlo estimate of the masked-diffusion ELBO: the log-likelihood of a continuation given a
context, for multiple-choice scoring (lm-eval's ``loglikelihood`` in :mod:`remedi.harness`; no lm-eval here).

For a continuation of L tokens, ``mc_num`` samples: sample j masks l_j of the L continuation positions
(uniformly chosen positions; the l_j are spread evenly over {1..L} from one uniform random offset, so each
l_j is uniform on {1..L} and together they stratify it: LLaDA's lower-variance variant), loss_j = (L / l_j) *
sum of -log p(token) over the masked positions; the estimate is -mean_j loss_j, a lower bound on
log p(continuation | context), exact when L = 1. The context is never masked.

Unsupervised classifier-free guidance (LLaDA's ``get_log_likelihood`` with ``cfg_scale`` w > 0): every row is
scored twice in one forward, as is and with the whole context masked (the unconditional copy), and the
logits are ``uncond + (1 + w) * (cond - uncond)``; w = 0 is the plain estimate (one pass, unchanged).

``is_greedy`` is true when, with the whole continuation masked, the argmax at every position is the
continuation (a one-step check; read from a sample with l = L, which the stratification provides whenever
mc_num >= L, else from one extra row). Every request draws from its own generator, so an estimate does
not depend on the other requests or on ``mc_batch_size``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch


def mc_mask_counts(L: int, n: int, gen: torch.Generator) -> list[int]:
    """n mask counts in {1..L}: each uniform, together spread evenly over {1..L} from one random offset."""
    k = int(torch.randint(0, L, (1,), generator=gen))
    return [(k + (j * L) // n) % L + 1 for j in range(n)]


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA's classifier-free guidance: ``uncond + (1 + cfg_scale) * (cond - uncond)``."""
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


@torch.no_grad()
def mc_loglikelihood(model, mask_id: int, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     generators: Sequence[torch.Generator], *, mc_num: int = 128, mc_batch_size: int = 32,
                     cfg_scale: float = 0.0, device=None, stats: Optional[dict] = None,
                     progress: Optional[Callable[[int], None]] = None) -> list[tuple[float, bool]]:
    """(log-likelihood estimate, is_greedy) per (context ids, continuation ids); see the module docstring.

    ``model(x, out_slice=...)`` returns ``.logits`` for the positions of ``out_slice``; ``generators`` holds
    one torch generator per pair (its random stream); ``stats`` (optional) gains forwards, rows, tokens and
    seconds; ``progress(n)`` is called after every forward with the rows it scored.
    """
    if mc_num < 1 or mc_batch_size < 1:
        raise ValueError(f"mc_num and mc_batch_size must be >= 1, got {mc_num}, {mc_batch_size}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    n = mc_num
    buckets: dict[tuple[int, int], list] = {}  # (len(ctx), L) -> rows (request, positions, l, greedy check)
    for r, ((ctx, cont), g) in enumerate(zip(pairs, generators)):
        if not cont:
            raise ValueError(f"loglikelihood request {r}: empty continuation")
        L = len(cont)
        rows = buckets.setdefault((len(ctx), L), [])
        counts = mc_mask_counts(L, n, g)
        for j, l in enumerate(counts):  # the first all-masked sample doubles as the greedy check
            rows.append((r, torch.randperm(L, generator=g)[:l], l, l == L and L not in counts[:j]))
        if L not in counts:
            rows.append((r, torch.arange(L), None, True))  # an extra all-masked row for the greedy check
    loss = [0.0] * len(pairs)
    greedy = [False] * len(pairs)
    st = stats if stats is not None else {}
    for k in ("forwards", "rows", "tokens"):
        st.setdefault(k, 0)
    st.setdefault("seconds", 0.0)
    t0 = time.perf_counter()
    for (lc, L), rows in buckets.items():
        for a in range(0, len(rows), mc_batch_size):
            chunk = rows[a:a + mc_batch_size]
            x = torch.tensor([list(pairs[r][0]) + list(pairs[r][1]) for r, *_ in chunk], device=device)
            target = x[:, lc:].clone()
            masked = torch.zeros(len(chunk), L, dtype=torch.bool)
            for k, (_, pos, *_) in enumerate(chunk):
                masked[k, pos] = True
            masked = masked.to(x.device)
            x[:, lc:][masked] = mask_id
            if cfg_scale > 0:  # the unconditional copy: the same rows with the context masked, one forward
                un = x.clone()
                un[:, :lc] = mask_id
                both = model(torch.cat([x, un]), out_slice=slice(lc, lc + L)).logits
                logits = guided_logits(both[:len(chunk)].float(), both[len(chunk):].float(), cfg_scale)
            else:
                logits = model(x, out_slice=slice(lc, lc + L)).logits  # (B, L, V)
            sel = logits[masked].float()  # (M, V): only masked positions
            nll = torch.logsumexp(sel, -1) - sel.gather(-1, target[masked][:, None]).squeeze(-1)
            per_row = torch.zeros(len(chunk), L, device=x.device, dtype=torch.float64)
            per_row[masked] = nll.double()
            per_row = per_row.sum(-1).cpu().tolist()
            arg_ok = (logits.argmax(-1) == target).all(-1).cpu().tolist()
            for k, (r, _, l, check) in enumerate(chunk):
                if check:
                    greedy[r] = bool(arg_ok[k])
                if l is not None:
                    loss[r] += (L / l) * per_row[k] / n
            st["forwards"] += 1
            st["rows"] += len(chunk) * (2 if cfg_scale > 0 else 1)
            st["tokens"] += int(x.numel()) * (2 if cfg_scale > 0 else 1)
            if progress is not None:
                progress(len(chunk))
    st["seconds"] += time.perf_counter() - t0
    return [(-loss[r], greedy[r]) for r in range(len(pairs))]
