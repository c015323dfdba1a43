"""GitHub Actions workflow commands: every located problem an ``::error`` annotation on its line.

``::error file=F,line=L,col=C,title=T::message``, escaped as the runner requires: ``%``, ``\\r``
and ``\\n`` in the message; those and ``:`` and ``,`` in a property.
See https://docs.github.com/actions/reference/workflow-commands-for-github-actions.
"""

from __future__ import annotations

from ..errors import Issue, NetbuildError, SpecError

TITLE = "netbuild"


def escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def error(message: str, file: str | None = None, line: int | None = None,
          col: int | None = None, title: str = TITLE) -> str:
    """One ``::error`` command; ``file``, ``line`` and ``col`` place it when known."""
    props = []
    if file is not None:
        props.append(f"file={escape_property(file)}")
        if line is not None:
            props.append(f"line={line}")
            props.append(f"col={col or 1}")
    props.append(f"title={escape_property(title)}")
    return f"::error {','.join(props)}::{escape_data(message)}"


def issue(item: Issue, title: str = TITLE) -> str:
    """A located problem on its file, line and column; the message is the CLI's line after the
    position (it starts with the spec path)."""
    line = str(item)
    if item.location is None:
        return error(line, title=title)
    where = f"{item.location}: "
    text = line[len(where):] if line.startswith(where) else line
    return error(text, item.location.source, item.location.line, item.location.column, title)


def errors(exc: NetbuildError, title: str = TITLE) -> list[str]:
    """The annotations for an error: one per located problem, else one per line of it."""
    if isinstance(exc, SpecError):
        return [issue(i, title) for i in exc.issues]
    return [error(line, title=title) for line in exc.lines()]
