"""The stacked launcher's parts: one stacked step against each student's own step, the group fit,
which jobs group together, and the shared measurements."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from omegaconf import OmegaConf

import distillab
from distillab import measure
from distillab.data import DigitsDataModule
from distillab.distill.methods.dkd import DecoupledKD
from distillab.distill.methods.kd import KD
from distillab.distill.methods.none import CrossEntropy
from distillab.models import CNN, MLP, resnet8
from distillab.stacked import fit, plan
from distillab.stacked import model as model_module
from distillab.stacked.loss import StackedLoss
from distillab.stacked.model import StackedModel, why_not_stackable
from distillab.stacked.optim import StackedOptimizer
from distillab.steps.handoff import Handoff
from tests.conftest import CONF

SEEDS, LAMS, TEMPERATURES, LRS = (0, 1, 2), (0.0, 0.5, 1.0), (1.0, 2.0, 4.0), (1e-3, 5e-3, 1e-2)
STUDENTS = {
    "mlp": lambda: MLP((1, 8, 8), 10, [16], 0.0, 0.0),
    "cnn": lambda: CNN((1, 8, 8), 10, 8, 1, 0.0),  # BatchNorm
    "resnet8": lambda: resnet8((3, 8, 8), 10),  # the CIFAR ResNet: BatchNorm and shortcuts
}
METHODS = {
    "kd": lambda m: KD(LAMS[m], TEMPERATURES[m], False),
    "kd-standardized": lambda m: KD(0.5, TEMPERATURES[m], True),
    "none": lambda m: CrossEntropy(),
    "dkd": lambda m: DecoupledKD(1.0, 1.0, 2.0 + m, TEMPERATURES[m], 0, False),  # a method called member by member
}


def _digits(kind: type = DigitsDataModule) -> DigitsDataModule:
    """``data=digits`` as conf/data/digits.yaml configures it, built as ``kind`` (a subclass)."""
    settings = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "digits.yaml"))
    settings.pop("_target_")
    return kind(**settings)


def _students(kind: str) -> list[torch.nn.Module]:
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        models.append(STUDENTS[kind]())
    return models


@pytest.mark.parametrize("kind", list(STUDENTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_one_stacked_step_equals_each_students_own_step(kind: str, method: str, one_thread) -> None:
    students = _students(kind)
    channels = 3 if kind == "resnet8" else 1
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(len(SEEDS), 16, channels, 8, 8, generator=generator)
    y = torch.randint(0, 10, (len(SEEDS), 16), generator=generator)
    y[1, :3] = -1  # unlabelled samples count in no cross-entropy
    teacher = 3 * torch.randn(len(SEEDS), 16, 10, generator=generator)
    methods = [METHODS[method](m) for m in range(len(SEEDS))]

    separate, expected = [copy.deepcopy(s).train() for s in students], []
    for m, (student, loss) in enumerate(zip(separate, methods)):
        optimizer = torch.optim.SGD(student.parameters(), lr=LRS[m], weight_decay=1e-4)
        terms = loss(student(x[m]), teacher[m], y[m])
        terms["loss"].backward()
        optimizer.step()
        expected.append({name: value.detach() for name, value in terms.items()})

    model = StackedModel(students, torch.device("cpu"))
    loss = StackedLoss(methods, torch.device("cpu"))
    # SGD: Adam's first step divides each gradient by its own size, so rounding in a near-zero
    # gradient could flip the step's sign (the optimizer itself is tested in test_stacked_optim.py)
    factories = [functools.partial(torch.optim.SGD, lr=lr, weight_decay=1e-4) for lr in LRS]
    optimizer = StackedOptimizer(list(model.params.values()), factories, None, 1)
    side = loss.teacher_log_probs(teacher) if loss.kind == "kd" else teacher
    terms = loss(model(x), side, y)
    optimizer.step(torch.autograd.grad(terms["loss"].sum(), list(model.params.values())))

    for m, student in enumerate(separate):
        assert list(terms) == list(expected[m])
        for name, value in expected[m].items():
            torch.testing.assert_close(terms[name][m].detach(), value, rtol=1e-5, atol=1e-6)
        for name, value in student.state_dict().items():  # parameters and BatchNorm statistics
            torch.testing.assert_close(model.state_dict(m)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_students_of_different_shapes_do_not_stack() -> None:
    assert why_not_stackable(_students("mlp")) is None
    other = MLP((1, 8, 8), 10, [32], 0.0, 0.0)
    assert "differs from student 0" in why_not_stackable([*_students("mlp"), other])


def test_the_group_fit_keeps_the_teacher_frozen_and_each_members_best_epoch(one_thread) -> None:
    data = _digits()
    torch.manual_seed(5)
    teacher = CNN((1, 8, 8), 10, 8, 1, 0.0)
    before = copy.deepcopy(teacher.state_dict())
    members = [
        fit.Member(student, KD(0.5, TEMPERATURES[m], False), functools.partial(torch.optim.Adam, lr=1e-2), SEEDS[m])
        for m, student in enumerate(_students("cnn"))
    ]
    trained, seconds = fit.GroupFit(members, data, teacher, None, None, 3, torch.device("cpu")).run()  # a live teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(value, before[name]), name
    steps = -(-len(data.splits["train"][1]) // 64)
    for outcome in trained:
        assert [step for step, _ in outcome.history] == [s for e in range(3) for s in 2 * [(e + 1) * steps - 1]]
        val = [row["val/acc"] for _, row in outcome.history if "val/acc" in row]
        assert outcome.best_epoch == val.index(max(val))  # ties keep the earlier epoch
        assert outcome.best_step == (outcome.best_epoch + 1) * steps and outcome.error is None
    # each member drew its own batches: the same data and method, different seeds, different paths
    assert trained[0].history[-1][1]["train/loss"] != trained[1].history[-1][1]["train/loss"]
    assert seconds > 0


def test_a_member_whose_loss_diverges_fails_alone(one_thread) -> None:
    data = _digits()
    members = [
        fit.Member(student, CrossEntropy(), functools.partial(torch.optim.SGD, lr=lr), seed)
        for student, lr, seed in zip(_students("mlp"), (0.01, 1e30, 0.01), SEEDS)
    ]
    trained, _ = fit.GroupFit(members, data, None, None, None, 2, torch.device("cpu")).run()
    assert trained[0].error is None and trained[2].error is None
    assert trained[1].error.startswith("training loss became") and "optim.optimizer.lr" in trained[1].error


# -- which jobs stack ------------------------------------------------------------------------------------
def _cfg(**values) -> OmegaConf:
    base = {
        "seed": 0,
        "rerun": False,
        "paths": {"output_dir": "/a"},
        "student": {"_target_": "distillab.models.MLP", "hidden": [32]},
        "distill": {"_target_": "distillab.distill.methods.kd.KD", "lam": 0.5, "temperature": 2, "standardize": False},
        "optim": {"optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 0.0}},
        "trainer": {"max_epochs": 100, "enable_progress_bar": True},
    }
    cfg = OmegaConf.create(base)
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    return cfg


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 3},
        {"distill__lam": 0.9},
        {"distill__temperature": 4.0},
        {"optim__optimizer__lr": 0.1},
        {"optim__optimizer__weight_decay": 5e-4},
        {"paths__output_dir": "/b", "rerun": True, "trainer__enable_progress_bar": False},
    ],
)
def test_jobs_that_differ_in_stackable_values_share_a_key(change) -> None:
    assert plan.stacking_key(_cfg(**change)) == plan.stacking_key(_cfg())


@pytest.mark.parametrize(
    "change",
    [
        {"student__hidden": [64]},
        {"trainer__max_epochs": 50},
        {"distill__standardize": True},
        {"distill___target_": "distillab.distill.methods.none.CrossEntropy"},
        {"optim__optimizer___target_": "torch.optim.SGD"},
    ],
)
def test_jobs_that_differ_in_anything_else_do_not(change) -> None:
    assert plan.stacking_key(_cfg(**change)) != plan.stacking_key(_cfg())


def test_groups_keep_the_order_of_their_first_job_and_split_at_max_stack() -> None:
    assert plan.groups(["a", "b", "a", "a", "b", "c"], 64) == [[0, 2, 3], [1, 4], [5]]
    assert plan.groups(["a"] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert plan.differing([_cfg(), _cfg(seed=1, distill__lam=0.9)]) == ["seed", "distill.lam"]


@pytest.mark.parametrize(
    ("trainer", "callbacks", "reason"),
    [
        ({"precision": "16-mixed"}, None, "trainer.precision=16-mixed"),
        ({"gradient_clip_val": 1.0}, None, "trainer.gradient_clip_val=1.0"),
        ({"accumulate_grad_batches": 2}, None, "trainer.accumulate_grad_batches=2"),
        ({"strategy": "ddp"}, None, "trainer.strategy=ddp"),
        ({}, {"early": {"_target_": "pytorch_lightning.callbacks.EarlyStopping"}}, "callbacks.early"),
        ({"precision": "32-true"}, {"bar": {"_target_": "distillab.callbacks.EpochProgressBar"}}, None),
    ],
)
def test_a_trainer_the_stacked_fit_does_not_implement_is_named(trainer, callbacks, reason) -> None:
    found = plan.why_not_trainer(OmegaConf.create(trainer), OmegaConf.create(callbacks) if callbacks else None)
    assert found == reason if reason is None else found.startswith(reason)


# -- measured once per architecture -------------------------------------------------------------------
def test_architecture_measurements_are_shared_and_weight_measurements_are_not(monkeypatch) -> None:
    calls = []
    timed = measure.latency_ms
    monkeypatch.setattr(measure, "latency_ms", lambda *a, **k: calls.append(1) or timed(*a, **k))
    first, second = _students("mlp")[:2]
    with torch.no_grad():
        second.classifier.weight.zero_()
    how = {"threads": 1, "warmup": 0, "repeats": 2}
    with measure.shared_profiles():
        a, b = measure.profile(first, (1, 8, 8), **how), measure.profile(second, (1, 8, 8), **how)
        c = measure.profile(MLP((1, 8, 8), 10, [8], 0.0, 0.0), (1, 8, 8), **how)
    assert len(calls) == 4  # batch 1 and 64, once for each of the two architectures
    assert a["latency_ms"] == b["latency_ms"] and (a["params"], a["macs"]) == (b["params"], b["macs"])
    assert b["nonzero_params"] == a["nonzero_params"] - second.classifier.weight.numel()
    assert c["params"] < a["params"]
    measure.profile(first, (1, 8, 8), **how)  # outside the block nothing is shared
    assert len(calls) == 6


def test_a_handed_over_job_gets_its_groups_stack_fields() -> None:
    record: dict = {}
    Handoff(None, None, "cached", 0.0, 1.0, "g", 3).complete(record)
    assert record == {"launcher": "stacked", "stack": {"group": "g", "size": 3}}  # no timing_s: nothing added


def test_a_jobs_total_counts_what_its_group_spent_for_it_before_the_job_started(tmp_path) -> None:
    from distillab.steps.teacher.cache import Teacher

    teacher = Teacher(torch.nn.Identity(), "k", "miss", tmp_path, seconds=2.0)
    record = {"timing_s": {"teacher": 2.5, "student": 1.0, "compress": 0.0, "total": 0.25}}
    Handoff(None, None, "cached", 0.5, 1.0, "g", 3, teacher).complete(record)  # fit 1.0, table 0.5, teacher 2.0
    assert record["timing_s"]["total"] == 3.75 and record["stack"] == {"group": "g", "size": 3}
    Handoff(None, None, "cached", 0.0, 1.0, "g", 3, None).complete(record)  # a later job: its share of the fit only
    assert record["timing_s"]["total"] == 4.75


def test_nothing_below_the_entry_points_imports_the_launcher() -> None:
    import ast
    from pathlib import Path

    package = Path(distillab.__file__).parent
    entry = {package / "cli.py", *(package / "stacked").rglob("*.py")}
    for path in sorted(set(package.rglob("*.py")) - entry):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "distillab.stacked" or n.startswith("distillab.stacked.") for n in names), path


def test_only_the_first_job_of_a_group_reports_the_teacher_it_trained(tmp_path) -> None:
    from distillab.stacked.group import _teacher_as_reported
    from distillab.steps.teacher.cache import Teacher

    trained = Teacher(torch.nn.Identity(), "a", "miss", tmp_path, seconds=2.0)
    loaded = Teacher(torch.nn.Identity(), "b", "hit", tmp_path, seconds=0.5)
    ensemble = Teacher(torch.nn.Identity(), "e", "miss", tmp_path, seconds=2.5, members=[trained, loaded])
    assert _teacher_as_reported(ensemble, True) is ensemble
    later = _teacher_as_reported(ensemble, False)
    assert (later.cache, later.seconds) == ("hit", 0.0) and later.model is ensemble.model
    assert [(m.cache, m.seconds) for m in later.members] == [("hit", 0.0), ("hit", 0.0)]
    assert (ensemble.cache, trained.cache) == ("miss", "miss")  # the first job's record is left as it is


def test_host_memory_does_not_cap_a_group_on_a_cpu() -> None:
    assert model_module.members_that_fit(_students("mlp")[0], torch.zeros(4, 1, 8, 8), torch.device("cpu")) is None


def test_groups_side_by_side_take_their_share_of_the_cores_and_a_gpu_slot() -> None:
    from distillab import slots

    node = lambda n: OmegaConf.create({"launcher": {"_target_": LAUNCHER, "max_stack": 64, "n_jobs": n}})  # noqa: E731
    assert slots.joblib_launcher(node(2)) is not None  # two groups at once: threads and GPUs are shared out
    assert slots.joblib_launcher(node(1)) is None  # one group at a time has the machine to itself


LAUNCHER = "hydra_plugins.distillab_launcher.stacked_launcher.StackedLauncher"


class _JitteredDigits(DigitsDataModule):
    """Digits whose training batches get random noise: an augmenting in-memory datamodule."""

    seen: list = []

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        noisy = x + 0.1 * torch.randn_like(x)
        self.seen.append(noisy)
        return noisy


def test_each_member_augments_its_own_batches(one_thread) -> None:
    data = _digits(_JitteredDigits)
    assert data.augments
    members = [
        fit.Member(student, CrossEntropy(), functools.partial(torch.optim.Adam, lr=1e-3), seed)
        for student, seed in zip(_students("mlp")[:2], SEEDS)
    ]
    trained, _ = fit.GroupFit(members, data, None, None, None, 1, torch.device("cpu")).run()
    steps = -(-len(data.splits["train"][1]) // 64)
    assert len(data.seen) == 2 * steps  # one call per member and step, on that member's batch
    assert data.seen[0].shape == (64, 1, 8, 8) and not torch.equal(data.seen[0], data.seen[1])
    assert all(outcome.error is None for outcome in trained)


# -- a group prepared and trained in this process ------------------------------------------------------
def _jobs(tmp_path, *overrides: str) -> list:
    """Two jobs of a sweep (seeds 0 and 1) as the launcher composes them."""
    import copy as copying

    from omegaconf import open_dict, read_write

    from distillab.stacked.launch import Job
    from tests.conftest import FAST, compose_hydra

    jobs = []
    for seed in (0, 1):
        config = compose_hydra(
            *FAST, "trainer.max_epochs=1", f"seed={seed}", f"paths.cache_dir={tmp_path / 'c'}", *overrides
        )
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(tmp_path / str(seed))
        task = copying.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        jobs.append(Job(seed, [f"seed={seed}"], config, task))
    return jobs


def test_a_group_is_trained_and_handed_to_its_jobs(tmp_path) -> None:
    from distillab.stacked import group, launch

    jobs = _jobs(tmp_path)
    members = group.train(jobs, launch.as_job)
    assert [m.job.num for m in members] == [0, 1]
    handoffs = [m.handoff for m in members]
    assert all(h is not None and h.size == 2 and h.trained.error is None for h in handoffs)
    assert handoffs[0].group == handoffs[1].group and handoffs[0].mode == "cached"
    assert handoffs[0].parts.data is not handoffs[1].parts.data  # each its own shuffle_seed ...
    assert handoffs[0].parts.data.splits is handoffs[1].parts.data.splits  # ... over the same tensors
    assert [h.parts.data.shuffle_seed for h in handoffs] == [0, 1]


def test_a_group_that_fails_to_train_together_runs_one_after_another(tmp_path, monkeypatch, caplog) -> None:
    from distillab.stacked import group, launch

    def unsupported(*args, **kwargs):
        raise RuntimeError("vmap: an operator without a batching rule\nmore detail")

    monkeypatch.setattr(fit.GroupFit, "run", unsupported)
    jobs = _jobs(tmp_path)
    with caplog.at_level("WARNING"):
        assert group.train(jobs, launch.as_job) == []  # no member trained: no job is handed anything
    assert "could not train together (RuntimeError: vmap: an operator without a batching rule)" in caplog.text


def test_methods_that_train_more_than_the_student_run_one_after_another(tmp_path, caplog) -> None:
    from distillab.stacked import group, launch

    jobs = _jobs(tmp_path, "distill=fitnet")
    with caplog.at_level("INFO"):
        assert group.train(jobs, launch.as_job) == []  # decided before any teacher is trained
    assert "jobs #0, #1 run one after another: distill=fitnet trains more than the student" in caplog.text
    assert not (tmp_path / "c").exists()
