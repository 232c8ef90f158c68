"""Command-line arguments as typed dataclasses shared by the scripts (one source for every default).

``parse_args`` builds the parser with transformers' ``HfArgumentParser`` (argparse underneath), so the
four scripts that share model and sampling knobs cannot drift apart. Each dataclass validates itself in
``__post_init__`` and raises ``ValueError`` naming the flag and the allowed values.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from remedi.model.loading import EMBEDDED_MODEL


def arg(default=None, help: str = "", **kw):
    """A dataclass field with argparse help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArgs:
    model_name: str = arg(str(EMBEDDED_MODEL), "hub id (GSAI-ML/LLaDA-8B-Base) or local hub-layout folder; "
                          "default: the embedded tiny model")
    mask_id: Optional[int] = arg(None, "mask token id; read from the tokenizer, the flag only double-checks it")
    dtype: str = arg("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    device: Optional[str] = arg(None, "cuda, cuda:1, cpu; default: cuda if available")
    seed: int = arg(0, "random seed (per-item seeds derive from it)")


def parse_args(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None, description: str = ""):
    """Parse argv into one instance per dataclass type (unknown flags are an error)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(dataclass_types), description=description)
    return parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else sys.argv[1:])


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
