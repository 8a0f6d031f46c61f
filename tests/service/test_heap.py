"""Freed heap pages go back to the operating system (glibc's `malloc_trim`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: the test suite's own process has an allocator history of its own.
SCENARIO = """
import torch
from service.heap import release_free_memory

def resident_mb():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) // 1024

big = torch.ones(2 * 2**20)  # freeing an 8 MB block raises glibc's mmap threshold past it,
del big  # so the 1 MB tensors below come from the heap, as a build's do after the first
keep, blocks = [], []
for _ in range(200):
    blocks.append(torch.ones(2**18))
    keep.append(torch.ones(16))  # live neighbours: the freed space is not at the heap's top
del blocks
before = resident_mb()
print(release_free_memory(), before - resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap and /proc")
def test_pages_freed_on_the_heap_are_handed_back() -> None:
    """Tensors the size of a version's merged weights, freed, stay resident until released."""
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True).stdout
    released, fell_mb = out.split()
    assert released == "True"
    assert int(fell_mb) > 150, f"about 200 MB of freed tensors should have left, {fell_mb} MB did"
