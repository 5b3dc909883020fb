"""What this CPU is, from /proc/cpuinfo: the trainer picks its precision by the flags, the benchmark and
the load test describe the machine with the rest."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any


def read_cpuinfo(text: str | None = None) -> dict[str, Any]:
    """Vendor, model, family, clock and flags of the first CPU in /proc/cpuinfo (text for tests)."""
    if text is None:
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        first[key.strip()] = value.strip()
    return {"vendor": first.get("vendor_id", ""), "model_name": first.get("model name", platform.processor()),
            "family": int(first.get("cpu family", 0) or 0), "model": int(first.get("model", 0) or 0),
            "mhz": float(first.get("cpu MHz", 0) or 0), "flags": set(first.get("flags", "").split())}
