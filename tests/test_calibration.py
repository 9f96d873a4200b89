"""Calibration (ECE, NLL) and per-class accuracy of every model of a run: the maths against numpy,
a compressed model that hides a lost class behind its mean accuracy, one pass over the test split,
a real run's record, and results.check on the new fields."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distillab import pipeline, results
from distillab.evaluate import calibration, largest_drop, per_class_accuracy
from distillab.steps import assembly
from tests.conftest import as_numpy, randn

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_ece(logits: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Guo et al. 2017: |accuracy - confidence| per equal-width confidence bin, weighted by its share."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    total = 0.0
    for low, high in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def numpy_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def noisy_logits(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that agree with the target on some samples and are over- or under-confident."""
    targets = torch.arange(400) % 7
    return scale * randn(400, 7, seed=int(scale * 10)) + 1.5 * nn.functional.one_hot(targets, 7), targets


def striped_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Confidences spread over (0.12, 0.99), right in every even fifteenth of [0, 1] and wrong in every
    odd one: a calibration error that depends on the number of bins and on the norm."""
    classes, confidence = 10, torch.linspace(0.12, 0.99, 300, dtype=torch.float64)
    targets = torch.arange(300) % classes
    right = (confidence * 15).floor().long() % 2 == 0
    predicted = torch.where(right, targets, (targets + 1) % classes)
    probs = ((1 - confidence) / (classes - 1)).unsqueeze(1).repeat(1, classes)
    probs[torch.arange(300), predicted] = confidence
    return probs.log(), targets


@pytest.mark.parametrize("logits,targets", [noisy_logits(0.5), noisy_logits(6.0), striped_logits()])
def test_ece_and_nll_match_numpy(logits, targets):
    got = calibration(logits, targets, int(targets.max()) + 1)
    assert got["ece"] == pytest.approx(numpy_ece(as_numpy(logits), targets.numpy()), abs=2e-6)
    assert got["nll"] == pytest.approx(numpy_nll(as_numpy(logits), targets.numpy()), abs=2e-6)
    assert got["ece"] > 0.02  # far from calibrated: a wrong binning would show


def test_calibration_of_non_finite_logits_is_null():
    logits = randn(10, 3)
    logits[4, 1] = float("nan")
    assert calibration(logits, torch.zeros(10, dtype=torch.long), 3) == {"ece": None, "nll": None}


def test_per_class_accuracy_and_largest_drop():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3, 3, 3])  # class 2 is absent
    preds = torch.tensor([0, 0, 1, 0, 1, 0, 3, 3, 3, 0])
    acc = per_class_accuracy(preds, targets, 4)
    expected = [float((preds[targets == k] == k).double().mean()) if (targets == k).any() else None for k in range(4)]
    assert acc == pytest.approx(expected) and acc[2] is None and acc[:2] == [0.75, 0.5]
    assert largest_drop(acc, [1.0, 1.0, 1.0, 0.75]) == {"class": 1, "drop": 0.5}
    # a tie goes to the lowest class; better everywhere is a negative drop
    assert largest_drop([0.5, 0.5], [0.75, 0.75]) == {"class": 0, "drop": 0.25}
    assert largest_drop([1.0, 0.9], [0.8, 0.8]) == {"class": 1, "drop": pytest.approx(-0.1)}


class LookupModel(nn.Module):
    """The crafted logits of sample ``i`` for input ``i``: a model whose every answer is chosen."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x.long()]


def crafted_logits(targets: torch.Tensor, wrong: list[int], classes: int) -> torch.Tensor:
    """Confident logits that are right except on the samples ``wrong`` (they predict the next class)."""
    predicted = targets.clone()
    predicted[wrong] = (targets[wrong] + 1) % classes
    return 4.0 * nn.functional.one_hot(predicted, classes).float()


def test_a_compressed_model_that_keeps_mean_accuracy_but_loses_a_class_shows_it():
    classes, targets = 4, torch.arange(40) % 4  # ten samples per class
    loader = DataLoader(TensorDataset(torch.arange(40), targets), batch_size=16)
    teacher = LookupModel(crafted_logits(targets, [], classes))
    student = LookupModel(crafted_logits(targets, [0, 1, 2, 3], classes))  # one miss in each class
    compressed = LookupModel(crafted_logits(targets, [2, 6, 10, 14], classes))  # all four misses in class 2

    blocks = {}
    for name, model in (("teacher", teacher), ("student", student), ("compressed", compressed)):
        blocks[name], _ = assembly.evaluation(model, loader, classes)
    blocks["compressed"] = assembly.with_drops(
        blocks["compressed"], teacher=blocks["teacher"], uncompressed=blocks["student"]
    )

    assert blocks["compressed"]["test"]["acc"] == blocks["student"]["test"]["acc"] == 0.9
    per_class = blocks["compressed"]["per_class"]
    assert per_class["acc"] == [1.0, 1.0, 0.6, 1.0]
    assert per_class["largest_drop_vs_uncompressed"] == {"class": 2, "drop": pytest.approx(0.3)}
    assert per_class["largest_drop_vs_teacher"] == {"class": 2, "drop": pytest.approx(0.4)}
    for name, block in blocks.items():
        results.check_model_block(name, block)


