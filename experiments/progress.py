"""Progress of long work in experiments/ (harvesting, training) without a terminal dependency: the
runner passes visualization.terminal.progress_bar in, and whoever passes nothing gets silent bars."""
from __future__ import annotations

from typing import Any, Callable


class SilentBar:
    """The part of a tqdm bar that the work calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def silent_bar(**_: Any) -> SilentBar:
    return SilentBar()


BarFactory = Callable[..., Any]  # (total, initial, desc, unit=..., position=...) -> a tqdm-like bar
