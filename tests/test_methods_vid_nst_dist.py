"""VID, NST, DIST and logit standardization (``standardize`` of KD and DKD) against independent
computations: closed forms on hand-chosen inputs and explicit float64 numpy loops over samples,
channels, positions and classes. Then gradient flow through real models, bad values failing in
one line, and one short digits run per method."""

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

from distillab import conf, settings
from distillab.distill.hooks import FeatureTaps
from distillab.distill.methods import base
from distillab.distill.methods.base import is_feature_method
from distillab.distill.methods.dist import DIST, dist_parts
from distillab.distill.methods.dkd import DecoupledKD, dkd_parts
from distillab.distill.methods.kd import KD, kd_loss, kd_terms, soft_kl, standardize_logits
from distillab.distill.methods.nst import NST, nst_loss
from distillab.distill.methods.vid import VID, VariationalRegressor, gaussian_nll, inverse_softplus
from distillab.labels import UNLABELLED, labelled_cross_entropy
from distillab.models import CNN, MLP
from distillab.settings import ConfigError
from tests.conftest import as_numpy as _np
from tests.conftest import randn as _randn

pytestmark = pytest.mark.usefixtures("one_thread")


def _method(option: str, **overrides):
    """The method ``conf/distill/<option>.yaml`` configures, with ``overrides`` on its values."""
    return conf.build("distill", option, **overrides)


def _block_mean(f: np.ndarray, size: int) -> np.ndarray:
    """Adaptive average pooling of square maps whose side is a multiple of ``size``, by loops."""
    n, c, h, _ = f.shape
    k = h // size
    out = np.zeros((n, c, size, size))
    for a, b, i, j in itertools.product(range(n), range(c), range(size), range(size)):
        out[a, b, i, j] = f[a, b, k * i : k * i + k, k * j : k * j + k].mean()
    return out


