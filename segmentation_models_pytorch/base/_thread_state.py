"""Per-thread settings switched on by a ``with`` block and restored after it.

Building modes (deferred or skipped initialisation, loading into channels_last) and forward-time
modes (recomputation, plain module calls) must not leak into other threads, nor outlive the block
that set them, even when it raises.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator


class ThreadValue:
    """A value per thread: ``default`` until changed inside ``with value.set(x):``."""

    def __init__(self, default: Any = None) -> None:
        self._local = threading.local()
        self._default = default

    def get(self) -> Any:
        return getattr(self._local, "value", self._default)

    @contextlib.contextmanager
    def set(self, value: Any) -> Iterator[Any]:
        before = self.get()
        self._local.value = value
        try:
            yield value
        finally:
            self._local.value = before
