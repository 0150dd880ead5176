"""Argument types of the command line: numbers checked as they are parsed, so a bad value
is an argparse error naming the option before anything is read or trained."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["at_least", "finite", "positive", "share"]


def at_least(low: int) -> Callable[[str], int]:
    """An integer no smaller than ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def positive(high: float = math.inf) -> Callable[[str], float]:
    """A finite number above 0 (and below ``high``): a NaN or an infinity is refused, not
    trained into a NaN model."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and 0 < value < high):
            bound = "" if high == math.inf else f" and below {high:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number above 0{bound}, got "
                                             f"{text}")
        return value
    return parse


def finite(text: str) -> float:
    """A finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def share(text: str) -> float:
    """A number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value
