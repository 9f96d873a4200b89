"""Distillation methods (FitNet, AT, SP, RKD, PKT, DKD; the newer ones have test files of their
own) against independent computations: closed forms on hand-chosen inputs, and explicit loops over
samples, pairs, triplets and classes in float64 numpy. Then gradient flow, layer binding on zoo and
library models, the settings each method declares against the values of its ``conf/distill`` YAML,
and one short digits run per method."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from distillab import conf, settings
from distillab.distill import hooks
from distillab.distill.hooks import FeatureTaps
from distillab.distill.methods.at import AttentionTransfer, at_loss
from distillab.distill.methods.base import is_feature_method
from distillab.distill.methods.crd import CRD
from distillab.distill.methods.dist import DIST
from distillab.distill.methods.dkd import DecoupledKD, dkd_parts, dkd_warmup
from distillab.distill.methods.dml import DeepMutualLearning
from distillab.distill.methods.fitnet import FitNet, Regressor, hint_loss
from distillab.distill.methods.kd import KD, soft_kl
from distillab.distill.methods.none import CrossEntropy
from distillab.distill.methods.nst import NST
from distillab.distill.methods.ofd import OFD
from distillab.distill.methods.online import OnlineKD
from distillab.distill.methods.pkt import ProbabilisticTransfer, pkt_loss
from distillab.distill.methods.reviewkd import ReviewKD
from distillab.distill.methods.rkd import RelationalKD, rkd_angle_loss, rkd_distance_loss
from distillab.distill.methods.sp import SimilarityPreserving, sp_loss
from distillab.distill.methods.vid import VID
from distillab.labels import UNLABELLED
from distillab.models import CNN, MLP, resnet8, torchvision_model, vgg8, wrn_16_1
from distillab.settings import ConfigError
from tests.conftest import as_numpy as _np
from tests.conftest import randn as _randn

pytestmark = pytest.mark.usefixtures("one_thread")


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _method(option: str, **overrides):
    """The method ``conf/distill/<option>.yaml`` configures, with ``overrides`` on its values."""
    return conf.build("distill", option, **overrides)


#: the errors of a wrong layer: the base's own, and those of ``distill.hooks``
LAYER_ERRORS = tuple({ConfigError, hooks.ConfigError})


# -- FitNet -----------------------------------------------------------------------------------------
def test_hint_loss_is_the_mean_squared_difference():
    s, t = _randn(2, 3, 2, 2, seed=1), _randn(2, 3, 2, 2, seed=2)
    expected = sum((a - b) ** 2 for a, b in zip(_np(s).ravel(), _np(t).ravel())) / s.numel()
    assert hint_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    loss = _method("fitnet", hint_weight=7.0)
    loss.build([s.shape], [t.shape])
    assert isinstance(loss.regressor, nn.Identity)  # same shapes: nothing to learn
    assert loss.feature_terms([s], [t])["hint"].item() == pytest.approx(7 * expected, rel=1e-6)


@pytest.mark.parametrize(
    "student_shape, teacher_shape, params",
    [
        ((4, 3, 4, 4), (4, 5, 4, 4), 3 * 5 + 2 * 5),  # 1×1 conv (no bias) + BN
        ((4, 3, 4, 4), (4, 5, 2, 2), 3 * 5 + 2 * 5),  # resampled to the teacher's 2×2
        ((4, 6), (4, 2, 2, 2), 6 * 8 + 8),  # flat student, map teacher: linear
        ((4, 2, 2, 2), (4, 5), 8 * 5 + 5),  # map student, flat teacher: linear
    ],
)
def test_regressor_maps_the_student_onto_the_teacher_shape(student_shape, teacher_shape, params):
    regressor = Regressor(torch.Size(student_shape), torch.Size(teacher_shape))
    assert sum(p.numel() for p in regressor.parameters()) == params
    assert regressor(_randn(*student_shape)).shape == teacher_shape
    loss = _method("fitnet", hint_weight=1.0)
    loss.build([torch.Size(student_shape)], [torch.Size(teacher_shape)])
    assert sum(p.numel() for p in loss.parameters()) == params


def test_spatial_regressor_is_a_one_by_one_convolution_then_batch_norm():
    x = _randn(2, 3, 4, 4, seed=3)
    regressor = Regressor(x.shape, torch.Size((2, 2, 2, 2))).eval()  # BN at its initial statistics
    weight = _np(regressor.map[0].weight)[:, :, 0, 0]  # 2×3
    xs = _np(x)
    pooled = np.zeros((2, 3, 2, 2))  # adaptive pooling 4×4 → 2×2 averages 2×2 blocks
    for n, c, i, j in itertools.product(range(2), range(3), range(2), range(2)):
        pooled[n, c, i, j] = xs[n, c, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
    expected = np.zeros((2, 2, 2, 2))
    for n, o, i, j in itertools.product(range(2), range(2), range(2), range(2)):
        expected[n, o, i, j] = sum(weight[o, c] * pooled[n, c, i, j] for c in range(3)) / math.sqrt(1 + 1e-5)
    np.testing.assert_allclose(_np(regressor(x)), expected, rtol=1e-5, atol=1e-6)


# -- attention transfer -----------------------------------------------------------------------------
def _attention(f: np.ndarray, p: float) -> np.ndarray:
    n, c, h, w = f.shape
    maps = np.zeros((n, h * w))
    for i in range(n):
        for j in range(h * w):
            maps[i, j] = sum(abs(f[i, k].ravel()[j]) ** p for k in range(c)) / c
        maps[i] /= math.sqrt(sum(v * v for v in maps[i]))
    return maps


def _block_mean(f: np.ndarray, size: int) -> np.ndarray:
    n, c, h, _ = f.shape
    k = h // size
    out = np.zeros((n, c, size, size))
    for a, b, i, j in itertools.product(range(n), range(c), range(size), range(size)):
        out[a, b, i, j] = f[a, b, k * i : k * i + k, k * j : k * j + k].mean()
    return out


def test_attention_transfer_closed_form():
    # one sample, one channel, two positions: q_s = (3², 4²)/‖·‖ = (9, 16)/√337, q_t = (1, 0)
    s = torch.tensor([[[[3.0, -4.0]]]])  # the sign is lost in |f|
    t = torch.tensor([[[[2.0, 0.0]]]])
    norm = math.sqrt(81 + 256)
    expected = ((9 / norm - 1) ** 2 + (16 / norm) ** 2) / 2  # mean over the 2 positions
    assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    # attention is invariant to the scale of the map and to the number of channels
    f = _randn(3, 4, 4, 4).relu()
    assert at_loss(f, 5 * f.repeat(1, 2, 1, 1)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("p", [2.0, 3.0, 1.0])
def test_attention_transfer_matches_a_loop(p):
    s, t = _randn(3, 4, 4, 4, seed=4), _randn(3, 6, 4, 4, seed=5)
    q_s, q_t = _attention(_np(s), p), _attention(_np(t), p)
    expected = sum((a - b) ** 2 for a, b in zip(q_s.ravel(), q_t.ravel())) / (3 * 16)
    assert at_loss(s, t, p).item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_pools_the_larger_map_and_sums_pairs():
    s1, t1 = _randn(2, 3, 4, 4, seed=6), _randn(2, 5, 2, 2, seed=7)  # student larger: pooled to 2×2
    s2, t2 = _randn(2, 3, 2, 2, seed=8), _randn(2, 5, 4, 4, seed=9)  # teacher larger
    first = np.sum((_attention(_block_mean(_np(s1), 2), 2) - _attention(_np(t1), 2)) ** 2) / (2 * 4)
    second = np.sum((_attention(_np(s2), 2) - _attention(_block_mean(_np(t2), 2), 2)) ** 2) / (2 * 4)
    loss = _method("at", at_weight=1000.0)
    got = loss.feature_terms([s1, s2], [t1, t2])["at"].item()
    assert got == pytest.approx(1000 * (first + second), rel=1e-5)


# -- similarity-preserving --------------------------------------------------------------------------
def _similarity(f: np.ndarray) -> np.ndarray:
    flat = f.reshape(len(f), -1)
    b = len(flat)
    g = np.array([[sum(flat[i] * flat[j]) for j in range(b)] for i in range(b)])
    return np.array([row / math.sqrt(sum(row * row)) for row in g])


def test_similarity_preserving_matches_a_loop_over_pairs():
    s, t = _randn(5, 3, 2, 2, seed=10), _randn(5, 7, seed=11)  # different shapes: only b×b matrices meet
    g_s, g_t = _similarity(_np(s)), _similarity(_np(t))
    expected = sum((g_s[i, j] - g_t[i, j]) ** 2 for i in range(5) for j in range(5)) / 25
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    loss = _method("sp", sp_weight=3000.0)
    assert loss.feature_terms([s, s], [t, 2 * s])["sp"].item() == pytest.approx(3000 * expected, rel=1e-5)


def test_similarity_preserving_closed_form():
    # two orthogonal samples: G_s = diag(1, 4) → rows (1, 0), (0, 1); two equal ones: rows (1, 1)/√2
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    expected = 2 * ((1 - r) ** 2 + r**2) / 4
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-6)


# -- relational KD ----------------------------------------------------------------------------------
def _psi_distance(e: np.ndarray) -> np.ndarray:
    b = len(e)
    d = np.zeros((b, b))
    for i, j in itertools.product(range(b), range(b)):
        if i != j:
            d[i, j] = math.sqrt(sum((e[i] - e[j]) ** 2))
    return d / (d.sum() / (b * (b - 1)))


def _psi_angle(e: np.ndarray) -> np.ndarray:
    b = len(e)
    cos = np.zeros((b, b, b))
    for i, j, k in itertools.product(range(b), range(b), range(b)):
        u, v = e[j] - e[i], e[k] - e[i]
        nu, nv = math.sqrt(sum(u * u)), math.sqrt(sum(v * v))
        cos[i, j, k] = sum(u * v) / (nu * nv) if nu > 0 and nv > 0 else 0.0
    return cos


def test_rkd_closed_form_equilateral_against_collinear():
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # all distances 1
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # distances 1, 2, 1: mean 4/3
    # ψ_D: student 1 everywhere off the diagonal, teacher (0.75, 1.5, 0.75): 6 off-diagonal entries of 9
    distance = 2 * (_huber(0.25) + _huber(0.5) + _huber(0.25)) / 9
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distance, rel=1e-5)
    # ψ_A: the student's angles are 60° (cos 1/2); the teacher's are 0° at the ends and 180° in the
    # middle; j = k ≠ i gives 1 in both, degenerate triplets 0 in both: 27 entries
    angle = 2 * (_huber(0.5) + _huber(1.5) + _huber(0.5)) / 27
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(angle, rel=1e-5)


def test_rkd_matches_loops_over_pairs_and_triplets():
    student = _randn(6, 4, seed=12)
    teacher = _randn(6, 9, seed=13)
    teacher[0] *= 8  # an outlier: some ψ_D differences exceed 1, the linear part of the Huber loss
    psi_s, psi_t = _psi_distance(_np(student)), _psi_distance(_np(teacher))
    assert np.abs(psi_s - psi_t).max() > 1 and np.abs(psi_s - psi_t)[psi_s != psi_t].min() < 1
    distance = sum(_huber(a - b) for a, b in zip(psi_s.ravel(), psi_t.ravel())) / 36
    cos_s, cos_t = _psi_angle(_np(student)), _psi_angle(_np(teacher))
    angle = sum(_huber(a - b) for a, b in zip(cos_s.ravel(), cos_t.ravel())) / 216
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distance, rel=1e-5)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(angle, rel=1e-5)
    terms = _method("rkd", distance_weight=25.0, angle_weight=50.0).feature_terms([student], [teacher])
    assert terms["rkd_distance"].item() == pytest.approx(25 * distance, rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(50 * angle, rel=1e-5)


def test_rkd_is_invariant_to_scale_and_translation():
    e = _randn(5, 3, seed=14)
    assert rkd_distance_loss(e, 3 * e + 1).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(e, 2 * e - 4).item() == pytest.approx(0.0, abs=1e-6)


# -- probabilistic knowledge transfer ---------------------------------------------------------------
def _conditionals(f: np.ndarray) -> np.ndarray:
    flat = f.reshape(len(f), -1)
    unit = [v / math.sqrt(sum(v * v)) for v in flat]
    sim = np.array([[(sum(a * b) + 1) / 2 for b in unit] for a in unit])
    return np.array([row / sum(row) for row in sim])


def test_pkt_closed_form():
    # orthogonal student samples: rows (1, 1/2)/(3/2) = (2/3, 1/3); parallel teacher ones: (1/2, 1/2)
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    per_row = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert pkt_loss(s, t).item() == pytest.approx(2 * per_row / 4, rel=1e-5)
    assert pkt_loss(s, 4 * s).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_matches_a_loop():
    s, t = _randn(5, 2, 2, 2, seed=15), _randn(5, 6, seed=16)
    p_s, p_t = _conditionals(_np(s)), _conditionals(_np(t))
    eps = 1e-7
    expected = sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps)) for i in range(5) for j in range(5)) / 25
    assert pkt_loss(s, t).item() == pytest.approx(expected, rel=1e-5)
    terms = _method("pkt", pkt_weight=30000.0).feature_terms([s], [t])
    assert terms["pkt"].item() == pytest.approx(30000 * expected, rel=1e-5)


# -- decoupled KD -----------------------------------------------------------------------------------
def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _dkd_loop(student: list[float], teacher: list[float], target: int, temperature: float) -> tuple[float, float]:
    p_s, p_t = _softmax(student, temperature), _softmax(teacher, temperature)
    tckd = _kl([p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]])
    others = [c for c in range(len(student)) if c != target]
    q_s = _softmax([student[c] for c in others], temperature)
    q_t = _softmax([teacher[c] for c in others], temperature)
    return tckd, _kl(q_t, q_s)


STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, 0.1, -0.3]]
TEACHER = [[2.0, 1.0, 0.0, 0.5], [0.5, 0.5, 2.0, -2.0], [4.0, -1.0, 0.0, 1.0]]
TARGETS = [1, 2, 3]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_parts_match_a_loop_over_classes(temperature):
    double = torch.float64  # KL of near-equal distributions cancels: compare in double precision
    tckd, nckd = dkd_parts(
        torch.tensor(STUDENT, dtype=double),
        torch.tensor(TEACHER, dtype=double),
        torch.tensor(TARGETS),
        temperature,
        reduction="none",
    )
    for i, (s, t, y) in enumerate(zip(STUDENT, TEACHER, TARGETS)):
        expected_tckd, expected_nckd = _dkd_loop(s, t, y, temperature)
        assert tckd[i].item() == pytest.approx(expected_tckd, rel=1e-9)
        assert nckd[i].item() == pytest.approx(expected_nckd, rel=1e-9)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_decomposes_into_tckd_and_weighted_nckd(temperature):
    """Zhao et al. (2022), eq. 4: KD = TCKD + (1 − p_t)·NCKD, p_t the teacher's target probability at T."""
    s, t, y = _randn(6, 5, seed=17) * 3, _randn(6, 5, seed=18) * 3, torch.tensor([0, 1, 2, 3, 4, 0])
    tckd, nckd = dkd_parts(s, t, y, temperature, reduction="none")
    for i in range(6):
        kd = soft_kl(s[i : i + 1], t[i : i + 1], temperature).item()
        p_target = _softmax(t[i].tolist(), temperature)[int(y[i])]
        assert tckd[i].item() + (1 - p_target) * nckd[i].item() == pytest.approx(kd, rel=1e-4, abs=1e-7)


