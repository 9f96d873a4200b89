"""Distillation without a pre-trained teacher (``distill=dml``, ``distill=online``) and with a
teacher assistant (``teacher_assistant=<model>``): the losses against float64 loops, where their
gradients go, short digits runs, what results.json reports, and the one-line errors."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distillab import conf, pipeline, settings
from distillab.config import ConfigError
from distillab.distill.cotraining import CoTrainingModule
from distillab.distill.methods.base import check_method, cotrains, for_finetuning, peer_roles
from distillab.distill.methods.dml import DeepMutualLearning, mutual_terms
from distillab.distill.methods.kd import KD
from tests.conftest import randn as _randn


def _model(option: str, **overrides) -> torch.nn.Module:
    """A ``conf/model`` architecture for 8×8 digits, with its YAML's values and ``overrides``."""
    return conf.build("model", option, input_shape=(1, 8, 8), num_classes=10, **overrides)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


# -- the losses -------------------------------------------------------------------------------------
@pytest.mark.parametrize("peers, temperature, weight", [(2, 1.0, 1.0), (3, 2.0, 0.5), (4, 4.0, 2.0)])
def test_mutual_terms_match_a_loop_over_peers_and_samples(peers, temperature, weight):
    logits = [_randn(5, 7, seed=k) * 3 for k in range(peers)]
    targets = torch.tensor([0, 3, 6, 2, 2])
    terms = mutual_terms(logits, targets, temperature, weight)
    z = [x.double().numpy() for x in logits]
    total = 0.0
    for k in range(peers):
        ce = np.mean([-_log_softmax(z[k][i])[targets[i]] for i in range(5)])
        kl = 0.0
        for other in range(peers):
            if other == k:
                continue
            for i in range(5):
                p, q = _log_softmax(z[other][i] / temperature), _log_softmax(z[k][i] / temperature)
                kl += np.sum(np.exp(p) * (p - q)) / 5
        kl = weight * temperature**2 * kl / (peers - 1)
        assert float(terms[f"ce{k}"]) == pytest.approx(ce, rel=1e-5)
        assert float(terms[f"kl{k}"]) == pytest.approx(kl, rel=1e-5, abs=1e-7)
        total += ce + kl
    assert float(terms["loss"]) == pytest.approx(total, rel=1e-5)


def test_each_peer_learns_only_from_its_own_loss():
    """Peer k's KL term pulls peer k towards the others; the others' logits get no gradient from it."""
    logits = [_randn(6, 5, seed=k).requires_grad_() for k in range(3)]
    terms = mutual_terms(logits, torch.arange(6) % 5, 2.0, 1.0)
    terms["kl1"].backward()
    assert logits[1].grad.abs().sum() > 0
    assert logits[0].grad is None and logits[2].grad is None


def test_online_teacher_learns_from_labels_only():
    method = conf.build("distill", "online")
    student, teacher = _randn(8, 10, seed=1).requires_grad_(), _randn(8, 10, seed=2).requires_grad_()
    y = torch.arange(8) % 10
    terms = method([student, teacher], y)
    assert set(terms) == {"ce", "kd", "teacher_ce", "loss"}
    terms["kd"].backward(retain_graph=True)
    assert teacher.grad is None and student.grad.abs().sum() > 0  # KD never pulls the teacher
    terms["teacher_ce"].backward()
    expected = torch.nn.functional.cross_entropy(teacher.detach(), y)
    assert float(terms["teacher_ce"].detach()) == pytest.approx(float(expected))
    assert teacher.grad.abs().sum() > 0
    # the student's terms are the Hinton loss at the method's λ and T
    hinton = KD(lam=method.lam, temperature=method.temperature, standardize=False)(
        student.detach(), teacher.detach(), y
    )
    assert float((terms["ce"] + terms["kd"]).detach()) == pytest.approx(float(hinton["loss"]), rel=1e-6)


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
def test_dml_finetunes_with_the_hinton_loss_it_equals_for_one_fixed_peer(weight):
    method = DeepMutualLearning(peers=2, peer_arch="student", temperature=2.0, kl_weight=weight)
    student, other, y = _randn(6, 10, seed=3), _randn(6, 10, seed=4), torch.arange(6)
    terms = method([student, other], y)
    kd = for_finetuning(method)
    assert isinstance(kd, KD) and kd.lam == pytest.approx(weight / (1 + weight))
    assert float(terms["ce0"] + terms["kl0"]) == pytest.approx((1 + weight) * float(kd(student, other, y)["loss"]))


