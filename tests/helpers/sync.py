"""Host-synchronisation spies for the static decoder tests (graph and residual-UPS tests)."""
import pytest
import torch


def _has_bool_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncSpy:
    """Counts every Python-level way a tensor's value reaches the host (each is a device sync on CUDA):
    item/tolist/cpu/numpy, bool/int/float/index conversions, nonzero, boolean-mask indexing, and
    torch.tensor (a host-to-device copy when the target is a GPU)."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self, monkeypatch):
        self.count, self.names = 0, []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name))
        for name in ("__getitem__", "__setitem__"):
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name), name, _has_bool_index))
        monkeypatch.setattr(torch, "nonzero", self._counting(torch.nonzero, "torch.nonzero"))
        monkeypatch.setattr(torch, "tensor", self._counting(torch.tensor, "torch.tensor"))

    def _counting(self, fn, name, when=None):
        def wrapper(*args, **kwargs):
            if when is None or when(args[1]):
                self.count += 1
                self.names.append(name)
            return fn(*args, **kwargs)
        return wrapper


def _watch(monkeypatch, cls, spy):
    """Record (event, block, spy count) around each step, still_running and end_block of ``cls``."""
    events = []
    for name in ("step", "still_running", "end_block"):
        orig = getattr(cls, name)

        def wrapped(self, *a, _orig=orig, _name=name, **kw):
            events.append((_name, self.lo, spy.count))
            out = _orig(self, *a, **kw)
            events.append((_name + " done", self.lo, spy.count))
            return out
        monkeypatch.setattr(cls, name, wrapped)
    return events


def _per_block(events):
    """{block start: (syncs from its first step to end_block, syncs inside end_block, steps, still_running)}."""
    out = {}
    for ev, lo, c in events:
        first, end, ended, steps, polls = out.get(lo, (None, None, None, 0, 0))
        if ev == "step" and first is None:
            first = c
        steps += ev == "step"
        polls += ev == "still_running"
        if ev == "end_block":
            end = c
        if ev == "end_block done":
            ended = c
        out[lo] = (first, end, ended, steps, polls)
    return {lo: (end - first, ended - end, steps, polls) for lo, (first, end, ended, steps, polls) in out.items()}


def assert_static_equals_eager_without_host_reads(model, cfg):
    """Decode the tiny test prompts eagerly and with the static decoder (built once outside the spy, then run
    under it): the same tokens and remask counts, and no host read from a block's first step to its end (what
    CUDA-graph capture needs)."""
    import dataclasses

    from remedi.decoding.graphs import StaticDecoder
    from remedi.decoding.sampler import generate
    from tests.helpers.sampler import IDS, PROMPTS, _gens

    want = generate(model, PROMPTS, cfg, IDS, _gens(3))
    static = dataclasses.replace(cfg, graphs=True)
    generate(model, PROMPTS, static, IDS, _gens(3))  # the decoder is built outside the spy
    with pytest.MonkeyPatch.context() as mp:
        spy = SyncSpy(mp)
        events = _watch(mp, StaticDecoder, spy)
        got = generate(model, PROMPTS, static, IDS, _gens(3))
    assert [x.tokens for x in got] == [x.tokens for x in want]
    assert [x.remasks_per_block for x in got] == [x.remasks_per_block for x in want]
    blocks = _per_block(events)
    assert blocks and all(inside == 0 for inside, *_ in blocks.values()), (blocks, spy.names)
