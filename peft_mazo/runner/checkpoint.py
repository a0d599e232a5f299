"""Checkpoints of a run: `checkpoint-<step>/` (adapter, `state.pt`, `run_config.json`) written atomically, `latest`
naming the newest complete one, and the clean-up after an interrupted run."""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from .._atomic import save_dir_atomically, write_text_atomically
from .config import RESUME_FIELDS, CheckpointError, RunConfig


logger = logging.getLogger(__name__)


CHECKPOINT_PREFIX = "checkpoint-"


RUN_CONFIG_NAME = "run_config.json"


def load_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's `state.pt` (optimizer, sampler, step), loaded without unpickling arbitrary objects."""
    return torch.load(Path(checkpoint) / "state.pt", weights_only=True, map_location="cpu")


def resume_settings(config: RunConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in RESUME_FIELDS}


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The newest complete checkpoint named by `out/latest`, or None."""
    pointer = Path(out) / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    path = Path(out) / name
    return path if (path / "state.pt").is_file() else None


def checkpoint_error(error: OSError, what: str, out: Path) -> CheckpointError:
    latest = latest_checkpoint(out)
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    reason = f"{error.strerror or error}" + (f" [{code}]" if code else "")
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "Free disk space (or choose another --out) and rerun with --resume."
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"Make {out} writable and rerun with --resume."
    else:
        fix = "Fix the cause and rerun with --resume."
    kept = f"the last complete checkpoint, {latest}, is intact" if latest else "no checkpoint was completed yet"
    return CheckpointError(f"Could not write {what} in {out}: {reason}. Nothing was half-written: {kept}. {fix}")


def save_checkpoint(
    out: Path, step: int, model: torch.nn.Module, state: dict[str, Any], run_config: Optional[dict[str, Any]] = None
) -> Path:
    """Write `checkpoint-<step>` atomically and point `latest` at it; drop older checkpoints.

    The adapter, `state.pt` (and `run_config.json`) are written into a hidden temporary directory, every file and the
    directory are fsynced, the directory is renamed to `checkpoint-<step>`, the run directory is fsynced, and `latest`
    is replaced atomically. A crash at any point leaves `latest` naming a complete checkpoint.

    Raises:
        CheckpointError: an `OSError` (disk full, permissions) while writing; the previous checkpoint is intact.
    """
    out = Path(out)
    final = out / f"{CHECKPOINT_PREFIX}{step}"

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        torch.save(state, staging / "state.pt")
        if run_config is not None:
            (staging / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2))

    try:
        save_dir_atomically(final, write)
        write_text_atomically(out / "latest", final.name)
    except OSError as error:
        raise checkpoint_error(error, f"checkpoint {final.name}", out) from error
    for old in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_files(out: Path) -> list[Path]:
    """Remove what an interrupted run can leave behind: hidden staging directories and temporary files, and
    checkpoints other than the one `latest` names (older ones whose removal was interrupted). Returns the paths."""
    out = Path(out)
    if not out.is_dir():
        return []
    keep = latest_checkpoint(out)
    removed = []
    for path in out.iterdir():
        stale_hidden = path.name.startswith(".") and (
            path.name.startswith((f".{CHECKPOINT_PREFIX}", ".adapter-", ".best-", ".mazo-write-test-"))
            or path.name.endswith(".tmp")
        )
        stale_checkpoint = path.name.startswith(CHECKPOINT_PREFIX) and path.is_dir() and path != keep
        if stale_hidden or stale_checkpoint:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("Removed %d file(s) left by an interrupted run in %s.", len(removed), out)
    return removed
