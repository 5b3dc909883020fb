"""What this machine's processes share safely: files written whole, file locks, and whether a process lives."""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomically(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """A crash leaves either the old file or the complete new one, never a part.

    The file is created readable by its owner only and gets `mode` before it takes `path`'s name, so
    a secret written with 0o600 is never readable by others, not even for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp.name, mode)
    os.replace(tmp.name, path)


@contextmanager
def file_lock(path: Path | str, shared: bool = False) -> Iterator[None]:
    """Hold a lock on `path`, exclusive or shared; the operating system releases it when its process dies."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user's
    return True