def test_the_co_training_contract():
    dml, online = conf.build("distill", "dml", peers=3, peer_arch="teacher"), conf.build("distill", "online")
    assert cotrains(dml) and cotrains(online) and not cotrains(conf.build("distill", "kd"))
    assert peer_roles(dml) == ["student", "teacher", "teacher"] and peer_roles(online) == ["student", "teacher"]
    student, teacher = _model("mlp", hidden=[16]), _model("cnn", width=4)
    check_method(dml, student, teacher, _randn(4, 1, 8, 8))  # the terms by name, on the untrained models


@pytest.mark.parametrize(
    "bad, message", [({"peers": 1}, "peers=1 is not allowed"), ({"peer_arch": "mlp"}, "peer_arch")]
)
def test_bad_dml_values_fail_in_one_line(bad, message):
    values = {**{k: v for k, v in conf.load("distill", "dml").items() if k != "_target_"}, **bad}
    with pytest.raises(ConfigError) as error:  # from the config node, before anything is built
        settings.check("distill", values, "distillab.distill.methods.dml.DeepMutualLearning")
    assert str(error.value).startswith(f"distill.{message}") and "\n" not in str(error.value)
    with pytest.raises(ConfigError) as error:  # and from Python
        DeepMutualLearning(**values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_peer_trains_and_peer_zero_chooses_the_checkpoint():
    torch.manual_seed(0)
    peers = [_model("mlp", hidden=[16]) for _ in range(2)]
    module = CoTrainingModule(peers, DeepMutualLearning(2, "student", 1.0, 1.0))
    before = [copy.deepcopy(p.state_dict()) for p in peers]
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.5)
    x, y = _randn(16, 1, 8, 8), torch.arange(16) % 10
    for _ in range(3):
        optimizer.zero_grad()
        logits = [p(x) for p in module.peers]
        module.loss(logits, y)["loss"].backward()
        optimizer.step()
    assert len(module.trainable_parameters()) == sum(len(list(p.parameters())) for p in peers)
    for peer, old in zip(peers, before):
        assert any(not torch.equal(v, old[k]) for k, v in peer.state_dict().items())


# -- runs -------------------------------------------------------------------------------------------
def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run / "csv" / "student" / "metrics.csv").open()))


