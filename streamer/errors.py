"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for or gave us (bad file, bad option, missing input)."""

    exit_code = 2


def need_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is a file to read; else the UserError saying what it is instead
    (`what` names it: "audio", "model file")."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if path.exists():
        raise UserError(f"{what} {path} is not a regular file")
    raise UserError(f"{what} {path} does not exist")
