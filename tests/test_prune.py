"""Pruning: unstructured zeros with a sparse artifact, structured channel removal with a
smaller, faster model; both leave the input model alone and reload exactly."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import prune as torch_prune

from distillab import conf, measure
from distillab.compress import PIPELINE_KEYS, SHARED, Compressed, Context
from distillab.compress import prune as P
from distillab.compress.prune import PRUNABLE, cubic_sparsity, load_structured, load_unstructured
from distillab.models import CNN, MLP, resnet20
from distillab.settings import ConfigError

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)


def configured(option: str) -> dict:
    """The settings ``conf/compress/<option>.yaml`` gives its function, the shared pipeline keys
    (``amount``, ``max_acc_drop``, ``cycles``) included."""
    node = OmegaConf.to_container(conf.load("compress", option), resolve=True)
    own = ("_target_", "_partial_", *PIPELINE_KEYS)
    return {key: value for key, value in node.items() if key in SHARED or key not in own}


def unstructured(model: nn.Module, context: Context, **settings) -> Compressed:
    """``prune.unstructured`` with the configured settings, ``settings`` on top."""
    return P.unstructured(model, context, **{**configured("prune_unstructured"), **settings})


def structured(model: nn.Module, context: Context, **settings) -> Compressed:
    """``prune.structured`` with the configured settings, ``settings`` on top."""
    return P.structured(model, context, **{**configured("prune_structured"), **settings})


def batches_of(input_shape: tuple[int, ...], n: int = 3, size: int = 16) -> Callable:
    def batches():
        generator = torch.Generator().manual_seed(0)
        for _ in range(n):
            yield (
                torch.randn(size, *input_shape, generator=generator),
                torch.randint(0, 10, (size,), generator=generator),
                torch.arange(size),
            )

    return batches


def context(input_shape: tuple[int, ...] = DIGITS, epochs: int = 0, finetune: Callable | None = None) -> Context:
    return Context(
        input_shape=input_shape, train_batches=batches_of(input_shape), finetune_epochs=epochs, finetune=finetune
    )


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN(DIGITS, 10, width=8, blocks=2, dropout=0.0)


def prunable_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE)]


def nonzero_fraction(model: nn.Module) -> float:
    """Nonzero fraction of the Conv/Linear weights: all nonzero parameters (measure) minus
    the nonzero biases and BatchNorm parameters, over the count of those weights."""
    names = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, PRUNABLE)}
    others = sum(int(torch.count_nonzero(p)) for name, p in model.named_parameters() if name not in names)
    return (measure.nonzero_params(model) - others) / sum(w.numel() for w in prunable_weights(model))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def one_line_error(call: Callable, key: str) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message
    return message


# -- unstructured -----------------------------------------------------------------------------
def test_unstructured_global_reaches_the_sparsity_and_leaves_the_rest_alone():
    model = small_cnn()
    before = snapshot(model)
    result = unstructured(model, context(), amount=0.8)
    pruned = result.model

    fraction = nonzero_fraction(pruned)
    print(f"nonzero fraction of the prunable weights at amount=0.8: {fraction:.4f}")
    assert fraction == pytest.approx(0.20, abs=0.01)
    assert result.details["nonzero_fraction"] == pytest.approx(fraction)
    assert (
        result.details["zeroed_weights"] + round(fraction * result.details["prunable_weights"])
        == result.details["prunable_weights"]
    )
    # biases, BatchNorm parameters and buffers are exactly the input's
    weights = {f"{name}.weight" for name, m in pruned.named_modules() if isinstance(m, PRUNABLE)}
    for name, tensor in pruned.state_dict().items():
        if name not in weights:
            assert torch.equal(tensor, before[name]), name
    # the masks are permanent: a plain module
    assert not torch_prune.is_pruned(pruned)
    assert not any(name.endswith(("_orig", "_mask")) for name in pruned.state_dict())
    assert same_state(model, before) and not torch_prune.is_pruned(model)
    assert result.method == "prune_unstructured" and "latency" in result.details["latency_note"]


def test_unstructured_layer_scope_prunes_each_layer_by_amount():
    pruned = unstructured(small_cnn(), context(), amount=0.6, scope="layer").model
    for weight in prunable_weights(pruned):
        zeros = int((weight == 0).sum())
        assert zeros == round(0.6 * weight.numel())


def test_unstructured_artifact_is_smaller_and_reloads_exactly(tmp_path):
    # wide enough that the weights, not the per-tensor file overhead, make up the artifact
    result = unstructured(CNN(DIGITS, 10, width=32, blocks=2, dropout=0.0), context(), amount=0.8)
    path = tmp_path / "sparse.pt"
    result.save(path)
    dense = measure.size_bytes(result.model)
    # 1 bit per weight + 4 bytes per nonzero: about 0.2 + 1/32 of the dense weights
    print(f"sparse/dense artifact bytes at amount=0.8: {path.stat().st_size / dense:.3f}")
    assert path.stat().st_size < 0.35 * dense
    assert result.details["sparse_size_bytes"] < 0.35 * result.details["dense_size_bytes"]
    assert result.details["dense_size_bytes"] == dense
    torch.load(path, weights_only=True)
    fresh = CNN(DIGITS, 10, width=32, blocks=2, dropout=0.0)
    assert not same_state(fresh, snapshot(result.model))
    load_unstructured(path, fresh)
    assert same_state(fresh, snapshot(result.model))


def test_cubic_schedule_values():
    # amount * (1 - (1 - (e + 1) / 4) ** 3) for e = 0..3, by hand
    assert [cubic_sparsity(0.8, e, 4) for e in range(4)] == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert [cubic_sparsity(0.8, e, 2) for e in range(2)] == pytest.approx([0.7, 0.8])


def test_gradual_schedule_raises_the_sparsity_each_epoch():
    seen = []

    def finetune(model, epochs, on_epoch_start=None):
        for epoch in range(epochs):
            on_epoch_start(epoch)
            weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
            seen.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
            # a training step: the pruned weights must stay zero
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, PRUNABLE):
                        m.weight_orig.add_(0.01)

    result = unstructured(small_cnn(), context(epochs=4, finetune=finetune), amount=0.8, schedule="gradual")
    assert seen == pytest.approx([0.4625, 0.7, 0.7875, 0.8], abs=1e-3)
    assert result.details["sparsity_per_epoch"] == pytest.approx([0.4625, 0.7, 0.7875, 0.8])
    assert nonzero_fraction(result.model) == pytest.approx(0.2, abs=1e-3)
    assert not torch_prune.is_pruned(result.model)


def test_oneshot_finetunes_with_the_masks_held():
    calls = []

    def finetune(model, epochs, on_epoch_start=None):
        calls.append(epochs)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, PRUNABLE):
                    m.weight_orig.add_(0.01)

    result = unstructured(small_cnn(), context(epochs=2, finetune=finetune), amount=0.8)
    assert calls == [2]
    assert nonzero_fraction(result.model) == pytest.approx(0.2, abs=0.01)


def test_unstructured_errors_are_one_line():
    model = small_cnn()
    one_line_error(lambda: unstructured(model, context(), amount=1.2), "amount")
    one_line_error(lambda: unstructured(model, context(), amount=0.0), "amount")
    one_line_error(lambda: unstructured(model, context(), amount=0.5, scope="net"), "scope")
    one_line_error(lambda: unstructured(model, context(), amount=0.5, schedule="gradual"), "schedule")
    one_line_error(lambda: unstructured(nn.Sequential(nn.Flatten(), nn.ReLU()), context(), amount=0.5), "model")


# -- structured -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_pruned():
    torch.manual_seed(0)
    model = resnet20(CIFAR, 10).eval()
    before = snapshot(model)
    result = structured(model, context(CIFAR), amount=0.5)
    return model, before, result


def test_structured_removes_channels_for_real(resnet_pruned):
    model, before, result = resnet_pruned
    pruned = result.model
    assert same_state(model, before)
    assert pruned.stem[0].weight.shape == (8, 3, 3, 3)
    assert pruned.layer3[0].conv1.weight.shape == (32, 16, 3, 3)
    assert pruned.fc.weight.shape == (10, 32)
    ratio = measure.params(pruned) / measure.params(model)
    print(f"resnet20 params ratio at amount=0.5: {ratio:.3f}")
    assert ratio <= 0.55
    assert result.details["param_ratio"] == pytest.approx(ratio)
    assert result.details["macs_after"] < result.details["macs_before"]
    assert result.details["out_channels"]["stem.0"] == [16, 8]
    assert pruned(torch.randn(2, *CIFAR)).shape == (2, 10)


def test_structured_artifact_reloads_identically(resnet_pruned, tmp_path):
    _, _, result = resnet_pruned
    path = tmp_path / "pruned.pt"
    result.save(path)
    assert torch.load(path, weights_only=True)["state_dict"]["fc.weight"].shape == (10, 32)
    fresh = resnet20(CIFAR, 10)
    assert fresh.fc.weight.shape == (10, 64)
    reloaded = load_structured(path, fresh).eval()
    x = torch.randn(4, *CIFAR)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model.eval()(x))
    assert measure.params(reloaded) == measure.params(result.model)


def test_structured_is_faster_at_batch_64(resnet_pruned):
    model, _, result = resnet_pruned
    timing = {"batch_size": 64, "warmup": 2, "repeats": 5, "threads": 1}
    ratio = measure.latency_ms(result.model, CIFAR, **timing) / measure.latency_ms(model, CIFAR, **timing)
    print(f"resnet20 batch-64 latency ratio at amount=0.5: {ratio:.3f}")
    assert ratio < 1


@pytest.mark.parametrize("budget", ["target_params", "target_macs"])
def test_structured_budget_is_met(budget):
    model = small_cnn()
    full = {"target_params": measure.params(model), "target_macs": measure.macs(model, DIGITS)}[budget]
    result = structured(model, context(), **{budget: full // 3})
    after = {"target_params": measure.params, "target_macs": lambda m: measure.macs(m, DIGITS)}[budget](result.model)
    assert after <= full // 3
    assert result.details["amount"] is None and result.details["channel_ratio"] > 0


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor"])
def test_structured_importances_run(importance):
    model = small_cnn()
    result = structured(model, context(), amount=0.5, importance=importance)
    assert result.details["importance"] == importance
    assert result.model.classifier.in_features == 8
    assert result.model(torch.randn(2, *DIGITS)).shape == (2, 10)


def test_structured_finetunes_after_pruning():
    shapes = []

    def finetune(model, epochs, on_epoch_start=None):
        shapes.append((epochs, model.classifier.in_features))

    result = structured(small_cnn(), context(epochs=3, finetune=finetune), amount=0.5)
    assert shapes == [(3, 8)] and result.model.classifier.in_features == 8


def test_structured_errors_are_one_line():
    model = small_cnn()
    params = measure.params(model)
    message = one_line_error(lambda: structured(model, context(), target_params=params + 1), "target_params")
    assert f"{params:,}" in message
    one_line_error(lambda: structured(model, context(), target_macs=10**12), "target_macs")
    one_line_error(lambda: structured(model, context(), amount=1.0), "amount")
    one_line_error(lambda: structured(model, context(), amount=0.5, importance="l3"), "importance")
    one_line_error(lambda: structured(CNN(DIGITS, 10, width=1, blocks=2, dropout=0.0), context(), amount=0.5), "amount")
    one_line_error(lambda: structured(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), context(), amount=0.5), "model")
    one_line_error(
        lambda: structured(
            MLP(DIGITS, 10, hidden=[32], dropout=0.0, input_dropout=0.0), context(), amount=0.5, importance="bn_scale"
        ),
        "importance",
    )
    one_line_error(lambda: structured(model, context(), amount=None), "amount")
    one_line_error(lambda: structured(model, context(), amount=0.5, iterative_steps=0), "iterative_steps")
    one_line_error(lambda: structured(model, context(), amount=0.5, round_to=0), "round_to")
    one_line_error(lambda: structured(model, context(), target_params=0), "target_params")


def test_structured_unreachable_budget_is_one_line():
    model = small_cnn()
    one_line_error(lambda: structured(model, context(), target_params=10), "target_params")


def test_structured_leaves_the_input_unchanged():
    model = small_cnn()
    before = snapshot(model)
    copy_before = copy.deepcopy(model)
    structured(model, context(), amount=0.5, importance="taylor")
    assert same_state(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert str(model) == str(copy_before)
