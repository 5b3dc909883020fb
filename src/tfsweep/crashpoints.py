"""Named points where a process may die, so that tests can kill the real process exactly there.

Production code calls `crashpoint("trainer.after_checkpoint")` at each point where a crash would leave
state half-written. It does nothing unless the environment variable `TFSWEEP_CRASH_AT` (read only by
the crash-recovery tests) names that point, optionally with the occurrence to die at:
`TFSWEEP_CRASH_AT=trainer.after_checkpoint` dies the first time, `...:3` the third time. The process
then kills itself with SIGKILL: no `finally`, no `atexit`, no flush, as with `kill -9` or a power cut.
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "TFSWEEP_CRASH_AT"
_seen: collections.Counter[str] = collections.Counter()


def crashpoint(name: str) -> None:
    target = os.environ.get(ENV)
    if not target:
        return
    point, _, occurrence = target.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] == int(occurrence or 1):
        os.kill(os.getpid(), signal.SIGKILL)
