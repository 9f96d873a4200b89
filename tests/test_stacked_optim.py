"""StackedOptimizer against M separate torch optimizers and schedulers fed the same gradients,
and which optimizer factories may be stacked."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distillab import optim
from distillab.settings import ConfigError
from distillab.stacked.optim import StackedOptimizer, why_not_stackable

CONF = Path(__file__).resolve().parents[1] / "conf"
M = 3
SHAPES = [(5, 4), (5,), (2, 3, 2, 2)]  # a linear weight, a bias, a conv kernel
LRS = [0.05, 0.02, 0.005]
WEIGHT_DECAYS = [0.0, 0.01, 0.1]
EPOCHS, STEPS_PER_EPOCH = 4, 3  # 12 steps; the schedules below change the rate at most epochs


def _factories(cls: type[torch.optim.Optimizer], **kwargs) -> list[functools.partial]:
    """One factory per member, as Hydra builds them, with the members' own lr and weight decay."""
    return [functools.partial(cls, lr=lr, weight_decay=wd, **kwargs) for lr, wd in zip(LRS, WEIGHT_DECAYS)]


OPTIMIZERS = {
    "adam": (torch.optim.Adam, {}),
    "adam-amsgrad-maximize": (torch.optim.Adam, {"betas": (0.8, 0.95), "amsgrad": True, "maximize": True}),
    "adamw": (torch.optim.AdamW, {}),
    "adamw-amsgrad": (torch.optim.AdamW, {"amsgrad": True, "eps": 1e-2}),
    "sgd-momentum-dampening": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),
    "sgd-nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "sgd-plain-maximize": (torch.optim.SGD, {"maximize": True}),
}
SCHEDULERS = {
    "constant": None,
    "cosine-warmup": functools.partial(optim.cosine, eta_min_ratio=0.1, warmup_epochs=2),
    "multistep-warmup": functools.partial(optim.multistep, milestones=[3], gamma=0.1, warmup_epochs=2),
}


