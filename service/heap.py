"""Giving the heap's free pages back to the operating system after a version is built.

A version's merged weights are a few hundred tensors of a few MB each. glibc serves sizes like
these from its heap once it has freed a larger block (its mmap threshold rises past it), and keeps
the pages when they are freed again. So every promotion left the serving process ~110-210 MB
larger in the soak, flat between events, although the replaced version was released.
`malloc_trim(0)` hands the free pages back: eight promotions of SmolLM2-135M with
`serving.cached_versions` 0 went 1,753 → 1,850-1,917 MB without it, 1,680 → 1,671 MB with it.
Elsewhere than glibc (musl, macOS) there is no such call, and nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (AttributeError, OSError):
        return None


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system; whether this C library can.

    >>> isinstance(release_free_memory(), bool)
    True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
