"""One inference session: what every script that decodes needs, resolved once and loaded once.

infer_compare, eval_gsm_math, the lm-eval adapter and Remask RL's rollouts all go through here:

1. :func:`open_session` (cheap, no weights): resolve the model folder (hub id or local), read config.json,
   the UPS checkpoint's metadata (not its tensors) and the LoRA folder's adapter_config, the tokenizer and
   its special ids; pick the embedded model's own UPS when none is given; apply the model folder's
   ``defaults.json`` to the sampling flags the user did not give, then validate them; decide the chat rule.
2. :meth:`Session.load`: read the backbone, merge the LoRA, attach the UPS — each file read once.
3. :meth:`Session.generate`: decode with one random stream per item, derived from (seed, item id) by
   :func:`item_generator`, so the same ``--seed`` samples the same text in every script, at any batch size
   and on any number of GPUs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from remedi.decoding.args import SamplingArgs
from remedi.decoding.sampler import STRATEGIES, Generation, SamplerConfig, generate
from remedi.model.config import LLaDAConfig
from remedi.model.loading import (EMBEDDED_MODEL, SpecialIds, default_chat, encode_prompt, load_model, load_tokenizer,
                                  preflight, resolve_special_ids)

log = logging.getLogger(__name__)

EMBEDDED_UPS_NAME = "ups_residual.pt"  # the best policy measured (README "A residual UPS anchored on entropy")
EMBEDDED_UPS_FALLBACK = "ups_head.pt"  # a freshly rebuilt folder has no residual until its search has run


def item_seed(seed: int, item_id: str) -> int:
    """A 63-bit seed from (run seed, item id): stable across processes, batch sizes and GPU counts."""
    digest = hashlib.sha256(f"{int(seed)}\x00{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def item_generator(seed: int, item_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one item (a CPU generator by default, so the draw does not depend on the GPU)."""
    return torch.Generator(device=device).manual_seed(item_seed(seed, str(item_id)))


def is_embedded(model_name: str) -> bool:
    return Path(model_name).expanduser().resolve() == EMBEDDED_MODEL.resolve()


def default_ups_head(model_name: str) -> Optional[str]:
    """The embedded model's own UPS checkpoint, when the embedded model is used and ships one: the residual
    policy, or the UPS head in a rebuilt folder that has no residual yet."""
    if not is_embedded(model_name):
        return None
    for name in (EMBEDDED_UPS_NAME, EMBEDDED_UPS_FALLBACK):
        if (EMBEDDED_MODEL / name).is_file():
            return str(EMBEDDED_MODEL / name)
    return None


def usable_sources(has_ups: bool) -> list[str]:
    """Every sampler strategy a model can decode with: all of them, ``ups`` only with a UPS."""
    return [s for s in STRATEGIES if s != "ups" or has_ups]


def parse_sources(text: Optional[str], has_ups: bool, default: Sequence[str]) -> list[str]:
    """A comma list of sampler strategies, checked (unknown names, duplicates, ups without a UPS)."""
    if text is None:
        return list(default)
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in STRATEGIES]
    if bad or not out:
        raise ValueError(f"--sources: unknown {bad or text!r} (unknown source); choose from {', '.join(STRATEGIES)}")
    if len(set(out)) != len(out):
        raise ValueError(f"--sources lists a source twice: {out}")
    if "ups" in out and not has_ups:
        raise ValueError("source 'ups' needs a UPS: pass --ups_head CHECKPOINT (or a model with a UPS stream), or "
                         "choose other --sources")
    return out


@dataclass
class Session:
    model_name: str
    model_dir: Path
    cfg: LLaDAConfig
    tokenizer: object
    ids: SpecialIds
    sampling: SamplingArgs
    chat: bool
    seed: int = 0
    ups_head: Optional[str] = None
    ups_meta: Optional[dict] = None
    lora_path: Optional[str] = None
    mask_id: Optional[int] = None
    model: Optional[torch.nn.Module] = None

    @property
    def has_ups(self) -> bool:
        return self.ups_meta is not None or bool(self.cfg.ups_taps)

    @property
    def embedded(self) -> bool:
        return is_embedded(self.model_name)

    @property
    def device(self) -> torch.device:
        if self.model is None:
            raise RuntimeError("Session.load() has not run")
        return next(self.model.parameters()).device

    def encode(self, text: str, chat: Optional[bool] = None) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.chat if chat is None else chat)

    def sampler_config(self, strategy: str, steps: Optional[int] = None, **overrides) -> SamplerConfig:
        extra = {"steps": int(steps)} if steps is not None else {}
        return self.sampling.to_sampler_config(strategy, **extra, **overrides)

    def check_prompts(self, strategies: Sequence[str], prompt_lengths: Sequence[int],
                      steps: Sequence[Optional[int]] = (None,)) -> None:
        """Every (strategy, steps) fits this model and the longest prompt: fails before any weight loads."""
        longest = max(prompt_lengths) if prompt_lengths else 0
        for src in strategies:
            for st in steps:
                self.sampler_config(src, st).validate(self.cfg.max_sequence_length, longest, self.has_ups)

    def load(self, device: Optional[str] = None, dtype: Optional[str] = None) -> "Session":
        """Read the weights once: backbone, LoRA merged, UPS attached; eval mode."""
        if self.model is None:
            self.model = load_model(self.model_dir, self.cfg, self.ups_head, self.lora_path, device, dtype)
            self.model.name_or_path = str(self.model_name)
            log.info("model %s (UPS: %s) on %s", self.model_name, self.model.ups_description, self.device)
        return self

    def generate(self, prompts: Sequence[Sequence[int]], strategy: str, item_ids: Sequence[str],
                 steps: Optional[int] = None, **overrides) -> list[Generation]:
        """Decode a batch; row i draws from item_generator(seed, item_ids[i])."""
        if self.model is None:
            raise RuntimeError("Session.load() must run before generate()")
        cfg = self.sampler_config(strategy, steps, **overrides)
        gens = [item_generator(self.seed, i) for i in item_ids]
        with torch.no_grad():
            return generate(self.model, [list(p) for p in prompts], cfg, self.ids, generators=gens)