def _softmax(row: list[float] | np.ndarray, temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# -- VID ----------------------------------------------------------------------------------------------
def _softplus(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def _vid_loop(mean: np.ndarray, target: np.ndarray, variance: np.ndarray) -> float:
    """½·(log σ²_c + (t − μ)²/σ²_c) summed over every entry, then divided by their number."""
    total, count = 0.0, 0
    for index in itertools.product(*(range(n) for n in target.shape)):
        v = variance[index[1]]
        total += 0.5 * (math.log(v) + (target[index] - mean[index]) ** 2 / v)
        count += 1
    return total / count


def _conv_mean(regressor: VariationalRegressor, x: np.ndarray) -> np.ndarray:
    """Three 1×1 convolutions with ReLUs between them, as sums over input channels per position."""
    weights = [_np(regressor.mean[i].weight)[:, :, 0, 0] for i in (0, 2, 4)]
    n, _, h, w = x.shape
    out = x
    for k, weight in enumerate(weights):
        nxt = np.zeros((n, weight.shape[0], h, w))
        for a, o, i, j in itertools.product(range(n), range(weight.shape[0]), range(h), range(w)):
            nxt[a, o, i, j] = sum(weight[o, c] * out[a, c, i, j] for c in range(weight.shape[1]))
        out = np.maximum(nxt, 0.0) if k < 2 else nxt
    return out


def test_vid_closed_form():
    # one sample, two channels at one position: t = (1, 2), μ = 0, σ² = (1, 4)
    mean, target = torch.zeros(1, 2, 1, 1), torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    expected = (0.5 * (0 + 1 / 1) + 0.5 * (math.log(4) + 4 / 4)) / 2
    assert gaussian_nll(mean, target, torch.tensor([1.0, 4.0])).item() == pytest.approx(expected, rel=1e-6)
    # flat features: the variance is per feature (dimension 1)
    assert gaussian_nll(torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([1.0, 4.0])).item() == (
        pytest.approx(expected, rel=1e-6)
    )


@pytest.mark.parametrize("init", [5.0, 1.0, 0.01])
def test_vid_variance_starts_at_init_variance(init):
    assert _softplus(inverse_softplus(init)) == pytest.approx(init, rel=1e-12)
    regressor = VariationalRegressor(torch.Size((2, 3, 4, 4)), torch.Size((2, 5, 4, 4)), init)
    torch.testing.assert_close(regressor.variance(), torch.full((5,), init), rtol=1e-6, atol=0)
    assert _method("vid").init_variance == 5.0  # the paper's init_pred_var


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [((2, 3, 4, 4), (2, 5, 2, 2)), ((2, 3, 2, 2), (2, 4, 4, 4)), ((2, 3, 2, 2), (2, 2, 2, 2))],
    ids=["student-larger", "teacher-larger", "same-size"],
)
def test_vid_on_maps_matches_a_loop(student_shape, teacher_shape):
    torch.manual_seed(0)
    s, t = _randn(*student_shape, seed=1), _randn(*teacher_shape, seed=2)
    regressor = VariationalRegressor(s.shape, t.shape, 5.0)
    with torch.no_grad():
        regressor.raw_variance.copy_(_randn(teacher_shape[1], seed=3))
    xs, xt = _np(s), _np(t)
    size = min(student_shape[2], teacher_shape[2])
    xs = _block_mean(xs, size) if student_shape[2] > size else xs
    xt = _block_mean(xt, size) if teacher_shape[2] > size else xt
    variance = np.array([_softplus(a) + 1e-5 for a in _np(regressor.raw_variance)])
    expected = _vid_loop(_conv_mean(regressor, xs), xt, variance)
    assert regressor(s, t).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [((3, 6), (3, 4)), ((3, 2, 2, 2), (3, 5)), ((3, 6), (3, 2, 2, 2))],
    ids=["flat", "map-to-flat", "flat-to-map"],
)
def test_vid_on_flat_features_is_linear(student_shape, teacher_shape):
    s, t = _randn(*student_shape, seed=4), _randn(*teacher_shape, seed=5)
    regressor = VariationalRegressor(s.shape, t.shape, 2.0)
    s_in, t_out = int(np.prod(student_shape[1:])), int(np.prod(teacher_shape[1:]))
    assert sum(p.numel() for p in regressor.parameters()) == s_in * t_out + t_out + teacher_shape[1]
    weight, bias = _np(regressor.mean.weight), _np(regressor.mean.bias)
    flat = _np(s).reshape(len(s), -1)
    mean = np.array(
        [[sum(weight[o, i] * flat[n, i] for i in range(s_in)) + bias[o] for o in range(t_out)] for n in range(3)]
    )
    expected = _vid_loop(mean.reshape(teacher_shape), _np(t), np.full(teacher_shape[1], 2.0))
    assert regressor(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_vid_variance_is_optimal_at_the_mean_squared_error():
    """For a fixed mean, ½·(log σ² + e²/σ²) averaged over a channel is smallest at σ² = mean e²:
    the gradient with respect to the variance vanishes there (a closed form of the optimum)."""
    s, t = _randn(4, 3, 2, 2, seed=6), _randn(4, 6, 2, 2, seed=7)
    regressor = VariationalRegressor(s.shape, t.shape, 5.0)
    with torch.no_grad():
        residual = (t - regressor.mean(s)).pow(2).mean(dim=(0, 2, 3))
        regressor.raw_variance.copy_(torch.tensor([inverse_softplus(v - 1e-5) for v in residual.tolist()]))
    regressor(s, t).backward()
    assert regressor.raw_variance.grad.abs().max().item() < 1e-6
    assert regressor.mean[4].weight.grad.abs().sum() > 0  # the mean still learns


def test_vid_sums_layer_pairs_with_its_weight():
    loss = _method("vid", vid_weight=3.0)
    pairs = [((2, 3, 4, 4), (2, 5, 2, 2)), ((2, 4, 2, 2), (2, 6, 2, 2))]
    s = [_randn(*a, seed=10 + i) for i, (a, _) in enumerate(pairs)]
    t = [_randn(*b, seed=20 + i) for i, (_, b) in enumerate(pairs)]
    loss.build([x.shape for x in s], [x.shape for x in t])
    expected = sum(q(a, b).item() for q, a, b in zip(loss.regressors, s, t))
    assert loss.feature_terms(s, t)["vid"].item() == pytest.approx(3.0 * expected, rel=1e-6)


def test_vid_parameters_on_the_digits_pair():
    student, teacher = (
        CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0),
        CNN((1, 8, 8), 10, width=32, blocks=2, dropout=0.0),
    )
    loss = _method("vid")
    loss.bind(student, teacher, _randn(4, 1, 8, 8))
    assert (loss.student_paths, loss.teacher_paths) == (["stages.0", "stages.1"], ["stages.0", "stages.1"])
    # per pair: convs s→t, t→t, t→t without bias, and one variance per teacher channel
    expected = (8 * 32 + 2 * 32 * 32 + 32) + (16 * 64 + 2 * 64 * 64 + 64)
    assert sum(p.numel() for p in loss.parameters()) == expected == 11616
    # an MLP student: its hidden activation pairs with the teacher's last stage through a linear layer
    mlp = MLP((1, 8, 8), 10, hidden=[32], dropout=0.0, input_dropout=0.0)
    loss = _method("vid")
    loss.bind(mlp, teacher, _randn(4, 1, 8, 8))
    assert loss.teacher_paths == ["stages.1"]
    assert sum(p.numel() for p in loss.parameters()) == 32 * 256 + 256 + 64


