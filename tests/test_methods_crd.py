"""Contrastive representation distillation (``distill=crd``): the NCE loss of both directions
against a float64 numpy computation, the memory bank's momentum update, the negatives, gradient
flow, the settings and a restored checkpoint; then short runs on digits, on a plain
LightningDataModule and with compression fine-tuning."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from distillab import conf, settings
from distillab.distill.hooks import FeatureTaps
from distillab.distill.methods import crd
from distillab.distill.methods.base import needs_index
from distillab.distill.methods.crd import CRD, contrast_scores, draw_contrast_rows, nce_loss, update_memory
from distillab.models import CNN
from distillab.settings import ConfigError
from tests.conftest import FAST, ROOT, run_train
from tests.conftest import as_numpy as _np
from tests.conftest import randn as _randn

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = ROOT / "examples" / "my_datamodule"


def _method(**overrides) -> CRD:
    return conf.build("distill", "crd", **overrides)


def _bound(train_size: int, seed: int = 0, **overrides) -> CRD:
    """A CRD on flat features: 5 student dimensions, 7 teacher dimensions, embedded in 3."""
    torch.manual_seed(seed)
    method = _method(**{"feat_dim": 3, **overrides})
    method.train_size = train_size
    method.build([torch.Size((4, 5))], [torch.Size((4, 7))])
    return method


# -- the maths, against float64 numpy ---------------------------------------------------------------
def _nce_numpy(h: np.ndarray, n: int, eps: float = 1e-7) -> float:
    """Eq. 18 of the paper as the authors compute it, one sample and one negative at a time."""
    b, k = h.shape[0], h.shape[1] - 1
    noise = k / n
    total = 0.0
    for i in range(b):
        total += math.log(h[i, 0] / (h[i, 0] + noise + eps))
        for j in range(1, k + 1):
            total += math.log(noise / (h[i, j] + noise + eps))
    return -total / b


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).sum(axis=-1, keepdims=True))


def test_nce_loss_on_a_hand_built_case():
    # 6 training samples, 2 anchors, 3 negatives each, fixed
    memory = _unit(_np(_randn(6, 3, seed=1)))
    anchors = _unit(_np(_randn(2, 3, seed=2)))
    rows = np.array([[4, 0, 2, 2], [1, 5, 3, 0]])
    temperature, z = 0.5, 7.0
    h = np.zeros((2, 4))
    for i in range(2):
        for j in range(4):
            h[i, j] = math.exp(sum(memory[rows[i, j], d] * anchors[i, d] for d in range(3)) / temperature) / z
    scores = contrast_scores(
        torch.tensor(anchors, dtype=torch.float32), torch.tensor(memory, dtype=torch.float32), torch.tensor(rows), 0.5
    )
    np.testing.assert_allclose(_np(scores) / z, h, rtol=1e-6)
    assert nce_loss(scores / z, 6).item() == pytest.approx(_nce_numpy(h, 6), rel=1e-6)
    assert nce_loss(torch.tensor(h), 6).item() == pytest.approx(_nce_numpy(h, 6), rel=1e-12)  # float64 in, exact


def test_both_directions_of_the_method_against_numpy(monkeypatch):
    """feature_terms end to end: heads, both memories, Z from the first batch, the weight."""
    n, index = 6, torch.tensor([4, 1])
    method = _bound(n, crd_weight=0.3, nce_t=0.2)
    rows = torch.tensor([[4, 0, 2, 2], [1, 5, 3, 0]])
    monkeypatch.setattr(crd, "draw_contrast_rows", lambda *args: rows)
    s, t = _randn(2, 5, seed=3), _randn(2, 7, seed=4)
    memory_s, memory_t = _np(method.memory_student), _np(method.memory_teacher)
    w_s, b_s = _np(method.embed_student.linear.weight), _np(method.embed_student.linear.bias)
    w_t, b_t = _np(method.embed_teacher.linear.weight), _np(method.embed_teacher.linear.bias)
    v_s, v_t = _unit(_np(s) @ w_s.T + b_s), _unit(_np(t) @ w_t.T + b_t)

    def direction(anchors: np.ndarray, memory: np.ndarray) -> float:
        raw = np.exp(np.einsum("ikd,id->ik", memory[rows.numpy()], anchors) / 0.2)
        z = raw.mean() * n  # estimated once, on this first batch
        return _nce_numpy(raw / z, n)

    expected = 0.3 * (direction(v_s, memory_t) + direction(v_t, memory_s))
    terms = method.feature_terms([s], [t], index)
    assert set(terms) == {"crd"}
    assert terms["crd"].item() == pytest.approx(expected, rel=1e-5)
    z_student = np.exp(np.einsum("ikd,id->ik", memory_t[rows.numpy()], v_s) / 0.2).mean() * n
    assert math.exp(method.log_z_student.item()) == pytest.approx(z_student, rel=1e-5)
    # Z stays what the first batch set
    method.feature_terms([_randn(2, 5, seed=5)], [_randn(2, 7, seed=6)], index)
    assert math.exp(method.log_z_student.item()) == pytest.approx(z_student, rel=1e-5)


def test_the_memory_moves_towards_the_batch_and_is_renormalised():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.6, 0.8]])
    embeddings = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    update_memory(memory, torch.tensor([3, 0]), embeddings, 0.25)
    # row 3: 0.25·(0.6, 0.8) + 0.75·(0, 1) = (0.15, 0.95); row 0: 0.25·(1, 0) + 0.75·(1, 0) = (1, 0)
    norm = math.sqrt(0.15**2 + 0.95**2)
    expected = [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.15 / norm, 0.95 / norm]]
    np.testing.assert_allclose(_np(memory), expected, rtol=1e-6)


def test_the_method_updates_both_memories_at_the_batch_indices_without_gradient():
    method = _bound(8, nce_momentum=0.5)
    before_s, before_t = method.memory_student.clone(), method.memory_teacher.clone()
    s, t, index = _randn(3, 5, seed=7).requires_grad_(), _randn(3, 7, seed=8), torch.tensor([6, 2, 5])
    method.feature_terms([s], [t], index)
    with torch.no_grad():
        v_s, v_t = method.embed_student(s), method.embed_teacher(t)
    for memory, before, v in ((method.memory_student, before_s, v_s), (method.memory_teacher, before_t, v_t)):
        assert not memory.requires_grad and memory.grad is None
        mixed = 0.5 * _np(before[index]) + 0.5 * _np(v)
        np.testing.assert_allclose(_np(memory[index]), _unit(mixed), rtol=1e-5, atol=1e-7)
        others = [i for i in range(8) if i not in index.tolist()]
        assert torch.equal(memory[others], before[others])


def test_the_memory_starts_uniform_like_the_reference():
    method = _bound(4000, feat_dim=12)
    bound = 1 / math.sqrt(12 / 3)
    for memory in (method.memory_student, method.memory_teacher):
        assert memory.shape == (4000, 12) and memory.dtype == torch.float32
        assert memory.min() >= -bound and memory.max() <= bound
        assert memory.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.02)  # unit norm on average
    assert not torch.equal(method.memory_student, method.memory_teacher)


# -- negatives --------------------------------------------------------------------------------------
def test_negatives_are_uniform_over_the_other_samples_with_the_positive_first():
    index = torch.tensor([0, 3, 4, 2])
    rows = draw_contrast_rows(index, 20000, 5, torch.Generator().manual_seed(0))
    assert rows.shape == (4, 20001) and torch.equal(rows[:, 0], index)
    negatives = rows[:, 1:]
    assert not (negatives == index.unsqueeze(1)).any()
    assert negatives.min() >= 0 and negatives.max() <= 4
    for i, positive in enumerate(index.tolist()):
        counts = torch.bincount(negatives[i], minlength=5).double() / 20000
        assert counts[positive] == 0
        others = [j for j in range(5) if j != positive]
        np.testing.assert_allclose(counts[others].numpy(), 0.25, atol=0.015)


def test_negatives_are_capped_to_the_other_samples_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="distillab.distill.methods.crd"):
        method = _bound(10, nce_k=100)
    assert method.negatives == 9
    lines = [r.message for r in caplog.records if "nce_k" in r.message]
    assert lines == [
        "distill.nce_k=100 is more than the 9 other samples of a 10-sample training set: 9 negatives per positive"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="distillab.distill.methods.crd"):
        assert _bound(10, nce_k=9).negatives == 9 and _bound(1257, nce_k=16384).negatives == 1256
    assert len([r for r in caplog.records if "nce_k" in r.message]) == 1  # only the one that is capped


def test_the_same_seed_draws_the_same_memory_and_negatives(monkeypatch):
    drawn: list[torch.Tensor] = []

    def keep(*args):
        rows = draw_contrast_rows(*args)
        drawn.append(rows)
        return rows

    monkeypatch.setattr(crd, "draw_contrast_rows", keep)
    index = torch.tensor([1, 7, 3])
    runs = []
    for seed in (11, 11, 12):
        drawn.clear()
        method = _bound(50, seed=seed, nce_k=20)
        for _ in range(3):
            method.feature_terms([_randn(3, 5)], [_randn(3, 7)], index)
        runs.append((method.memory_student.clone(), torch.stack(drawn)))
    assert torch.equal(runs[0][1], runs[1][1]) and torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert not torch.equal(runs[0][1][0], runs[0][1][1])  # a fresh draw at every step


# -- gradients, parameters, buffers, checkpoints ------------------------------------------------------
def _cnn_pair() -> tuple[CNN, CNN]:
    torch.manual_seed(0)
    return CNN((1, 8, 8), 10, width=4, blocks=2, dropout=0.0), CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0)


def test_gradients_reach_the_student_and_the_heads_never_the_teacher():
    student, teacher = _cnn_pair()
    x, y = _randn(16, 1, 8, 8, seed=22), torch.arange(16) % 10
    loss = _method(kd={"lam": 0.5, "temperature": 4.0})
    assert needs_index(loss)
    loss.bind(student, teacher, x[:8], train_size=40)
    assert (loss.student_paths, loss.teacher_paths) == (["classifier:in"], ["classifier:in"])
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    logits, teacher_logits = student(x), teacher(x)  # the teacher with gradients on: the loss must cut them
    student_feats, teacher_feats = taps[0].take(), taps[1].take()
    for tensor in [logits, teacher_logits, *student_feats, *teacher_feats]:
        tensor.retain_grad()
    terms = loss(logits, teacher_logits, y, student_feats, teacher_feats, index=torch.arange(16) + 20)
    assert {"ce", "kd", "crd", "loss"} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    terms["crd"].backward()
    assert student_feats[0].grad is not None and student_feats[0].grad.abs().sum() > 0
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0  # down to the first convolution
    assert teacher_logits.grad is None and teacher_feats[0].grad is None
    assert all(p.grad is None for p in teacher.parameters())
    heads = [*loss.embed_student.parameters(), *loss.embed_teacher.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert {id(p) for p in loss.parameters()} == {id(p) for p in heads}  # the buffers are no parameters
    for name in ("memory_student", "memory_teacher", "log_z_student", "log_z_teacher"):
        buffer = getattr(loss, name)
        assert not buffer.requires_grad and buffer.grad is None
    assert sum(p.numel() for p in loss.parameters()) == (8 * 128 + 128) + (
        16 * 128 + 128
    )  # widths 4, 8: embeddings 8, 16


def test_a_checkpoint_of_the_method_restores_its_memory_and_normalisers(tmp_path):
    method = _bound(12, seed=1)
    method.feature_terms([_randn(4, 5)], [_randn(4, 7)], torch.tensor([0, 5, 6, 11]))
    assert not method.log_z_student.isnan() and not method.log_z_teacher.isnan()
    path = tmp_path / "method.pt"
    torch.save(method.state_dict(), path)
    fresh = _bound(12, seed=2)
    assert not torch.equal(fresh.memory_student, method.memory_student)
    fresh.feature_terms([_randn(4, 5, seed=9)], [_randn(4, 7, seed=9)], torch.tensor([1, 2, 3, 4]))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for name, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert not fresh.z_ready  # Z is read from the restored buffers at the next step
    fresh.feature_terms([_randn(4, 5)], [_randn(4, 7)], torch.tensor([0, 5, 6, 11]))
    assert fresh.log_z_student == method.log_z_student


# -- settings and one-line errors -------------------------------------------------------------------
def _yaml() -> tuple[str, dict]:
    values = OmegaConf.to_container(conf.load("distill", "crd"))
    return values.pop("_target_"), values


BAD = [
    ({"nce_momentum": 1.0}, "nce_momentum=1.0 is not allowed: a momentum in [0, 1) (the share of a memory row kept"),
    ({"nce_k": 0}, "nce_k=0 is not allowed: an integer >= 1"),
    ({"feat_dim": 12.5}, "feat_dim=12.5 is not allowed: an integer >= 1"),
    ({"nce_t": 0}, "nce_t=0 is not allowed: a temperature > 0"),
    ({"crd_weight": -0.8}, "crd_weight=-0.8 is not allowed: a weight >= 0"),
    ({"kd": {"lam": 1.5, "temperature": 4.0}}, "kd.lam=1.5 is not allowed: a weight in [0, 1]"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_a_bad_value_fails_in_one_line_naming_the_key(bad, message):
    target, values = _yaml()
    assert target == "distillab.distill.methods.crd.CRD"
    values.update(bad)
    with pytest.raises(ConfigError) as error:
        settings.check("distill", values, target)
    assert str(error.value).startswith(f"distill.{message}") and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:
        get_class(target)(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_yaml_holds_the_cifar100_recipe():
    _, values = _yaml()
    assert values == {
        "crd_weight": 0.8,
        "feat_dim": 128,
        "nce_k": 16384,
        "nce_t": 0.07,
        "nce_momentum": 0.5,
        "student_layer": None,
        "teacher_layer": None,
        "kd": {"lam": 0.0, "temperature": 4.0},
    }


def test_a_missing_train_size_fails_in_one_line():
    student, teacher = _cnn_pair()
    for size in (None, 0):
        with pytest.raises(ConfigError) as error:
            _method().bind(student, teacher, _randn(4, 1, 8, 8), train_size=size)
        assert "CRD" in str(error.value) and "training set" in str(error.value) and "\n" not in str(error.value)
    method = _method()
    with pytest.raises(ConfigError, match=r"^distill: CRD keeps one memory row per training sample") as error:
        method.build([torch.Size((4, 5))], [torch.Size((4, 7))])  # built without bind()
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        _method().bind(student, teacher, _randn(4, 1, 8, 8), train_size=1)


def test_cached_teacher_outputs_never_stand_in_for_the_live_teacher():
    from distillab.steps.teacher import outputs

    data = conf.build("data", "digits")
    data.setup("fit")
    auto = outputs.OutputSettings(cache="auto", dtype="float32", top_k=None)
    mode, reason = outputs.decide(auto, data, _method())
    assert mode == "live" and "CRD reads the teacher's intermediate features" in reason
    cached = outputs.OutputSettings(cache="cached", dtype="float32", top_k=None)
    with pytest.raises(ConfigError, match=r"^teacher_outputs.cache=cached is not allowed here: CRD reads"):
        outputs.decide(cached, data, _method())


# -- short runs ---------------------------------------------------------------------------------------
def _logged(run: Path, role: str = "student") -> list[dict[str, float]]:
    rows = csv.DictReader((run / "csv" / role / "metrics.csv").open())
    return [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("train/loss")]


def test_digits_run(make_cfg, tmp_path, teacher_cache, caplog):
    from distillab import pipeline

    cfg = make_cfg("distill=crd", "student=cnn", "student.width=8", "trainer.max_epochs=4", cache=teacher_cache)
    with caplog.at_level(logging.INFO, logger="distillab"):
        record = pipeline.run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == "crd"
    epochs = _logged(tmp_path / "run")
    assert len(epochs) == 4
    values = [row["train/crd"] for row in epochs]
    assert all(math.isfinite(v) and v > 0 for v in values), values
    # the first epoch scores against the random initial memory (about the loss of chance); once the
    # memory holds embeddings, the term falls epoch after epoch, below the first epoch's by the fourth
    assert values[1] > values[2] > values[3] and values[3] < values[0], values
    assert record["teacher"]["outputs"] == "live"
    assert "teacher outputs: live: CRD reads the teacher's intermediate features" in caplog.text
    # digits: 1,257 training samples, so 1,256 negatives instead of 16,384, said once
    assert caplog.text.count("distill.nce_k=16384 is more than the 1256 other samples of a 1257-sample") == 1
    student = record["student"]
    deployed = sum(p.numel() for p in CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0).parameters())
    assert student["params"] == deployed  # the heads are not part of the deployed student
    # heads: student embedding 16 → 128 and teacher (cnn, width 32) embedding 64 → 128
    assert student["extra_params"] == (16 * 128 + 128) + (64 * 128 + 128)
    assert student["test"]["acc"] > 0.5


def test_a_plain_datamodule_runs_crd_through_the_indexed_loader(make_cfg, tmp_path, teacher_cache, monkeypatch):
    from distillab import pipeline
    from distillab.data import adapter

    monkeypatch.syspath_prepend(str(EXAMPLE))
    cfg = make_cfg("distill=crd", "student=cnn", "student.width=8", "trainer.max_epochs=2", cache=teacher_cache)
    with open_dict(cfg):
        cfg.data = OmegaConf.load(EXAMPLE / "conf" / "data" / "my_data.yaml")
    served = []
    original = adapter.fit_arguments
    monkeypatch.setattr(
        adapter, "fit_arguments", lambda data, indexed: served.append(indexed) or original(data, indexed)
    )
    record = pipeline.run(cfg)
    assert record["status"] == "ok" and record["dataset"] == "MyDataModule" and served == [True]
    assert record["teacher"]["outputs"] == "live"
    epochs = _logged(tmp_path / "run")
    assert len(epochs) == 2 and all(math.isfinite(row["train/crd"]) for row in epochs)
    # 420 training samples (70 % of the demo set's 600): heads 16 → 128 and 64 → 128
    assert record["student"]["extra_params"] == (16 * 128 + 128) + (64 * 128 + 128)


def test_compression_fine_tuning_with_crd(make_cfg, tmp_path, teacher_cache, caplog):
    from distillab import pipeline

    cfg = make_cfg(
        "distill=crd",
        "student=cnn",
        "student.width=8",
        "trainer.max_epochs=1",
        "compress=prune_structured",
        "compress.finetune_epochs=1",
        cache=teacher_cache,
    )
    with caplog.at_level(logging.INFO, logger="distillab"):
        record = pipeline.run(cfg)
    assert record["status"] == "ok" and record["compress"] == "prune_structured"
    assert record["compressed"]["params"] < record["student"]["params"]
    # the student's fit and the fine-tuning each set their own normalisation constants
    assert caplog.text.count("CRD normalisation constant Z set to") == 4


@pytest.mark.slow  # ~45 s: a teacher and a student fitted by two spawned processes
def test_data_parallel_processes_keep_one_memory(tmp_path, teacher_cache):
    """Under DDP each process updates its memory with the whole global batch (gathered), so the
    copies stay equal and rank 0's copy, in the checkpoint, has every training sample's row."""
    run = tmp_path / "run"
    result = run_train(
        [
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            *FAST,
            "trainer.max_epochs=1",
            "teacher.recipe.max_epochs=1",
            "distill=crd",
            "student=cnn",
            "student.width=8",
            f"hydra.run.dir={run}",
            f"paths.cache_dir={teacher_cache}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for name in ("loss.memory_student", "loss.memory_teacher"):
        norms = state[name].norm(dim=1)  # an updated row has unit norm; an initial one only about
        assert len(norms) == 1257 and bool(((norms - 1).abs() < 1e-4).all()), name


def test_half_precision_buffers_keep_a_large_normaliser():
    """trainer.precision=16-true turns the buffers to float16, whose largest value is 65504: Z, about
    N·mean(exp(m·v/τ)), is kept as its logarithm, and the scores are computed in float32."""
    method = _bound(50000, nce_k=64, nce_t=0.07).half()
    terms = method.feature_terms([_randn(4, 5).half()], [_randn(4, 7).half()], torch.tensor([0, 17, 4000, 49999]))
    assert torch.isfinite(terms["crd"]) and terms["crd"].dtype == torch.float32
    assert method.log_z_student.dtype == torch.float16 and math.exp(method.log_z_student.item()) > 4e4
    assert method.memory_student.dtype == torch.float16
