"""Result files that are strict JSON: Python's json writes NaN, which strict parsers (jq, JavaScript)
refuse, so an undefined figure is written as null instead."""

from __future__ import annotations

import math


def to_json(value):
    """`value` with NaN (an undefined standard error) as null, so the result file is strict JSON."""
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
