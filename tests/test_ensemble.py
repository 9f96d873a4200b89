"""Several teachers: the combined soft targets, the configuration checks, one real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from distillab import pipeline
from distillab.config import ConfigError
from distillab.distill.methods.kd import soft_kl
from distillab.steps.teacher import ensemble
from tests.conftest import CONF

LOGITS = torch.tensor(
    [
        [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]],
        [[-0.5, 1.5, 0.0], [3.0, -2.0, 0.5]],
        [[0.0, 0.0, 4.0], [1.0, 1.0, 1.0]],
    ]
)  # 3 teachers × 2 samples × 3 classes


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("weights", [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]])
def test_probability_average_is_exact(temperature: float, weights: list[float]) -> None:
    combined = ensemble.combine_logits(LOGITS, torch.tensor(weights), "probs", temperature)
    got = torch.softmax(combined / temperature, dim=-1)
    for sample in range(2):
        expected = [0.0, 0.0, 0.0]
        for k, w in enumerate(weights):
            probs = _softmax(LOGITS[k, sample].tolist(), temperature)
            expected = [e + w * p for e, p in zip(expected, probs)]
        np.testing.assert_allclose(got[sample].numpy(), expected, rtol=1e-6)


class _Fixed(nn.Module):
    """A member whose logits are row ``k`` of LOGITS, whatever the input."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LOGITS[self.k]


def test_logit_average_and_weights_are_normalised() -> None:
    model = ensemble.Ensemble([_Fixed(k) for k in range(3)], ["a", "b", "c"], weights=[2, 1, 1], combine="logits")
    expected = 0.5 * LOGITS[0] + 0.25 * LOGITS[1] + 0.25 * LOGITS[2]
    torch.testing.assert_close(model(torch.zeros(2, 1)), expected)
    assert model.weights.tolist() == [0.5, 0.25, 0.25]


def test_kd_against_an_ensemble_is_kd_against_the_averaged_distribution() -> None:
    temperature = 2.0
    student = torch.tensor([[0.3, -0.2, 1.0], [0.0, 2.0, -1.0]])
    combined = ensemble.combine_logits(LOGITS, torch.full((3,), 1 / 3), "probs", temperature)
    p_teacher = torch.softmax(LOGITS / temperature, dim=-1).mean(dim=0)
    log_p_student = torch.log_softmax(student / temperature, dim=-1)
    expected = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=1).mean()
    torch.testing.assert_close(soft_kl(student, combined, temperature), expected)


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teachers=[cnn]"], "needs at least two names"),
        (["teachers=[cnn,mlp]", "ensemble.weights=[1]"], "ensemble.weights=[1] is not allowed"),
        (["teachers=[cnn,mlp]", "ensemble.combine=median"], "ensemble.combine='median' is not allowed"),
        (["teachers=[cnn,mlp]", "distill=fitnet"], "distill=fitnet reads the features of one teacher"),
        (
            ["teachers=[cnn,nosuchnet]"],
            "teachers: 'nosuchnet' is not a model option; allowed: bilstm, cnn, hf_classifier, mlp",
        ),
    ],
)
def test_bad_ensembles_fail_before_training(make_cfg, overrides: list[str], message: str, tmp_path) -> None:
    cfg = make_cfg(*overrides, own_cache=True)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        pipeline.run(cfg)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_members_take_the_run_teacher_recipe(make_cfg) -> None:
    cfg = make_cfg("teachers=[cnn,resnet8]", "teacher.recipe.seed=7")
    before = OmegaConf.to_container(cfg)
    members = ensemble.member_nodes(cfg.teachers, cfg.teacher, [CONF])
    assert [m._target_.rsplit(".", 1)[-1] for m in members] == ["CNN", "resnet8"]
    assert all(m.recipe.max_epochs == 3 and m.recipe.seed == 7 and m.ckpt_path is None for m in members)
    assert OmegaConf.to_container(cfg) == before  # built beside the run's config, which is never edited


# -- end to end -------------------------------------------------------------------------------------
def test_an_ensemble_run_reports_every_teacher(make_cfg, tmp_path) -> None:
    cfg = make_cfg("teachers=[cnn,mlp]", "distill.temperature=4", own_cache=True)
    record = pipeline.run(cfg)
    assert record["status"] == "ok"
    assert record["teacher"]["arch"] == "ensemble(cnn+mlp)"
    members = record["teachers"]
    assert [m["arch"] for m in members] == ["cnn", "mlp"]
    assert all(m["cache"] == "miss" and 0 <= m["test"]["acc"] <= 1 for m in members)
    assert len({m["cache_key"] for m in members}) == 2
    assert record["teacher"]["params"] == sum(m["params"] for m in members)

    # the second run trains nothing: both members come from the cache
    again = pipeline.run(
        make_cfg("teachers=[cnn,mlp]", "distill.temperature=4", out=tmp_path / "again", own_cache=True)
    )
    assert [m["cache"] for m in again["teachers"]] == ["hit", "hit"]
    assert again["teacher"]["cache"] == "hit"
    assert again["teacher"]["test"] == record["teacher"]["test"]
