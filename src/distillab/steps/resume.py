"""Resuming a sweep: run again only the jobs that have no complete result.

Hydra numbers a sweep's jobs in the order of its overrides, so the same command with the same
``hydra.sweep.dir`` gives job k the same folder. A job whose folder already holds a complete
results.json of its own configuration (same config hash) is skipped and returns that record;
``rerun=true`` runs it anyway. Any other job starts from a clean folder: what an earlier attempt
left (a killed job's checkpoint, metric logs, a compressed model, a failed or foreign result)
is removed first, so nothing of it can be mistaken for the new attempt's output.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distillab import results

log = logging.getLogger(__name__)

# what a run writes into its folder next to results.json (logger folders are added from cfg.logger)
ATTEMPT_OUTPUTS = ("checkpoints", "compressed")
# loggers whose files live in <save_dir>/<name>/<role> and are rewritten by every attempt
FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")


def start(out: Path, config_hash: str, rerun: bool, logger: DictConfig | None, sweep: bool) -> dict[str, Any] | None:
    """The stored record when the job of ``config_hash`` in ``out`` is already complete and may be
    skipped (in a sweep, without ``rerun``); otherwise None, after clearing an earlier attempt's
    files (those of the ``logger`` node's file loggers too)."""
    force = rerun
    record, why = results.previous(out, config_hash)
    if record is not None and sweep and not force:
        log.info("skip: %s already complete (config %s); rerun=true runs it again", out, record["config_hash"])
        return record
    if record is not None:
        why = "complete, and rerun=true runs it again" if sweep else "complete, and a single run is never skipped"
    if why:
        log.info("rerun: %s: %s", out, why)
    if _is_rank_zero():
        cleared = clear_attempt(logger, out)
        if cleared:
            log.info("cleared what an earlier attempt left in %s: %s", out, ", ".join(cleared))
    return None


def clear_attempt(logger: DictConfig | None, out: Path) -> list[str]:
    """Remove an earlier attempt's outputs from ``out``; return the names removed. Hydra's own
    files (``.hydra/``, the job log) stay, and nothing outside ``out`` is touched."""
    names = [results.FILENAME, *ATTEMPT_OUTPUTS, *_logger_folders(logger, out)]
    removed = []
    for name in dict.fromkeys(names):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _logger_folders(logger: DictConfig | None, out: Path) -> list[str]:
    """The folders of file loggers that write into ``out`` itself (e.g. ``csv``, ``tensorboard``)."""
    folders = []
    for conf in (logger or {}).values():
        if conf is None or not str(conf.get("_target_", "")).endswith(FOLDER_LOGGERS):
            continue
        name, save_dir = conf.get("name"), conf.get("save_dir")
        if name and save_dir and "/" not in str(name) and Path(str(save_dir)).resolve() == out.resolve():
            folders.append(str(name))
    return folders


def _is_rank_zero() -> bool:
    """Only one process of a distributed job touches the folder."""
    from pytorch_lightning.utilities import rank_zero_only

    return rank_zero_only.rank == 0
