"""A residual UPS: score = anchor + g_theta(features), a remask policy that starts as the best heuristic.

The anchor is a training-free TPS statistic computed exactly as the sampler computes it
(:func:`remedi.model.scores.position_scores` on the prepared logits, float64): ``entropy`` by default
(minus the entropy; the best heuristic on the embedded model), or ``tps_prob`` / ``margin``, or ``none``.
g reads the step's features (:mod:`remedi.model.features`) -- no extra forward: the logits and tokens
are the sampler's, and the base UPS logit and the block's hidden states come out of the same model call
(:meth:`ResidualUPS.model_features` projects the hidden states). g's output layer starts at zero, so a fresh residual policy
makes exactly its anchor's decisions, token for token; training can only move it away from the heuristic
where that helps.

g is ``linear`` (one weight per feature column and a bias: the few weights the derivative-free stage
in :mod:`remedi.policy.search` optimises) or ``attention``: the features projected to ``attn_dim``, one
self-attention layer over the block's positions (block context), and a zero-initialised output.

``unmask_only``: visible positions always stay (score +inf), so the policy only orders the masked ones:
the "unmask-only twin" of a policy, which isolates what its remasking is worth.

``hide_threshold`` (optional; None, the default, is off and decides exactly as before): a learned count of
extra hidden positions. After the fixed schedule keeps the K_n best positions of a step, any kept position
whose residual score (anchor + g, before the sampler's EOS/EOT -inf rule) is below the threshold tau is hidden
anyway, so K_n minus that count stay visible: a state-dependent count instead of the fixed K_n. A step whose
schedule keeps the whole block (K_n = block length: always the block's last step, and with more steps than
positions also the surplus steps before it) hides nothing, so every block still ends fully decoded.
:meth:`ResidualUPS.hide_below_threshold` gives the mask, pure tensor code reading tau in place (one CUDA-graph
capture serves every tau); :func:`remedi.decoding.step.decide` applies it. Remask RL refuses such a policy (the
threshold is no Plackett-Luce action: :func:`remedi.decoding.step.policy_decide`). The search (``--learn_hide`` of
:mod:`remedi.policy.search`) sets tau from one extra searched number theta through
:meth:`ResidualUPS.threshold_at` (tau = U - (U - L + 1) exp(-7 theta), [L, U] the anchor's score range;
theta = 0 is below every score the anchor gives, i.e. off in effect).

How it plugs in: :class:`~remedi.model.llada.RemeDiLM` carries the policy as ``ups_policy`` (its forward is
unchanged: ``ups_logits`` stay the base UPS's (B, L)); the decoders (eager and static/CUDA graph) pass it as
``scorer`` to :func:`remedi.decoding.step.decide` for the ``ups`` source, which ranks by :meth:`ResidualUPS.score`
(the step's logits, tokens, base UPS logits and the block's hidden states) instead of ``position_scores``;
Remask RL rollouts pass it to :func:`~remedi.decoding.step.policy_decide`, whose Plackett-Luce / top-k
scores are then the residual score, recording the features so :mod:`remedi.rl.loss` rescores with g's
current weights. ``RemeDiLM.ups_modules()`` is the residual, so RL trains g (the base UPS stays fixed).
save_ups / load_ups store it beside the base UPS (head or stream): the metadata says ``kind: residual`` and
``residual: {...}`` (:meth:`ResidualUPS.spec`; ``hide_threshold: true`` when tau is on), the tensors are
``ups_policy.*`` (tau is ``ups_policy.hide_tau``, absent when off, so files older than it load as before);
:func:`remedi.model.checkpoint.build_residual` rebuilds and checks it from a file.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from remedi.model.features import check_feature_names, feature_width, step_features, token_types
from remedi.model.scores import position_scores

ANCHORS = ("entropy", "tps_prob", "margin", "none")
G_KINDS = ("linear", "attention")
DEFAULT_FEATURES = ("entropy", "margin", "logp_tok", "logp_max", "masked", "pos", "progress", "digit", "operator",
                    "result_digit", "base")
# The search's map theta -> tau (ResidualUPS.threshold_at): tau = U - (U - L + HIDE_MARGIN) exp(-HIDE_RATE theta).
# theta = 0 puts tau HIDE_MARGIN below the anchor's lowest score (entropy: -log V - 1 = -7.85): off in effect. The
# map is logarithmic in the distance to the top of the range because the scores that matter crowd there: on the
# embedded model (32 test items, 48 steps, entropy) the kept positions of non-final steps have entropy median 0,
# 99th percentile 0.68 nats, max 3.9, against log V = 6.85. With rate 7, theta = 0.3 (one sigma0 of the search)
# gives tau = -0.96 (hides kept positions above 0.96 nats: under 1% of them), 0.6 gives -0.12 and 0.9 gives -0.014.
# A linear map tau = -7.85 (1 - theta) would hide nothing below theta 0.5 and only the top 1% below theta 0.91:
# a flat start that gives CMA-ES no signal for several generations.
HIDE_RATE = 7.0
HIDE_MARGIN = 1.0


class ResidualUPS(nn.Module):
    """score = anchor(logits, tokens) + g(features); see the module docstring."""

    def __init__(self, d_model: int, type_table: torch.Tensor, anchor: str = "entropy",
                 features: Sequence[str] = DEFAULT_FEATURES, hidden_rank: int = 0, g: str = "linear",
                 attn_dim: int = 8, unmask_only: bool = False, seed: int = 0,
                 hide_threshold: Optional[float] = None):
        super().__init__()
        if anchor not in ANCHORS:
            raise ValueError(f"residual anchor {anchor!r}: choose one of {', '.join(ANCHORS)}")
        if g not in G_KINDS:
            raise ValueError(f"residual g {g!r}: choose one of {', '.join(G_KINDS)}")
        features = tuple(features)
        check_feature_names(features, hidden_rank)
        self.d_model, self.anchor, self.features, self.hidden_rank = d_model, anchor, features, hidden_rank
        self.g, self.attn_dim, self.unmask_only, self.seed = g, attn_dim, bool(unmask_only), seed
        F = feature_width(features, hidden_rank)
        self.register_buffer("type_table", type_table.to(torch.uint8).clone())
        gen = torch.Generator().manual_seed(seed)
        # A fixed random projection: the hidden state's first `hidden_rank` random directions (norm ~1).
        self.register_buffer("hidden_proj", torch.randn(d_model, hidden_rank, generator=gen) / math.sqrt(d_model))
        self.weight = nn.Parameter(torch.zeros(F))  # the linear residual: zero = the anchor
        self.bias = nn.Parameter(torch.zeros(()))
        if g == "attention":
            a = attn_dim
            self.inp = nn.Parameter(torch.randn(F, a, generator=gen) / math.sqrt(F))
            self.qk = nn.Parameter(torch.randn(2, a, a, generator=gen) / math.sqrt(a))
            self.out = nn.Parameter(torch.zeros(a))  # zero output layer: the block context starts silent
        # tau of the learned count (module docstring); a None buffer is not in the state dict, so a file without
        # a threshold has no ups_policy.hide_tau and an old file loads exactly as before
        self.register_buffer("hide_tau", None if hide_threshold is None else
                             torch.tensor(float(hide_threshold), dtype=torch.float64))

    # ------------------------------------------------------------------------------- description / weights
    def spec(self) -> dict[str, Any]:
        """What rebuilds this policy (stored in the UPS file's metadata as ``residual``)."""
        return {"anchor": self.anchor, "features": list(self.features), "hidden_rank": self.hidden_rank,
                "g": self.g, "attn_dim": self.attn_dim, "unmask_only": self.unmask_only, "seed": self.seed,
                "hide_threshold": self.hide_tau is not None,
                "d_model": self.d_model, "vocab_size": int(self.type_table.numel()),
                "feature_columns": self.feature_columns()}

    def feature_columns(self) -> list[str]:
        """One name per feature column (the hidden projection has ``hidden_rank`` of them)."""
        cols = []
        for n in self.features:
            cols += [f"hidden{j}" for j in range(self.hidden_rank)] if n == "hidden" else [n]
        return cols

    def linear_weights(self) -> torch.Tensor:
        """(F + 1,) float64: the linear weights, then the bias (what the derivative-free stage searches)."""
        return torch.cat([self.weight.detach().double().cpu(), self.bias.detach().double().cpu()[None]])

    @torch.no_grad()
    def set_linear_weights(self, w: Sequence[float] | torch.Tensor) -> "ResidualUPS":
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1)
        if w.numel() != self.weight.numel() + 1:
            raise ValueError(f"{w.numel()} weights for a linear residual of {self.weight.numel()} features + bias")
        self.weight.copy_(w[:-1].to(self.weight))
        self.bias.copy_(w[-1].to(self.bias))
        return self

    # ------------------------------------------------------------------------------- the learned count
    def score_range(self) -> tuple[float, float]:
        """[L, U]: the scores the anchor alone can give (g = 0): -entropy in [-log V, 0], a probability or margin
        in [0, 1], ``none`` exactly 0."""
        if self.anchor == "entropy":
            return -math.log(self.type_table.numel()), 0.0
        return (0.0, 1.0) if self.anchor in ("tps_prob", "margin") else (0.0, 0.0)

    def threshold_at(self, theta: float) -> float:
        """tau for the search's coordinate theta: U - (U - L + HIDE_MARGIN) exp(-HIDE_RATE theta) (constants above).
        theta = 0 is HIDE_MARGIN below every anchor score (off in effect while g is zero); tau rises towards U."""
        lo, hi = self.score_range()
        return hi - (hi - lo + HIDE_MARGIN) * math.exp(-HIDE_RATE * float(theta))

    def search_columns(self) -> list[str]:
        """Names of what the derivative-free stage searches: the feature columns, the bias, and ``hide_theta`` when
        the policy has a hide threshold."""
        return self.feature_columns() + ["bias"] + (["hide_theta"] if self.hide_tau is not None else [])

    @torch.no_grad()
    def set_search_point(self, v: Sequence[float] | torch.Tensor) -> "ResidualUPS":
        """Set the linear weights and bias and, with a hide threshold, tau = :meth:`threshold_at` (the last value,
        theta), in place (a captured static step reads them where they are)."""
        v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
        n = len(self.search_columns())
        if v.numel() != n:
            raise ValueError(f"{v.numel()} values for a search point of {n} ({', '.join(self.search_columns())})")
        if self.hide_tau is not None:
            self.hide_tau.fill_(self.threshold_at(float(v[-1])))
            v = v[:-1]
        return self.set_linear_weights(v)

    def hide_below_threshold(self, score: torch.Tensor, keep: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, Lb) bool: kept positions to hide anyway (score below tau), or None without a hide threshold.

        score (B, Lb) this policy's :meth:`score`; keep (B,) K_n. Nothing is hidden where K_n covers the block
        (K_n = Lb: the block's last step), so a block still ends fully visible. Pure tensor code (no host sync)."""
        if self.hide_tau is None:
            return None
        below = score < self.hide_tau.to(score.dtype)
        return below & (keep < score.shape[-1])[:, None]

    # ------------------------------------------------------------------------------- scoring
    def step_inputs(self, logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, keep: torch.Tensor,
                    ups: Optional[torch.Tensor], hidden: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, Lb, F), anchor (B, Lb)), float64: what the score is computed from at one step.

        logits (B, Lb, V) prepared; tokens (B, Lb) candidate or current token; masked (B, Lb); keep (B,) K_n;
        ups (B, Lb) the base UPS logits (None: 0); hidden (B, Lb, d) the block's final hidden states (read
        only with the ``hidden`` feature). Pure tensor code (no host sync): the static decoder captures it.
        """
        feats = step_features(self.features, logits, tokens, masked, keep, self.type_table,
                              self.model_features(ups, hidden, tokens), self.hidden_rank)
        anchor = position_scores(self.anchor, logits, tokens, None, None) if self.anchor != "none" else \
            torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device)
        return feats, anchor

    def model_features(self, ups: Optional[torch.Tensor], hidden: Optional[torch.Tensor],
                       tokens: torch.Tensor) -> torch.Tensor:
        """(B, Lb, 1 + hidden_rank) float64: the base UPS logit (0 without a base UPS), then the hidden
        state's fixed random projection (detached: g never trains the backbone)."""
        base = ups.double() if ups is not None else torch.zeros(tokens.shape, dtype=torch.float64,
                                                                device=tokens.device)
        cols = [base[..., None]]
        if self.hidden_rank:
            if hidden is None:
                raise ValueError("a residual UPS with the 'hidden' feature needs the block's hidden states")
            cols.append(hidden.detach().double() @ self.hidden_proj.double())  # (B, Lb, r)
        return torch.cat(cols, -1)

    def residual(self, feats: torch.Tensor) -> torch.Tensor:
        """g(features): (B, Lb, F) float64 -> (B, Lb) float64."""
        out = feats @ self.weight.double() + self.bias.double()
        if self.g == "attention":
            h = feats @ self.inp.double()  # (B, Lb, a)
            q, k = h @ self.qk[0].double(), h @ self.qk[1].double()
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attn_dim), -1)  # (B, Lb, Lb)
            out = out + (h + att @ h) @ self.out.double()
        return out

    def score_from(self, feats: torch.Tensor, anchor: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """anchor + g(features), (..., Lb) float64; +inf at visible positions with ``unmask_only``. Any
        leading dims (a rollout's recorded (N, nb, Lb, F) features too); differentiable in g's weights."""
        score = anchor + self.residual(feats)
        if self.unmask_only:
            score = torch.where(masked, score, torch.full_like(score, torch.inf))
        return score

    def score(self, logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor, keep: torch.Tensor,
              ups: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Lb) float64: the anchor plus g, as the sampler ranks them (the scorer interface of
        :func:`remedi.decoding.step.decide`)."""
        feats, anchor = self.step_inputs(logits, tokens, masked, keep, ups, hidden)
        return self.score_from(feats, anchor, masked)


# ------------------------------------------------------------------------------------------- files
def new_residual(model, tokenizer, **kw) -> ResidualUPS:
    """A fresh (zero) residual policy for ``model``'s shapes, with the tokenizer's token-type table."""
    cfg = model.config
    ref = next(model.parameters())
    return ResidualUPS(cfg.d_model, token_types(tokenizer, cfg.vocab_size), **kw).to(ref.device)


def attach_policy(model, policy: Optional[nn.Module]) -> None:
    """Put ``policy`` (a :class:`ResidualUPS`, a :class:`remedi.policy.slip.SlipOracle`, or None) on the model."""
    if policy is not None:
        policy.to(next(model.parameters()).device)
    model.ups_policy = policy

