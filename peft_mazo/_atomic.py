"""Durable file writes: fsync of files and directories, a text file replaced atomically, a directory written under
a hidden name and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Optional


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (deepest first)."""
    directories = [path]
    for item in path.rglob("*"):
        if item.is_dir():
            directories.append(item)
        elif item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(directory)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(staging)` on a fresh hidden directory next to `target`, fsync it, and rename it to `target`."""
    staging: Optional[Path] = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    aside: Optional[Path] = None
    try:
        write(staging)
        fsync_tree(staging)
        if target.exists():  # never the checkpoint `latest` names while it is rewritten: move it aside first
            aside = target.with_name(f".{target.name}-replaced-{os.getpid()}")
            os.replace(target, aside)
        os.replace(staging, target)
        staging = None
        fsync_dir(target.parent)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
