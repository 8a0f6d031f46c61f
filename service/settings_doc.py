"""The settings reference (`docs/settings.md`), generated from the settings tree itself.

Written by `evergreen config reference`; a test fails when the committed file and the tree
disagree, so the reference can never describe settings that no longer exist.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path

from pydantic import BaseModel, SecretStr

from service.settings import Settings

HEADER = """\
# Settings reference

Every setting Evergreen reads, generated from `service/settings.py` by
`evergreen config reference > docs/settings.md` (a test keeps this file current).
Set a field in `evergreen.toml` under its section (`[replay]` then `index = "pq"`), or in the
environment: a section's field is `EVERGREEN_<SECTION>_<FIELD>` (`EVERGREEN_REPLAY_INDEX=pq`), a
deeper one is set through its parent as JSON (`EVERGREEN_TRAIN_EWC='{"enabled": true}'`).
`evergreen config show` prints the effective values.
"""


def _type_name(annotation: object) -> str:
    """A short, readable type: `'a' | 'b'` for literals, `int | None` for optionals."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _plain(value: object) -> object:
    """JSON-ready data with sets sorted, so the reference is the same on every run."""
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, BaseModel):
        return {k: _plain(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)  # type: ignore[type-var]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):  # the home directory differs per machine: show it as `~`
        home = str(Path.home())
        return "~" + str(value)[len(home):] if str(value).startswith(home) else str(value)
    return value


def _default(value: object) -> str:
    return f"`{json.dumps(_plain(value), default=str)}`".replace("|", "\\|")


def _section(model: type[BaseModel], path: list[str]) -> list[str]:
    rows, nested = [], []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested.append((name, field.annotation))
            continue
        key = ".".join([*path, name])
        env = f"`EVERGREEN_{'_'.join([*path, name]).upper()}`" if len(path) <= 1 else "(via parent)"
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | {env} | {_type_name(field.annotation)} | "
                    f"{_default(field.get_default(call_default_factory=True))} | {description} |")
    lines = []
    if rows:
        title = ".".join(path) or "(top level)"
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        lines += [f"## `{title}`" if path else f"## {title}", "", doc, "",
                  "| key | environment | type | default | description |", "|---|---|---|---|---|", *rows, ""]
    for name, sub in nested:
        lines += _section(sub, [*path, name])
    return lines


def reference() -> str:
    """The whole reference as markdown.

    Examples
    --------
    >>> "`replay.index`" in reference() and "EVERGREEN_KAFKA_BOOTSTRAP" in reference()
    True
    """
    return "\n".join([HEADER, *_section(Settings, [])]).rstrip() + "\n"
