"""The code sandbox: run untrusted generated Python programs contained, limited and honestly scored.

Low level on purpose: standard library only (no torch, nothing else of the package), imported by
:mod:`remedi.tasks.code` and the evaluation. :mod:`~remedi.sandbox.runner` is the parent side (limits, the
bubblewrap launch, timeouts, verdicts, the host check), :mod:`~remedi.sandbox.bwrap` the outer layer's command
line, :mod:`~remedi.sandbox.child` the containment layers applied inside the child and the harness that runs the
program, :mod:`~remedi.sandbox.seccomp` the system-call filter. The README's code-task section says what it
guarantees and where.
"""
from remedi.sandbox.runner import (ALLOW_FLAG, LAYERS, REQUIRED, STATUSES, ExecResult, Limits, SandboxError,
                                   accept_weak_host, clean_stale_dirs, containment, missing_layers, pass_at_k,
                                   require_strong, run_many, run_program)

__all__ = ["ALLOW_FLAG", "LAYERS", "REQUIRED", "STATUSES", "ExecResult", "Limits", "SandboxError", "accept_weak_host",
           "clean_stale_dirs", "containment", "missing_layers", "pass_at_k", "require_strong", "run_many",
           "run_program"]
