"""`pkmlm-train [key=value ...]`: train a model (Hydra app; `-m` runs sweeps).

With no overrides this is the embedded default run: `model=tiny` + a tiny memory on the
Wikipedia sample, on CPU in a few minutes.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pkmlm.cli._common import precheck_overrides, user_errors_exit_2
from pkmlm.config import config_dir, register_configs

register_configs()


@user_errors_exit_2
def _run(cfg: DictConfig) -> float:
    from pkmlm.train.loop import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    typed = OmegaConf.to_object(cfg)
    summary = train(typed, run_dir, resolved)
    # Returned to Hydra (e.g. for sweepers that optimise a value): final validation loss.
    return float(summary.get("val/loss", float("nan")))


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    return _run(cfg)


def main() -> None:
    precheck_overrides(config_dir(), "config")
    _hydra_main()


if __name__ == "__main__":
    main()