def test_dml_run_reports_every_peer_and_writes_no_teacher_cache(make_cfg, tmp_path):
    cfg = make_cfg("distill=dml", "distill.peers=3", "student=cnn", "student.width=4", own_cache=True)
    record = pipeline.run(cfg)
    assert record["method"] == "dml" and record["kept_peer"] == 0
    assert [peer["arch"] for peer in record["peers"]] == ["cnn", "cnn", "cnn"]
    assert record["peers"][0]["test"] == record["student"]["test"]
    assert len({peer["test"]["acc"] for peer in record["peers"]}) >= 2  # three inits, three models
    assert record["teacher"]["cache"] == "cotrained" and record["teacher"]["outputs"] == "cotrained"
    assert record["teacher"]["params"] == record["peers"][1]["params"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    rows = _metrics(tmp_path / "run")
    assert {f"train/kl{k}" for k in range(3)} <= set(rows[0]) and "val/peer2/acc" in rows[0]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["peers"][2]["val"]["acc"] == record["peers"][2]["val"]["acc"]


def test_online_run_trains_the_teacher_alongside(make_cfg, tmp_path):
    record = pipeline.run(make_cfg("distill=online", own_cache=True))
    assert record["teacher"]["arch"] == "cnn" and record["teacher"]["cache"] == "cotrained"
    assert record["teacher"]["test"]["acc"] > 0.5  # trained from scratch in the same 3 epochs
    assert [peer["arch"] for peer in record["peers"]] == ["mlp", "cnn"]
    assert {**record["teacher"]["test"], "agreement": 1.0} == record["peers"][1]["test"]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    rows = [row for row in _metrics(tmp_path / "run") if row["train/teacher_ce"]]
    assert float(rows[-1]["train/teacher_ce"]) < float(rows[0]["train/teacher_ce"])


def test_dml_student_compresses_with_kd_fine_tuning(make_cfg):
    record = pipeline.run(make_cfg("distill=dml", "compress=prune_structured", "compress.finetune_epochs=1"))
    assert record["compressed"]["params"] < record["student"]["params"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["distill=online", "teachers=[cnn,mlp]"], "teachers=['cnn', 'mlp'] is not allowed with distill=online"),
        (["distill=dml", "student.init=from_teacher"], "student.init=from_teacher is not allowed with distill=dml"),
        (["distill=online", "teacher_outputs.cache=cached"], "teacher_outputs.cache=cached is not allowed"),
        (["distill=online", "compress=quant_dynamic", "compress.target=teacher"], "compress.target=teacher"),
        (["distill=online", "teacher_assistant=cnn"], "teacher_assistant=cnn is not allowed with distill=online"),
        (["distill=none", "teacher_assistant=cnn"], "teacher_assistant=cnn is not allowed with distill=none"),
        (["teacher_assistant=bogus"], "teacher_assistant: 'bogus' is not a model option; allowed: "),
        (["teacher_assistant=cnn", "teacher_assistant.width=0"], "teacher_assistant.width"),
        (["teacher_assistant=cnn", "teacher_assistant.recipe.max_epochs=-1"], "teacher_assistant.recipe.max_epochs"),
    ],
)
def test_what_cannot_go_together_fails_before_training(overrides, message, make_cfg, tmp_path):
    with pytest.raises(ConfigError) as error:
        pipeline.run(make_cfg(*overrides))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_teacher_file_is_refused_with_online(make_cfg, tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save(_model("cnn").state_dict(), path)
    with pytest.raises(ConfigError, match="teacher.ckpt_path=.* is not allowed with distill=online"):
        pipeline.run(make_cfg("distill=online", f"teacher.ckpt_path={path}"))


# -- teacher assistant ------------------------------------------------------------------------------
def test_teacher_assistant_is_a_model_node_with_its_own_recipe(make_cfg):
    cfg = make_cfg("teacher_assistant=cnn", "teacher_assistant.width=16", "teacher_assistant.recipe.max_epochs=2")
    helper, model = pipeline.prepare(cfg).assistant
    assert helper.option == "cnn" and helper.node.width == 16
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _model("cnn", width=16).parameters())
    assert helper.node.recipe.max_epochs == 2 and cfg.teacher.recipe.max_epochs != 2  # its own, when set
    assert helper.node.recipe.seed == cfg.teacher.recipe.seed  # else the teacher's
    assert pipeline.prepare(make_cfg()).assistant is None  # teacher_assistant=none, the default


def test_teacher_assistant_is_distilled_once_and_cached(make_cfg, tmp_path):
    cache = tmp_path / "shared"
    first = pipeline.run(make_cfg("teacher_assistant=cnn", "teacher.width=48", out=tmp_path / "a", cache=cache))
    block = first["teacher_assistant"]
    assert block["arch"] == "cnn" and block["cache"] == "miss" and block["params"] < first["teacher"]["params"]
    assert first["teacher"]["cache"] == "miss" and block["cache_key"] != first["teacher"]["cache_key"]
    assert (tmp_path / "a" / "csv" / "teacher_assistant" / "metrics.csv").is_file()
    # another student, same teacher and assistant: both come from the cache
    second = pipeline.run(
        make_cfg("teacher_assistant=cnn", "teacher.width=48", "student.hidden=[16]", out=tmp_path / "b", cache=cache)
    )
    assert second["teacher_assistant"]["cache"] == "hit" and second["teacher"]["cache"] == "hit"
    assert second["teacher_assistant"]["cache_key"] == block["cache_key"]
    assert second["teacher_assistant"]["test"] == block["test"]
    folder = next(p for p in cache.iterdir() if block["cache_key"] in p.name and p.is_dir())
    assert not (folder / "checkpoints").exists()
    # another teacher recipe: another teacher key, so another assistant
    third = pipeline.run(
        make_cfg("teacher_assistant=cnn", "teacher.width=48", "teacher.recipe.seed=1", out=tmp_path / "c", cache=cache)
    )
    assert third["teacher_assistant"]["cache"] == "miss"
    assert third["teacher_assistant"]["cache_key"] != block["cache_key"]