class Separate:
    """The reference: one torch optimizer and scheduler per member over its own copy of the
    parameters, stepped the way Lightning steps them (scheduler once per epoch)."""

    def __init__(self, init: list[torch.Tensor], factories, scheduler) -> None:
        self.params = [[torch.nn.Parameter(t[m].clone()) for t in init] for m in range(M)]
        self.optimizers = [factory(params) for factory, params in zip(factories, self.params)]
        self.schedulers = [scheduler(o, max_epochs=EPOCHS) for o in self.optimizers] if scheduler else []

    def step(self, grads: list[torch.Tensor]) -> None:
        for m, optimizer in enumerate(self.optimizers):
            for p, g in zip(self.params[m], grads):
                p.grad = g[m].clone()
            optimizer.step()

    def schedule_step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def lr(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([o.param_groups[0]["lr"] for o in self.optimizers], dtype=dtype)


def _gradients(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random gradients whose scale shrinks and grows, so amsgrad's running maximum matters."""
    scale = 4.0 ** -(step % 3)
    return [scale * torch.randn(M, *shape, dtype=dtype) for shape in SHAPES]


def _assert_members_match(stacked: list[torch.Tensor], separate: Separate) -> None:
    for m in range(M):
        for i, p in enumerate(stacked):
            torch.testing.assert_close(
                p[m], separate.params[m][i].detach(), msg=lambda s, m=m, i=i: f"member {m}, param {i}: {s}"
            )


def _train(factories, scheduler, dtype: torch.dtype = torch.float32) -> None:
    """Train both ways with identical gradients; members must match after every step and their
    learning rates after every epoch."""
    torch.manual_seed(0)
    init = [torch.randn(M, *shape, dtype=dtype) for shape in SHAPES]
    stacked = [t.clone().requires_grad_() for t in init]
    separate = Separate(init, factories, scheduler)
    optimizer = StackedOptimizer(stacked, factories, scheduler, max_epochs=EPOCHS)
    for epoch in range(EPOCHS):
        torch.testing.assert_close(optimizer.lr, separate.lr(dtype))
        for step in range(STEPS_PER_EPOCH):
            grads = _gradients(epoch * STEPS_PER_EPOCH + step, dtype)
            given = [g.clone() for g in grads]
            optimizer.step(grads)
            separate.step(grads)
            _assert_members_match(stacked, separate)
            assert all(torch.equal(g, h) for g, h in zip(grads, given)), "step() changed the gradients it was given"
        optimizer.schedule_step()
        separate.schedule_step()
    torch.testing.assert_close(optimizer.lr, separate.lr(dtype))
    moved = [(p - t).abs().max() for p, t in zip(stacked, init)]
    assert all(d > 1e-3 for d in moved), "the parameters barely moved: the comparison would prove nothing"


@pytest.mark.parametrize("scheduler", SCHEDULERS.values(), ids=SCHEDULERS.keys())
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_member_follows_its_own_torch_optimizer(name, scheduler):
    cls, kwargs = OPTIMIZERS[name]
    _train(_factories(cls, **kwargs), scheduler)


@pytest.mark.parametrize("name", ["adamw", "sgd-momentum-dampening"])
def test_float64_parameters_are_updated_in_float64(name):
    cls, kwargs = OPTIMIZERS[name]
    _train(_factories(cls, **kwargs), SCHEDULERS["cosine-warmup"], dtype=torch.float64)


def test_schedules_differ_per_member_by_their_base_rate():
    """The schedule's factor is shared, the rate is each member's own: lr is the [M] vector of rates."""
    stacked = [torch.zeros(M, 2, requires_grad=True)]
    optimizer = StackedOptimizer(stacked, _factories(torch.optim.SGD), SCHEDULERS["multistep-warmup"], EPOCHS)
    seen = [optimizer.lr.tolist()]
    for _ in range(EPOCHS - 1):
        optimizer.schedule_step()
        seen.append(optimizer.lr.tolist())
    # two warm-up epochs (half, then all of the base rate), the base rate, x0.1 from milestone 3
    expected = [[lr * f for lr in LRS] for f in (0.5, 1.0, 1.0, 0.1)]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "factories,key",
    [
        (
            [functools.partial(torch.optim.Adam, lr=1e-3), functools.partial(torch.optim.Adam, betas=(0.8, 0.999))],
            "betas",
        ),
        (
            [functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), functools.partial(torch.optim.SGD, lr=0.1)],
            "momentum",
        ),
        (
            [
                functools.partial(torch.optim.SGD, momentum=0.9),
                functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
            ],
            "nesterov",
        ),
        ([functools.partial(torch.optim.Adam), functools.partial(torch.optim.Adam, amsgrad=True)], "amsgrad"),
        ([functools.partial(torch.optim.Adam), functools.partial(torch.optim.AdamW)], "AdamW"),
    ],
)
def test_members_that_differ_beyond_lr_and_weight_decay_are_refused_naming_the_key(factories, key):
    reason = why_not_stackable(factories)
    assert reason is not None and key in reason and "\n" not in reason
    with pytest.raises(ConfigError, match=key):
        StackedOptimizer([torch.zeros(2, 3, requires_grad=True)], factories, None, max_epochs=1)


def test_an_unsupported_optimizer_is_refused_naming_the_supported_ones():
    reason = why_not_stackable([functools.partial(torch.optim.RMSprop, lr=0.01)] * 2)
    assert reason is not None and "\n" not in reason
    assert all(name in reason for name in ("RMSprop", "torch.optim.Adam", "torch.optim.AdamW", "torch.optim.SGD"))


@pytest.mark.parametrize("node", ["adam", "adamw", "sgd"])
def test_the_conf_optimizers_stack_with_swept_lr_and_weight_decay(node):
    """Factories built by Hydra from conf/optim, with lr and weight decay swept and an option that
    only changes the implementation, stack."""
    base = OmegaConf.load(CONF / "optim" / f"{node}.yaml").optimizer
    factories = [
        instantiate(OmegaConf.merge(base, {"lr": lr, "weight_decay": wd, "foreach": m == 0}))
        for m, (lr, wd) in enumerate(zip(LRS, WEIGHT_DECAYS))
    ]
    assert why_not_stackable(factories) is None


def test_defaults_written_out_equal_defaults_left_out():
    """Settings are compared as torch resolves them: AdamW's betas given as a list (as a YAML list
    arrives) equal its default tuple."""
    factories = [
        functools.partial(torch.optim.AdamW, lr=1e-3),
        functools.partial(torch.optim.AdamW, betas=[0.9, 0.999]),
    ]
    assert why_not_stackable(factories) is None


def test_parameters_must_hold_one_row_per_member():
    with pytest.raises(ValueError, match="parameter 1 has shape \\(2, 3\\)"):
        StackedOptimizer(
            [torch.zeros(M, 3, requires_grad=True), torch.zeros(2, 3, requires_grad=True)],
            _factories(torch.optim.SGD),
            None,
            max_epochs=1,
        )
