"""Names of config keys: "did you mean" suggestions for a mistyped name, and dotted `section.key` names.

Shared by the config, the CLI, search, tracking, checkpoints and seeds; it imports nothing of tuneloop's, so
every module may use it without closing an import circle.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest candidate, or "" when none is close; appended to error lines."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def dotted_keys(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{'optim': {'learning_rate': 5e-05}} -> {'optim.learning_rate': 5e-05}."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}
