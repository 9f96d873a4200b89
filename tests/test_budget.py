"""Pruning to an accuracy budget (sensitivity scan, greedy search, fine-tuning with back-off) and
pruning in cycles, for both pruning methods; checked against accuracies and counts computed here."""

from __future__ import annotations

import copy
import csv
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from distillab import compress, measure, pipeline, results
from distillab.compress import Context, budget, plots
from distillab.compress import prune as P
from distillab.compress.prune_structured import channel_removal
from distillab.compress.prune_unstructured import weight_zeroing
from distillab.config import ConfigError, validate
from distillab.models import CNN, MLP
from tests.test_prune import configured, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = (1, 8, 8)
GRID = [0.25, 0.5, 0.75]


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@pytest.fixture(scope="module")
def digits() -> Split:
    """scikit-learn's digits in [0, 1], 1,400 training and 397 validation samples."""
    bunch = load_digits()
    x = torch.tensor(bunch.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return Split(x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]])


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int = 128) -> Callable:
    def batches():
        for start in range(0, len(x), size):
            yield x[start : start + size], y[start : start + size], torch.arange(start, min(start + size, len(x)))

    return batches


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on all of ``x`` at once, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(y)


def context_of(data: Split, model: nn.Module, finetune: Callable | None = None, epochs: int = 0, **options) -> Context:
    """A context over ``data`` whose reference is ``model``'s validation accuracy (unless ``options`` say)."""
    return Context(
        input_shape=DIGITS,
        train_batches=batches_of(data.x_train, data.y_train),
        finetune_epochs=epochs,
        finetune=finetune,
        val_batches=batches_of(data.x_val, data.y_val),
        **{"reference_val_acc": accuracy(model, data.x_val, data.y_val), **options},
    )


@pytest.fixture(scope="module")
def trained_mlp(digits) -> nn.Module:
    """An MLP 64-64-64-10 trained for a few epochs (about 0.95 validation accuracy)."""
    torch.manual_seed(0)
    model = MLP(DIGITS, 10, hidden=[64, 64], dropout=0.0, input_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(digits.x_train), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(digits.x_train[batch]), digits.y_train[batch]).backward()
            optimizer.step()
    return model.eval()


def with_budget(option: str, model: nn.Module, context: Context, **settings):
    """The method of ``option`` with its configured settings, an accuracy budget and ``settings`` on top."""
    method = {"prune_structured": P.structured, "prune_unstructured": P.unstructured}[option]
    return method(model, context, **{**configured(option), "amount": None, "max_acc_drop": 0.02, **settings})


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]


def zeroed_fraction(model: nn.Module) -> float:
    weights = linear_weights(model)
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the scan -------------------------------------------------------------------------------------------
def test_the_scan_has_a_row_per_layer_and_amount_with_what_it_removes(digits, trained_mlp):
    result = with_budget(
        "prune_unstructured", trained_mlp, context_of(digits, trained_mlp), scan_amounts=GRID, max_acc_drop=0.05
    )
    rows = result.tables["sensitivity"]
    layers = ["features.1", "features.3", "classifier"]
    assert [(row["layer"], row["amount"]) for row in rows] == [(layer, a) for layer in layers for a in GRID]
    assert all(list(row) == ["layer", "amount", "val_acc", "params_removed", "macs_removed"] for row in rows)
    for row in rows:
        layer = trained_mlp.get_submodule(row["layer"])
        # torch's l1_unstructured zeroes round(amount * n) weights; a Linear weight is used once per sample
        assert row["params_removed"] == row["macs_removed"] == round(row["amount"] * layer.weight.numel())
        # the same layer pruned here by hand: its smallest magnitudes set to zero
        alone = copy.deepcopy(trained_mlp)
        weight = alone.get_submodule(row["layer"]).weight
        with torch.no_grad():
            smallest = weight.abs().flatten().argsort()[: row["params_removed"]]
            weight.view(-1)[smallest] = 0.0
        assert row["val_acc"] == pytest.approx(accuracy(alone, digits.x_val, digits.y_val))


