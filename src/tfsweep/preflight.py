"""The checks a run passes before Hydra writes anything: its output folder, `.hydra/` and its log file.

Hydra calls `on_run_start` after composing the config and before making the run's folder, so a secret
taken out of the config here never reaches `.hydra/`, and a config refused here leaves nothing behind.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import get_method
from omegaconf import DictConfig, open_dict, read_write

from tfsweep.config import validate
from tfsweep.credentials import move_secrets
from tfsweep.data import check_root
from tfsweep.errors import UserError


def job_config(config: DictConfig) -> DictConfig:
    """The config the task function will get: `config` without Hydra's own node."""
    job = copy.deepcopy(config)
    with read_write(job), open_dict(job):
        del job["hydra"]
    return job


class Preflight(Callback):
    """Move secrets out of the config, then run every check; refuse a bad config with one line.

    `checks` names further functions (`tfsweep.sweep_config.check`) that take the job's config and
    raise a UserError.
    """

    def __init__(self, checks: list[str] = ()) -> None:
        self.checks = [get_method(name) for name in checks]

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            move_secrets(config)
            HydraConfig.instance().set_config(config)  # lets the checks resolve `${hydra:...}`, as --cfg does
            job = job_config(config)
            validate(job)
            check_root(job.data)
            for check in self.checks:
                check(job)
        except UserError as exc:
            # SystemExit, not an Exception: Hydra turns a callback's exceptions into warnings and goes on.
            sys.exit(f"error: {exc}")

    on_multirun_start = on_run_start
