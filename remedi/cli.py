"""Console commands of an installed package (``[project.scripts]`` in pyproject.toml).

Each command runs its script's ``main`` exactly as ``python remedi/<script>.py`` and
``python -m remedi.<script>`` do (through :func:`remedi.arguments.run_main`: one ``error:`` line and exit
code 2 for bad input), so the three ways of starting a script behave the same.

    remedi-eval     remedi/eval_gsm_math.py       remedi-sft      remedi/train_remask_sft.py
    remedi-lora     remedi/train_remask_lora.py   remedi-rl       remedi/train_remask_rl.py
    remedi-compare  remedi/infer_compare.py       remedi-harness  python -m remedi.harness (lm-eval)
"""
from __future__ import annotations

import importlib
import sys

SCRIPTS = {"remedi-eval": "remedi.eval_gsm_math", "remedi-sft": "remedi.train_remask_sft",
           "remedi-lora": "remedi.train_remask_lora", "remedi-rl": "remedi.train_remask_rl",
           "remedi-compare": "remedi.infer_compare"}


def _run(module: str) -> None:
    from remedi.arguments import run_main

    run_main(importlib.import_module(module).main)


def eval_main() -> None:
    _run(SCRIPTS["remedi-eval"])


def sft_main() -> None:
    _run(SCRIPTS["remedi-sft"])


def lora_main() -> None:
    _run(SCRIPTS["remedi-lora"])


def rl_main() -> None:
    _run(SCRIPTS["remedi-rl"])


def compare_main() -> None:
    _run(SCRIPTS["remedi-compare"])


def harness_main() -> None:
    from remedi.harness import main

    sys.exit(main())
