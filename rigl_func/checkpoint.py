"""Atomic checkpoints: a preempted or killed job never leaves a half-written file.

``save_checkpoint`` writes to a temporary file in the target's directory, flushes and
fsyncs it, then ``os.replace``-s it over the target (atomic on POSIX and Windows), and
fsyncs the directory. A reader therefore sees either the previous complete checkpoint
or the new complete one, never a torn file. ``load_checkpoint`` is ``torch.load`` with
a clear error for a missing path.

Example:
    >>> import tempfile, os, torch
    >>> d = tempfile.mkdtemp()
    >>> path = os.path.join(d, "ckpt.pt")
    >>> save_checkpoint({"step": torch.tensor(3)}, path)
    >>> int(load_checkpoint(path)["step"])
    3
    >>> sorted(os.listdir(d))  # no temporary file left behind
    ['ckpt.pt']

A process killed (SIGKILL, preemption) in the middle of a save leaves its temporary
file, named ``<name>.<random>.tmp`` next to the target; the target itself is intact.
:func:`remove_stale_temp_files` deletes such leftovers when no save is running.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["state_types", "save_checkpoint", "load_checkpoint", "remove_stale_temp_files"]


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """Save ``obj`` with ``torch.save`` atomically (temp file + fsync + rename).

    Args:
        obj: anything ``torch.save`` accepts (typically a dict of state dicts).
        path: destination file. Its directory must exist.

    Raises:
        ValueError: ``path``'s directory does not exist.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"save_checkpoint: directory of path={path!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path: PathLike, map_location: Any = None, *, weights_only: bool = True) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: as in ``torch.load`` (e.g. ``"cpu"``).
        weights_only: as in ``torch.load``; True (tensors, dicts, lists, numbers,
            strings and rigl_func's state types: :data:`state_types`) suffices for
            everything rigl_func saves.

    Raises:
        ValueError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"load_checkpoint: path={path!r} does not exist")
    # rigl_func allowlists its state types at import, but a caller's
    # ``with torch.serialization.safe_globals([...])`` removes them again on exit: add back
    # (for this call only) whichever are missing.
    missing = [t for t in state_types() if t not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(missing):
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def state_types() -> list[type]:
    """The NamedTuple state types of rigl_func (``RigLState``, ``RigLOptimizerState``,
    ``SGDState``, ``AdamWState``): loadable with ``torch.load(weights_only=True)``."""
    from rigl_func.functional_optim import AdamWState, SGDState
    from rigl_func.sparse_optimizer import RigLOptimizerState
    from rigl_func.state import RigLState

    return [RigLState, RigLOptimizerState, SGDState, AdamWState]


def remove_stale_temp_files(path: PathLike) -> list[str]:
    """Delete the temporary files that killed :func:`save_checkpoint` calls for
    ``path`` left behind (``<name>.<random>.tmp`` in its directory).

    Call it only when no process is saving to ``path`` (e.g. at start-up, before
    training resumes): a running save's temporary file matches the same pattern.
    The target itself and other files are never touched.

    Args:
        path: the checkpoint file whose leftovers to remove.

    Returns:
        The removed paths, sorted.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + "."
    removed = []
    if not os.path.isdir(directory):
        return removed
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(prefix) and entry.endswith(".tmp") and len(entry) > len(prefix) + len(".tmp"):
            full = os.path.join(directory, entry)
            if os.path.isfile(full):
                os.unlink(full)
                removed.append(full)
    return removed
