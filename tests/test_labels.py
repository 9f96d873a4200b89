"""Labels for part of the training set (``data.labelled_fraction``): the loss over labelled
samples, the labelled subset, the teacher's full labels, and runs end to end."""

from __future__ import annotations

import math

import pytest
import torch

from distillab import conf, pipeline
from distillab.config import ConfigError
from distillab.data import DigitsDataModule
from distillab.distill.methods.kd import kd_terms, soft_kl
from distillab.distill.methods.none import CrossEntropy
from distillab.distill.module import ClassifierModule, _EpochTotals
from distillab.labels import UNLABELLED, labelled_cross_entropy, labelled_nll, labelled_subset
from tests.conftest import teacher_key

U = UNLABELLED


# -- the loss -----------------------------------------------------------------------------------
def hand_cross_entropy(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


def test_labelled_cross_entropy_is_the_mean_over_labelled_rows():
    rows = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [3.0, -2.0, 1.0]]
    targets = [2, U, 1, U]
    value = labelled_cross_entropy(torch.tensor(rows), torch.tensor(targets))
    expected = (hand_cross_entropy(rows[0], 2) + hand_cross_entropy(rows[2], 1)) / 2
    assert float(value) == pytest.approx(expected, rel=1e-6)
    # all labelled: plain cross-entropy
    full = labelled_cross_entropy(torch.tensor(rows), torch.tensor([2, 0, 1, 0]))
    assert float(full) == pytest.approx(sum(hand_cross_entropy(r, t) for r, t in zip(rows, [2, 0, 1, 0])) / 4, rel=1e-6)


def test_a_batch_without_labels_gives_zero_and_finite_gradients():
    logits = torch.randn(5, 4, requires_grad=True)
    value = labelled_cross_entropy(logits, torch.full((5,), U))
    assert value.requires_grad and value.item() == 0.0
    value.backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad, torch.zeros(5, 4))


def test_labelled_nll_of_log_probabilities_is_the_weighted_labelled_mean():
    rows = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [3.0, -2.0, 1.0]]
    targets = torch.tensor([2, U, 1, U])
    logits = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    expected = (hand_cross_entropy(rows[0], 2) + hand_cross_entropy(rows[2], 1)) / 2
    for weight in (1.0, 0.25):
        value = labelled_nll(torch.log_softmax(logits, dim=1), targets, weight=weight)
        assert value.dtype == torch.float64 and value.item() == pytest.approx(weight * expected, rel=1e-12)
        assert labelled_cross_entropy(logits, targets, weight=weight).item() == pytest.approx(value.item(), rel=1e-12)
    # the gradient of the weighted mean: softmax − one-hot on the labelled rows, over their count
    (grad,) = torch.autograd.grad(labelled_nll(torch.log_softmax(logits, dim=1), targets, weight=0.25), logits)
    softmax = torch.softmax(logits.detach(), dim=1)
    expected_grad = torch.zeros_like(softmax)
    for i, target in ((0, 2), (2, 1)):
        expected_grad[i] = 0.25 * (softmax[i] - torch.nn.functional.one_hot(torch.tensor(target), 3)) / 2
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    # no label in the batch: 0 with a zero gradient, weighted or not
    for weight in (1.0, 0.3):
        empty = labelled_nll(torch.log_softmax(logits, dim=1), torch.full((4,), U), weight=weight)
        assert empty.item() == 0.0
        (grad,) = torch.autograd.grad(empty, logits)
        assert torch.equal(grad, torch.zeros(4, 3, dtype=torch.float64))


def test_kd_and_plain_losses_use_labels_only_where_there_are_some():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    targets = torch.tensor([1, U, U, 3, U, 0])
    terms = kd_terms(student, teacher, targets, lam=0.3, temperature=2.0)
    labelled = targets != U
    ce = torch.nn.functional.cross_entropy(student[labelled], targets[labelled])
    assert float(terms["ce"]) == pytest.approx(0.7 * float(ce), rel=1e-6)
    # the soft-target term covers every sample, labelled or not
    assert float(terms["kd"]) == pytest.approx(0.3 * 4 * float(soft_kl(student, teacher, 2.0)), rel=1e-6)
    assert float(CrossEntropy()(student, None, targets)["loss"]) == pytest.approx(float(ce), rel=1e-6)


def test_training_accuracy_counts_labelled_samples_only():
    totals = _EpochTotals(["loss"])
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [5.0, 0.0]])  # predicts class 0
    totals.add({"loss": torch.tensor(1.0)}, logits, torch.tensor([0, U, 1, U]))
    totals.add({"loss": torch.tensor(3.0)}, logits[:2], torch.tensor([U, U]))
    means = totals.means("train")
    assert float(means["train/acc"]) == 0.5  # 1 correct of 2 labelled
    assert float(means["train/loss"]) == pytest.approx((4 * 1.0 + 2 * 3.0) / 6)  # terms: per sample


# -- the labelled subset ------------------------------------------------------------------------
def digits(**kwargs) -> DigitsDataModule:
    data = conf.build("data", "digits", **kwargs)
    data.setup()
    return data


def test_the_labelled_subset_is_stratified_and_of_the_right_size():
    data = digits(labelled_fraction=0.1)
    y = data.splits["train"][1]
    mask = data.labelled_mask()
    assert int(mask.sum()) == round(0.1 * len(y)) == 126
    for label in range(10):
        in_class = y == label
        assert abs(int(mask[in_class].sum()) - 0.1 * int(in_class.sum())) <= 1
    # a tiny fraction still labels one sample of every class, and no more
    tiny = labelled_subset(y, 0.001, seed=0)
    assert torch.equal(torch.bincount(y[tiny], minlength=10), torch.ones(10, dtype=torch.long))
    # imbalanced classes keep their proportions
    skewed = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    counts = torch.bincount(skewed[labelled_subset(skewed, 0.2, seed=3)], minlength=3)
    assert counts.tolist() == [10, 6, 1]