def test_pruning_one_layer_alone_changes_only_that_layer(trained_mlp):
    zeroing = weight_zeroing(trained_mlp, DIGITS, GRID)
    assert list(zeroing.grids) == ["features.1", "features.3", "classifier"]
    pruned = zeroing.prune(trained_mlp, {"features.3": 0.5})
    before, after = trained_mlp.state_dict(), pruned.state_dict()
    assert torch.equal(after["features.3.weight_mask"].logical_not(), pruned.features[3].weight == 0)
    for name, tensor in before.items():
        kept = after[name] if name in after else after[name.replace(".weight", ".weight_orig")]
        assert torch.equal(kept, tensor), name  # the originals are untouched, the mask holds the zeros
    assert int((pruned.features[3].weight == 0).sum()) == 64 * 64 // 2
    assert all(int((pruned.get_submodule(n).weight == 0).sum()) == 0 for n in ("features.1", "classifier"))


def test_the_macs_of_zeroed_weights_count_convolutions_transposed_grouped_and_dense():
    """The MACs objective of unstructured pruning, against torch's flop counter (dense) and the
    count of each layer by hand: a weight of a convolution is used once per output position, one
    of a transposed convolution once per input position."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 8x8 out: 36 weights x 64
        nn.Conv2d(4, 6, 3, padding=1, groups=2),  # 8x8 out: 108 weights x 64
        nn.ConvTranspose2d(6, 3, 2, stride=2),  # 8x8 in, 16x16 out: 72 weights x 64 (not x 256)
        nn.Flatten(),
        nn.Linear(3 * 16 * 16, 10),
    )
    zeroing = weight_zeroing(model, DIGITS, GRID)
    by_hand = (36 + 108 + 72) * 64 + 3 * 16 * 16 * 10
    assert zeroing.cost(model)["macs"] == by_hand == measure.macs(model, DIGITS)
    half = zeroing.prune(model, {"2": 0.5})
    assert zeroing.cost(half)["macs"] == by_hand - 36 * 64


def test_removing_one_group_of_channels_changes_only_its_layers():
    torch.manual_seed(0)
    model = CNN(DIGITS, 10, width=8, blocks=2, dropout=0.0).eval()
    context = Context(DIGITS, batches_of(torch.randn(32, *DIGITS), torch.randint(0, 10, (32,))))
    removal = channel_removal(
        model, context, importance="l1", iterative_steps=1, round_to=None, scan_amounts=GRID, objective="params"
    )
    assert set(removal.grids) == {"stages.0.0.0", "stages.0.1.0", "stages.1.0.0", "stages.1.1.0"}
    pruned = removal.prune(model, {"stages.0.0.0": 0.5})
    before, after = model.state_dict(), pruned.state_dict()
    changed = {name for name in before if before[name].shape != after[name].shape}
    bn = {f"stages.0.0.1.{key}" for key in ("weight", "bias", "running_mean", "running_var")}
    assert changed == {"stages.0.0.0.weight", "stages.0.1.0.weight"} | bn
    assert all(torch.equal(before[name], after[name]) for name in before if name not in changed)
    # 4 of the 8 filters go: 4 * (1 * 3 * 3) weights, 4 BN scales and 4 shifts, and 8 * 4 * 3 * 3 next-layer inputs
    assert removal.cost(model)["params"] - removal.cost(pruned)["params"] == 36 + 8 + 288
    assert model.stages[0][0][0].weight.shape == (8, 1, 3, 3)  # the input model is left alone


# -- the search -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["prune_unstructured", "prune_structured"])
def test_the_search_meets_the_budget_and_removes_at_least_the_largest_uniform_amount(option, digits, trained_mlp):
    context = context_of(digits, trained_mlp)
    floor = context.reference_val_acc - 0.02
    result = with_budget(option, trained_mlp, context)
    found = result.details["budget"]
    assert found["within_budget"] and found["val_acc_after_finetune"] is None
    # without fine-tuning, the safe step is checked again and is the result
    assert [(a["step"], a["within_budget"]) for a in found["attempts"]] == [(found["safe_step"], True)]
    assert found["chosen_step"] == found["safe_step"] == found["path_steps"]
    assert found["floor"] == pytest.approx(floor)
    assert accuracy(result.model, digits.x_val, digits.y_val) == pytest.approx(found["val_acc_before_finetune"])
    assert found["val_acc_before_finetune"] >= floor

    def removed(model: nn.Module) -> float:
        if option == "prune_unstructured":
            return zeroed_fraction(model)
        return 1 - param_count(model) / param_count(trained_mlp)

    assert found["removed_fraction"] == pytest.approx(removed(result.model))
    uniform, uniform_amount = 0.0, None
    for amount in configured(option)["scan_amounts"]:
        settings = {"amount": amount, "max_acc_drop": None} | (
            {"scope": "layer"} if option == "prune_unstructured" else {}
        )
        candidate = with_budget(option, trained_mlp, context, **settings).model
        if accuracy(candidate, digits.x_val, digits.y_val) < floor:
            break
        uniform, uniform_amount = removed(candidate), amount
    print(
        f"{option}: search removes {removed(result.model):.3f}, uniform amount {uniform_amount} removes {uniform:.3f}"
    )
    assert removed(result.model) >= uniform
    assert removed(result.model) > 0.3


def test_a_budget_of_zero_loses_no_validation_sample(digits, trained_mlp):
    context = context_of(digits, trained_mlp)
    result = with_budget("prune_unstructured", trained_mlp, context, max_acc_drop=0.0)
    assert accuracy(result.model, digits.x_val, digits.y_val) >= context.reference_val_acc
    assert result.details["budget"]["floor"] == context.reference_val_acc
    assert zeroed_fraction(result.model) > 0.1


def hurting(times: int | None, calls: list) -> Callable:
    """A fine-tuning that ruins the model (every prediction class 0) the first ``times`` calls
    (None: always) and changes nothing after; ``calls`` records whether the zeros were held by
    masks (every layer with zeros has one, and one has)."""

    def finetune(model, epochs, on_epoch_start=None):
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        masked = [hasattr(m, "weight_mask") for m in layers]
        calls.append(any(masked) and masked == [bool((m.weight == 0).any()) for m in layers])
        if times is None or len(calls) <= times:
            with torch.no_grad():
                model.classifier.bias[0] += 1e4

    return finetune


def no_more_than(less: dict[str, float], more: dict[str, float]) -> bool:
    """Every layer of ``less`` pruned by at most its amount in ``more``."""
    return all(amount <= more.get(layer, 0.0) for layer, amount in less.items())


def training(data: Split, calls: list) -> Callable:
    """A real fine-tuning: ``epochs`` of cross-entropy with Adam on the training split."""

    def finetune(model, epochs, on_epoch_start=None):
        calls.append(epochs)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(epochs):
            for x, y, _ in batches_of(data.x_train, data.y_train, 64)():
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        model.eval()

    return finetune


def test_the_path_beyond_the_safe_step_passes_every_uniform_configuration():
    grids = {"a": GRID, "b": GRID[:2], "c": GRID}
    generator = torch.Generator().manual_seed(0)
    by_step = {
        (layer, amount): {"val_acc": float(torch.rand(1, generator=generator)), "params_removed": 100 * amount}
        for layer, grid in grids.items()
        for amount in grid
    }
    start = {"a": 0.5}
    path = budget.extend(grids, by_step, start, "params", 1.0)
    assert len(path) == sum(len(grid) for grid in grids.values()) - 2  # one step each, to the top of every grid
    assert all(sum(b.values()) > sum(a.values()) for a, b in zip([start, *path], path))
    assert path[-1] == {layer: grid[-1] for layer, grid in grids.items()}
    for amount in (0.5, 0.75):  # at or above the start; "b" stops at the top of its grid
        assert {layer: min(amount, grid[-1]) for layer, grid in grids.items()} in path


def test_fine_tuning_takes_the_search_beyond_the_safe_step(digits, trained_mlp):
    calls: list = []
    context = context_of(digits, trained_mlp, finetune=training(digits, calls), epochs=2)
    result = with_budget("prune_unstructured", trained_mlp, context)
    found = result.details["budget"]
    attempts = found["attempts"]
    assert calls == [2] * len(attempts) and len(attempts) == 4  # finetune_attempts in the YAML
    assert attempts[0]["step"] == found["safe_step"] > 0 and found["path_steps"] > found["safe_step"]
    assert found["chosen_step"] > found["safe_step"] and found["within_budget"]
    chosen = next(attempt for attempt in attempts if attempt["step"] == found["chosen_step"])
    assert chosen["within_budget"] and chosen["val_acc_pruned"] < found["floor"] <= chosen["val_acc_finetuned"]
    assert no_more_than(attempts[0]["amounts"], chosen["amounts"])
    # bisection: each attempt lies between the furthest success and the nearest failure before it
    for i, attempt in enumerate(attempts[1:], start=1):
        passed = [a["step"] for a in attempts[:i] if a["within_budget"]]
        failed = [a["step"] for a in attempts[:i] if not a["within_budget"]]
        assert max(passed, default=0) < attempt["step"] < min(failed, default=found["path_steps"] + 1)
    assert accuracy(result.model, digits.x_val, digits.y_val) == pytest.approx(found["val_acc_after_finetune"])
    assert accuracy(result.model, digits.x_val, digits.y_val) >= found["floor"]
    total = sum(w.numel() for w in linear_weights(trained_mlp))
    safe = sum(
        round(a * trained_mlp.get_submodule(layer).weight.numel()) for layer, a in attempts[0]["amounts"].items()
    )
    print(f"zeroed: {safe / total:.3f} at the safe step, {zeroed_fraction(result.model):.3f} fine-tuned along the path")
    assert zeroed_fraction(result.model) > safe / total


def test_a_failed_check_after_finetuning_backs_off_below_the_safe_step(digits, trained_mlp):
    calls: list = []
    context = context_of(digits, trained_mlp, finetune=hurting(1, calls), epochs=1)
    result = with_budget("prune_unstructured", trained_mlp, context, scan_amounts=GRID)
    found = result.details["budget"]
    first, second, *_ = found["attempts"]
    assert calls == [True] * len(found["attempts"])  # the zeros held by their masks while fine-tuning
    assert first["step"] == found["safe_step"] >= 2
    assert not first["within_budget"] and first["val_acc_finetuned"] < 0.2
    assert second["step"] == found["safe_step"] // 2 and second["within_budget"]
    assert 0 < found["chosen_step"] < found["safe_step"] and found["within_budget"]
    chosen = next(attempt for attempt in found["attempts"] if attempt["step"] == found["chosen_step"])
    assert no_more_than(chosen["amounts"], first["amounts"]) and chosen["amounts"] != first["amounts"]
    assert found["amounts"] == {layer: chosen["amounts"].get(layer, 0.0) for layer in found["amounts"]}
    assert accuracy(result.model, digits.x_val, digits.y_val) == pytest.approx(chosen["val_acc_finetuned"])
    assert not any(name.endswith("_mask") for name in result.model.state_dict())


def test_the_attempts_are_bounded_and_when_all_fail_nothing_is_pruned(digits, trained_mlp):
    calls: list = []
    context = context_of(digits, trained_mlp, finetune=hurting(None, calls), epochs=1)
    result = with_budget("prune_unstructured", trained_mlp, context, scan_amounts=GRID, finetune_attempts=2)
    found = result.details["budget"]
    assert len(calls) == 2 and [attempt["within_budget"] for attempt in found["attempts"]] == [False, False]
    assert found["within_budget"] and found["chosen_step"] == 0 and found["removed_fraction"] == 0.0
    assert set(found["amounts"].values()) == {0.0}
    state = trained_mlp.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in result.model.state_dict().items())


def test_a_dry_run_scans_one_layer_and_takes_one_step(digits):
    torch.manual_seed(0)
    model = CNN(DIGITS, 10, width=8, blocks=2, dropout=0.0).eval()
    context = context_of(
        digits, model, dry_run=True, measure={"warmup": 0, "repeats": 1, "threads": 1}, reference_val_acc=1.0
    )
    result = with_budget("prune_structured", model, context, objective="latency")
    assert len(result.tables["sensitivity"]) == 1
    assert "latency_ms_removed" in result.tables["sensitivity"][0]
    assert result.details["budget"]["search_evaluations"] == 1


def test_a_latency_objective_scans_the_latency(digits):
    torch.manual_seed(0)
    model = CNN(DIGITS, 10, width=8, blocks=1, dropout=0.0).eval()
    context = context_of(digits, model, measure={"warmup": 0, "repeats": 3, "threads": 1})
    result = with_budget("prune_structured", model, context, objective="latency", max_acc_drop=0.5, scan_amounts=GRID)
    rows = result.tables["sensitivity"]
    assert len(rows) == 2 * len(GRID) and all(isinstance(row["latency_ms_removed"], float) for row in rows)
    assert result.details["budget"]["objective"] == "latency" and "latency_ms" in result.details["budget"]["removed"]


# -- cycles ---------------------------------------------------------------------------------------------
def test_cycle_amounts_remove_the_same_fraction_of_what_remains():
    assert budget.cycle_amounts(0.875, 3) == pytest.approx([0.5, 0.75, 0.875])
    assert budget.cycle_amounts(0.5, 1) == [0.5]
    remaining = [1 - a for a in budget.cycle_amounts(0.8, 4)]
    ratios = [b / a for a, b in zip([1.0, *remaining], remaining)]
    assert ratios == pytest.approx([0.2**0.25] * 4)


def test_unstructured_cycles_reach_the_amount_and_finetune_each_cycle(digits):
    torch.manual_seed(0)
    model = CNN(DIGITS, 10, width=8, blocks=2, dropout=0.0).eval()
    seen = []

    def finetune(target, epochs, on_epoch_start=None):
        layers = [m for m in target.modules() if isinstance(m, budget.PRUNABLE)]
        weights = [m.weight for m in layers]
        seen.append((epochs, sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)))
        with torch.no_grad():  # a training step: what is masked stays zero
            for m in layers:
                m.weight_orig.add_(0.01)

    context = context_of(digits, model, finetune=finetune, epochs=2)
    result = P.unstructured(model, context, **{**configured("prune_unstructured"), "amount": 0.875, "cycles": 3})
    assert [epochs for epochs, _ in seen] == [2, 2, 2]
    assert [sparsity for _, sparsity in seen] == pytest.approx([0.5, 0.75, 0.875], abs=1e-3)
    rows = result.tables["cycles"]
    assert [row["cycle"] for row in rows] == [0, 1, 2, 3]
    assert [row["amount"] for row in rows] == pytest.approx([0.0, 0.5, 0.75, 0.875])
    assert all(
        a["nonzero_params"] > b["nonzero_params"] and a["size_bytes"] > b["size_bytes"] for a, b in zip(rows, rows[1:])
    )
    assert rows[-1]["val_acc"] == pytest.approx(accuracy(result.model, digits.x_val, digits.y_val))
    assert result.details["cycle_amounts"] == pytest.approx([0.5, 0.75, 0.875])
    assert result.details["nonzero_fraction"] == pytest.approx(0.125, abs=1e-3)


def test_structured_cycles_end_where_one_shot_pruning_does(digits):
    torch.manual_seed(0)
    model = CNN(DIGITS, 10, width=16, blocks=2, dropout=0.0).eval()
    widths = []

    def finetune(target, epochs, on_epoch_start=None):
        widths.append(target.classifier.in_features)

    context = context_of(digits, model, finetune=finetune, epochs=1)
    settings = {**configured("prune_structured"), "amount": 0.5}
    cycled = P.structured(model, context, **{**settings, "cycles": 2})
    # 1 - sqrt(0.5) of the 32 channels after the first cycle: int(32 * 0.7071) = 22 kept; then 16
    assert widths == [22, 16]
    once = P.structured(model, context_of(digits, model), **settings).model
    assert [p.shape for p in cycled.model.parameters()] == [p.shape for p in once.parameters()]
    rows = cycled.tables["cycles"]
    assert [row["params"] for row in rows] == sorted((row["params"] for row in rows), reverse=True)
    assert rows[-1]["params"] == param_count(once) and cycled.details["cycle_amounts"] == pytest.approx(
        [1 - 0.5**0.5, 0.5]
    )


# -- errors ---------------------------------------------------------------------------------------------
def test_budget_and_cycle_settings_fail_in_one_line(digits):
    model = CNN(DIGITS, 10, width=8, blocks=1, dropout=0.0).eval()
    plain = context_of(digits, model)
    tuned = context_of(digits, model, finetune=lambda *args, **kwargs: None, epochs=1)
    structured = configured("prune_structured")
    unstructured = configured("prune_unstructured")
    cases = [
        (P.structured, plain, {**structured, "max_acc_drop": 0.01}, "amount"),
        (P.unstructured, plain, {**unstructured, "max_acc_drop": 0.01}, "amount"),
        (
            P.structured,
            plain,
            {**structured, "amount": None, "max_acc_drop": 0.01, "target_params": 100},
            "target_params",
        ),
        (P.structured, tuned, {**structured, "amount": None, "max_acc_drop": 0.01, "cycles": 2}, "cycles"),
        (P.unstructured, plain, {**unstructured, "amount": None}, "amount"),
        (P.structured, plain, {**structured, "cycles": 2}, "cycles"),
        (P.unstructured, tuned, {**unstructured, "cycles": 2, "schedule": "gradual"}, "cycles"),
        (P.structured, tuned, {**structured, "amount": None, "target_params": 100, "cycles": 2}, "cycles"),
        (
            P.unstructured,
            tuned,
            {**unstructured, "amount": None, "max_acc_drop": 0.01, "schedule": "gradual"},
            "schedule",
        ),
        (P.unstructured, plain, {**unstructured, "objective": "latency"}, "objective"),
        (P.structured, plain, {**structured, "scan_amounts": [0.5, 0.2]}, "scan_amounts"),
        (P.structured, plain, {**structured, "scan_amounts": []}, "scan_amounts"),
        (P.structured, plain, {**structured, "scan_amounts": [0.5, 1.5]}, "scan_amounts"),
        (P.structured, plain, {**structured, "finetune_attempts": 0}, "finetune_attempts"),
        (P.structured, plain, {**structured, "max_acc_drop": 1.0}, "max_acc_drop"),
    ]
    for method, context, settings, key in cases:
        one_line_error(lambda m=method, c=context, s=settings: m(model, c, **s), key)
    narrow = CNN(DIGITS, 10, width=1, blocks=1, dropout=0.0).eval()  # one channel per layer: none can go
    message = one_line_error(
        lambda: P.structured(
            narrow, plain, **{**structured, "amount": None, "max_acc_drop": 0.01, "scan_amounts": [0.5]}
        ),
        "scan_amounts",
    )
    assert "without removing them all" in message


# -- figures and a whole run ---------------------------------------------------------------------------------
def test_the_cycles_figure_is_written_and_tables_without_one_are_skipped(tmp_path):
    rows = [
        {
            "cycle": c,
            "amount": a,
            "params": 100,
            "nonzero_params": n,
            "size_bytes": 4 * n,
            "val_acc_pruned": v - 0.1,
            "val_acc": v,
        }
        for c, a, n, v in ((0, 0.0, 100, 0.9), (1, 0.5, 50, 0.88), (2, 0.75, 25, 0.85))
    ]
    path = plots.save_figure("cycles", rows, tmp_path / "cycles.png", {})
    assert path == tmp_path / "cycles.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.save_figure("quant_sensitivity", rows, tmp_path / "other.png", {}) is None
    assert plots.save_figure("cycles", [], tmp_path / "empty.png", {}) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycles.png"]


def test_a_run_with_a_budget_saves_the_scan_and_its_figure(make_cfg, tmp_path):
    record = pipeline.run(
        make_cfg(
            "compress=prune_structured",
            "compress.max_acc_drop=0.05",  # alone: the search chooses the amounts
            "compress.finetune_epochs=1",
            "student=cnn",
            "student.width=8",
            "measure.warmup=0",
            "measure.repeats=2",
        ),
        raise_on_failure=True,
    )
    found = record["compressed"]["details"]["budget"]
    assert found["within_budget"] and found["max_acc_drop"] == 0.05
    folder = tmp_path / "run" / "compressed"
    with open(folder / "sensitivity.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["layer"] for row in rows} == set(found["amounts"]) and len(rows) >= len(found["amounts"])
    assert list(rows[0]) == ["layer", "amount", "val_acc", "params_removed", "macs_removed"]
    assert (folder / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["compressed"]["details"]["budget"] == found


@pytest.mark.parametrize("option", compress.takes("amount"))
def test_a_budget_on_the_command_line_lets_the_search_choose_the_amounts(option, make_cfg):
    plain = make_cfg(f"compress={option}")
    assert plain.compress.amount is not None  # the YAML's default amount
    # a run that writes the default out composes the same config: its hash, and a sweep's resume, are unchanged
    explicit = make_cfg(f"compress={option}", f"compress.amount={plain.compress.amount}")
    assert results.config_hash(explicit) == results.config_hash(plain)
    cfg = make_cfg(f"compress={option}", "compress.max_acc_drop=0.01")
    assert cfg.compress.amount is None
    validate(cfg)
    taking = [m for m in compress.methods(cfg.compress) if "amount" in inspect.signature(m.func).parameters]
    assert taking and all(m.keywords["amount"] is None and m.keywords["max_acc_drop"] == 0.01 for m in taking)


def test_an_amount_set_with_a_budget_fails_before_training(make_cfg, tmp_path):
    cfg = make_cfg("compress=prune_structured", "compress.amount=0.3", "compress.max_acc_drop=0.01", own_cache=True)
    with pytest.raises(ConfigError) as caught:
        pipeline.run(cfg, raise_on_failure=True)
    assert str(caught.value).startswith("compress.amount=0.3 is not allowed with max_acc_drop=0.01")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "cache").exists()
