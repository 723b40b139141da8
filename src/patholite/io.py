"""Atomic writes: readers see the old file or the complete new one, never half of one.

Files get the mode the user's umask gives a plain ``open``: 0644 under umask 022, 0664 under 002.
(``mkstemp`` creates its file 0600 whatever the umask, for privacy of temporary files; a record or an
artifact is an output others on the machine may need to read.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's /proc).

    Setting it to read it back (the portable way) leaves a window in which another thread's files get
    mode 0666; the slide engine writes from threads, so that is the fallback only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, with the
    mode the umask gives a new file (folders created on the way follow the umask too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # after the writer: a library may have replaced the temporary file rather than written into it
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
