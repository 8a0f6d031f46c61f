"""The web console: one static page at `/` that reads and drives the JSON API from the browser.

Its files live in the `service/console/` package directory (package data), served under
`/console/`. The page holds no secret: an admin key is typed into it and sent by the browser.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

router = APIRouter(include_in_schema=False)

# Scripts and styles from this origin only: a ticket or a gate reason shown on the page can
# never run as code, whatever it contains.
POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
          "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


# Found from this file rather than by package name: the test tree has a `service` package too.
FILES = Path(__file__).resolve().parent.parent / "console"


def assets() -> StaticFiles:
    """The page's scripts, styles and icon, mounted at `/console`."""
    return StaticFiles(directory=FILES)


@router.get("/", response_class=HTMLResponse)
def console() -> HTMLResponse:
    """The console page."""
    page = (FILES / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})
