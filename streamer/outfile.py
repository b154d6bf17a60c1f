"""Files the commands write (a render's mp4, an exported model): checked before any work, written whole
or not at all, and only ever over a regular file (or a link, which is replaced, not followed).

A file is written beside its name under a temporary one and renamed into place when complete, so a
failed or interrupted run leaves what was there before. Renaming replaces whatever has the name, so
anything that is not a regular file (a folder, a device such as /dev/null, a pipe) is refused up
front, --force or not: as root, rendering to /dev/null once made it a plain file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from streamer.errors import UserError


def check(out: str | Path, force: bool, suffixes: tuple[str, ...] = ()) -> Path:
    """`out` as a Path, if it may be written: a file name ending in one of `suffixes` (any if none),
    in a folder that exists and can be written to, naming nothing yet or, with `force`, a regular file."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UserError(f"output {out} must end in {' or '.join(suffixes)}")
    if out.is_symlink() or out.exists():  # (a link is replaced by the file, whatever it points to)
        if out.exists() and not out.is_file():
            raise UserError(f"{out} is not a regular file; give the name of a file to write")
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"folder {folder} does not exist")
    # told before any work; the effective user's rights, as the write will have (`writing` says the rest)
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise UserError(f"cannot write to folder {folder}")
    return out


def cannot_write(out: Path, e: OSError) -> UserError:
    """The one-line error for an OSError met writing `out` (read-only or full disk, no permission)."""
    return UserError(f"cannot write {out}: {e.strerror or e}")


@contextlib.contextmanager
def writes(out: Path) -> Iterator[None]:
    """Around what writes `out` (and only that: an OSError reading an input is not the output's): an
    OSError becomes `cannot_write`'s one line."""
    try:
        yield
    except OSError as e:
        raise cannot_write(out, e) from None


@contextlib.contextmanager
def writing(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` to write; renamed to `out` when the block ends without error,
    removed otherwise. Check `out` first (`check`)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        yield tmp
        with writes(out):
            os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):  # (a read-only folder refuses even to unlink what is not there)
            tmp.unlink(missing_ok=True)
