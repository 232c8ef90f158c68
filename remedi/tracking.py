"""Experiment trackers for the training runs (``--report_to none|tensorboard|wandb|trackio``).

The trackers are accelerate's own (:mod:`accelerate.tracking`), started on the main process only. The run's
arguments go in as its configuration; every line a run appends to metrics.jsonl goes in as scalars at its step
(SFT: the optimiser step, RL: the update), so the tracker shows what metrics.jsonl holds. TensorBoard writes
its event files under ``<output_dir>/tracking/``; wandb and trackio log to project ``remedi``, run name the
output folder's name. metrics.jsonl stays the record a resume trusts: a tracker is a view of it.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "remedi"
TRACKING_DIR = "tracking"
REPORT_TO_HELP = ("also send the metrics.jsonl lines to an experiment tracker (accelerate's): none, tensorboard "
                  "(event files in <output_dir>/tracking), wandb or trackio")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_report_to(value: str) -> None:
    """A known tracker whose package is installed (checked with the flags, before any weight loads)."""
    if value not in REPORT_TO:
        raise ValueError(f"--report_to {value!r}: choose one of {', '.join(REPORT_TO)}")
    if value == "none":
        return
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "trackio": is_trackio_available}[value]()
    if not available:
        raise ValueError(f"--report_to {value}: the {_PACKAGE[value]} package is not installed; pip install "
                         f"{_PACKAGE[value]}, or pass --report_to none")


def _config_value(v):
    """What every tracker accepts as a configuration value: bool, int, float or str."""
    if isinstance(v, (bool, int, float, str)):
        return v
    return "none" if v is None else str(v)


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of one metrics.jsonl line (strings, lists and NaN are left out)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = v
    return out


class Tracker:
    """One run's tracker; with ``report_to`` none (or off the main process) every call does nothing."""

    def __init__(self, report_to: str, output_dir: str | Path, config: dict, main: bool = True):
        self.report_to, self.impl = report_to, None
        if report_to == "none" or not main:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        out = Path(output_dir)
        cls = LOGGER_TYPE_TO_CLASS[report_to]
        if report_to == "tensorboard":
            self.impl = cls(out.name, out / TRACKING_DIR)
        else:
            self.impl = cls(PROJECT, name=out.name)
        self.impl.start()
        self.impl.store_init_configuration({k: _config_value(v) for k, v in config.items()})
        where = f" in {out / TRACKING_DIR / out.name}" if report_to == "tensorboard" else f", project {PROJECT}"
        log.info("tracking the run with %s%s", report_to, where)

    def log(self, record: dict, step: int) -> None:
        if self.impl is not None:
            self.impl.log(scalars(record), step=int(step))

    def finish(self) -> None:
        if self.impl is not None:
            self.impl.finish()
            self.impl = None


@contextlib.contextmanager
def track(trainer) -> Iterator[Tracker]:
    """The tracker of a training run (Remask SFT's ``Trainer`` or Remask RL's ``RLTrainer``, after setup), set as
    ``trainer.tracker`` while the block runs and finished after it, also when the run fails."""
    args = getattr(trainer, "targs", None) or trainer.rargs
    config = getattr(trainer, "args_record", None) or getattr(trainer, "record", None) or {}
    tracker = Tracker(getattr(args, "report_to", "none"), trainer.out, config, trainer.main)
    trainer.tracker = tracker
    try:
        yield tracker
    finally:
        tracker.finish()


def log_metrics(trainer, record: dict, step: int) -> None:
    """Send one metrics.jsonl line to the run's tracker, if it has one."""
    tracker: Optional[Tracker] = getattr(trainer, "tracker", None)
    if tracker is not None:
        tracker.log(record, step)