def test_dkd_special_cases():
    # two classes: a single non-target class, so its distribution is 1 and NCKD = 0
    s, t, y = _randn(4, 2, seed=19), _randn(4, 2, seed=20), torch.tensor([0, 1, 1, 0])
    _, nckd = dkd_parts(s, t, y, 4.0, reduction="none")
    assert torch.allclose(nckd, torch.zeros(4), atol=1e-7)
    # logits that differ only at the target: NCKD = 0 while TCKD > 0
    s, y = _randn(3, 5, seed=21), torch.tensor([0, 2, 4])
    t = s.clone()
    t[torch.arange(3), y] += 2.0
    tckd, nckd = dkd_parts(s, t, y, 2.0, reduction="none")
    assert torch.allclose(nckd, torch.zeros(3), atol=1e-7) and (tckd > 1e-3).all()
    # non-target logits permuted among themselves: the target probability is kept, TCKD = 0 while NCKD > 0
    t = s[:, [0, 2, 3, 4, 1]]
    tckd, nckd = dkd_parts(s, t, torch.zeros(3, dtype=torch.long), 2.0, reduction="none")
    assert torch.allclose(tckd, torch.zeros(3), atol=1e-6) and (nckd > 1e-3).all()


def test_dkd_loss_terms_weights_and_warmup():
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    temperature, alpha, beta = 4.0, 1.5, 8.0
    loops = [_dkd_loop(a, b, c, temperature) for a, b, c in zip(STUDENT, TEACHER, TARGETS)]
    tckd, nckd = sum(x for x, _ in loops) / 3, sum(x for _, x in loops) / 3
    ce = -sum(math.log(_softmax(a, 1.0)[c]) for a, c in zip(STUDENT, TARGETS)) / 3
    loss = DecoupledKD(
        ce_weight=0.5, alpha=alpha, beta=beta, temperature=temperature, warmup_epochs=4, standardize=False
    )
    assert loss.temperature == temperature
    for epoch, w in ((0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)):
        loss.on_epoch_start(epoch)
        terms = loss(s, t, y)
        assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)
        assert terms["tckd"].item() == pytest.approx(w * alpha * temperature**2 * tckd, rel=1e-5, abs=1e-5)
        assert terms["nckd"].item() == pytest.approx(w * beta * temperature**2 * nckd, rel=1e-5)
        assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in ("ce", "tckd", "nckd")), rel=1e-6)
    assert [dkd_warmup(e, 0) for e in (0, 5)] == [1.0, 1.0]  # no warm-up
    assert _method("dkd", warmup_epochs=0, standardize=False)(s, t, y)["tckd"].item() == pytest.approx(
        16 * tckd, rel=1e-5, abs=1e-5
    )


