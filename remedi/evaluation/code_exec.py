"""Moved: the code sandbox is :mod:`remedi.sandbox`; these names stay importable from here."""
from remedi.sandbox import ExecResult, Limits, containment, pass_at_k, run_many, run_program  # noqa: F401
