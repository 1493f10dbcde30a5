"""The figures that answer "does this defense work against this attack?", read from each run.

A run records in ``results.json`` (``"residual"``, :class:`bdlab.defenses.base.Residual`) which of its
metrics its defense's category answers with: the ASR left under the defense and the clean accuracy it
costs, or for an inspector its verdict on the target class and that class's anomaly index. The report
reads the named metrics under derived keys (``residual/asr``, ...), so its lead tables need no list of
defenses, and each of their cells is one run's own ``defense/...`` (or ``trojan/asr``) figure.
"""

from __future__ import annotations

import math
from typing import Any

from bdlab.reporting.collect import Record

ASR, COST, FLAGGED, AIV = "residual/asr", "residual/cost", "residual/flagged", "residual/aiv"
#: the derived key of each field of a run's ``residual`` record
FIELDS = {"asr": ASR, "cost": COST, "flagged": FLAGGED, "aiv": AIV}


def number(value: Any) -> float | None:
    """``value`` as a float; None when it is not a number, or NaN (how a run says a metric does not apply)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def residual_values(record: Record) -> dict[str, float]:
    """The run's residual figures under the derived keys: a field naming a metric takes that metric's value,
    a field holding a number (no defense costs 0) takes the number; absent, null or NaN is left out (n/a)."""
    values = {}
    for name, key in FIELDS.items():
        source = record.residual.get(name)
        value = record.metrics.get(source) if isinstance(source, str) else source
        if (found := number(value)) is not None:
            values[key] = found
    return values


def describe(residual: dict[str, Any]) -> str:
    """A run's residual record in words: ``meaning: `asr key`, cost `cost key```."""
    named = [f"`{residual[name]}`" for name in ("asr", "flagged", "aiv") if isinstance(residual.get(name), str)]
    cost = residual.get("cost")
    named.append(f"cost `{cost}`" if isinstance(cost, str) else f"cost {cost:g}" if number(cost) is not None
                 else "cost n/a")
    return f"{residual.get('meaning', '')}: {', '.join(named)}"
