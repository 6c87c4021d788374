"""The demo's plain-language verdicts: is a briefly trained model's output the size of the real thing?

A verdict is one sentence. It starts with ``"undertrained: "`` when any check fails (then lists the failures and the
fix), and otherwise says what was checked; the size checks accept up to a factor of `SIZE_FACTOR` either way.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SIZE_FACTOR", "size_matches", "verdict"]

SIZE_FACTOR = 3.0


def size_matches(value: float, reference: float, factor: float = SIZE_FACTOR) -> bool:
    """Whether `value` lies within `factor` times `reference`, either way (a zero reference matches nothing)."""
    return 1.0 / factor <= value / max(reference, 1e-9) <= factor


def verdict(problems: Sequence[str], ok: str) -> str:
    """``"undertrained: <problems>; <fix>"`` when there are problems, else `ok`."""
    if problems:
        return "undertrained: " + " and ".join(problems) + "; train longer (raise --num_epochs) or on more data."
    return ok
