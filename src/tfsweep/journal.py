"""Check an Optuna journal file before use: repair a torn last record, refuse damage anywhere else.

A crash or a full disk can cut the last line of `journal.log`. Optuna then skips that line but appends
the next record right after it, which makes the file unreadable from then on. Repair keeps every
complete record, drops the torn tail and keeps the original next to it; damage before the last line
is not ours to guess about, so the file is left as it was and the command stops.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from optuna.storages.journal import JournalFileSymlinkLock

from tfsweep.errors import UserError

log = logging.getLogger(__name__)


class DamagedJournalError(UserError):
    """The journal has a damaged record before its last line."""


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def check_journal(path: Path) -> None:
    """Repair a torn last record of the journal at `path` (keeping a backup), or raise DamagedJournalError."""
    if not path.exists() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))  # Optuna's own append lock: no worker writes meanwhile
    lock.acquire()
    try:
        data = path.read_bytes()
        *lines, tail = data.split(b"\n")  # `tail` is what follows the last newline: b"" when intact
        damaged = next((number for number, line in enumerate(lines, 1) if not _is_record(line)), None)
        if damaged is not None:
            raise DamagedJournalError(
                f"sweep.storage={path} is damaged at line {damaged} of {len(lines) + bool(tail)}, before its end, "
                "and was left as it was: restore it from a backup, or move it away to start the study afresh")
        if not tail:
            return
        backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, backup)
        with open(path, "r+b") as journal:
            if _is_record(tail):  # complete but for its newline: keep it
                journal.seek(len(data))
                journal.write(b"\n")
                what = "added the missing newline after its last record"
            else:
                journal.truncate(len(data) - len(tail))
                what = f"dropped its torn last record ({len(tail)} bytes)"
        log.warning("repaired %s: %s; the original is kept as %s. A trial whose end that record held is "
                    "retried and resumes from its checkpoints", path, what, backup.name)
    finally:
        lock.release()