def test_dkd_unlabelled_samples_take_the_teachers_class():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    y = torch.tensor([UNLABELLED, 2, UNLABELLED])
    teacher_class = [max(range(4), key=lambda c: row[c]) for row in TEACHER]
    student_class = [max(range(4), key=lambda c: row[c]) for row in STUDENT]
    assert teacher_class[0] != student_class[0]  # the sample tells whose prediction is taken
    loops = [_dkd_loop(STUDENT[i], TEACHER[i], teacher_class[i], 4.0) for i in (0, 2)]
    loops.append(_dkd_loop(STUDENT[1], TEACHER[1], 2, 4.0))
    terms = DecoupledKD(ce_weight=1.0, alpha=1.0, beta=1.0, temperature=4.0, warmup_epochs=0, standardize=False)(
        s, t, y
    )
    assert terms["ce"].item() == pytest.approx(-math.log(_softmax(STUDENT[1], 1.0)[2]), rel=1e-5)  # labelled only
    assert terms["tckd"].item() == pytest.approx(16 * sum(x for x, _ in loops) / 3, rel=1e-5, abs=1e-5)
    assert terms["nckd"].item() == pytest.approx(16 * sum(x for _, x in loops) / 3, rel=1e-5)


# -- gradient flow through real models --------------------------------------------------------------
METHODS = {
    "fitnet": (lambda: _method("fitnet", kd={"lam": 0.5, "temperature": 4.0}), ["hint"]),
    "at": (lambda: _method("at", kd={"lam": 0.5, "temperature": 4.0}), ["at"]),
    "sp": (lambda: _method("sp", kd={"lam": 0.5, "temperature": 4.0}), ["sp"]),
    "rkd": (lambda: _method("rkd", kd={"lam": 0.5, "temperature": 4.0}), ["rkd_distance", "rkd_angle"]),
    "pkt": (lambda: _method("pkt", kd={"lam": 0.5, "temperature": 4.0}), ["pkt"]),
    "dkd": (lambda: _method("dkd", warmup_epochs=0), ["tckd", "nckd"]),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_reach_the_student_only(method):
    make, names = METHODS[method]
    torch.manual_seed(0)
    student, teacher = (
        CNN((1, 8, 8), 10, width=4, blocks=2, dropout=0.0),
        CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0),
    )
    x, y = _randn(16, 1, 8, 8, seed=22), torch.arange(16) % 10
    loss = make()
    feature = is_feature_method(loss)  # a logit method (DKD) reads no layers and takes no features
    if feature:
        loss.bind(student, teacher, x[:8])
    paths = (loss.student_paths, loss.teacher_paths) if feature else ([], [])
    taps = [FeatureTaps(student, paths[0]), FeatureTaps(teacher, paths[1])]
    logits, teacher_logits = student(x), teacher(x)  # the teacher with gradients on: the loss must cut them
    student_feats, teacher_feats = taps[0].take(), taps[1].take()
    for tensor in [logits, teacher_logits, *student_feats, *teacher_feats]:
        tensor.retain_grad()
    features = (student_feats, teacher_feats) if feature else ()
    terms = loss(logits, teacher_logits, y, *features)
    assert set(names) <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    (sum(terms[name] for name in names) + terms.get("kd", 0)).backward()  # the method's own terms
    reached = student_feats or [logits]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in reached)
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0  # down to the first convolution
    assert teacher_logits.grad is None and all(f.grad is None for f in teacher_feats)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in loss.parameters())  # FitNet's regressor learns too
    if method == "fitnet":
        assert sum(p.numel() for p in loss.parameters()) > 0


