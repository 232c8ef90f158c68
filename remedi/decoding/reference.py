"""Slow, obviously-correct reference for :func:`remedi.decoding.sampler.generate` (same conventions, same results).

One row at a time, no padding, a full forward over the whole sequence each step (no ``out_slice``),
Python loops over the positions of the block and Python ``sorted`` for every ranking. Tests check that
the fast batched sampler gives the same tokens, NFE and remask counts for every strategy. Only the
config dataclasses and the generation record are shared with the fast path; the algorithm is not.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from remedi.model.loading import SpecialIds
from remedi.decoding.sampler import RANDOM_STRATEGIES, REMASK_STRATEGIES, Generation, SamplerConfig



def score_one(strategy: str, row: torch.Tensor, token: int, ups_logit, rand: float) -> float:
    """One position's score, written out plainly: ``row`` is its prepared logit vector (mask and, if asked,
    EOS set to -inf), ``token`` the candidate (masked position) or the current token (unmasked)."""
    if strategy in RANDOM_STRATEGIES:
        return rand
    if strategy == "ups":
        return 1.0 / (1.0 + math.exp(-float(ups_logit)))
    probs = torch.softmax(row.double(), -1)
    if strategy in ("tps_prob", "llada_low_confidence"):
        return float(probs[token])
    if strategy == "margin":
        top = sorted(probs.tolist(), reverse=True)
        return top[0] - top[1]
    return sum(p * math.log(p) for p in probs.tolist() if p > 0)  # entropy: minus the entropy

def llada_counts(m: int, steps: int) -> list[int]:
    """LLaDA: m // steps tokens per step, plus one for each of the first m % steps steps."""
    return [m // steps + (1 if n < m % steps else 0) for n in range(steps)]


@torch.inference_mode()
def generate_ref(model, prompts: list[list[int]], cfg: SamplerConfig, ids: SpecialIds,
                 generators: Optional[list[torch.Generator]] = None) -> list[Generation]:
    if generators is None:
        generators = [torch.Generator().manual_seed(0) for _ in prompts]
    out = []
    for prompt, g in zip(prompts, generators):
        cfg.validate(model.config.max_sequence_length, len(prompt), model.ups_arch is not None)
        t0 = time.perf_counter()
        gen = _generate_row(model, list(prompt), cfg, ids, g)
        gen.seconds = time.perf_counter() - t0
        out.append(gen)
    return out


def _row_logits(model, seq: list[int], P: int, cfg: SamplerConfig, ids: SpecialIds):
    """Full-sequence logits (T, V) float32 with CFG applied, and UPS logits (T,) or None (conditional)."""
    device = next(model.parameters()).device
    x = torch.tensor([seq], device=device)
    out = model(x)
    logits = out.logits[0].float()
    ups = None if out.ups_logits is None else out.ups_logits[0]
    if cfg.cfg_scale > 0:
        un = list(seq)
        for i in range(P):
            un[i] = ids.mask
        un_logits = model(torch.tensor([un], device=device)).logits[0].float()
        logits = un_logits + (cfg.cfg_scale + 1) * (logits - un_logits)
    return logits, ups


def _generate_row(model, prompt: list[int], cfg: SamplerConfig, ids: SpecialIds, g: torch.Generator) -> Generation:
    P, Lb, s = len(prompt), cfg.block_length, cfg.steps_per_block
    seq = prompt + [ids.mask] * cfg.gen_length
    nfe, per_block, traj, step = 0, [], [] if cfg.record_trajectory else None, 0
    stops = (ids.eos,) if ids.eot is None else (ids.eos, ids.eot)
    for blk in range(cfg.num_blocks):
        lo = P + blk * Lb
        block = range(lo, lo + Lb)
        m = sum(1 for i in block if seq[i] == ids.mask)
        counts = llada_counts(m, s)
        targets = [sum(llada_counts(Lb, s)[:n + 1]) for n in range(s)]  # K_n for the remask strategies
        n_remask = 0
        for n in range(s):
            logits, ups = _row_logits(model, seq, P, cfg, ids)
            nfe += 2 if cfg.cfg_scale > 0 else 1
            # per-row random draws, in the documented order: Gumbel uniforms, then uniform confidences
            gumbel_u = None
            if cfg.temperature > 0:
                gumbel_u = torch.rand((Lb, logits.shape[-1]), generator=g, dtype=torch.float64, device=g.device)
            rand_conf = None
            if cfg.strategy in RANDOM_STRATEGIES:
                rand_conf = torch.rand((Lb,), generator=g, dtype=torch.float64, device=g.device).tolist()
            cand, score = {}, {}
            for j, i in enumerate(block):
                row = logits[i].clone()
                row[ids.mask] = -math.inf
                if cfg.logits_eos_inf:
                    row[ids.eos] = -math.inf
                if cfg.temperature > 0:
                    noisy = row.double().exp().cpu() / (-torch.log(gumbel_u[j].cpu())) ** cfg.temperature
                    x0 = int(noisy.argmax())
                else:
                    x0 = int(row.argmax())
                cand[i] = x0
                was_masked = seq[i] == ids.mask
                if cfg.strategy not in REMASK_STRATEGIES and not was_masked:
                    continue  # LLaDA ranks only the masked positions
                token = x0 if was_masked else seq[i]
                sc = score_one(cfg.strategy, row, token, None if ups is None else ups[i],
                              rand_conf[j] if rand_conf is not None else None)
                if cfg.confidence_eos_eot_inf and was_masked and x0 in stops:
                    sc = -math.inf
                score[i] = sc
            ranking = sorted(score, key=lambda i: (-score[i], i))
            before = list(seq)
            if cfg.strategy in REMASK_STRATEGIES:
                keep = set(ranking[:targets[n]])
                for i in block:
                    if i in keep:
                        seq[i] = cand[i] if before[i] == ids.mask else before[i]
                    else:
                        seq[i] = ids.mask
            else:
                for i in ranking[:counts[n]]:
                    seq[i] = cand[i]
            unmasked = [i - P for i in block if before[i] == ids.mask and seq[i] != ids.mask]
            remasked = [i - P for i in block if before[i] != ids.mask and seq[i] == ids.mask]
            n_remask += len(remasked)
            if traj is not None:
                traj.append({"step": step, "block": blk, "span": [lo - P, lo - P + Lb],
                             "unmasked": unmasked, "remasked": remasked,
                             "conf": {i - P: float(v) for i, v in score.items()},
                             "tokens": [None if t == ids.mask else t for t in seq[P:]]})
            step += 1
        per_block.append(n_remask)
        if cfg.eos_gating and any(seq[i] == ids.eos for i in block):
            break
    gen = seq[P:]
    tokens = gen[:gen.index(ids.eos)] if ids.eos in gen else gen
    return Generation(tokens=tokens, nfe=nfe, remasks=sum(per_block), remasks_per_block=per_block, seconds=0.0,
                      trajectory=traj)
