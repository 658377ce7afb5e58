"""Counting XLA compilations in a test: the backend's compilations and the persistent
cache's hits (tests/conftest.py enables the cache), each of which stands for one."""

from __future__ import annotations

import jax

EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_hits")


class CompileCounter:
    """`with COMPILES as c: ...` counts the compilations of the block in `c.count`."""

    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)

    def _on_duration(self, event, duration, **kwargs):
        self._on_event(event)

    def _on_event(self, event, **kwargs):
        if self.active and event in EVENTS:
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


COMPILES = CompileCounter()
"""The one counter of the test session (listeners cannot be removed one by one)."""