# -- binding layers ---------------------------------------------------------------------------------
def _bound(loss, student: nn.Module, teacher: nn.Module, channels: int = 3, **kwargs) -> tuple[list, list]:
    loss.bind(student, teacher, _randn(4, channels, 8, 8), **kwargs)
    return loss.student_paths, loss.teacher_paths


def test_default_layers_on_zoo_models():
    shape = (3, 8, 8)
    cnn, mlp, r8, wrn, vgg = (
        CNN(shape, 10, width=4, blocks=2, dropout=0.0),
        MLP(shape, 10, hidden=[32], dropout=0.0, input_dropout=0.0),
        resnet8(shape, 10),
        wrn_16_1(shape, 10),
        vgg8(shape, 10),
    )
    assert _bound(_method("fitnet"), cnn, r8) == (["stages.1"], ["layer2"])  # the middle stage
    assert _bound(_method("fitnet"), wrn, vgg) == (["layer2"], ["block2"])
    assert _bound(_method("at"), r8, wrn) == (["layer1", "layer2", "layer3"], ["layer1", "layer2", "layer3"])
    # a 2-stage student and a 3-stage teacher pair up from the output side
    assert _bound(_method("at"), cnn, r8) == (["stages.0", "stages.1"], ["layer2", "layer3"])
    assert _bound(_method("sp"), cnn, vgg) == (["stages.1"], ["block4"])  # the last stage
    assert _bound(_method("sp"), mlp, r8) == (["features.2"], ["layer3"])  # an MLP's hidden activation
    for loss in (_method("rkd"), _method("pkt")):
        assert _bound(loss, mlp, r8) == (["classifier:in"], ["fc:in"])  # the embeddings
        assert _bound(loss, cnn, vgg) == (["classifier:in"], ["classifier:in"])
    # fine-tuning a compressed copy: the student's layers on both sides
    assert _bound(_method("at"), r8, resnet8(shape, 10), same_architecture=True)[1] == ["layer1", "layer2", "layer3"]
    # explicit paths win, with the :in suffix
    loss = _method("sp", student_layers=["stages.0", "stages.1:in"], teacher_layers=["layer1", "layer3.0.conv1"])
    assert _bound(loss, cnn, r8) == (["stages.0", "stages.1:in"], ["layer1", "layer3.0.conv1"])
    assert _bound(_method("rkd", student_layer="pool", teacher_layer="layer3"), cnn, r8) == (["pool"], ["layer3"])


