"""Checked values: what the studio's forms and endpoints send, turned into numbers or a ``ValueError``
that names the field. No Gradio here (the engine and the job manager use it)."""

from __future__ import annotations

import math
from typing import Any


def check_integer(what: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``low..high``; integral floats (what number widgets send) are accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a whole number, got {value!r}")  # noqa: TRY004 (bad input: ValueError)
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{what} must be a whole number, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{what} {int(value)} is outside {low}..{high}")
    return int(value)


def check_number(what: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")  # noqa: TRY004
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    if not low <= value <= high:
        raise ValueError(f"{what} {value:g} is outside {low:g}..{high:g}")
    return float(value)
