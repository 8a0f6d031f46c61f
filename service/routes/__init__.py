"""One router per resource."""

from typing import Annotated

from fastapi import Query

# Versions or windows in one page of the history routes: the registry keeps a record of every
# version for good, so a year of hourly updates would otherwise answer 8,760 x 8,760 cells.
DEFAULT_ROWS = 100
MAX_ROWS = 1000
Limit = Annotated[int, Query(ge=1, le=MAX_ROWS, description="Newest versions returned.")]
Before = Annotated[str | None, Query(description="Page back: versions created before this one (the live one is "
                                                 "then not added).")]
