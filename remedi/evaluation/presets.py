"""Published evaluation protocols for LLaDA-8B-Instruct, one name each, with the baseline they report.

A preset pins the sampler settings of a protocol (generation length, block length, steps, cache, threshold)
and records what the lm-eval command line must add (few-shot count, chat template) and the published
LLaDA-8B-Instruct numbers to compare against (the protocols published by LLaDA, Fast-dLLM and d1). Used by the
lm-eval adapter (``--model_args preset=NAME``; explicit model_args override single settings) and printable
as a table (:func:`preset_table`, ``python -m remedi.evaluation.presets``).

Every preset decodes greedily (temperature 0, no CFG) with LLaDA's low-confidence order
(``strategy=llada_low_confidence``: the published baselines); pass ``strategy=ups`` or another remask source
to compare at the same protocol. ``eos_gating`` is pinned off (the protocols compute every block; on
llada_low_confidence gating never changes the text, only the NFE and time), and ``cache=none`` except in the
cached Fast-dLLM variant, so a model folder's ``defaults.json`` cannot change a protocol.

Notes on the sources:

* LLaDA semi-AR: LLaDA's EVAL.md, block 8 for GSM8K, block 64 for MATH, steps = gen length (one token per
  step). The LLaDA protocol does not pin the few-shot count; 4-shot with lm-eval's chat template
  (``--apply_chat_template --fewshot_as_multiturn``) is how LLaDA-8B-Instruct GSM8K is commonly run; the
  ``fewshot`` column is a recommendation there, not part of the published setting.
* Fast-dLLM: lm-eval's ``gsm8k`` task, 5-shot, plain text prompts (no chat template), gen 256, block 32;
  the cached variant adds the dual KV cache (refreshed at each block's first step) and parallel threshold
  decoding at 0.9 (79.3 -> 78.5 at 8.1x throughput in the paper).
* d1 / wd1 / SPG: 0-shot with the chat template, gen 128/256/512, block 32, steps = gen / 2 (two tokens per
  step). Those papers prompt with their own reasoning system prompt and answer format, so lm-eval's
  ``gsm8k`` / ``minerva_math500`` prompts are close to, not identical with, the published setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Preset", "PRESETS", "get_preset", "preset_sampling", "preset_table"]


@dataclass(frozen=True)
class Preset:
    name: str
    protocol: str  # the paper / document the setting comes from
    settings: dict  # adapter model_args the preset pins (SamplingArgs fields and strategy)
    tasks: tuple  # lm-eval task names the baseline was measured on
    num_fewshot: Optional[int]  # what to pass as --num_fewshot (None: not pinned by the protocol)
    chat_template: bool  # whether to pass --apply_chat_template
    baseline: dict = field(default_factory=dict)  # task -> published LLaDA-8B-Instruct accuracy (percent)
    speedup: Optional[str] = None  # published throughput note
    note: str = ""

    @property
    def gen_length(self) -> int:
        return int(self.settings["gen_length"])


_GREEDY = {"strategy": "llada_low_confidence", "temperature": 0.0, "cfg_scale": 0.0, "eos_gating": False,
           "cache": "none", "threshold": None}


def _d1(gen: int, gsm: float, math: float) -> Preset:
    return Preset(f"d1_{gen}", "d1 / wd1 / SPG", {**_GREEDY, "gen_length": gen, "block_length": 32, "steps": gen // 2},
                  ("gsm8k", "minerva_math500"), 0, True, {"gsm8k": gsm, "minerva_math500": math},
                  note="their own reasoning prompt; lm-eval's task prompts differ")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("llada_gsm8k", "LLaDA semi-AR (EVAL.md)",
           {**_GREEDY, "gen_length": 256, "block_length": 8, "steps": 256}, ("gsm8k",), 4, True, {"gsm8k": 78.6},
           note="few-shot count not pinned by the protocol; 4-shot is the common choice"),
    Preset("llada_math", "LLaDA semi-AR (EVAL.md)",
           {**_GREEDY, "gen_length": 512, "block_length": 64, "steps": 512}, ("minerva_math",), 4, True,
           {"minerva_math": 42.2}, note="few-shot count not pinned by the protocol"),
    Preset("fast_dllm_gsm8k", "Fast-dLLM",
           {**_GREEDY, "gen_length": 256, "block_length": 32, "steps": 256}, ("gsm8k",), 5, False, {"gsm8k": 79.3}),
    Preset("fast_dllm_gsm8k_cached", "Fast-dLLM (dual cache + threshold 0.9)",
           {**_GREEDY, "gen_length": 256, "block_length": 32, "steps": 256, "cache": "dual", "cache_refresh": 0,
            "threshold": 0.9}, ("gsm8k",), 5, False, {"gsm8k": 78.5}, speedup="8.1x throughput vs no cache"),
    _d1(128, 69.5, 28.2),
    _d1(256, 77.2, 32.4),
    _d1(512, 79.8, 34.6),
)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[str(name)]
    except KeyError:
        raise ValueError(f"preset={name!r}: choose one of {', '.join(PRESETS)}") from None


def preset_sampling(name: Optional[str], explicit: dict) -> tuple[dict, dict]:
    """(merged settings, origin): the preset's settings overridden by the explicitly given ones.

    ``explicit`` holds only the settings the user gave; a ``None`` there (``threshold=None``) replaces the
    preset's value with "not set" (the model folder's defaults.json, then the library default). ``origin``
    says for each merged key whether it came from the preset or the user ("model_args").
    """
    given = dict(explicit)
    pinned = dict(get_preset(name).settings) if name else {}
    merged = {**pinned, **given}
    origin = {k: ("model_args" if k in given else f"preset {name}") for k in merged}
    return merged, origin


def preset_table() -> str:
    """The presets as a markdown table (settings and published LLaDA-8B-Instruct baselines)."""
    rows = ["| preset | protocol | gen | block | steps | cache / threshold | tasks (few-shot, chat) | "
            "LLaDA-8B-Instruct baseline |", "|---|---|---:|---:|---:|---|---|---|"]
    for p in PRESETS.values():
        s = p.settings
        cache = s.get("cache", "none") + (f" / {s['threshold']}" if s.get("threshold") is not None else "")
        shots = "?" if p.num_fewshot is None else str(p.num_fewshot)
        base = ", ".join(f"{t} {v}" for t, v in p.baseline.items()) + (f" ({p.speedup})" if p.speedup else "")
        rows.append(f"| {p.name} | {p.protocol} | {s['gen_length']} | {s['block_length']} | {s['steps']} | {cache} | "
                    f"{', '.join(p.tasks)} ({shots}-shot{', chat' if p.chat_template else ''}) | {base} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(preset_table())
