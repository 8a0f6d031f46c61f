"""An ingester process for the kill -9 test: `python ingest_worker.py BOOTSTRAP DATA_DIR`.

Runs the real Ingester into a real ReplayBuffer with small batches (so a kill lands mid-stream)
until SIGTERM; the test kills it with SIGKILL instead.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path


def main(bootstrap: str, data_dir: Path) -> None:
    from replay.buffer import ReplayBuffer
    from replay.embed import SentenceEmbedder
    from streams.config import KafkaSettings
    from streams.ingest import Ingester

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)
    settings = KafkaSettings(bootstrap=bootstrap, max_poll_interval_ms=3000, session_timeout_ms=3000,
                             poll_timeout_ms=200, batch_size=8, write_batch_records=8)
    buffer = ReplayBuffer(data_dir, SentenceEmbedder(batch_size=8))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Ingester(bootstrap, settings, buffer).run(stop)
    buffer.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
