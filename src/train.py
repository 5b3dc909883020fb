"""Train the tutorial CNN: `python src/train.py model.dropout=0.4 optimizer=adam ...`."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from tfsweep.config import CONFIG_DIR, register_configs
from tfsweep.errors import UserError

log = logging.getLogger("train")
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float:
    from tfsweep.training import train  # TensorFlow loads only once the config passed its checks

    try:
        metrics = train(cfg)
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(1)
    log.info("final metrics: %s", ", ".join(f"{k} = {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics["val/accuracy"]


if __name__ == "__main__":
    main()
