"""Processes of one run under `accelerate launch`: who is main, barriers, and sharing a value from main.

Without a launcher (or with one process) everything is a no-op, and the code paths are the same.
"""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=1)
def _state():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def world() -> int:
    s = _state()
    return 1 if s is None else s.num_processes


def rank() -> int:
    s = _state()
    return 0 if s is None else s.process_index


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    s = _state()
    if s is not None:
        s.wait_for_everyone()


def share(value):
    """The main process's value, on every process (any JSON-like object)."""
    s = _state()
    if s is None:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def accelerator():
    """An Accelerator for data-parallel training (None in a single process: plain training is the same). It only
    syncs gradients: autocast and fp16 loss scaling are `diffusion.train`'s, the same in one process and in many."""
    if _state() is None:
        return None
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")