def open_session(model_name: str, sampling: SamplingArgs, *, ups_head: Optional[str] = None,
                 lora_path: Optional[str] = None, chat: Optional[bool] = None, seed: int = 0,
                 mask_id: Optional[int] = None, default_ups: bool = True) -> Session:
    """Every cheap check and default, no weights read (see the module docstring)."""
    if ups_head is None and default_ups:
        ups_head = default_ups_head(model_name)
        if ups_head:
            log.info("using the embedded model's UPS %s", ups_head)
    model_dir, cfg, meta = preflight(model_name, ups_head, lora_path)
    sampling.resolve(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ids = resolve_special_ids(tokenizer, cfg, mask_id)
    chat = default_chat(model_name) if chat is None else chat
    return Session(str(model_name), Path(model_dir), cfg, tokenizer, ids, sampling, chat, seed, ups_head, meta,
                   lora_path, mask_id)


def fixed_settings(session: Session) -> dict:
    """The settings every result of a run shares (written beside results, checked on resume)."""
    return {"model_name": session.model_name, "ups_head": session.ups_head, "lora_path": session.lora_path,
            "seed": session.seed, **{k: v for k, v in dataclasses.asdict(session.sampling).items() if k != "steps"}}


# ------------------------------------------------------------------------------------- the notebook API
@dataclass
class Decoded:
    """What one source made of one prompt: the text, the counts, and (when recorded) the trajectory."""
    source: str
    text: str
    tokens: list
    nfe: int
    remasks: int
    seconds: float
    generation: Generation
    tokenizer: object = dataclasses.field(repr=False, default=None)

    @property
    def trajectory(self) -> Optional[list]:
        """One dict per step (see :class:`remedi.decoding.sampler.Generation`); None unless recorded."""
        return self.generation.trajectory

    def draw(self, png, html=None, title: Optional[str] = None, prompt: Optional[str] = None) -> dict:
        """The trajectory picture (and optionally the HTML page) of this decoding."""
        from remedi.decoding.trajectory import draw_trajectory

        return draw_trajectory(self.generation, self.tokenizer, png, html, title=title or f"source {self.source}",
                               prompt=prompt, answer=self.text)


class Remedi:
    """A loaded model for notebooks: load once, then text in, text out, per source (see :func:`load`)."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def sources(self) -> list[str]:
        """Every source this model can decode with (``ups`` only with a UPS)."""
        return usable_sources(self.session.has_ups)

    @property
    def tokenizer(self):
        return self.session.tokenizer

    def generate(self, text: str, sources: Optional[Sequence[str] | str] = None, *, trajectory: bool = True,
                 steps: Optional[int] = None, item_id: str = "0") -> dict[str, Decoded]:
        """Decode ``text`` with each source (default: all of :attr:`sources`); returns {source: Decoded}.

        The random stream comes from (seed, ``item_id``): prompt 0 of ``infer_compare.py --prompt TEXT`` with the
        same seed and sampling settings decodes the same tokens."""
        if not isinstance(text, str):
            raise TypeError("generate() takes one prompt string; call it once per prompt")
        names = ",".join(sources) if isinstance(sources, (list, tuple)) else sources
        chosen = parse_sources(names, self.session.has_ups, self.sources)
        prompt = self.session.encode(text)
        self.session.check_prompts(chosen, [len(prompt)], [steps])
        out = {}
        for src in chosen:
            g = self.session.generate([prompt], src, [item_id], steps, record_trajectory=trajectory)[0]
            out[src] = Decoded(src, self.tokenizer.decode(g.tokens, skip_special_tokens=True), list(g.tokens), g.nfe,
                               g.remasks, g.seconds, g, self.tokenizer)
        return out

    def __repr__(self) -> str:
        s = self.session
        return (f"Remedi({s.model_name!r}, ups={s.ups_head or ('stream' if s.cfg.ups_taps else None)!r}, "
                f"lora={s.lora_path!r}, gen_length={s.sampling.gen_length}, block_length={s.sampling.block_length}, "
                f"steps={s.sampling.steps})")


def load(model_name: Optional[str] = None, *, ups_head: Optional[str] = None, lora_path: Optional[str] = None,
         chat: Optional[bool] = None, seed: int = 0, device: Optional[str] = None, dtype: str = "auto",
         **sampling) -> Remedi:
    """Load a model once for interactive use: ``remedi.load().generate("Ann has 3 pens ...")``.

    ``model_name``: hub id or local folder (default: the embedded tiny model, with its own UPS). ``sampling``:
    any sampler flag by name (``steps=48``, ``gen_length=96``, ``cache="dual"``, ...); the model folder's
    defaults.json fills the rest, as in the scripts."""
    names = {f.name for f in dataclasses.fields(SamplingArgs)}
    unknown = sorted(set(sampling) - names)
    if unknown:
        import difflib

        close = {k: difflib.get_close_matches(k, sorted(names), n=1) for k in unknown}
        raise ValueError("remedi.load: unknown sampling setting(s) " + ", ".join(
            f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items())
            + f"; known: {', '.join(sorted(names))}")
    session = open_session(str(model_name or EMBEDDED_MODEL), SamplingArgs(**sampling), ups_head=ups_head,
                           lora_path=lora_path, chat=chat, seed=seed)
    return Remedi(session.load(device, dtype))