def test_wrong_layer_fails_with_one_line_naming_near_paths():
    cnn, r8 = CNN((1, 8, 8), 10, width=4, blocks=2, dropout=0.0), resnet8((1, 8, 8), 10)
    with pytest.raises(LAYER_ERRORS) as error:
        _bound(_method("fitnet", student_layer="stage.1"), cnn, r8, channels=1)
    message = str(error.value)
    assert "\n" not in message and "distill.student_layer='stage.1'" in message and "stages.1" in message
    with pytest.raises(LAYER_ERRORS) as error:
        _bound(_method("at", teacher_layers=["layer1", "layr3"]), cnn, r8, channels=1)
    message = str(error.value)
    assert "\n" not in message and "distill.teacher_layers='layr3'" in message and "layer3" in message
    with pytest.raises(LAYER_ERRORS, match="must pair up"):
        _bound(_method("sp", student_layers=["stages.0", "stages.1"], teacher_layers=["layer3"]), cnn, r8, channels=1)


def test_attention_transfer_needs_feature_maps():
    mlp, cnn = (
        MLP((1, 8, 8), 10, hidden=[32], dropout=0.0, input_dropout=0.0),
        CNN((1, 8, 8), 10, width=4, blocks=2, dropout=0.0),
    )
    with pytest.raises(LAYER_ERRORS) as error:
        _bound(_method("at"), mlp, cnn, channels=1)
    message = str(error.value)
    assert "\n" not in message
    assert "N×C×H×W" in message and "'features.2'" in message and "[4, 32]" in message and "student=cnn" in message
    with pytest.raises(LAYER_ERRORS, match=r"teacher layer 'classifier:in' gives shape \[4, 8\].*teacher=cnn"):
        _bound(_method("at", student_layers=["stages.1"], teacher_layers=["classifier:in"]), cnn, cnn, channels=1)


