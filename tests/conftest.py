"""Shared fixtures: configs composed from the real conf/ tree, with tiny epochs and private
output and cache folders, so tests call ``pipeline.run(cfg)`` as ``train.py`` would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from distillab import conf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# small enough to finish in seconds, large enough for the digits models to learn
FAST = [
    "num_threads=1",  # tiny models: one thread is fastest, and parallel test runs do not oversubscribe
    "trainer.max_epochs=3",
    "teacher.recipe.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]

conf.register_resolvers()
#: most test workers ``pytest -n auto`` starts (each imports torch and trains small models)
MAX_WORKERS = 8


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one worker per core, at most :data:`MAX_WORKERS`."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config) -> None:
    """In a test worker, torch gets the worker's share of the cores, so that workers training at
    the same time do not oversubscribe them (a test that sets its own thread count restores it)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def compose_cfg(overrides: list[str], out: Path, cache: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml like a Hydra run, with output and cache folders under ``out``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out)
        cfg.paths.cache_dir = str(cache or out / "teacher_cache")
        del cfg.hydra
    return cfg


def compose_hydra(*overrides: str) -> DictConfig:
    """conf/train.yaml composed with Hydra's own node (``hydra.sweeper``, ``hydra.launcher``), as is."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher cache of the whole test session: each teacher (the FAST digits cnn above all) is
    trained once and then loaded by every test that only needs *a* trained teacher. Under xdist the
    workers share the folder, and the cache's own file lock makes one of them train a missing
    teacher while the others wait for it, as two jobs of a sweep do."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "teacher_cache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def make_cfg(tmp_path: Path, teacher_cache: Path):
    """``make_cfg(*overrides)`` composes a run whose teachers come from the session's
    :func:`teacher_cache`; a test of the cache itself (a miss, a hit, a lock, a crash) or one that
    trains a teacher in its own way passes ``own_cache=True`` (``tmp_path / "cache"``) or a ``cache``."""

    def make(
        *overrides: str,
        fast: bool = True,
        out: Path | None = None,
        cache: Path | None = None,
        own_cache: bool = False,
    ) -> DictConfig:
        chosen = (FAST if fast else []) + list(overrides)
        folder = cache or (tmp_path / "cache" if own_cache else teacher_cache)
        return compose_cfg(chosen, out or tmp_path / "run", folder)

    yield make
    GlobalHydra.instance().clear()


def run_train(
    args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def teacher_key(cfg: DictConfig) -> str:
    """The teacher-cache key of a composed run config."""
    from distillab.steps.teacher import cache

    return cache.cache_key(cache.identity(cfg.data, cfg.teacher, cfg.trainer.precision))


def teacher_folder(cfg: DictConfig) -> Path:
    """The teacher-cache folder of a composed run config."""
    from distillab.steps.teacher import cache

    return cache.cache_folder(cfg.paths.cache_dir, cache.identity(cfg.data, cfg.teacher, cfg.trainer.precision))


def quiet_trainer(epochs: int, root_dir: Path | None = None, callbacks=(), **options):
    """A CPU Lightning Trainer for unit tests: no logger, bar, summary or checkpoint unless asked."""
    import pytorch_lightning as pl

    settings = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        **options,
    }
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", callbacks=list(callbacks), default_root_dir=root_dir, **settings
    )


# -- helpers of the numeric tests -------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): they run many times faster on one thread than on all cores when the cores
    are shared (another test run beside this one); the setting is restored after the module."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int = 0, dtype=None):
    """A standard normal tensor from its own generator: the same numbers whatever ran before."""
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def as_numpy(x):
    """A tensor as a float64 numpy array, for the independent computations."""
    return x.detach().double().numpy()


@pytest.fixture(scope="module")
def digits_splits() -> dict:
    """The train/val/test tensors of ``data=digits`` as the run splits them."""
    return conf.build("data", "digits").splits


def fit_on_digits(model, splits: dict, epochs: int, lr: float = 1e-3):
    """``model`` trained in place by Adam and cross-entropy on the digits training split, in a
    seeded batch order, and returned in eval mode: a trained model for a test in a second."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    x, y = splits["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=order).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()
