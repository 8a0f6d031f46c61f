"""The README's commands work as written, at every moment a newcomer may type them: before any
ticket, with tickets but no version learned yet (classify answers zero-shot), and once a version
is live. Each `bash` block after a `<!-- tested by tests/test_readme.py -->` marker runs against
a live service (real broker, the tiny llama), with `localhost:8000` and the local broker's
`127.0.0.1:9092` pointed at the test's own, and every JSON answer's shape is checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from service.settings import Settings
from streams.broker import LocalBroker, announced
from tests.conftest import LiveService, tiny_settings, wait_for

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- tested by tests/test_readme.py -->"


def readme_blocks() -> dict[str, list[str]]:
    """Each marked block's commands (continuation lines joined), by the heading above it."""
    text = (ROOT / "README.md").read_text()
    blocks: dict[str, list[str]] = {}
    for found in re.finditer(re.escape(MARKER) + r"\s*```bash\n(.*?)```", text, re.DOTALL):
        heading = re.findall(r"^#+ (.+)$", text[:found.start()], re.MULTILINE)[-1]
        joined = found.group(1).replace("\\\n", " ")
        blocks[heading] = [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return blocks


def run(command: str, live: LiveService, broker: LocalBroker, cwd: Path) -> subprocess.CompletedProcess[str]:
    port = live.url.rsplit(":", 1)[1]
    command = command.replace("localhost:8000", f"localhost:{port}").replace("127.0.0.1:9092", broker.bootstrap)
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "EVERGREEN_API_PORT": port,
           "EVERGREEN_MODEL_BASE": live.service.settings.model.base}
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command.replace('.venv/bin/', '')}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def check_answer(command: str, answer: subprocess.CompletedProcess[str]) -> None:
    assert answer.returncode in (0, 1) if "evergreen update" in command else answer.returncode == 0, \
        (command, answer.stdout, answer.stderr[-2000:])
    if "/v1/classify" in command:
        body = json.loads(answer.stdout)  # whole, or as the README's jq projects it
        assert isinstance(body["label"], str) and body["adapter_version"] and "zero_shot" in body, body
    elif "/v1/tickets" in command:
        assert json.loads(answer.stdout)["accepted"] >= 1
    elif "evergreen update" in command:
        assert re.match(r"update \d+ (promoted|rejected|skipped) ", answer.stdout), answer.stdout
    elif "curl" in command:
        json.loads(answer.stdout)  # every other curl answers JSON (jq passes it through)


def test_readme_commands_answer_at_every_moment(broker: LocalBroker, serve: Callable[[Settings], LiveService],
                                                tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert {"Try it", "Use it on your own tickets"} <= set(blocks), blocks.keys()
    live = serve(tiny_settings(tmp_path / "data", broker.bootstrap))
    with announced(broker.bootstrap, tmp_path / "data"):  # as `evergreen up` announces its local broker
        walk_through(blocks, live, broker, tmp_path)


def walk_through(blocks: dict[str, list[str]], live: LiveService, broker: LocalBroker, tmp_path: Path) -> None:
    try_it = blocks["Try it"]

    # Before any ticket: classify explains why it cannot answer; the other reads work.
    for command in try_it:
        answer = run(command, live, broker, tmp_path)
        if "/v1/classify" in command:
            assert "the buffer holds no labelled ticket" in answer.stdout, answer.stdout
        else:
            check_answer(command, answer)

    # The user's own tickets (a JSONL file, one ticket through the API, an update, its gate report).
    for command in blocks["Use it on your own tickets"]:
        if command.startswith("{"):  # the JSONL example: written to the file the next commands read
            with (tmp_path / "my-tickets.jsonl").open("a") as handle:
                handle.write(command + "\n")
            continue
        if "/v1/classify" in command:  # zero-shot once the tickets are in, before a version learned labels
            wait_for(lambda: live.service.buffer.pending() >= 7, 60, "the tickets in the buffer")
            assert live.service.registry.info(live.service.registry.live or "").labels == []
            answer = run(command, live, broker, tmp_path)
            check_answer(command, answer)
            assert json.loads(answer.stdout)["zero_shot"] is True
            continue
        check_answer(command, run(command, live, broker, tmp_path))

    # Whatever the gate said, the README's reads keep answering in shape.
    for command in try_it:
        check_answer(command, run(command, live, broker, tmp_path))