def _train_step(loss, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    taps = [FeatureTaps(student, loss.student_paths), FeatureTaps(teacher, loss.teacher_paths)]
    try:
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        terms = loss(logits, teacher_logits, torch.arange(len(x)) % 10, taps[0].take(), taps[1].take())
        terms["loss"].backward()
        return terms
    finally:
        for tap in taps:
            tap.remove()


def _library_model_binds(model: nn.Module) -> None:
    cnn, x = CNN((3, 8, 8), 10, width=4, blocks=2, dropout=0.0), _randn(4, 3, 8, 8, seed=23)
    model.eval()
    # defaults: the library model's stages and embedding
    assert _bound(_method("at"), cnn, model)[1] == ["layer3", "layer4"]
    assert _bound(_method("rkd"), cnn, model)[1] == ["fc:in"]
    # explicit paths deep inside the model, as student and as teacher
    fitnet = _method("fitnet", student_layer="layer2.1.conv2", teacher_layer="stages.1")
    assert _bound(fitnet, model, cnn) == (["layer2.1.conv2"], ["stages.1"])
    terms = _train_step(fitnet, model, cnn, x)
    assert torch.isfinite(terms["hint"]) and model.layer2[1].conv2.weight.grad is not None
    pkt = _method("pkt", teacher_layer="layer4.1.bn2")
    _bound(pkt, cnn, model)
    assert torch.isfinite(_train_step(pkt, cnn, model, x)["pkt"])


def test_torchvision_model_as_teacher_and_student():
    _library_model_binds(torchvision_model((3, 8, 8), 10, name="resnet18", pretrained=False, weights=None))


def test_timm_model_as_teacher_and_student():
    pytest.importorskip("timm")
    from distillab.models import timm_model

    _library_model_binds(timm_model((3, 8, 8), 10, name="resnet18", pretrained=False))


# -- settings: declared on the constructor, valued in conf/distill/ ---------------------------------
OPTIONS = conf.options("distill")
CLASSES = {
    "none": CrossEntropy,
    "kd": KD,
    "fitnet": FitNet,
    "at": AttentionTransfer,
    "sp": SimilarityPreserving,
    "rkd": RelationalKD,
    "pkt": ProbabilisticTransfer,
    "dkd": DecoupledKD,
    "vid": VID,
    "nst": NST,
    "ofd": OFD,
    "reviewkd": ReviewKD,
    "crd": CRD,
    "dist": DIST,
    "dml": DeepMutualLearning,
    "online": OnlineKD,
}


def _yaml(option: str) -> tuple[str, dict]:
    """The ``_target_`` of ``conf/distill/<option>.yaml`` and the values it sets."""
    values = OmegaConf.to_container(conf.load("distill", option))
    return values.pop("_target_"), values


def test_every_option_builds_its_class():
    assert OPTIONS == sorted(CLASSES)
    for option, cls in CLASSES.items():
        assert type(_method(option)) is cls


BAD = [
    ("fitnet", {"hint_weight": -1}, "hint_weight=-1 is not allowed: a weight >= 0"),
    ("at", {"p": 0}, "p=0 is not allowed: an exponent > 0 (2 in the paper)"),
    ("at", {"student_layers": 3}, "student_layers=3 is not allowed: a string or a list, or null"),
    ("sp", {"kd": {"lam": 2, "temperature": 4.0}}, "kd.lam=2 is not allowed: a weight in [0, 1]"),
    ("rkd", {"angle_weight": float("nan")}, "angle_weight=nan is not allowed: a weight >= 0"),
    ("pkt", {"kd": {"lam": 0.0, "temperature": 0}}, "kd.temperature=0 is not allowed: a temperature > 0"),
    ("dkd", {"temperature": float("inf")}, "temperature=inf is not allowed: a temperature > 0"),
    ("dkd", {"warmup_epochs": -1}, "warmup_epochs=-1 is not allowed: epochs >= 0 (the DKD terms ramp up"),
    ("kd", {"lam": 1.5}, "lam=1.5 is not allowed: a weight in [0, 1]"),
]


@pytest.mark.parametrize("option, bad, message", BAD)
def test_a_bad_value_fails_in_one_line_naming_the_key(option, bad, message):
    target, values = _yaml(option)
    values.update(bad)
    with pytest.raises(ConfigError) as error:  # from the config node, before anything is built
        settings.check("distill", values, target)
    assert str(error.value).startswith(f"distill.{message}") and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:  # and when the method is built from Python
        get_class(target)(**values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


# -- one short digits run per method -----------------------------------------------------------------
def _logged(run: Path) -> list[dict[str, float]]:
    rows = csv.DictReader((run / "csv" / "student" / "metrics.csv").open())
    return [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("train/loss")]


RUNS = {
    "fitnet": (["distill=fitnet"], ["hint"]),
    "at": (["distill=at"], ["at"]),
    "sp": (["distill=sp"], ["sp"]),
    "rkd": (["distill=rkd"], ["rkd_distance", "rkd_angle"]),
    "pkt": (["distill=pkt"], ["pkt"]),
    "dkd": (["distill=dkd", "distill.warmup_epochs=2"], ["ce", "tckd", "nckd"]),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_digits_run_per_method(method, make_cfg, tmp_path, teacher_cache):
    overrides, names = RUNS[method]
    from distillab import pipeline  # imported here: the unit tests above do not need the run

    cfg = make_cfg(*overrides, "student=cnn", "student.width=8", cache=teacher_cache)
    record = pipeline.run(cfg)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == method
    epochs = _logged(tmp_path / "run")
    assert len(epochs) == 3
    for name in names:
        values = [row[f"train/{name}"] for row in epochs]
        assert all(math.isfinite(v) and v >= 0 for v in values), (name, values)
        if method != "dkd":  # the feature term is what the student learns to reduce
            assert values[-1] < values[0], (name, values)
    student = record["student"]
    deployed = sum(p.numel() for p in CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0).parameters())
    assert student["params"] == deployed  # regressors are not part of the deployed student
    if method == "fitnet":
        # student stages.1 (16 channels) → teacher stages.1 (64 channels): 1×1 conv + BN
        assert student["extra_params"] == 16 * 64 + 2 * 64
    else:
        assert student["extra_params"] == 0
    if method == "dkd":
        assert epochs[-1]["train/ce"] < epochs[0]["train/ce"] and student["test"]["acc"] > 0.5
