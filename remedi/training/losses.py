"""Remask SFT losses and UPS metrics (RemeDi, arXiv:2509.23653; the TPS loss is LLaDA's SFT objective,
arXiv:2502.09992).

TPS (token prediction stream), LLaDA's SFT form:

    L_TPS = mean_b [ sum_{i in S_mask(b)} -log p(x0_i | x_t) / p_mask_i ] / |answer(b)|

UPS (unmasking policy stream), binary cross-entropy with logits over every answer position with labels
1 on S_clean, 0 on S_incorrect and stopgrad(p(x0_i | x_t)) on S_mask (the TPS probability of the true
token from the same forward); with smoothing (the authors' code) 0.95 / 0.05 / 0.05 + 0.9 p:

    L_UPS = mean over all answer tokens of the batch of BCE(h_i, y_i)

Answer positions include the EOS padding after the answer (trained as in LLaDA's SFT); the prompt never
contributes. Every function works on (B, L) tensors and returns float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SETS = ("clean", "incorrect", "masked")


def true_token_logprob(logits: torch.Tensor, x0: torch.Tensor, where: torch.Tensor):
    """log p(x0_i | x_t) and whether the TPS argmax equals x0_i, at the positions ``where`` (B, L) only.

    logits: (B, L, V) in any dtype, or already the (N, V) rows at ``where`` (row-major order), which is
    what the training step passes: it projects only the masked positions' hidden states onto the
    vocabulary. The softmax runs in float32 over the selected rows only, so memory is (number of selected
    positions) x V rather than B x L x V. Returns (logp (B, L) float32, 0 elsewhere; argmax_ok (B, L)
    bool, False elsewhere).
    """
    sel = (logits if logits.dim() == 2 else logits[where]).float()  # (N, V)
    logp_sel = torch.log_softmax(sel, dim=-1).gather(-1, x0[where][:, None]).squeeze(-1)  # (N,)
    ok_sel = sel.argmax(-1) == x0[where]
    logp = torch.zeros(x0.shape, dtype=torch.float32, device=sel.device)
    logp = logp.masked_scatter(where, logp_sel)
    ok = torch.zeros(x0.shape, dtype=torch.bool, device=sel.device).masked_scatter(where, ok_sel)
    return logp, ok


def tps_loss(logp_true: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor,
             answer_mask: torch.Tensor) -> torch.Tensor:
    """Masked CE weighted by 1 / p_mask, summed per row, divided by the row's answer length, batch mean."""
    # Weight is 0 off S_mask; p_mask > 0 wherever a position was masked, the clamp only keeps 1/0 out
    # of the graph (0 * inf would be nan in the backward).
    weight = torch.where(masked, 1.0 / p_mask.float().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    per_row = (-logp_true * weight).sum(-1)  # (B,)
    answer_len = answer_mask.sum(-1).clamp_min(1).float()
    return (per_row / answer_len).mean()


def ups_labels(clean: torch.Tensor, incorrect: torch.Tensor, masked: torch.Tensor, p_true: torch.Tensor,
               smoothing: bool = False) -> torch.Tensor:
    """(B, L) float32 targets; positions outside the answer get 0 (they are excluded by the loss)."""
    p = p_true.detach().float()
    if smoothing:
        hi, lo, m = 0.95, 0.05, 0.05 + 0.9 * p
    else:
        hi, lo, m = 1.0, 0.0, p
    y = torch.zeros_like(p)
    y = torch.where(clean, torch.full_like(p, hi), y)
    y = torch.where(incorrect, torch.full_like(p, lo), y)
    return torch.where(masked, m, y)


def ups_loss(ups_logits: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits averaged over the answer tokens of the whole batch."""
    bce = F.binary_cross_entropy_with_logits(ups_logits.float(), labels.float(), reduction="none")
    n = answer_mask.sum().clamp_min(1)
    return (bce * answer_mask).sum() / n


# ------------------------------------------------------------------------------------------- metrics
def auroc(scores: torch.Tensor, positive: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); None with one class only."""
    scores = scores.detach().double().flatten()
    positive = positive.flatten().bool()
    n_pos, n = int(positive.sum()), positive.numel()
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty(n, dtype=torch.float64)
    # average rank of each tie group (1-based)
    uniq, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def auroc_reference(scores, positive) -> Optional[float]:
    """O(n^2) pairwise definition (tests compare :func:`auroc` against it)."""
    pos = [float(s) for s, p in zip(scores.flatten(), positive.flatten()) if p]
    neg = [float(s) for s, p in zip(scores.flatten(), positive.flatten()) if not p]
    if not pos or not neg:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


class UPSMetrics:
    """Accumulates UPS scores by set over several steps; :meth:`compute` summarises and resets.

    Accuracies (threshold sigmoid(h) = 0.5): clean = fraction scored >= 0.5 (label 1), incorrect = fraction
    scored < 0.5 (label 0), masked = agreement with the soft label rounded at 0.5. An AUROC needs two
    classes, so per set of positions the question it answers is:
    - ``auroc_unmasked``: on S_clean u S_incorrect, does h rank the right tokens above the wrong ones;
    - ``auroc_masked``: on S_mask, does h rank the positions whose TPS argmax is right above the others
      ("predictable now", what the sampler needs before it unmasks).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._h = {s: [] for s in SETS}
        self._y_masked: list[torch.Tensor] = []
        self._ok_masked: list[torch.Tensor] = []
        # self-noise runs only: scores of self predictions (and whether they are right), of random
        # replacements and of untouched clean tokens
        self._self: Optional[dict[str, list[torch.Tensor]]] = None

    @torch.no_grad()
    def update(self, ups_logits, labels, clean, incorrect, masked, argmax_ok,
               self_pos: Optional[torch.Tensor] = None) -> None:
        h = ups_logits.detach().float().cpu()
        clean, incorrect, masked = clean.cpu(), incorrect.cpu(), masked.cpu()
        for name, m in (("clean", clean), ("incorrect", incorrect), ("masked", masked)):
            self._h[name].append(h[m])
        self._y_masked.append(labels.detach().float().cpu()[masked])
        self._ok_masked.append(argmax_ok.detach().cpu()[masked])
        if self_pos is not None:
            sp = self_pos.cpu()
            if self._self is None:
                self._self = {"h": [], "ok": [], "random": [], "clean": []}
            self._self["h"].append(h[sp])
            self._self["ok"].append(clean[sp])  # a self prediction is clean exactly when it equals x0
            self._self["random"].append(h[incorrect & ~sp])
            self._self["clean"].append(h[clean & ~sp])

    def _self_metrics(self) -> dict[str, Optional[float]]:
        """Self-noise only: how often the model's own fills are wrong, and whether h separates them.

        ``auroc_self``: among self predictions, right above wrong (the inference-time question);
        ``auroc_random``: untouched clean tokens above random replacements (what batch/vocab noise asks).
        """
        cat = {k: torch.cat(v) for k, v in self._self.items()}
        ok = cat["ok"]
        clean, rnd = cat["clean"], cat["random"]
        lab = torch.cat([torch.ones(clean.numel(), dtype=torch.bool), torch.zeros(rnd.numel(), dtype=torch.bool)])
        return {"n_self": int(ok.numel()),
                "self_wrong_frac": float((~ok).float().mean()) if ok.numel() else None,
                "auroc_self": auroc(cat["h"], ok) if ok.numel() else None,
                "auroc_random": auroc(torch.cat([clean, rnd]), lab) if lab.numel() else None}

    def compute(self) -> dict[str, Optional[float]]:
        h = {s: torch.cat(v) if v else torch.empty(0) for s, v in self._h.items()}
        y_m = torch.cat(self._y_masked) if self._y_masked else torch.empty(0)
        ok_m = torch.cat(self._ok_masked) if self._ok_masked else torch.empty(0, dtype=torch.bool)
        out: dict[str, Optional[float]] = {}
        for s in SETS:
            out[f"n_{s}"] = int(h[s].numel())
            out[f"ups_mean_{s}"] = float(torch.sigmoid(h[s]).mean()) if h[s].numel() else None
        out["ups_acc_clean"] = float((h["clean"] >= 0).float().mean()) if h["clean"].numel() else None
        out["ups_acc_incorrect"] = float((h["incorrect"] < 0).float().mean()) if h["incorrect"].numel() else None
        out["ups_acc_masked"] = (float(((h["masked"] >= 0) == (y_m >= 0.5)).float().mean())
                                 if h["masked"].numel() else None)
        un = torch.cat([h["clean"], h["incorrect"]])
        lab = torch.cat([torch.ones(h["clean"].numel(), dtype=torch.bool),
                         torch.zeros(h["incorrect"].numel(), dtype=torch.bool)])
        out["auroc_unmasked"] = auroc(un, lab) if un.numel() else None
        out["auroc_masked"] = auroc(h["masked"], ok_m) if h["masked"].numel() else None
        out["tps_acc_masked"] = float(ok_m.float().mean()) if ok_m.numel() else None
        if self._self is not None:
            out.update(self._self_metrics())
        self.reset()
        return out