# -- NST ----------------------------------------------------------------------------------------------
def _mmd_loop(s: np.ndarray, t: np.ndarray) -> float:
    """Squared MMD with k(x, y) = (xᵀy)² between the normalised channels, per image, batch mean."""

    def unit(v: np.ndarray) -> np.ndarray:
        return v / math.sqrt(sum(x * x for x in v))

    total = 0.0
    for n in range(len(s)):
        a = [unit(s[n, c].ravel()) for c in range(s.shape[1])]
        b = [unit(t[n, c].ravel()) for c in range(t.shape[1])]
        k = lambda x, y: sum(p * q for p, q in zip(x, y)) ** 2  # noqa: E731
        ss = sum(k(x, y) for x in a for y in a) / len(a) ** 2
        tt = sum(k(x, y) for x in b for y in b) / len(b) ** 2
        st = sum(k(x, y) for x in a for y in b) / (len(a) * len(b))
        total += ss + tt - 2 * st
    return total / len(s)


def test_nst_closed_form():
    # student channels (3, 0) and (0, −2) normalise to e1 and −e2; the teacher's one channel to (1, 1)/√2:
    # k(s, s) = [[1, 0], [0, 1]] → mean 1/2; k(t, t) = 1; k(s, t) = 1/2 each → MMD² = 1/2 + 1 − 1
    s = torch.tensor([[3.0, 0.0], [0.0, -2.0]]).view(1, 2, 1, 2)
    t = torch.tensor([[5.0, 5.0]]).view(1, 1, 1, 2)
    assert nst_loss(s, t).item() == pytest.approx(0.5, rel=1e-6)
    # the same set of channels, rescaled and permuted: no discrepancy
    f = _randn(3, 4, 2, 2, seed=30)
    assert nst_loss(f, 7 * f[:, [2, 0, 3, 1]]).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "student_shape, teacher_shape",
    [((3, 4, 4, 4), (3, 6, 2, 2)), ((2, 3, 2, 2), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 2, 4, 4))],
)
def test_nst_matches_a_loop(student_shape, teacher_shape):
    s, t = _randn(*student_shape, seed=31), _randn(*teacher_shape, seed=32)
    size = min(student_shape[2], teacher_shape[2])
    xs = _block_mean(_np(s), size) if student_shape[2] > size else _np(s)
    xt = _block_mean(_np(t), size) if teacher_shape[2] > size else _np(t)
    expected = _mmd_loop(xs, xt)
    assert expected > 0
    assert nst_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_nst_sums_layer_pairs_with_its_weight_and_needs_maps():
    s1, t1 = _randn(2, 3, 4, 4, seed=33), _randn(2, 5, 2, 2, seed=34)
    s2, t2 = _randn(2, 4, 2, 2, seed=35), _randn(2, 6, 2, 2, seed=36)
    expected = _mmd_loop(_block_mean(_np(s1), 2), _np(t1)) + _mmd_loop(_np(s2), _np(t2))
    loss = _method("nst")
    assert loss.nst_weight == 50.0
    assert loss.feature_terms([s1, s2], [t1, t2])["nst"].item() == pytest.approx(50 * expected, rel=1e-5)
    mlp, cnn = (
        MLP((1, 8, 8), 10, hidden=[32], dropout=0.0, input_dropout=0.0),
        CNN((1, 8, 8), 10, width=4, blocks=2, dropout=0.0),
    )
    with pytest.raises(ConfigError) as error:
        _method("nst").bind(mlp, cnn, _randn(4, 1, 8, 8))
    message = str(error.value)
    assert "\n" not in message and "distill=nst needs N×C×H×W" in message and "'features.2'" in message


