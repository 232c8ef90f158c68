"""Command-line arguments as typed dataclasses shared by the scripts (one source for every default).

``parse_args`` builds the parser with transformers' ``HfArgumentParser`` (argparse underneath), so the
scripts that share model and sampling knobs cannot drift apart. Each dataclass validates what it can
alone in ``__post_init__`` and raises ``ValueError`` naming the flag and the allowed values.

A field whose value a model folder may supply (``defaults.json``) defaults to ``None``: the flag was not
given. :func:`fill_defaults` later fills such fields from the model folder, then from the library
default, and logs where each value came from; validation that depends on those values runs after it.
No script re-reads ``sys.argv`` to learn what the user typed.

``--config FILE`` (YAML or JSON, one mapping of flag name -> value) works for every script that parses here:
the file's values become the parser's defaults, so a flag on the command line beats the file. A training
run's own ``args.json`` is such a file (its bookkeeping keys are skipped), so ``--config runs/x/args.json``
replays the run. A key that is no flag of the script is an error naming the closest flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from remedi.model.loading import EMBEDDED_MODEL

log = logging.getLogger(__name__)

def arg(default=None, help: str = "", **kw):
    """A dataclass field with argparse help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def model_arg(library_default, help: str, **kw):
    """A field a model folder's defaults.json may set: None on the command line means "not given"."""
    shown = f"{help} (default: the model folder's defaults.json, else {library_default})"
    return field(default=None, metadata={"help": shown, **kw})


@dataclass
class ModelArgs:
    model_name: str = arg(str(EMBEDDED_MODEL), "hub id (GSAI-ML/LLaDA-8B-Base) or local hub-layout folder; "
                          "default: the embedded tiny model")
    mask_id: Optional[int] = arg(None, "mask token id; read from the tokenizer, the flag only double-checks it")
    dtype: str = arg("auto", "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    device: Optional[str] = arg(None, "cuda, cuda:1, cpu; default: cuda if available")
    seed: int = arg(0, "random seed (per-item seeds derive from it and the item id)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example commands of a script's docstring as written; shows a default once, when it says
    something (never "(default: None)"); fields filled from a model folder say so in their help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS, False) or action.option_strings == []:
            return text
        return f"{text} (default: {action.default})"


def _parser(dataclass_types: Sequence[type], description: str):
    """transformers' ``HfArgumentParser`` (argparse underneath) with two changes: a flag is never matched by a
    prefix (``--lr`` is not ``--lr_lora``, and is not ambiguous either: it is unknown), and a parse error is a
    ``ValueError``, which :func:`run_main` prints as one line instead of the whole usage."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):
            raise ValueError(f"{message} (see --help)")

    parser = Parser(list(dataclass_types), description=description, formatter_class=HelpFormatter,
                    allow_abbrev=False)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML or JSON file of flag values (e.g. a run's args.json, or configs/*.yaml); flags "
                             "given on the command line override it")
    return parser


RECORD_KEYS = ("script", "versions", "resolved_from")
"""Keys of a run's args.json that are bookkeeping, not flags: skipped when it is read back with --config."""


def _split_config(args: list[str]) -> tuple[Optional[str], list[str]]:
    """Take ``--config FILE`` / ``--config=FILE`` out of ``args``."""
    path, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--config" or a.startswith("--config="):
            if path is not None:
                raise ValueError("--config is given twice; pass one file (flags on the command line override it)")
            if a == "--config":
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ValueError("--config needs a file: --config run.yaml (or a run's args.json)")
                path, i = args[i + 1], i + 2
                continue
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def read_config(path: str | os.PathLike) -> dict:
    """A --config file as a dict: ``.json`` as JSON, anything else as YAML (which also reads JSON)."""
    import json

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--config {path} does not exist; give a .yaml or .json file of flag values")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # the parser's message, on one line
        raise ValueError(f"--config {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of flag name -> value, got a {type(data).__name__}")
    return {str(k).lstrip("-"): v for k, v in data.items() if str(k) not in RECORD_KEYS}


def _apply_config(parser, path: str, unknown_hint=None) -> None:
    """Make the file's values the parser's defaults (so command-line flags still win)."""
    import difflib

    values = read_config(path)
    dests = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    for key in values:
        if key not in dests:
            hint = unknown_hint([f"--{key}"]) if unknown_hint else None
            close = difflib.get_close_matches(key, list(dests), n=1, cutoff=0.5)
            where = f"; {hint}" if hint else (f"; did you mean --{close[0]}?" if close else "")
            raise ValueError(f"--config {path}: unknown key {key!r} (no flag --{key} in this script){where}")
    parser.set_defaults(**values)


def _did_you_mean(parser, flags: Sequence[str]) -> str:
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and "-" not in o[2:]]
    out = []
    for f in flags:
        longer = [k for k in known if k.startswith(f)]  # what a prefix used to match
        close = longer if 0 < len(longer) <= 3 else difflib.get_close_matches(f, known, n=1, cutoff=0.75)
        if close:
            out.append(f"; {f}: did you mean {' or '.join(close)}?")
    return "".join(out)


def parse_args(dataclass_types: Sequence[type], argv: Optional[Sequence[str]] = None, description: str = "",
               unknown_hint=None):
    """Parse argv into one instance per dataclass type (``--config FILE`` supplies defaults, see the module
    docstring). Unknown flags are an error that suggests the closest known one; ``unknown_hint(flags)`` may return a clearer message for them (e.g. "that is a LoRA flag: use
    train_remask_lora.py")."""
    parser = _parser(dataclass_types, description)
    config, args = _split_config(list(argv) if argv is not None else sys.argv[1:])
    if config is not None:
        _apply_config(parser, config, unknown_hint)
    *out, extra = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    if extra:
        flags = sorted({a.split("=", 1)[0] for a in extra if a.startswith("-")}) or extra
        hint = unknown_hint(flags) if unknown_hint else None
        if hint:
            raise ValueError(hint)
        raise ValueError(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(parser, flags)} (see --help)")
    return tuple(out)


def fill_defaults(obj: Any, model_values: Mapping[str, Any], source: str | Path,
                  library: Mapping[str, Any]) -> dict[str, str]:
    """Fill the ``None`` fields of ``obj`` named in ``library``: from ``model_values`` (a model folder's
    defaults.json) first, else the library default. Returns {field: where its value came from} and logs
    the values taken from the model folder."""
    origin, taken = {}, {}
    for f in dataclasses.fields(obj):
        if f.name not in library:
            continue
        if getattr(obj, f.name) is not None:
            origin[f.name] = "command line"
        elif f.name in model_values:
            setattr(obj, f.name, model_values[f.name])
            origin[f.name] = str(source)
            taken[f.name] = model_values[f.name]
        else:
            setattr(obj, f.name, library[f.name])
            origin[f.name] = "library default"
    if taken:
        log.info("from %s: %s", source, ", ".join(f"{k} {v}" for k, v in taken.items()))
    return origin


def setup_logging(main_process: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""What bad input raises: shown as one line, not a traceback."""


def run_main(main, argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main(argv)``: a user error prints the one line ``error: <message>`` and exits with code 2
    (as argparse does for a bad flag); ``--debug`` or ``REMEDI_DEBUG=1`` shows the full traceback instead (the
    README and ``--help`` say so, the error does not repeat it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("REMEDI_DEBUG", "") not in ("", "0")
    try:
        main([a for a in argv if a != "--debug"])
    except USER_ERRORS as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print("error: " + " ".join(msg.split()), file=sys.stderr)
        raise SystemExit(2) from None
