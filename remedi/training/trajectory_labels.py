"""Trajectory labels for a head UPS: train it on the states the sampler actually visits (Learn2PD-style).

Remask SFT corrupts the gold answer with random tokens or the model's own one-step predictions made
with clean context; few of those are wrong (~3% on the embedded model), so the head learns to trust
every visible token, while at inference errors compound along the trajectory. Here the frozen model
decodes training problems with an ordinary sampler strategy, every state it visits is kept, and the
head learns, on the current block of each state:

* a visible token: 1[token == gold] (the gold answer at that position),
* a masked position: p(gold | state) from the frozen TPS (stop-grad), as Remask SFT's masked label,
* positions outside the block: excluded.

Pieces: :func:`collect_states` (rollouts -> padded tensors), :func:`trajectory_labels`,
:func:`train_head` (backbone frozen, BCE on the head only) and a CLI::

    python -m remedi.training.trajectory_labels --model_name checkpoints/remedi-tiny-gsm \\
        --ups_head checkpoints/remedi-tiny-gsm/ups_head.pt --dataset train.jsonl --n_problems 3000 \\
        --strategy entropy --steps 48 --train_steps 1500 --batch_size 256 --lr 1e-3 --save_path out.pt

Layout: the gold gen region is the SFT layout of :mod:`remedi.training.data` for a plain (non-chat)
model: ``tokenizer(answer, add_special_tokens=False) + [EOS]``, padded with EOS to gen_length (cut to
gen_length when longer); the prompt is ``encode_prompt(tokenizer, question, chat=False)``, i.e.
``tokenizer(question)["input_ids"]``, as the embedded model was trained and is evaluated.

States are stored as one tensor ``input_ids`` (N, P + G): the prompt left-padded with the pad id to the
longest prompt of the whole collection (P), then the gen region as it was before the step (mask where
masked), with ``attention_mask`` marking the real tokens. The sampler uses physical RoPE positions after
its own (batch-wise) left padding; RoPE depends only on relative positions and padded keys are masked,
so a state computes the same hidden states (up to float rounding) as in the rollout. Training is a
plain batched forward: rows of a batch are cut to their common leading padding.

``--strategy ups`` rolls out with the head being trained, at its initial weights (``--ups_head``, or a
fresh random head when omitted): on-policy for that head at the start of training, not updated during
collection.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from remedi.decoding.sampler import STRATEGIES, SamplerConfig, generate
from remedi.model.loading import SpecialIds
from remedi.training.losses import auroc
from remedi.training.build import adamw

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ states
def gold_region(answer_ids: Sequence[int], gen_length: int, eos: int) -> list[int]:
    """Gold gen-region tokens: the answer ids (with their end tokens), EOS-padded / cut to gen_length."""
    ids = list(answer_ids)[:gen_length]
    return ids + [eos] * (gen_length - len(ids))


def collect_states(model, prompts: list[list[int]], golds: list[list[int]], cfg: SamplerConfig, ids: SpecialIds,
                   generators: Optional[list[torch.Generator]] = None, every: int = 1,
                   problem_offset: int = 0) -> dict:
    """Roll the sampler out on ``prompts`` and return the state before every ``every``-th step of each row.

    golds: the gold gen regions (gen_length tokens each, see :func:`gold_region`). Returns CPU tensors:
    input_ids (N, P+G) long (left-padded prompt, then the gen region before the step, mask where masked),
    attention_mask (N, P+G) bool, gold (N, G) long, span (N, 2) long ([lo, hi) in gen coordinates),
    prompt_len (N,), problem (N,) (index into ``prompts`` + problem_offset), step (N,) (the row's 0-based
    step), step_in_block (N,), and final (len(prompts), G): each row's gen region after its last step;
    plus the ints P (prompt width) and G (gen_length).
    """
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    if len(golds) != len(prompts):
        raise ValueError(f"{len(golds)} gold answers for {len(prompts)} prompts")
    G = cfg.gen_length
    bad = [i for i, g in enumerate(golds) if len(g) != G]
    if bad:
        raise ValueError(f"gold {bad[0]} has {len(golds[bad[0]])} tokens, expected gen_length {G} (use gold_region)")
    cfg = dataclasses.replace(cfg, record_trajectory=True)
    gens = generate(model, prompts, cfg, ids, generators)
    P = max(len(p) for p in prompts)
    rows, meta, finals = [], [], []
    for b, (p, g) in enumerate(zip(prompts, gens)):
        prefix = [ids.pad] * (P - len(p)) + list(p)
        before = [ids.mask] * G
        last_blk, n_in_blk = None, 0
        for rec in g.trajectory:
            n_in_blk = n_in_blk + 1 if rec["block"] == last_blk else 0
            last_blk = rec["block"]
            if rec["step"] % every == 0:
                rows.append(prefix + before)
                meta.append((len(p), rec["span"][0], rec["span"][1], b + problem_offset, rec["step"], n_in_blk))
            before = [ids.mask if t is None else t for t in rec["tokens"]]
        finals.append(before)
    x = torch.tensor(rows, dtype=torch.long).reshape(len(rows), P + G)
    m = torch.tensor(meta, dtype=torch.long).reshape(len(rows), 6)
    attn = torch.arange(P + G)[None, :] >= (P - m[:, 0:1])
    gold = torch.tensor(golds, dtype=torch.long)[m[:, 3] - problem_offset] if rows else torch.empty(0, G).long()
    return {"input_ids": x, "attention_mask": attn, "gold": gold, "span": m[:, 1:3].clone(),
            "prompt_len": m[:, 0].clone(), "problem": m[:, 3].clone(), "step": m[:, 4].clone(),
            "step_in_block": m[:, 5].clone(), "final": torch.tensor(finals, dtype=torch.long).reshape(-1, G),
            "P": P, "G": G}


def merge_states(parts: list[dict], pad_id: int) -> dict:
    """Concatenate :func:`collect_states` results, left-padding every prompt to the widest P."""
    P = max(s["P"] for s in parts)
    G = parts[0]["G"]
    out: dict = {"P": P, "G": G}
    for k in ("input_ids", "attention_mask"):
        fill = pad_id if k == "input_ids" else False
        out[k] = torch.cat([F.pad(s[k], (P - s["P"], 0), value=fill) for s in parts])
    for k in ("gold", "span", "prompt_len", "problem", "step", "step_in_block", "final"):
        out[k] = torch.cat([s[k] for s in parts])
    return out


# ------------------------------------------------------------------------------------------ labels
def trajectory_labels(state: torch.Tensor, gold: torch.Tensor, span: torch.Tensor, p_gold: torch.Tensor,
                      mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, G) float32, weight (B, G) bool) for gen-region states (B, G).

    In the block [span[:, 0], span[:, 1]): a visible token gets 1[token == gold], a masked position
    p_gold (detached); every position outside the block gets label 0 and weight False.
    """
    pos = torch.arange(state.shape[1], device=state.device)[None, :]
    span = span.to(state.device)
    weight = (pos >= span[:, 0:1]) & (pos < span[:, 1:2])
    masked = state == mask_id
    labels = torch.where(masked, p_gold.detach().float(), (state == gold).float())
    return torch.where(weight, labels, torch.zeros_like(labels)), weight