def test_the_subset_depends_on_the_split_seed_only_and_grows_with_the_fraction():
    a, b = digits(labelled_fraction=0.1), digits(labelled_fraction=0.1)
    a.shuffle_seed, b.shuffle_seed = 0, 7  # the run seeds of two jobs of a sweep
    assert torch.equal(a.labelled_mask(), b.labelled_mask())
    assert not torch.equal(a.labelled_mask(), digits(labelled_fraction=0.1, split_seed=1).labelled_mask())
    smaller = a.labelled_mask(0.05)
    assert bool((a.labelled_mask() | ~smaller).all())  # the 5 % subset lies inside the 10 % one
    assert bool(digits(labelled_fraction=1.0).labelled_mask().all())


def test_the_train_loader_hides_the_other_labels_and_val_test_keep_theirs():
    data = digits(labelled_fraction=0.1)
    x_train, y_train = data.splits["train"]
    mask = data.labelled_mask()
    seen = torch.zeros(len(y_train), dtype=torch.bool)
    for x, y, index in data.train_dataloader():
        assert torch.equal(x, x_train[index])
        assert torch.equal(y, torch.where(mask[index], y_train[index], torch.full_like(y, U)))
        seen[index] = True
    assert bool(seen.all())
    for loader in (data.val_dataloader(), data.test_dataloader()):
        assert all(bool((y >= 0).all()) for _, y, _ in loader)
    with data.labelled(None):
        assert all(bool((y >= 0).all()) for _, y, _ in data.train_dataloader())
    assert any(bool((y == U).any()) for _, y, _ in data.train_dataloader())  # restored


@pytest.mark.parametrize(
    ("override", "start"),
    [
        ("data.labelled_fraction=0", "data.labelled_fraction=0 is not allowed: a fraction in (0, 1]"),
        ("data.labelled_fraction=1.5", "data.labelled_fraction=1.5 is not allowed: a fraction in (0, 1]"),
        ("teacher.recipe.labelled_fraction=0", "teacher.recipe.labelled_fraction=0 is not allowed"),
    ],
)
def test_a_fraction_out_of_range_is_a_one_line_error(make_cfg, override, start):
    with pytest.raises(ConfigError) as info:
        pipeline.run(make_cfg(override))
    assert str(info.value).startswith(start) and "\n" not in str(info.value)


# -- the teacher --------------------------------------------------------------------------------
def teacher_batches(make_cfg, monkeypatch, *overrides: str) -> tuple[list[tuple], DigitsDataModule, str]:
    """The (targets, index) of every batch the teacher recipe trains on, the data and the cache key."""
    batches = []
    original = ClassifierModule.training_step

    def spy(self, batch, batch_idx):
        if type(self) is ClassifierModule:  # the teacher's module; the student's is a subclass
            batches.append((batch[1].clone(), batch[2].clone()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ClassifierModule, "training_step", spy)
    cfg = make_cfg(
        "data.labelled_fraction=0.1", "teacher.recipe.max_epochs=1", "teacher.width=8", *overrides, own_cache=True
    )
    parts = pipeline.prepare(cfg)
    teacher = pipeline.obtain_teacher(cfg, parts)
    assert teacher.cache == "miss"
    return batches, parts.data, teacher.key


def test_the_teacher_trains_on_every_label(make_cfg, monkeypatch):
    batches, data, key = teacher_batches(make_cfg, monkeypatch)
    y_train = data.splits["train"][1]
    targets, index = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(index.tolist()) == list(range(len(y_train)))
    assert torch.equal(targets, y_train[index])  # no UNLABELLED among them
    # the student's loader hides labels again afterwards
    assert sum(int((y == U).sum()) for _, y, _ in data.train_dataloader()) == len(y_train) - 126
    # the student's share of labels is not part of the teacher's identity
    assert key == teacher_key(make_cfg("teacher.recipe.max_epochs=1", "teacher.width=8"))


def test_a_teacher_recipe_may_use_a_share_of_the_labels(make_cfg, monkeypatch):
    batches, data, key = teacher_batches(make_cfg, monkeypatch, "teacher.recipe.labelled_fraction=0.5")
    targets, index = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    hidden = ~data.labelled_mask(0.5)[index]
    assert torch.equal(targets == U, hidden) and int(hidden.sum()) == 1257 - 629  # 628.5 rounds up
    assert key != teacher_key(make_cfg("data.labelled_fraction=0.1", "teacher.recipe.max_epochs=1", "teacher.width=8"))


# -- end to end ---------------------------------------------------------------------------------
def test_runs_with_a_tenth_of_the_labels_record_the_fraction(make_cfg, tmp_path):
    common = ["data.labelled_fraction=0.1", "teacher.width=8"]
    kd = pipeline.run(make_cfg(*common, "distill=kd", out=tmp_path / "kd"))
    none = pipeline.run(make_cfg(*common, "distill=none", out=tmp_path / "none"))
    for record in (kd, none):
        assert record["status"] == "ok"
        assert record["labelled_fraction"] == 0.1 and record["labelled_samples"] == 126
        assert record["student"]["test"]["acc"] > 0.2  # learns something from 126 labels
    assert kd["method"] == "kd" and none["method"] == "none"
    assert none["teacher"]["cache"] == "hit"  # the same teacher as the kd run: all labels
    header, *rows = (tmp_path / "none" / "csv" / "student" / "metrics.csv").read_text().splitlines()
    assert "train/acc" in header.split(",")
