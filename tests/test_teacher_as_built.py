"""A teacher with zero recipe epochs is used as built (pretrained weights): evaluated, cached, never fitted."""

import copy

import torch

from distillab import pipeline


def test_zero_recipe_epochs_keep_every_weight_and_batchnorm_statistic(make_cfg, tmp_path):
    overrides = ("teacher=resnet8", "teacher.recipe.max_epochs=0")
    cfg = make_cfg(*overrides, out=tmp_path / "a", own_cache=True)
    parts = pipeline.prepare(cfg)
    built = copy.deepcopy(parts.teacher.state_dict())
    assert any(name.endswith("running_mean") for name in built)  # a teacher whose statistics could drift
    teacher = pipeline.obtain_teacher(cfg, parts)
    assert teacher.cache == "miss" and teacher.metrics["best_epoch"] == 0
    assert 0.0 <= teacher.metrics["val"]["acc"] <= 1.0
    kept = teacher.model.state_dict()
    assert kept.keys() == built.keys()
    assert all(torch.equal(kept[name], built[name]) for name in built)
    # cached like any teacher: a second run loads the same weights
    again = pipeline.prepare(make_cfg(*overrides, out=tmp_path / "b", own_cache=True))
    hit = pipeline.obtain_teacher(cfg, again)
    assert hit.cache == "hit" and all(torch.equal(hit.model.state_dict()[n], built[n]) for n in built)
