"""The sampler tests' tiny models, prompts, grids and spies (shared by the sampler, fast-decoding, graph and
infer_compare tests and conftest's fixtures)."""
from __future__ import annotations

import torch

from remedi.decoding.sampler import SamplerConfig
from remedi.model.checkpoint import add_stream
from remedi.model.config import get_config
from remedi.model.llada import ModelOutput, RemeDiLM, UPSHead, init_weights
from remedi.model.loading import SpecialIds


CFG = get_config("test-tiny")


IDS = SpecialIds(mask=CFG.mask_token_id, eos=CFG.eos_token_id, pad=CFG.pad_token_id, eot=CFG.vocab_size - 3, bos=None)


PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15, 16, 23, 42, 1]]


# (gen_length, block_length, steps, temperature, cfg_scale, logits_eos_inf, confidence_eos_eot_inf)
GRID = [
    (16, 16, 8, 0.0, 0.0, False, False),
    (16, 8, 8, 0.7, 0.0, False, True),
    (12, 4, 6, 0.0, 1.5, True, False),
    (8, 4, 12, 1.0, 0.5, False, True),  # 6 steps per block of 4: surplus steps commit nothing
]


def _model(seed=0, eos_boost=3.0) -> RemeDiLM:
    """Tiny model with a UPS head; EOS/EOT logits amplified so that they actually get predicted."""
    m = RemeDiLM(CFG)
    init_weights(m, std=0.2, generator=torch.Generator().manual_seed(seed))
    head = UPSHead(CFG.d_model, 8)
    init_weights(head, std=0.5, generator=torch.Generator().manual_seed(seed + 1))
    m.attach_head(head)
    with torch.no_grad():
        m.model.transformer.ff_out.weight[IDS.eos] *= eos_boost
        m.model.transformer.ff_out.weight[IDS.eot] *= eos_boost
    return m.eval()


def _stream_model(seed=3) -> RemeDiLM:
    """The tiny model with a stream UPS (taps 0 and 2) instead of the head, its linears made non-trivial."""
    m = _model(seed=seed)
    m.ups_head = None
    add_stream(m, (0, 2))
    with torch.no_grad():
        for lin in m.model.backprop_linears:
            lin.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return m.eval()


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed * 100 + i) for i in range(n)]


def _scfg(strategy, g, **kw):
    G, Lb, S, T, c, lei, ceei = g
    return SamplerConfig(strategy=strategy, steps=S, gen_length=G, block_length=Lb, temperature=T, cfg_scale=c,
                         logits_eos_inf=lei, confidence_eos_eot_inf=ceei, **kw)


# -------------------------------------------------------------------------------------- invariants
class Spy(torch.nn.Module):
    """Records every forward's input so the tests can check what the sampler fed the model."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    config = property(lambda self: self.inner.config)
    ups_arch = property(lambda self: self.inner.ups_arch)

    def record(self, input_ids, attention_mask, kw):
        return input_ids.clone(), None if attention_mask is None else attention_mask.clone()

    def forward(self, input_ids, attention_mask=None, **kw):
        self.calls.append(self.record(input_ids, attention_mask, kw))
        return self.inner(input_ids, attention_mask, **kw)


# --------------------------------------------------------------------------- a case made to remask
class FakeModel(torch.nn.Module):
    """Vocabulary of 8; the first step confidently predicts a wrong token W at generated position 0.

    Once W sits there, the TPS puts little mass on it and the UPS scores it low; a remask strategy must
    take it back and later fill in the right token, while LLaDA's unmask-only decoding keeps it.
    """

    V, MASK, EOS, W = 8, 7, 6, 5
    RIGHT = [1, 2, 3, 4]

    def __init__(self, P):
        super().__init__()
        self.P = P
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = get_config("test-tiny", vocab_size=8, embedding_size=8, mask_token_id=7, eos_token_id=6,
                                 pad_token_id=6)
        self.ups_arch = "head"

    FILL, VISIBLE = -8.0, 2.0  # logit of every other token; logit of the right token where one is visible

    def masked_scores(self, fresh: bool, j: int, right: int):
        """(predicted token, its logit, UPS logit) at masked generated position j."""
        pred = self.W if (fresh and j == 0) else right
        return pred, (2.2 if pred == self.W else 0.5), 0.0

    def forward(self, input_ids, attention_mask=None, *, out_slice=None, **kw):
        B, T = input_ids.shape
        logp = torch.full((B, T, self.V), self.FILL)
        ups = torch.zeros(B, T)
        for b in range(B):
            gen = input_ids[b, self.P:].tolist()
            fresh = all(t == self.MASK for t in gen)
            for j, t in enumerate(gen):
                i, right = self.P + j, self.RIGHT[j]
                if t == self.MASK:
                    pred, logit, ups[b, i] = self.masked_scores(fresh, j, right)
                    logp[b, i, pred] = logit
                    logp[b, i, (pred + 1) % 5] = 0.0
                else:
                    logp[b, i, right] = self.VISIBLE
                    ups[b, i] = 5.0 if t == right else -5.0
        sl = out_slice or slice(None)
        return ModelOutput(logits=logp[:, sl], hidden=torch.zeros(B, T, 1)[:, sl], ups_logits=ups[:, sl])


# (gen_length, block_length, temperature, cfg_scale, confidence_eos_eot_inf, eos_gating, threshold, remask_threshold)
TGRID = [
    (16, 8, 0.0, 0.0, False, False, 0.3, None),
    (16, 8, 0.0, 0.0, False, True, 0.5, 0.2),
    (12, 4, 0.8, 0.0, True, False, 0.2, 0.2),
    (12, 4, 0.0, 1.0, False, True, 0.4, 0.1),
    (16, 16, 1.0, 0.0, False, False, 0.05, 0.04),
]


def _tcfg(strategy, t, **kw):
    G, Lb, T, c, ceei, gate, thr, rthr = t
    return SamplerConfig(strategy=strategy, gen_length=G, block_length=Lb, temperature=T, cfg_scale=c,
                         confidence_eos_eot_inf=ceei, eos_gating=gate, threshold=thr, remask_threshold=rthr, **kw)