# -- DIST ---------------------------------------------------------------------------------------------
def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def _dist_loop(student: np.ndarray, teacher: np.ndarray, temperature: float) -> tuple[float, float]:
    p_s = [_softmax(row, temperature) for row in student]
    p_t = [_softmax(row, temperature) for row in teacher]
    n, classes = len(p_s), len(p_s[0])
    inter = 1 - sum(_pearson(p_s[i], p_t[i]) for i in range(n)) / n
    columns = [([p_s[i][c] for i in range(n)], [p_t[i][c] for i in range(n)]) for c in range(classes)]
    intra = 1 - sum(_pearson(a, b) for a, b in columns) / classes
    return inter, intra


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dist_matches_a_loop(temperature):
    s, t = _randn(6, 5, seed=40, dtype=torch.float64) * 3, _randn(6, 5, seed=41, dtype=torch.float64) * 3
    inter, intra = dist_parts(s, t, temperature)
    expected_inter, expected_intra = _dist_loop(_np(s), _np(t), temperature)
    assert inter.item() == pytest.approx(expected_inter, rel=1e-6)
    assert intra.item() == pytest.approx(expected_intra, rel=1e-6)
    y = torch.tensor([0, 1, 2, 3, 4, UNLABELLED])
    terms = DIST(ce_weight=0.5, beta=2.0, gamma=3.0, temperature=temperature)(s, t, y)
    ce = -sum(math.log(_softmax(_np(s)[i], 1.0)[int(y[i])]) for i in range(5)) / 5  # labelled samples only
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-9)
    assert terms["inter"].item() == pytest.approx(temperature**2 * 2 * expected_inter, rel=1e-6)
    assert terms["intra"].item() == pytest.approx(temperature**2 * 3 * expected_intra, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in ("ce", "inter", "intra")), rel=1e-12)


def test_dist_closed_form_with_two_classes():
    """With two classes a row (q, 1 − q) centred is ±(q − ½)(1, −1): the Pearson correlation of two
    rows is the sign of (q_s − ½)(q_t − ½), and each column's correlation is that of the q's."""
    s = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    p_s = torch.sigmoid(s[:, 0])
    # a teacher whose q is an increasing affine map of the student's, on the same side of ½: no loss
    q_t = 0.5 + 0.4 * (p_s - 0.5)
    t = torch.stack([torch.log(q_t / (1 - q_t)), torch.zeros(3, dtype=torch.float64)], dim=1)
    inter, intra = dist_parts(s, t, 1.0)
    # (up to the 1e-8 added to the product of the norms in the Pearson correlation)
    assert inter.item() == pytest.approx(0.0, abs=1e-6) and intra.item() == pytest.approx(0.0, abs=1e-6)
    # the opposite teacher (q_t = 1 − q_s): every correlation is −1, both relations 2
    inter, intra = dist_parts(s, -s, 1.0)
    assert inter.item() == pytest.approx(2.0, rel=1e-6) and intra.item() == pytest.approx(2.0, rel=1e-6)
    terms = _method("dist")(4 * s, -4 * s, torch.tensor([0, 1, 0]))  # at T = 4: the same probabilities
    assert terms["inter"].item() == pytest.approx(16 * 2 * 2.0, rel=1e-6)  # T² · beta · 2
    assert terms["intra"].item() == pytest.approx(16 * 2 * 2.0, rel=1e-6)


