"""Progress of long computations (kNN passes, selection, feature extraction), reported to an optional sink.

Library functions take `progress=None` and report through `Progress.start(what, total)` and `advance(n)`; the
default does nothing. The command line passes `Bars`, which draws tqdm bars on stderr for whatever runs longer
than a couple of seconds, so short commands print nothing extra.
"""

from __future__ import annotations

import sys


class Progress:
    """The interface, and the silent default."""

    def start(self, what: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


NO_PROGRESS = Progress()


def or_silent(progress: Progress | None) -> Progress:
    return NO_PROGRESS if progress is None else progress


class Bars(Progress):
    """One tqdm bar per started stage, on stderr, shown only once a stage has run for `delay` seconds."""

    def __init__(self, show: bool = True, delay: float = 2.0):
        self.show, self.delay, self.bar = show, delay, None

    def start(self, what: str, total: int) -> None:
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=what, file=sys.stderr, delay=self.delay, disable=not self.show,
                        leave=False, dynamic_ncols=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
