"""Run one distillation experiment, or a sweep with -m: `python train.py --help`."""

import hydra
from omegaconf import DictConfig

from distillab import cli, conf

conf.register_resolvers()  # the help text lists the models every role can take


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return cli.run_job(cfg)  # distillab.pipeline.run(cfg), with one-line errors


if __name__ == "__main__":
    cli.check_command_line()  # one line and exit 2 for bad input, before the heavy imports
    main()
