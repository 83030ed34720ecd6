"""Experiment trackers (`log_with`): each training stage's loss curve, through accelerate's trackers.

A stage is logged when it finishes, from its recorded losses (`loss.npz`: every step, those before a resume too),
as one tracker run named seed<S>/<arm>/it<III> under RUN_DIR/tracking. TensorBoard writes event files there;
Weights & Biases runs offline (WANDB_MODE=offline) unless WANDB_MODE says otherwise, so it never reaches the
network unless asked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run_name(seed: int, label: str, t: int) -> str:
    return f"seed{seed}/{label}/it{t:03d}"


def log_losses(kind: str, logging_dir: Path, name: str, losses) -> None:
    """One tracker run: the loss of every step, as train/loss at steps 1, 2, ... A tracker that fails (a full
    disk, a wandb set-up) gets a one-line warning: the stage's results are already saved."""
    try:
        _log(kind, logging_dir, name, losses)
    except Exception as e:  # noqa: BLE001 - whatever a tracker raises, the run goes on
        print(f"model-collapse: warning: log_with = {kind} failed for {name}: {str(e).splitlines()[0][:160]}",
              file=sys.stderr)


def _log(kind: str, logging_dir: Path, name: str, losses) -> None:
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    logging_dir.mkdir(parents=True, exist_ok=True)
    if kind == "tensorboard":
        tracker = TensorBoardTracker(name, str(logging_dir))
    else:
        os.environ.setdefault("WANDB_MODE", "offline")
        # accelerate names the wandb *project* after its run name: one project, a run per stage
        tracker = WandBTracker("model-collapse", dir=str(logging_dir), name=name)
    if hasattr(tracker, "start"):  # newer accelerate creates the writer or run here, older ones in __init__
        tracker.start()
    for step, value in enumerate(losses, 1):
        if value == value:  # NaN: a step a checkpoint from before losses were kept did not record
            tracker.log({"train/loss": float(value)}, step=step)
    tracker.finish()
