"""Experiment loggers for a run (``trainer.loggers``): Lightning's own, by name.

* ``csv`` (default, no extra package): ``<run>/logs/version_N/metrics.csv``;
* ``tensorboard`` (``pip install 'mmssl[tensorboard]'``): event files under ``<run>/logs/version_N``, the same
  folder as the CSV (``tensorboard --logdir <run>/logs``);
* ``wandb`` (``pip install 'mmssl[wandb]'``): project ``$WANDB_PROJECT`` or ``mmssl``, run name = ``name``,
  files under ``<run>``; ``WANDB_MODE=offline`` keeps it local;
* ``mlflow`` (``pip install 'mmssl[mlflow]'``): experiment = ``name``, tracking at ``$MLFLOW_TRACKING_URI`` or
  ``file:<run>/mlruns``.

Pictures (``viz.PictureCallback``) go to every logger that takes images, besides the PNG files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from mmssl.config import check_loggers


def make_loggers(names: Sequence[str], run_dir: str | Path, name: str) -> list[Logger]:
    """The loggers ``names`` for a run writing into ``run_dir``; CSV and TensorBoard share ``logs/version_N``
    (a resumed run gets a new version and keeps the earlier metrics)."""
    check_loggers(names)
    run_dir = Path(run_dir)
    version = CSVLogger(run_dir, name="logs").version  # the next free logs/version_N, shared by both
    loggers: list[Logger] = []
    for logger in dict.fromkeys(names):  # each once, in the given order
        if logger == "csv":
            loggers.append(CSVLogger(run_dir, name="logs", version=version))
        elif logger == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="logs", version=version, default_hp_metric=False))
        elif logger == "wandb":
            project = os.environ.get("WANDB_PROJECT", "mmssl")
            loggers.append(WandbLogger(name=name, save_dir=str(run_dir), project=project))
        elif logger == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
            loggers.append(MLFlowLogger(experiment_name=name, tracking_uri=uri))
    return loggers
