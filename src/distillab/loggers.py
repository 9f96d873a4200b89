"""Experiment loggers from the ``logger`` group, one set per trained model (teacher, student).

wandb never needs an account: without an API key the run is logged offline (no prompt, no
network wait) and the log says where the files are and how to upload them. The jobs of a sweep
share a wandb group named after the sweep folder and are tagged with their overrides; after the
last job one ``sweep-summary`` run of the group holds the sweep's table and plot.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
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


# override keys that say where files go or how they are logged, not what was trained
UNTAGGED = ("hydra", "paths", "logger")
TAG_LENGTH = 64  # wandb rejects longer tags


def override_tags(overrides: list[str]) -> list[str]:
    """wandb tags from a job's overrides (``distill=kd``, ``seed=1``), so the runs of a sweep can
    be filtered by setting. Folder and logger overrides are left out; long ones are cut short."""
    tags: list[str] = []
    for override in overrides:
        text = override.lstrip("+")
        if text.lstrip("~").split("=", 1)[0].split(".", 1)[0] in UNTAGGED:
            continue
        tag = text if len(text) <= TAG_LENGTH else text[: TAG_LENGTH - 1] + "…"
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def _job_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def sweep_group(sweep_dir: str | os.PathLike) -> str:
    """The wandb group of a sweep's runs: its folder, e.g. ``outputs-multirun-2025-01-31-12-00-00``."""
    return Path(sweep_dir).as_posix().replace("/", "-").strip("-.")


def uses_wandb(logger: DictConfig | None) -> bool:
    """Whether the ``logger`` node has a wandb logger."""
    return any(
        conf is not None and str(conf.get("_target_", "")).endswith("WandbLogger") for conf in (logger or {}).values()
    )


def _role_kwargs(target: str, role: str, conf: DictConfig, sweep_group: str | None) -> dict[str, Any]:
    name = target.rsplit(".", 1)[-1]
    if name in ("CSVLogger", "TensorBoardLogger"):
        return {"version": role}
    if name == "WandbLogger":
        kwargs: dict[str, Any] = {
            "job_type": role,
            "offline": wandb_offline(conf),
            "tags": [*(conf.get("tags") or []), *override_tags(_job_overrides())],
        }
        if sweep_group:
            kwargs["group"] = sweep_group
        return kwargs
    return {}


def build(
    logger: DictConfig | None, role: str, hyperparams: dict[str, Any], sweep_group: str | None = None
) -> list[Logger]:
    """Instantiate every logger of the ``logger`` node for ``role`` ('teacher', 'teacher-<name>' for a
    member of an ensemble, or 'student'), each recording ``hyperparams`` (the run's resolved config)."""
    loggers = []
    for conf in (logger or {}).values():
        if conf is None or "_target_" not in conf:
            continue
        kwargs = _role_kwargs(str(conf._target_), role, conf, sweep_group)
        if kwargs.get("offline"):
            os.environ.setdefault("WANDB_SILENT", "true")
        logger = instantiate(conf, **kwargs)
        logger.log_hyperparams(hyperparams)
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


def log_sweep_summary(
    conf: DictConfig, sweep_dir: Path, tables: dict[str, tuple[list[str], list[dict[str, Any]]]], images: list[Path]
) -> Path:
    """One more wandb run in the sweep's group (job type ``sweep-summary``) with the report's
    ``tables`` (name -> columns and rows: the summary and the paired comparisons) and its
    ``images`` (logged under their file stems), so the project page compares the sweep's settings
    without custom panels. Offline without an API key, like the jobs; returns the run's folder."""
    import wandb

    offline = wandb_offline(conf)
    if offline:
        os.environ.setdefault("WANDB_SILENT", "true")
    group = sweep_group(sweep_dir)
    run = wandb.init(
        project=conf.get("project"),
        entity=conf.get("entity"),
        group=group,
        job_type="sweep-summary",
        name=f"{group}-summary"[-128:],
        dir=str(sweep_dir),
        mode="offline" if offline else "online",
        tags=["sweep-summary"],
        config={"sweep_dir": str(sweep_dir)},
    )
    logged: dict[str, Any] = {
        name: wandb.Table(
            columns=columns,
            allow_mixed_types=True,
            data=[[_table_cell(row.get(column)) for column in columns] for row in rows],
        )
        for name, (columns, rows) in tables.items()
    }
    logged.update({image.stem: wandb.Image(str(image)) for image in images})
    run.log(logged)
    directory = Path(run.dir).parent
    run.finish()
    if offline:
        log.info(
            "wandb: sweep summary logged offline to %s; upload the sweep with "
            "`wandb sync %s/wandb/offline-run-* %s/*/wandb/offline-run-*`",
            directory,
            sweep_dir,
            sweep_dir,
        )
    return directory


def _table_cell(value: Any) -> Any:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
