"""A trace-time choice among named options (mtlx.models.precision's product policy, the GELU
gradient in mtlx.models.activations, dropout's draws in mtlx.models.dropout): read while a
function is traced, so `jax.jit` bakes the choice into the compiled program; set globally or
for a `with` block (tests, the benchmark's A/B)."""

from __future__ import annotations

import contextlib
from typing import Sequence


class TracePolicy:
    def __init__(self, owner: str, choices: Sequence[str], default: str):
        self.owner, self.choices = owner, tuple(choices)
        self.value = self._check(default)

    def _check(self, name: str) -> str:
        if name not in self.choices:
            raise ValueError(f"{self.owner}: policy must be one of {self.choices}, got {name!r}")
        return name

    def get(self) -> str:
        return self.value

    def chosen(self, choice: str) -> bool:
        """Whether `choice` is in force now, 'auto' meaning: on accelerators, not on a CPU."""
        if self.value == "auto":
            import jax
            return jax.default_backend() != "cpu"
        return self.value == choice

    def set(self, name: str) -> str:
        """Sets the policy; returns the previous one."""
        previous, self.value = self.value, self._check(name)
        return previous

    @contextlib.contextmanager
    def scope(self, name: str):
        """``with scope(name): ...`` traces what is inside under that policy."""
        previous = self.set(name)
        try:
            yield
        finally:
            self.value = previous