class CountingLoader:
    """A loader that counts how often it is iterated."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


def test_a_model_block_runs_the_model_over_the_test_split_once():
    x, y = randn(48, 8, seed=1), torch.arange(48) % 3
    test = CountingLoader(DataLoader(TensorDataset(x, y), batch_size=16))
    val = CountingLoader(DataLoader(TensorDataset(x, y), batch_size=16))
    model = nn.Linear(8, 3)
    block = assembly.model_block(
        model, test, val, 3, (8,), torch.zeros(48, dtype=torch.long), {"warmup": 0, "repeats": 1}
    )
    assert (test.passes, val.passes) == (1, 1)
    logits = as_numpy(model(x))
    assert block["test"]["acc"] == pytest.approx(float((logits.argmax(1) == y.numpy()).mean()), abs=1e-6)
    assert block["calibration"]["nll"] == pytest.approx(numpy_nll(logits, y.numpy()), abs=2e-6)
    assert len(block["per_class"]["acc"]) == 3


def check_calibration_of_a_run(record: dict, make_cfg) -> None:
    """The calibration and per-class fields of a real run's record with a compressed student (the
    run of ``test_compress_pipeline.test_unstructured_pruning_of_the_student``, which calls this:
    one run serves both)."""
    results.check(record)
    counts = None
    for role in ("teacher", "student", "compressed"):
        block = record[role]
        assert "ece" not in block["test"] and set(block["calibration"]) == {"ece", "nll"}
        assert 0.0 <= block["calibration"]["ece"] <= 1.0 and block["calibration"]["nll"] > 0.0
        acc = block["per_class"]["acc"]
        assert len(acc) == 10 and None not in acc
        # the per-class accuracies weighted by the test split's class counts give the mean accuracy
        counts = counts if counts is not None else class_counts_of_test_split(make_cfg)
        assert float(np.dot(acc, counts) / counts.sum()) == pytest.approx(block["test"]["acc"], abs=1e-5)
    assert "largest_drop_vs_teacher" not in record["teacher"]["per_class"]
    assert_largest_drop(record["student"], record["teacher"], "teacher")
    assert_largest_drop(record["compressed"], record["teacher"], "teacher")
    assert_largest_drop(record["compressed"], record["student"], "uncompressed")  # compressed.of == student
    flat = results.flatten(record)
    assert "compressed/per_class/largest_drop_vs_uncompressed/drop" in flat and "student/calibration/ece" in flat
    assert not any(isinstance(value, (list, dict)) for value in flat.values())


def class_counts_of_test_split(make_cfg) -> np.ndarray:
    """Samples per class in the test split of the run's data, counted from the datamodule."""
    data = pipeline.prepare(make_cfg("student=cnn", "student.width=8")).data
    data.setup("test")
    targets = torch.cat([batch[1] for batch in data.test_dataloader()])
    return np.bincount(targets.numpy(), minlength=10)


def assert_largest_drop(block: dict, reference: dict, name: str) -> None:
    """The recorded drop is the largest per-class gap to ``reference``, at the class it names."""
    drops = np.array(reference["per_class"]["acc"]) - np.array(block["per_class"]["acc"])
    entry = block["per_class"][f"largest_drop_vs_{name}"]
    assert entry["drop"] == pytest.approx(drops.max(), abs=2e-6)
    assert entry["drop"] == pytest.approx(drops[entry["class"]], abs=2e-6)


GOOD_BLOCK = {
    "test": {"acc": 0.9},
    "calibration": {"ece": 0.05, "nll": 0.3},
    "per_class": {"acc": [1.0, 0.8, None], "largest_drop_vs_teacher": {"class": 1, "drop": 0.1}},
}


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("calibration", "nll"), -0.1, "student.calibration.nll"),
        (("calibration", "ece"), 1.5, "student.calibration.ece"),
        (("calibration",), {"ece": 0.1}, "exactly the keys ece and nll"),
        (("per_class", "acc"), [1.0, 1.2], "student.per_class.acc"),
        (("per_class", "acc"), [], "student.per_class.acc"),
        (("per_class", "largest_drop_vs_teacher", "class"), 2, "class=2"),  # class 2 has no accuracy
        (("per_class", "largest_drop_vs_teacher", "class"), 7, "class=7"),
        (("per_class", "largest_drop_vs_teacher", "drop"), 1.5, "drop=1.5"),
        (("per_class", "worst"), 3, "per_class.worst is not allowed"),
    ],
)
def test_check_rejects_a_malformed_calibration_or_per_class_field(path, value, message):
    record = {key: {} for key in results.REQUIRED_OK}
    record.update(status="ok", ratios={}, teacher=copy.deepcopy(GOOD_BLOCK), student=copy.deepcopy(GOOD_BLOCK))
    results.check(record)
    target = record["student"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError, match=message):
        results.check(record)


def test_check_reaches_ensemble_members_and_peers_and_accepts_older_records():
    record = {key: {} for key in results.REQUIRED_OK}
    record.update(status="ok", ratios={}, student={"test": {"acc": 0.9}})  # written before these fields
    results.check(record)
    record["peers"] = [copy.deepcopy(GOOD_BLOCK), {**GOOD_BLOCK, "calibration": {"ece": None, "nll": 0.2}}]
    with pytest.raises(ValueError, match=r"peers\.1\.calibration\.ece"):
        results.check(record)
    record["peers"][1]["calibration"] = {"ece": None, "nll": None}  # non-finite logits
    record["teachers"] = [{"test": {"acc": 0.9}, "per_class": {"acc": "0.9"}}]
    with pytest.raises(ValueError, match=r"teachers\.0\.per_class\.acc"):
        results.check(record)
