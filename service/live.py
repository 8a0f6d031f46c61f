"""What is served, and the one rule for changing it: load and check first, then move the pointer.

The runtime loads a version and checks it (safetensors from the registry only, finite weights)
before anything names it live, so the registry's live pointer never points at weights that
were refused; a crash between the two leaves the old version live on disk and the new one, at
worst, loaded in memory. Promotion after a gate, a promotion or rollback by hand, and a
replica following its primary all go through here.
"""

from __future__ import annotations

from typing import Protocol

from service.registry import AdapterRegistry


class Serving(Protocol):
    """What changing the live version needs from a serving runtime (`ModelRuntime`)."""

    def swap(self, version: str) -> None: ...


class NothingServed:
    """The runtime of a process that serves nothing (a benchmark driving the update path):
    promotions only move the registry's pointer, as a serving process would after its swap."""

    def swap(self, version: str) -> None:
        pass


class LiveVersion:
    """Changes the served version. `RegistryError` or `UnsafeAdapter` from the runtime leave
    the live pointer where it was."""

    def __init__(self, registry: AdapterRegistry, runtime: Serving) -> None:
        self.registry = registry
        self.runtime = runtime

    def promote(self, name: str) -> None:
        self.runtime.swap(name)
        self.registry.promote(name)

    def rollback(self) -> str:
        """Serve the version that was live before the current one; returns its name."""
        previous = self.registry.previous_live()
        self.runtime.swap(previous)
        self.registry.rollback()
        return previous

    def follow(self, name: str) -> None:
        """A replica: serve what the primary promoted. The primary owns the pointer."""
        self.runtime.swap(name)