# ------------------------------------------------------------------------------------------ training
def _batch(states: dict, idx: torch.Tensor, device) -> tuple:
    """One batch on ``device``, cut to its rows' common leading padding: (x, attn or None, P0)."""
    P = states["P"]
    lead = int((P - states["prompt_len"][idx]).min())
    x = states["input_ids"][idx, lead:].to(device)
    attn = states["attention_mask"][idx, lead:].to(device)
    return x, (None if bool(attn.all()) else attn), P - lead


def batch_forward(model, states: dict, idx: torch.Tensor, ids_mask: int) -> dict:
    """Frozen backbone (no grad) -> head UPS logits with grad; labels, weights and the visible-token sets."""
    device = next(model.parameters()).device
    x, attn, P0 = _batch(states, idx, device)
    G = states["G"]
    with torch.no_grad():
        out = model.model(x, attn, out_slice=slice(P0, P0 + G), compute_logits=False)
        hidden = out.hidden  # (B, G, d) gen region
        span = states["span"][idx].to(device)
        Lb = int((span[:, 1] - span[:, 0]).max())
        pos = (span[:, 0:1] + torch.arange(Lb, device=device)[None, :]).clamp(max=G - 1)  # (B, Lb)
        h_blk = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = model.model.transformer.ff_out(h_blk)[..., :model.config.vocab_size].float()
        gold = states["gold"][idx].to(device)
        logp = torch.log_softmax(logits, -1).gather(-1, gold.gather(1, pos)[..., None]).squeeze(-1)
        p_gold = torch.zeros(gold.shape, dtype=torch.float32, device=device).scatter(1, pos, logp.exp())
    ups = model.ups_head(hidden.detach())  # (B, G), the head's gradient only
    state = x[:, P0:P0 + G]
    labels, weight = trajectory_labels(state, gold, span, p_gold, ids_mask)
    visible = weight & (state != ids_mask)
    return {"ups": ups, "labels": labels, "weight": weight, "visible": visible, "correct": state == gold}