def test_dist_settings_of_the_official_cifar_recipe():
    loss = _method("dist")
    assert (loss.ce_weight, loss.beta, loss.gamma, loss.temperature) == (1.0, 2.0, 2.0, 4.0)
    assert base.temperature(loss) == 4.0 and base.needs_teacher(loss)


# -- logit standardization ----------------------------------------------------------------------------
def _zscore(row: np.ndarray) -> np.ndarray:
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return np.array([(v - mean) / (std + 1e-7) for v in row])


STUDENT = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.2], [2.5, 0.1, 0.1, -0.3]])
TEACHER = np.array([[6.0, 1.0, 0.0, 0.5], [0.5, 0.5, 9.0, -2.0], [4.0, -1.0, 0.0, 1.0]])
TARGETS = [1, 2, 0]


def test_standardized_logits_match_a_loop():
    got = standardize_logits(torch.tensor(STUDENT))
    np.testing.assert_allclose(_np(got), np.array([_zscore(r) for r in STUDENT]), rtol=1e-12)
    assert standardize_logits(torch.ones(2, 5)).abs().max().item() == 0.0  # a constant row: 0, not NaN


@pytest.mark.parametrize("lam, temperature", [(0.5, 2.0), (1.0, 4.0), (0.9, 1.0)])
def test_standardized_kd_matches_a_loop(lam, temperature):
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    ce = -sum(math.log(_softmax(row, 1.0)[c]) for row, c in zip(STUDENT, TARGETS)) / 3  # raw logits
    kl = (
        sum(_kl(_softmax(_zscore(b), temperature), _softmax(_zscore(a), temperature)) for a, b in zip(STUDENT, TEACHER))
        / 3
    )
    terms = KD(lam=lam, temperature=temperature, standardize=True)(s, t, y)
    assert terms["ce"].item() == pytest.approx((1 - lam) * ce, rel=1e-9, abs=1e-12)
    assert terms["kd"].item() == pytest.approx(lam * temperature**2 * kl, rel=1e-9)
    assert terms["loss"].item() == pytest.approx((1 - lam) * ce + lam * temperature**2 * kl, rel=1e-9)
    assert kd_loss(s, t, y, lam, temperature, standardize=True).item() == pytest.approx(terms["loss"].item(), rel=1e-12)


def test_standardized_kd_is_invariant_to_shift_and_scale():
    s, t, y = _randn(8, 10, seed=50, dtype=torch.float64), _randn(8, 10, seed=51, dtype=torch.float64), torch.arange(8)
    shift = _randn(8, 1, seed=52, dtype=torch.float64) * 5  # a constant per sample
    kd = KD(lam=1.0, temperature=2.0, standardize=True)
    reference = kd(s, t, y)["kd"].item()
    assert reference > 1e-3
    for a, b in ((s + shift, t), (s, t - 3.0), (3.0 * s, t), (s, 0.25 * t + shift), (0.5 * s - shift, 4.0 * t + 1.0)):
        # exact but for the 1e-7 added to the standard deviation, which does not scale
        assert kd(a, b, y)["kd"].item() == pytest.approx(reference, rel=1e-6)
    plain = KD(lam=1.0, temperature=2.0, standardize=False)
    assert plain(3.0 * s, t, y)["kd"].item() != pytest.approx(plain(s, t, y)["kd"].item(), rel=1e-3)
    # logits that agree up to scale and shift have nothing left to distil
    assert kd(s, 5.0 * s + 2.0, y)["kd"].item() == pytest.approx(0.0, abs=1e-12)


