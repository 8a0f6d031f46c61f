"""replay: curated, durable, searchable memory of every ticket, split into windows and probes."""

from replay.buffer import ReplayBuffer, Snapshot, WindowInfo, is_probe
from replay.config import ReplaySettings
from replay.embed import Embedder, SentenceEmbedder
from replay.shortlist import shortlist

__all__ = ["Embedder", "ReplayBuffer", "ReplaySettings", "SentenceEmbedder", "Snapshot", "WindowInfo",
           "is_probe", "shortlist"]
