"""Module-name patterns, one rule everywhere (delta-method targets, `deltakern.quantize(skip=...)`,
`integrations.bnb.convert(skip=...)`): a pattern matches a module name exactly, as a dotted suffix
("q_proj" matches "model.layers.0.self_attn.q_proj"), or as a regular expression (re.fullmatch).
A pattern that is not a valid regular expression raises ValueError naming it."""

from __future__ import annotations

import functools
import re
from typing import Iterable


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"module-name pattern {pattern!r} is not a valid regular expression ({exc}); "
                         "escape it (re.escape) or give a module name / dotted suffix") from None


def check(patterns: Iterable[str]) -> None:
    """Raise ValueError for the first pattern that is not a valid regular expression."""
    for p in patterns:
        _compiled(p)


def match(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` matches any of `patterns` exactly, as a dotted suffix, or as a regex (fullmatch)."""
    for p in patterns:
        if name == p or name.endswith("." + p) or _compiled(p).fullmatch(name):
            return True
    return False