def _dkd_loop(student: np.ndarray, teacher: np.ndarray, target: int, temperature: float) -> tuple[float, float]:
    p_s, p_t = _softmax(student, temperature), _softmax(teacher, temperature)
    tckd = _kl([p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]])
    others = [c for c in range(len(student)) if c != target]
    return tckd, _kl(_softmax(teacher[others], temperature), _softmax(student[others], temperature))


def test_standardized_dkd_matches_a_loop_and_is_invariant():
    s, t, y = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(TARGETS)
    temperature, alpha, beta = 2.0, 1.5, 8.0
    loops = [_dkd_loop(_zscore(a), _zscore(b), c, temperature) for a, b, c in zip(STUDENT, TEACHER, TARGETS)]
    tckd, nckd = sum(x for x, _ in loops) / 3, sum(x for _, x in loops) / 3
    ce = -sum(math.log(_softmax(row, 1.0)[c]) for row, c in zip(STUDENT, TARGETS)) / 3
    loss = DecoupledKD(
        ce_weight=0.5, alpha=alpha, beta=beta, temperature=temperature, warmup_epochs=0, standardize=True
    )
    terms = loss(s, t, y)
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-9)
    assert terms["tckd"].item() == pytest.approx(alpha * temperature**2 * tckd, rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(beta * temperature**2 * nckd, rel=1e-9)
    moved = loss(4.0 * s - 2.0, 0.5 * t + 7.0, y)
    assert moved["tckd"].item() == pytest.approx(terms["tckd"].item(), rel=1e-6)
    assert moved["nckd"].item() == pytest.approx(terms["nckd"].item(), rel=1e-6)
    # unlabelled samples still take the teacher's class, which z-scoring does not change
    unlabelled = torch.tensor([UNLABELLED, 2, UNLABELLED])
    teacher_class = TEACHER.argmax(axis=1)
    loops = [
        _dkd_loop(_zscore(a), _zscore(b), int(c), temperature)
        for a, b, c in zip(STUDENT, TEACHER, [teacher_class[0], 2, teacher_class[2]])
    ]
    got = loss(s, t, unlabelled)
    assert got["tckd"].item() == pytest.approx(alpha * temperature**2 * sum(x for x, _ in loops) / 3, rel=1e-9)


def test_standardize_false_gives_exactly_the_previous_values():
    s, t, y = _randn(16, 10, seed=60), _randn(16, 10, seed=61) * 3, torch.arange(16) % 10
    y[3] = UNLABELLED
    for lam, temperature in ((0.5, 2.0), (0.9, 4.0), (0.0, 4.0), (1.0, 1.0)):
        terms = KD(lam=lam, temperature=temperature, standardize=False)(s, t, y)
        ce = (1 - lam) * labelled_cross_entropy(s, y) if lam < 1 else torch.zeros(())
        kd = lam * temperature**2 * soft_kl(s, t, temperature) if lam > 0 else torch.zeros(())
        # the weights are applied inside the mean's scaling: equal up to float rounding
        torch.testing.assert_close(terms["ce"], ce)
        torch.testing.assert_close(terms["kd"], kd)
        assert torch.equal(terms["loss"], terms["ce"] + terms["kd"])
        old = kd_terms(s, t, y, lam, temperature)  # the callers that do not standardize
        assert all(torch.equal(old[k], terms[k]) for k in ("ce", "kd"))
    assert _method("kd").standardize is False and _method("dkd").standardize is False
    dkd = _method("dkd", warmup_epochs=0)
    terms = dkd(s, t, y)
    tckd, nckd = dkd_parts(s, t, torch.where(y != UNLABELLED, y, t.argmax(dim=1)), 4.0)
    assert torch.equal(terms["tckd"], 16.0 * 1.0 * tckd) and torch.equal(terms["nckd"], 16.0 * 8.0 * nckd)
    assert torch.equal(terms["ce"], 1.0 * labelled_cross_entropy(s, y))
    # standardizing does change the values (the logits here are far from standardized)
    assert _method("dkd", warmup_epochs=0, standardize=True)(s, t, y)["nckd"].item() != pytest.approx(
        terms["nckd"].item(), rel=1e-3
    )


# -- gradient flow through real models ------------------------------------------------------------------
METHODS = {
    "vid": (lambda: _method("vid", kd={"lam": 0.5, "temperature": 4.0}), ["vid"]),
    "nst": (lambda: _method("nst", kd={"lam": 0.5, "temperature": 4.0}), ["nst"]),
    "dist": (lambda: _method("dist"), ["inter", "intra"]),
    "kd-standardized": (lambda: _method("kd", lam=1.0, standardize=True), ["kd"]),
    "dkd-standardized": (lambda: _method("dkd", warmup_epochs=0, standardize=True), ["tckd", "nckd"]),
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
    feature = is_feature_method(loss)
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
    base.check_terms(terms, loss)
    assert set(names) <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    (sum(terms[name] for name in names) + terms.get("kd", 0)).backward()  # the method's own terms
    reached = student_feats or [logits]
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in reached)
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0  # down to the first convolution
    assert teacher_logits.grad is None and all(f.grad is None for f in teacher_feats)
    assert all(p.grad is None for p in teacher.parameters())
    own = list(loss.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)  # VID's regressors and variances
    if method == "vid":
        assert len(own) == 2 * 4  # per pair: three convolutions and the variances


# -- settings: a bad value fails in one line naming the key -----------------------------------------------
def _yaml(option: str) -> tuple[str, dict]:
    values = OmegaConf.to_container(conf.load("distill", option))
    return values.pop("_target_"), values


BAD = [
    ("vid", {"vid_weight": -1}, "vid_weight=-1 is not allowed: a weight >= 0"),
    ("vid", {"init_variance": 0}, "init_variance=0 is not allowed: a variance > 1e-05"),
    ("vid", {"kd": {"lam": 2, "temperature": 4.0}}, "kd.lam=2 is not allowed: a weight in [0, 1]"),
    ("nst", {"nst_weight": float("nan")}, "nst_weight=nan is not allowed: a weight >= 0"),
    ("nst", {"teacher_layers": 3}, "teacher_layers=3 is not allowed: a string or a list, or null"),
    ("dist", {"beta": -0.5}, "beta=-0.5 is not allowed: a weight >= 0"),
    ("dist", {"temperature": 0}, "temperature=0 is not allowed: a temperature > 0"),
    ("kd", {"standardize": "yes"}, "standardize='yes' is not allowed: true or false"),
    ("dkd", {"standardize": 1}, "standardize=1 is not allowed: true or false"),
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


def test_each_new_option_builds_its_class():
    for option, cls in (("vid", VID), ("nst", NST), ("dist", DIST)):
        assert type(_method(option)) is cls
    assert _method("kd", standardize=True).standardize is True


# -- one short digits run per method --------------------------------------------------------------------
def _logged(run: Path) -> list[dict[str, float]]:
    rows = csv.DictReader((run / "csv" / "student" / "metrics.csv").open())
    return [{k: float(v) for k, v in row.items() if v} for row in rows if row.get("train/loss")]


RUNS = {
    "vid": (["distill=vid"], ["vid"]),
    "nst": (["distill=nst"], ["nst"]),
    "dist": (["distill=dist"], ["ce", "inter", "intra"]),
    "kd": (["distill=kd", "distill.standardize=true"], ["ce", "kd"]),
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
        assert all(math.isfinite(v) for v in values), (name, values)
        if method in ("vid", "nst"):  # the feature term is what the student learns to reduce
            assert values[-1] < values[0], (name, values)
        if name != "vid":  # VID's negative log-likelihood goes below zero once σ² < 1
            assert all(v >= 0 for v in values), (name, values)
    student = record["student"]
    deployed = sum(p.numel() for p in CNN((1, 8, 8), 10, width=8, blocks=2, dropout=0.0).parameters())
    assert student["params"] == deployed  # VID's regressors are not part of the deployed student
    assert student["extra_params"] == (11616 if method == "vid" else 0)
    if method in ("dist", "kd"):
        assert epochs[-1]["train/ce"] < epochs[0]["train/ce"] and student["test"]["acc"] > 0.5
