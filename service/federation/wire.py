"""What travels between a site's client and the hub: adapters as Flower's arrays, and signatures.

An adapter is the tensors of its safetensors file in name order (every site's adapter has the
same names: the hub's first global adapter is one of theirs). Each result a site sends the hub is
signed with the key the two share, over the round, the kind of result and its bytes, so a result
from a site the hub does not know, or altered on the way, is refused (`verify`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import load, save

FEDERATION_KEY_ENV = "EVERGREEN_FEDERATION_KEY"  # the key a site shares with the hub
SITE_API_KEY_ENV = "EVERGREEN_SITE_API_KEY"  # an admin key of the site's own service, for its client


def to_arrays(weights: bytes) -> tuple[list[str], list[np.ndarray]]:
    """A safetensors file's tensor names (sorted) and its tensors as arrays, in that order."""
    tensors = load(weights)
    names = sorted(tensors)
    return names, [tensors[name].numpy() for name in names]


def to_safetensors(names: Sequence[str], arrays: Sequence[np.ndarray]) -> bytes:
    if len(names) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for an adapter of {len(names)} tensors")
    return save({name: torch.from_numpy(np.ascontiguousarray(array))
                 for name, array in zip(names, arrays, strict=True)})


def payload(arrays: Sequence[np.ndarray], *fields: object) -> bytes:
    """The bytes a fit result's signature covers: its arrays (shapes and values) and its fields."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(repr(fields).encode())
    return digest.digest()


def sign(key: str, round_number: int, kind: str, data: bytes) -> str:
    """HMAC-SHA256 of a site's `kind` result ("fit", "evaluate") of a round."""
    message = f"{round_number}:{kind}:".encode() + hashlib.sha256(data).digest()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def verify(key: str, round_number: int, kind: str, data: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(key, round_number, kind, data), signature)
