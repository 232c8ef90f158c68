"""lm-eval task YAMLs shipped with the package: the embedded model's arithmetic task (``remedi_arith``,
generate_until) and its multiple-choice twin (``remedi_arith_mc``, loglikelihood).

``python -m remedi.harness`` and :func:`remedi.harness.simple_evaluate` add this folder to lm-eval's task
index on their own (no ``--include_path``). The YAMLs read their rows through :mod:`remedi.lm_eval_tasks.sources`,
which names the files by absolute path, so they work from any working directory and from an
installed wheel.
"""
from __future__ import annotations

from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
