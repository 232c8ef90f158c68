"""Headroom of a token action at result digits, measured open-loop on the embedded model (issue 20).

Decode the first N test problems with entropy (exact sampler, greedy), find every false ``a op b = c`` in the
outputs, and give the backbone a second look at each: one forward of the finished output with some positions
hidden, argmax at c's digits. Three contexts are hidden in turn:

  result         c's digits only (what the slip oracle's remasking amounts to)
  result+copies  c's digits and every later copy of c in the output (the numbers that repeat the slip)
  result+after   c's digits and everything after them (only the left context stays)

Reported per context: the share of false equations whose second look is the true result ("fixed"), and among
those whose true result has as many digits as c, the share where every true digit is in the backbone's top 2
at its position ("top-2"). Gold-free: only the arithmetic of the output's own equations is checked.

  python scripts/slip_probe.py --n_items 200 --out runs/slip_probe.json
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remedi.arguments import arg, parse_args, run_main, setup_logging  # noqa: E402
from remedi.files import check_writable, write_json_atomic  # noqa: E402

CONTEXTS = ("result", "result+copies", "result+after")


@dataclass
class ProbeArgs:
    n_items: int = arg(200, "first test items to decode with entropy")
    steps: int = arg(48, "denoising steps (gen 96, block 32, exact sampler, as in results/embedded/round3)")
    batch_size: int = arg(200, "problems per decode batch")
    out: Optional[str] = arg(None, "write the counts here as JSON")
    device: Optional[str] = arg(None, "cuda or cpu (default: cuda if available)")

    def __post_init__(self):
        if self.n_items < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("--n_items, --batch_size and --steps must be >= 1")
        if self.out:
            check_writable(self.out, "--out")  # before the decoding, not after it


def true_result(a: str, op: str, b: str) -> Optional[str]:
    """The value of ``a op b`` as a digit string, or None when it is not a non-negative integer."""
    from remedi.policy.slip import equation_value

    v = equation_value(a, op, b)
    return str(v.numerator) if v is not None and v >= 0 and v.denominator == 1 else None


def hidden_positions(slip, context: str, length: int) -> list[int]:
    if context == "result":
        return slip.result
    if context == "result+copies":
        return slip.result + slip.copies
    return list(range(slip.result[0], length))


def probe(session, prompts: list[list[int]], gens, pieces: list[str], digit_id: dict) -> dict:
    """Counts per context over every false equation of ``gens`` (see the module docstring)."""
    from remedi.policy.slip import find_slips

    ids, G = session.ids, session.sampling.gen_length
    counts = {c: {"fixed": 0, "top2": 0, "same_length": 0} for c in CONTEXTS}
    n = 0
    for prompt, g in zip(prompts, gens):
        toks = list(g.tokens) + [ids.eos] * (G - len(g.tokens))
        for slip in find_slips([pieces[t] for t in g.tokens]):
            n += 1
            want = true_result(slip.a, slip.op, slip.b)
            for c in CONTEXTS:
                x = torch.tensor([list(prompt) + toks], device=next(session.model.parameters()).device)
                x[0, [len(prompt) + q for q in hidden_positions(slip, c, G)]] = ids.mask
                logits = session.model(x).logits[0, len(prompt):].float()
                logits[:, ids.mask] = -torch.inf
                got = "".join(pieces[t] for t in logits[slip.result].argmax(-1).tolist())
                counts[c]["fixed"] += int(got == want)
                if want is not None and len(want) == len(slip.result):
                    counts[c]["same_length"] += 1
                    rank = [int((logits[q] > logits[q, digit_id[ch]]).sum()) for q, ch in zip(slip.result, want)]
                    counts[c]["top2"] += int(max(rank) < 2)
    return {"false_equations": n, "contexts": counts}


def main(argv=None) -> dict:
    (a,) = parse_args([ProbeArgs], argv, description=__doc__)
    setup_logging()
    from remedi.decoding.args import SamplingArgs
    from remedi.evaluation import data as D
    from remedi.model.loading import EMBEDDED_MODEL
    from remedi.session import open_session

    session = open_session(str(EMBEDDED_MODEL), SamplingArgs(steps=a.steps, gen_length=96, block_length=32,
                                                             temperature=0.0, cache="none", eos_gating=False))
    spec = D.resolve_dataset(None, None, "test", None)
    items, _ = D.select_items(D.load_items(spec), 0, a.n_items, False, 0)
    style = D.prompt_style(spec, session.chat)
    prompts = [D.encode(session.tokenizer, D.build_prompt(it.question, spec.fmt, style), style)[0] for it in items]
    session.load(a.device, "fp32")
    tok = session.tokenizer
    pieces = [tok.decode([i]) for i in range(session.model.config.vocab_size)]
    digit_id = {d: tok.convert_tokens_to_ids(d) for d in "0123456789"}
    total = {"items": len(items), "steps": a.steps, "false_equations": 0,
             "contexts": {c: {"fixed": 0, "top2": 0, "same_length": 0} for c in CONTEXTS}}
    with torch.no_grad():
        for i in range(0, len(items), a.batch_size):
            sub = items[i:i + a.batch_size]
            gens = session.generate(prompts[i:i + a.batch_size], "entropy", [it.id for it in sub], a.steps)
            part = probe(session, prompts[i:i + a.batch_size], gens, pieces, digit_id)
            total["false_equations"] += part["false_equations"]
            for c in CONTEXTS:
                for k, v in part["contexts"][c].items():
                    total["contexts"][c][k] += v
    n = max(total["false_equations"], 1)
    print(f"{total['false_equations']} false equations in {len(items)} items (entropy, {a.steps} steps)")
    for c, v in total["contexts"].items():
        print(f"  hide {c:<14} fixed {v['fixed']:>4} ({v['fixed'] / n:.1%})   true digits in top 2: "
              f"{v['top2']} of {v['same_length']} with the same length")
    if a.out:
        write_json_atomic(Path(a.out), total)
    return total


if __name__ == "__main__":
    run_main(main)
