"""Reading and writing the planner's quantities: '15.6T' tokens, '16M' batches, '8k' GPUs."""

from __future__ import annotations

import math
import re

# Decimal suffixes, as in "15.6T tokens"; Ki/Mi are binary, for GPU counts such as 16Ki = 16,384.
SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20}


def parse_count(text: str, what: str = "value") -> float:
    """'15.6T' -> 1.56e13, '300B' -> 3e11, '8k' -> 8000, '16Ki' -> 16384, '2048' -> 2048."""
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", str(text).strip().replace("_", "").lower())
    if not match or match.group(2) not in SUFFIXES:
        raise ValueError(f"cannot read {what} {text!r}; write a number with an optional suffix "
                         f"K, M, B, T (e.g. 15.6T, 300B, 16M) or Ki, Mi (16Ki = 16384)")
    value = float(match.group(1)) * SUFFIXES[match.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} {text!r} must be positive")
    return value


def parse_int_count(text: str, what: str = "value") -> int:
    value = parse_count(text, what)
    if abs(value - round(value)) > 1e-9 * value:
        raise ValueError(f"{what} {text!r} must be a whole number")
    return int(round(value))


def human(value: float, unit: str = "") -> str:
    """1.56e13 -> '15.6T'; 16384 -> '16.4K'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value:.3g}{unit}"


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))
