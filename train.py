"""Run one distillation experiment, or a sweep with -m: `python train.py --help`."""

import sys

import hydra
from omegaconf import DictConfig

from distillab import cli, pipeline
from distillab.config import ConfigError, register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        record = pipeline.run(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # the student's validation accuracy is the objective a Hydra sweeper maximises
    return record.get("student", {}).get("val", {}).get("acc")


if __name__ == "__main__":
    cli.check_command_line()
    main()
