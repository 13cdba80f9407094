"""TensorBoard HParams: one run per entry (a sweep's scored row, a search's trial), all in one table.

Every run carries the same experiment summary (every hyperparameter of every entry, so the HParams tab lists
them all in one table: one an entry lacks is left empty there), its own values, its metrics as `hparam/NAME`
scalars, and optionally a series (e.g. per-epoch validation PSNR). Written whole: the folder is replaced, so a
re-run leaves no stale runs.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class HParamsRun:
    name: str  # the run's folder under the root (e.g. METHOD/NNN, or a unit's key)
    values: dict[str, Any]  # its hyperparameters: str, bool, int or float
    metrics: dict[str, Any]  # its metrics; None or non-finite ones are left out
    series: list[tuple[str, int, float]] = field(default_factory=list)  # (tag, step, value)


def write_hparams(root: Path, runs: list[HParamsRun], metric_names: list[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    shutil.rmtree(root, ignore_errors=True)
    template: dict[str, Any] = {}
    for run in runs:
        for key, value in run.values.items():
            template.setdefault(key, value)
    metrics = {f"hparam/{name}": 0.0 for name in metric_names}
    experiment, _, _ = hparams(template, metrics)
    for run in runs:
        _, start, end = hparams(run.values, metrics)
        with SummaryWriter(str(root / run.name)) as writer:
            for summary in (experiment, start, end):
                writer.file_writer.add_summary(summary)
            for name in metric_names:
                value = run.metrics.get(name)
                if finite(value):
                    writer.add_scalar(f"hparam/{name}", float(value))
            for tag, step, value in run.series:
                writer.add_scalar(tag, value, step)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