def head_loss(model, states: dict, idx: torch.Tensor, ids_mask: int) -> tuple[torch.Tensor, dict]:
    """BCE-with-logits of the head against :func:`trajectory_labels`, averaged over the block positions."""
    f = batch_forward(model, states, idx, ids_mask)
    bce = F.binary_cross_entropy_with_logits(f["ups"], f["labels"], reduction="none")
    w = f["weight"].float()
    return (bce * w).sum() / w.sum().clamp_min(1), f


def train_head(model, states: dict, steps: int, batch_size: int, lr: float,
               generator: Optional[torch.Generator] = None, log_every: int = 10, mask_id: Optional[int] = None,
               weight_decay: float = 0.0) -> list[dict]:
    """Train ``model.ups_head`` only (AdamW, backbone in eval mode without gradients) for ``steps`` batches.

    Batches walk a random permutation of the states (a fresh one per pass, drawn from ``generator``). Every
    ``log_every`` steps (and at the last) appends {step, loss, auroc_visible (head score, correct vs wrong
    visible tokens of the window), frac_wrong_visible, n_visible, seconds}; ``auroc_visible`` is None when
    the window has one class only.
    """
    if model.ups_head is None:
        raise ValueError("train_head needs a model with a UPS head attached (model.attach_head(UPSHead(d, w)))")
    mask_id = model.config.mask_token_id if mask_id is None else mask_id
    N = states["input_ids"].shape[0]
    if N == 0:
        raise ValueError("no states to train on (collect_states returned none)")
    generator = generator or torch.Generator().manual_seed(0)
    model.eval()
    model.ups_head.train()
    opt = adamw([{"params": list(model.ups_head.parameters())}], lr=lr, weight_decay=weight_decay)
    order, pos = torch.randperm(N, generator=generator), 0
    history, win = [], {"loss": [], "scores": [], "correct": []}
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + min(batch_size, N) > N:
            order, pos = torch.randperm(N, generator=generator), 0
        idx = order[pos:pos + batch_size]
        pos += len(idx)
        loss, f = head_loss(model, states, idx, mask_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        win["loss"].append(float(loss.detach()))
        v = f["visible"]
        win["scores"].append(f["ups"].detach()[v].cpu())
        win["correct"].append(f["correct"][v].cpu())
        if step % log_every == 0 or step == steps:
            s, c = torch.cat(win["scores"]), torch.cat(win["correct"])
            history.append({"step": step, "loss": sum(win["loss"]) / len(win["loss"]), "auroc_visible": auroc(s, c),
                            "frac_wrong_visible": float((~c).float().mean()) if c.numel() else None,
                            "n_visible": int(c.numel()), "seconds": round(time.perf_counter() - t0, 2)})
            log.info("step %d/%d %s", step, steps, json.dumps(history[-1]))
            win = {"loss": [], "scores": [], "correct": []}
    model.ups_head.eval()
    return history


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m remedi.training.trajectory_labels",
                                 description="Train a head UPS on the states a sampler visits (trajectory labels).",
                                 allow_abbrev=False)
    ap.add_argument("--model_name", required=True)
    ap.add_argument("--ups_head", default=None, help="initial head (.pt/.safetensors); omitted: a fresh UPSHead")
    ap.add_argument("--ups_width", type=int, default=128, help="width of a fresh head (no --ups_head)")
    ap.add_argument("--dataset", required=True, help="JSON lines with question/answer fields (GSM8K format)")
    ap.add_argument("--n_problems", type=int, default=None, help="first N problems (default: all)")
    ap.add_argument("--strategy", default="entropy", choices=STRATEGIES,
                    help="rollout strategy; 'ups' rolls out with the initial head (on-policy at the start)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's defaults.json)")
    ap.add_argument("--gen_length", type=int, default=None)
    ap.add_argument("--block_length", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--every", type=int, default=1, help="keep the state before every n-th step")
    ap.add_argument("--collect_batch", type=int, default=256, help="prompts per rollout batch")
    ap.add_argument("--train_steps", type=int, required=True)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--log_every", type=int, default=50)
    ap.add_argument("--save_path", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="fp32")
    a = ap.parse_args(argv)
    for k in ("train_steps", "batch_size", "collect_batch", "every", "log_every"):
        if getattr(a, k) < 1:
            ap.error(f"--{k} must be >= 1")
    if a.n_problems is not None and a.n_problems < 1:
        ap.error("--n_problems must be >= 1")
    return a


def main(argv=None) -> dict:
    from pathlib import Path

    from tqdm import tqdm

    from remedi.decoding.args import SamplingArgs
    from remedi.files import check_writable, read_jsonl
    from remedi.model.checkpoint import save_ups
    from remedi.model.llada import UPSHead
    from remedi.model.loading import encode_prompt, load_for_inference

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    a = parse_args(argv)
    check_writable(a.save_path, "--save_path")
    if not Path(a.dataset).is_file():
        raise FileNotFoundError(f"--dataset {a.dataset}: no such file")
    torch.manual_seed(a.seed)
    loaded = load_for_inference(a.model_name, a.ups_head, None, device=a.device, dtype=a.dtype)
    model, tok, ids = loaded.model, loaded.tokenizer, loaded.ids
    if model.ups_head is None:
        if model.model.has_stream:
            raise ValueError(f"{a.model_name} has a stream UPS; this script trains a head UPS on a plain backbone")
        model.attach_head(UPSHead(model.config.d_model, width=a.ups_width).to(next(model.parameters()).device))
    sa = SamplingArgs(steps=a.steps, gen_length=a.gen_length, block_length=a.block_length,
                      temperature=a.temperature, cache="none", eos_gating=False, compile=False, graphs=False,
                      threshold=None, remask_threshold=None, cfg_scale=0.0)
    cfg = sa.resolve(loaded.model_dir).to_sampler_config(a.strategy)
    rows = read_jsonl(a.dataset)[:a.n_problems]
    if not rows:
        raise ValueError(f"--dataset {a.dataset} holds no records")
    prompts = [encode_prompt(tok, r["question"], chat=False) for r in rows]
    golds = [gold_region(list(tok(r["answer"], add_special_tokens=False)["input_ids"]) + [ids.eos], cfg.gen_length,
                         ids.eos) for r in rows]
    log.info("rollouts: %d problems, %s", len(rows), cfg)
    parts, t0 = [], time.perf_counter()
    for s in tqdm(range(0, len(rows), a.collect_batch), desc="rollouts", unit="batch"):
        p, g = prompts[s:s + a.collect_batch], golds[s:s + a.collect_batch]
        gens = [torch.Generator().manual_seed(a.seed * 1_000_003 + s + i) for i in range(len(p))]
        parts.append(collect_states(model, p, g, cfg, ids, gens, every=a.every, problem_offset=s))
    states = merge_states(parts, ids.pad)
    collect_s = time.perf_counter() - t0
    solved = float((states["final"] == torch.tensor(golds)).all(1).float().mean())
    log.info("%d states from %d problems in %.1fs (rollouts exactly equal to gold: %.3f)",
             states["input_ids"].shape[0], len(rows), collect_s, solved)
    hist = train_head(model, states, a.train_steps, a.batch_size, a.lr, torch.Generator().manual_seed(a.seed),
                      a.log_every, ids.mask, a.weight_decay)
    recipe = {"script": "trajectory_labels", "args": vars(a), "sampler": dataclasses.asdict(cfg),
              "n_states": int(states["input_ids"].shape[0]), "n_problems": len(rows),
              "init_ups_head": a.ups_head, "final_metrics": hist[-1] if hist else None,
              "collect_seconds": round(collect_s, 1)}
    save_ups(a.save_path, model, extra_meta={"train": recipe})
    log.info("saved %s", a.save_path)
    return {"history": hist, "n_states": recipe["n_states"], "save_path": a.save_path}


if __name__ == "__main__":
    main()
