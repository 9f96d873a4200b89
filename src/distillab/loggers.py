"""Experiment loggers from the ``logger`` group, one set per trained model (teacher, student).

wandb never needs an account: without an API key the run is logged offline (no prompt, no
network wait) and the log says where the files are and how to upload them.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)


def wandb_api_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline(conf: DictConfig) -> bool:
    mode = os.environ.get("WANDB_MODE", "")
    return bool(conf.get("offline")) or mode in ("offline", "dryrun") or not wandb_api_key_present()


def _role_kwargs(target: str, role: str, cfg: DictConfig, sweep_group: str | None) -> dict[str, Any]:
    name = target.rsplit(".", 1)[-1]
    if name in ("CSVLogger", "TensorBoardLogger"):
        return {"version": role}
    if name == "WandbLogger":
        kwargs: dict[str, Any] = {"job_type": role, "offline": wandb_offline(cfg.logger.wandb)}
        if sweep_group:
            kwargs["group"] = sweep_group
        return kwargs
    return {}


def build(cfg: DictConfig, role: str, sweep_group: str | None = None) -> list[Logger]:
    """Instantiate every configured logger for ``role`` ('teacher', 'teacher-<name>' for a member of an
    ensemble, or 'student')."""
    loggers = []
    for conf in (cfg.get("logger") or {}).values():
        if conf is None or "_target_" not in conf:
            continue
        kwargs = _role_kwargs(str(conf._target_), role, cfg, sweep_group)
        if kwargs.get("offline"):
            os.environ.setdefault("WANDB_SILENT", "true")
        logger = instantiate(conf, **kwargs)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def finish(loggers: list[Logger], summary: dict[str, Any] | None = None) -> None:
    """Flush each logger, put ``summary`` in wandb's run summary, and close wandb runs."""
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            run = logger.experiment
            if summary:
                run.summary.update(summary)
            directory = Path(run.dir).parent
            offline = getattr(run.settings, "mode", "") in ("offline", "dryrun") or run.offline
            run.finish()
            if offline:
                log.info("wandb: logged offline to %s; upload with `wandb sync %s`", directory, directory)
        else:
            logger.finalize("success")
            logger.save()
