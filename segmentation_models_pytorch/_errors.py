"""Error types and messages shared across the package."""

from __future__ import annotations

import difflib
from typing import Iterable


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name (encoder, architecture, weights...).

    Subclasses both ``KeyError`` (what SMP 0.6.0 raises, so existing ``except KeyError`` keeps working)
    and ``ValueError``; unlike a bare ``KeyError`` its message prints without quotes.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name(kind: str, name: object, choices: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build an error naming close matches of ``name`` among ``choices``."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(name), choices, n=5, cutoff=0.5)
    msg = f"Unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean: {', '.join(close)}?"
    if len(choices) <= 40:
        msg += f" Available: {', '.join(choices)}."
    else:
        msg += f" There are {len(choices)} choices; list them with {hint or 'the registry'}."
    return UnknownNameError(msg)
