"""Atomic file writes: a reader (or a crash) never sees half a file.

Every file the project writes for later (checkpoints, replay segments,
``result.json``, ``config.yaml``, ``provenance.json``, the report) goes through
``write_atomically``: a temporary file next to the target, fsync, rename over
the target, fsync of the directory. On any error the target is untouched.
"""

from __future__ import annotations

import io
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

# mkstemp creates 0600 files; results are for sharing with collaborators.
FILE_MODE = 0o644


def fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (some filesystems refuse; then it is a no-op)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], None], *, kill_halfway: bool = False
) -> None:
    """``write(handle)`` into a temporary file next to ``path``, fsync, rename, fsync the dir.

    On any error the temporary file is removed and ``path`` is untouched.
    ``kill_halfway`` (test hook ``debug.kill_during_checkpoint``) writes half of the
    bytes to the temporary file, makes them durable and SIGKILLs this process.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        os.fchmod(descriptor, FILE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            if kill_halfway:
                data = io.BytesIO()
                write(data)
                handle.write(data.getbuffer()[: data.tell() // 2])
                handle.flush()
                os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_text_atomically(path: Path, text: str | bytes) -> None:
    """Write ``text`` (str as UTF-8, or bytes) to ``path`` atomically."""
    payload = text.encode("utf-8") if isinstance(text, str) else text
    write_atomically(path, lambda handle: handle.write(payload))
