"""LLaDA's reference ``generate`` re-written in the tests from the LLaDA paper and hub code ("The reference sampler").

Batched like the original: the whole (B, P + G) sequence goes through the model every step (left padding
with an attention mask), confidences are computed over the whole sequence and set to -inf outside the
current block and at decoded positions, and each row commits its top-k. Differences from the original,
all documented in remedi/sampler.py and deliberate:
  * random numbers come from one generator per row, drawn for the current block only (Gumbel uniforms
    (block_length, V) float64, then uniform confidences (block_length,) float64), not from the global
    stream over the whole sequence;
  * the mask token is never predicted;
  * confidence_eos_eot_inf applies at every temperature, to EOS and EOT;
  * softmax in float64; ties and -inf confidences are ranked by position, and only masked positions of the
    current block can be committed (the original's topk over -inf ties could reach later blocks).
"""
from __future__ import annotations

import torch


def add_gumbel_noise(logits, temperature, generators, lo, hi):
    """exp(logits) / (-log u) ** temperature in float64, u drawn per row for the current block."""
    if temperature == 0:
        return logits
    out = logits.to(torch.float64).exp()
    for b, g in enumerate(generators):
        u = torch.rand((hi - lo, logits.shape[-1]), generator=g, dtype=torch.float64)
        out[b, lo:hi] = out[b, lo:hi] / (-torch.log(u)) ** temperature
    return out


def num_transfer_tokens(block_mask_index, steps):
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def llada_generate(model, prompts, generators, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", mask_id=None, eos_id=None, eot_id=None, pad_id=None,
                   logits_eos_inf=False, confidence_eos_eot_inf=False):
    B = len(prompts)
    P = max(len(p) for p in prompts)
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    attention_mask = torch.ones_like(x)
    for b, p in enumerate(prompts):
        x[b, :P - len(p)] = pad_id
        attention_mask[b, :P - len(p)] = 0
        x[b, P - len(p):P] = torch.tensor(p)
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[:, :P] = True

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks

    for num_block in range(num_blocks):
        lo, hi = P + num_block * block_length, P + (num_block + 1) * block_length
        block_mask_index = x[:, lo:hi] == mask_id
        ntt = num_transfer_tokens(block_mask_index, steps)
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                x_ = torch.cat([x, un_x], dim=0)
                logits = model(x_, torch.cat([attention_mask, attention_mask], 0)).logits.float()
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x, attention_mask).logits.float()
            logits[:, :, mask_id] = -torch.inf
            if logits_eos_inf:
                logits[:, :, eos_id] = -torch.inf

            logits_with_noise = add_gumbel_noise(logits, temperature, generators, lo, hi)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # (B, T)

            if remasking == "low_confidence":
                p = torch.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0[..., None]).squeeze(-1)  # (B, T)
            elif remasking == "random":
                x0_p = torch.full(x0.shape, -torch.inf, dtype=torch.float64)
                for b, g in enumerate(generators):
                    x0_p[b, lo:hi] = torch.rand((hi - lo,), generator=g, dtype=torch.float64)
            else:
                raise NotImplementedError(remasking)
            if confidence_eos_eot_inf:
                stop = (x0 == eos_id) | (x0 == eot_id) if eot_id is not None else x0 == eos_id
                x0_p = torch.where(stop, torch.full_like(x0_p, -torch.inf), x0_p)

            x0 = torch.where(mask_index, x0, x)
            for j in range(B):
                cand = [t for t in range(lo, hi) if bool(mask_index[j, t])]
                cand.sort(key=lambda t: (-float(x0_p[j, t]), t))
                for t in cand[: int(ntt[j, i])]:
                    x[j, t] = x0[j, t]
    return x[:, P:]
