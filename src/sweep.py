"""Run or resume an Optuna sweep: `python src/sweep.py [sweeps=quick] sweep.n_trials=4 trainer.steps=300`."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from tfsweep.config import CONFIG_DIR
from tfsweep.errors import UserError
from tfsweep.sweep_config import register_sweep_configs

log = logging.getLogger("sweep")
register_sweep_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="sweep")
def main(cfg: DictConfig) -> float | None:
    from tfsweep.sweep import run_sweep  # TensorFlow loads only once the config passed its checks

    try:
        result = run_sweep(cfg)
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to continue the study")
        sys.exit(130)
    return result["best_value"]


if __name__ == "__main__":
    main()
