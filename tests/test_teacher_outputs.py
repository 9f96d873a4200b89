"""Cached teacher outputs: the loss equals the live teacher's, the table follows the sample
index, is computed once and shared, and is refused where the teacher's inputs change."""

from __future__ import annotations

import csv
import logging
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from distillab import build, cli, conf, pipeline
from distillab.config import ConfigError, validate
from distillab.data import SyntheticDataModule, adapter
from distillab.data.base import TensorBatches
from distillab.distill.methods.kd import KD
from distillab.distill.module import DistillationModule
from distillab.steps.teacher import outputs as teacher_outputs
from distillab.steps.teacher.cache import Teacher
from tests.conftest import FAST, compose_cfg

AUTO = teacher_outputs.OutputSettings(cache="auto", dtype="float32", top_k=None)


def synthetic(**overrides) -> SyntheticDataModule:
    return conf.build("data", "synthetic", **overrides)


def KDLoss(lam: float = 0.5, temperature: float = 2.0) -> KD:  # noqa: N802 - the method, with test values
    return KD(lam=lam, temperature=temperature, standardize=False)


class JitteredSynthetic(SyntheticDataModule):
    """Synthetic data whose training batches get random noise: the teacher's inputs change."""

    def augment(self, x: Tensor) -> Tensor:
        return x + 0.1 * torch.randn_like(x)


class Echo(nn.Module):
    """A 'teacher' whose logits are the first inputs of each sample: row i of its table can
    only equal its output on a batch if the row belongs to the same sample."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))
        self.samples_seen = 0

    def forward(self, x: Tensor) -> Tensor:
        self.samples_seen += len(x)
        return self.scale * x.flatten(1)[:, : self.classes]


def _cnn_teacher_and_data(tmp_path: Path) -> tuple[nn.Module, nn.Module, object]:
    cfg = compose_cfg([], tmp_path / "run")
    data = build.part("data", cfg.data)
    info = adapter.prepare(data, 0)
    torch.manual_seed(1)
    teacher = build.model("teacher", cfg.teacher, info)
    student = build.model("student", cfg.student, info)
    # logits of a confident teacher, as a trained one gives (an untrained one's are near 0)
    head = [module for module in teacher.modules() if isinstance(module, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(40.0)
    return teacher.eval(), student, data


# -- the loss is the live teacher's --------------------------------------------------------------
def test_kd_loss_per_batch_equals_live_teacher(tmp_path):
    teacher, student, data = _cnn_teacher_and_data(tmp_path)
    table = teacher_outputs.compute(teacher, data.splits["train"][0])
    loss = KDLoss(lam=0.7, temperature=4.0)
    live = DistillationModule(student, teacher, loss)
    calls = []
    teacher.register_forward_hook(lambda *args: calls.append(1))
    cached = DistillationModule(student, teacher, loss, teacher_table=table)  # given the teacher, still not run
    batches = data.train_dataloader()
    checked = 0
    for _ in range(2):  # two epochs: two permutations
        for x, y, index in batches:
            with torch.no_grad():
                logits = student(x)
            teacher_live = live.teacher_logits(x, index)
            before = len(calls)
            teacher_cached = cached.teacher_logits(x, index)
            assert len(calls) == before, "the cached path ran the teacher"
            assert (teacher_cached - teacher_live).abs().max() < 1e-5
            terms_live = live.loss_terms(x, y, index, logits)
            terms_cached = cached.loss_terms(x, y, index, logits)
            for name in ("loss", "ce", "kd"):
                assert abs(float(terms_live[name]) - float(terms_cached[name])) <= 1e-6, name
            checked += 1
    assert checked == 2 * len(batches) and float(terms_live["kd"]) > 1e-3  # the KD term is not trivially 0


def _logged(run: Path) -> list[dict[str, str]]:
    rows = csv.DictReader((run / "csv" / "student" / "metrics.csv").open())
    return [row for row in rows if row.get("train/kd")]


def test_fit_equals_live_teacher_and_table_is_computed_once(tmp_path, monkeypatch, caplog):
    computed: list[int] = []
    forward = teacher_outputs._forward

    def counting(model, inputs, *args, **kwargs):
        computed.append(len(inputs))
        return forward(model, inputs, *args, **kwargs)

    monkeypatch.setattr(teacher_outputs, "_forward", counting)
    cache = tmp_path / "cache"
    common = [*FAST, "trainer.max_epochs=2", "teacher.recipe.max_epochs=2"]

    def run(name: str, mode: str) -> dict:
        cfg = compose_cfg([*common, f"teacher_outputs.cache={mode}"], tmp_path / name, cache)
        return pipeline.run(cfg)

    with caplog.at_level(logging.INFO, logger="distillab.steps.teacher.outputs"):
        live = run("live", "live")
        assert computed == [] and "teacher outputs: live: teacher_outputs.cache=live" in caplog.text
        first = run("first", "auto")
        assert computed == [conf.build("data", "digits").split_sizes["train"]]  # once, over the whole training split
        stored = list((cache).glob("*/outputs/logits-*.pt"))
        assert len(stored) == 1 and "(miss)" in caplog.text
        mtime = stored[0].stat().st_mtime_ns
        second = run("second", "cached")
    assert len(computed) == 1, "the second run computed the table again"
    assert stored[0].stat().st_mtime_ns == mtime and "(hit)" in caplog.text
    assert [r["teacher"]["outputs"] for r in (live, first, second)] == ["live", "cached", "cached"]
    assert live["teacher"]["cache_key"] == first["teacher"]["cache_key"]  # the same trained teacher

    rows = {name: _logged(tmp_path / name) for name in ("live", "first", "second")}
    assert len(rows["live"]) == 2
    for epoch in range(2):
        for term in ("train/kd", "train/ce", "train/loss"):
            reference = float(rows["live"][epoch][term])
            for name in ("first", "second"):
                assert abs(float(rows[name][epoch][term]) - reference) <= 1e-6, (name, epoch, term)
    assert first["student"]["val"]["acc"] == live["student"]["val"]["acc"]


# -- rows follow the sample index ------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
def test_rows_follow_the_sample_index_under_shuffling_and_sharding(world_size):
    data = synthetic(input_shape=[1, 4, 4], num_classes=4, num_samples=203, batch_size=16)
    x, y = data.splits["train"]
    teacher = Echo(classes=4)
    table = teacher_outputs.compute(teacher, x, batch_size=7)  # batches of another size than training
    assert teacher.samples_seen == len(x)
    module = DistillationModule(nn.Linear(16, 4), None, KDLoss(), teacher_table=table)
    seen = torch.zeros(len(x), dtype=torch.long)
    for rank in range(world_size):
        batches = TensorBatches(x, y, 16, shuffle=True, seed=3, rank=rank, world_size=world_size)
        for _ in range(2):
            order = []
            for xb, _, index in batches:
                assert torch.equal(module.teacher_logits(xb, index), teacher(xb))
                seen[index] += 1
                order.append(index)
            assert not torch.equal(torch.cat(order), torch.cat(order).sort().values)  # shuffled
    assert bool((seen >= 2).all()), "some training samples were never looked up"
    with pytest.raises(ValueError, match="index"):
        module.teacher_logits(x[:4], None)


def test_the_digest_of_batches_is_the_digest_of_the_whole_tensor():
    """A map-style training set is read batch by batch, in index order, never held whole: its
    digest and table are those of the tensor of all its inputs."""
    x, y = torch.randn(37, 3, 4, 4), torch.arange(37) % 3

    def in_order(inputs: Tensor, batch_size: int) -> adapter.InputsInOrder:
        return adapter.InputsInOrder(DataLoader(TensorDataset(inputs, y), batch_size=batch_size, shuffle=True))

    whole = teacher_outputs.inputs_digest(x)
    assert teacher_outputs.inputs_digest(in_order(x, 8)) == whole == teacher_outputs.inputs_digest(in_order(x, 64))
    changed = x.clone()
    changed[36, 0, 0, 0] += 1
    assert teacher_outputs.inputs_digest(in_order(changed, 8)) != whole
    echo = Echo(classes=3)
    assert torch.equal(teacher_outputs.compute(echo, in_order(x, 5)), teacher_outputs.compute(echo, x, 7))
    assert echo.samples_seen == 2 * 37


def test_table_moves_with_the_module():
    module = DistillationModule(nn.Linear(16, 4), None, KDLoss(), teacher_table=torch.randn(10, 4))
    module.double()
    assert module.teacher_logits(torch.zeros(2, 16), torch.tensor([0, 3])).dtype == torch.float64


class PreparedCounting(nn.Module):
    """A logit method with the pair of hooks: its prepared table is the logits times −4 (exact in
    floating point), and ``forward_prepared`` undoes that, so a step equals ``forward`` on the
    logits only if it read prepared rows."""

    def __init__(self) -> None:
        super().__init__()
        self.prepared: list[Tensor] = []
        self.prepared_steps = 0

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        loss = ((student_logits - teacher_logits) ** 2).mean()
        return {"loss": loss}

    def prepare_teacher(self, teacher_logits: Tensor) -> Tensor:
        self.prepared.append(teacher_logits)
        return teacher_logits * -4.0

    def forward_prepared(self, student_logits: Tensor, rows: Tensor, targets: Tensor) -> dict[str, Tensor]:
        self.prepared_steps += 1
        return self(student_logits, rows / -4.0, targets)


class WithoutHooks(nn.Module):
    """A user's logit method: forward only."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        return {"loss": ((student_logits - teacher_logits) ** 2).mean()}


def test_the_table_is_prepared_once_and_steps_read_prepared_rows():
    table = torch.randn(10, 4)
    method = PreparedCounting()
    module = DistillationModule(nn.Linear(16, 4), None, method, teacher_table=table)
    x, y, index = torch.randn(3, 16), torch.tensor([0, 1, 2]), torch.tensor([7, 0, 3])
    logits = module.model(x)
    for _ in range(3):
        terms = module.loss_terms(x, y, index, logits)
    assert len(method.prepared) == 1 and method.prepared[0] is table and method.prepared_steps == 3
    expected = ((logits - table[index]) ** 2).mean()
    assert torch.equal(terms["loss"], expected)
    plain = DistillationModule(nn.Linear(16, 4), None, WithoutHooks(), teacher_table=table)
    assert torch.equal(plain.loss_terms(x, y, index, logits)["loss"], expected)  # forward, on the logits
    with pytest.raises(ValueError, match="index"):
        module.loss_terms(x, y, None, logits)


def test_a_cast_prepares_the_table_again_from_the_cast_logits():
    table = torch.randn(10, 4)
    method = KD(lam=0.5, temperature=2.0, standardize=True)
    module = DistillationModule(nn.Linear(16, 4), None, method, teacher_table=table).double()
    x, y, index = torch.randn(3, 16, dtype=torch.float64), torch.tensor([0, -1, 2]), torch.tensor([9, 4, 1])
    logits = module.model(x)
    terms = module.loss_terms(x, y, index, logits)
    assert terms["kd"].dtype == torch.float64
    # the float64 teacher's log-probabilities, not the float32 ones cast
    expected = method(logits, table.double()[index], y)
    for name in ("ce", "kd", "loss"):
        assert torch.equal(terms[name], expected[name]), name


def test_a_method_with_prepare_teacher_alone_is_refused():
    class HalfHooked(WithoutHooks):
        def prepare_teacher(self, teacher_logits: Tensor) -> Tensor:
            return teacher_logits

    with pytest.raises(TypeError, match="forward_prepared"):
        DistillationModule(nn.Linear(16, 4), None, HalfHooked(), teacher_table=torch.randn(10, 4))
    DistillationModule(nn.Linear(16, 4), nn.Linear(16, 4), HalfHooked())  # no table: the hook is not used


# -- augmentation, feature methods and bad settings ---------------------------------------------
def test_augmented_inputs_take_the_live_teacher_and_cached_fails_in_one_line(tmp_path, caplog):
    overrides = ["data=synthetic", "data._target_=tests.test_teacher_outputs.JitteredSynthetic"]
    cfg = compose_cfg([*FAST, *overrides], tmp_path / "auto", tmp_path / "cache")
    data = build.part("data", cfg.data)
    assert data.augments and not synthetic().augments
    mode, reason = teacher_outputs.decide(AUTO, data, KDLoss())
    assert mode == "live" and "augmented" in reason
    teacher = Teacher(Echo(10), "k", "hit", tmp_path)
    with caplog.at_level(logging.INFO, logger="distillab.steps.teacher.outputs"):
        outputs = teacher_outputs.for_run(AUTO, "cpu", teacher, data, KDLoss())
    assert outputs.table is None and teacher.model.samples_seen == 0
    assert "teacher outputs: live: training batches are randomly augmented" in caplog.text

    cached = compose_cfg([*FAST, *overrides, "teacher_outputs.cache=cached"], tmp_path / "cached", tmp_path / "cache")
    with pytest.raises(ConfigError) as error:
        pipeline.run(cached)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith("teacher_outputs.cache=cached")
    assert not (tmp_path / "cache").exists(), "a teacher was trained before the error"


def test_feature_methods_take_the_live_teacher(tmp_path):
    cfg = compose_cfg(["distill=fitnet", "student=cnn", "student.width=8"], tmp_path / "run")
    parts = pipeline.prepare(cfg)
    mode, reason = teacher_outputs.decide(AUTO, parts.data, parts.method)
    assert mode == "live" and "features" in reason
    cfg.teacher_outputs.cache = "cached"
    with pytest.raises(ConfigError, match="^teacher_outputs.cache=cached .*features"):
        pipeline.prepare(cfg)


def test_no_teacher_needed_means_no_table(tmp_path):
    cfg = compose_cfg(["distill=none", "teacher_outputs.cache=cached"], tmp_path / "run")
    parts = pipeline.prepare(cfg)
    cached = teacher_outputs.OutputSettings(cache="cached", dtype="float32", top_k=None)
    assert teacher_outputs.decide(cached, parts.data, parts.method)[0] == "none"


@pytest.mark.parametrize(
    "override,key",
    [
        ("teacher_outputs.cache=sometimes", "teacher_outputs.cache"),
        ("teacher_outputs.dtype=float8", "teacher_outputs.dtype"),
        ("teacher_outputs.top_k=0", "teacher_outputs.top_k"),
        ("teacher_outputs.topk=5", "teacher_outputs.topk"),
    ],
)
def test_bad_settings_fail_in_one_line(override, key, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.check_command_line([override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    validate(
        compose_cfg(
            ["teacher_outputs.cache=live", "teacher_outputs.dtype=float16", "teacher_outputs.top_k=3"], tmp_path
        )
    )


# -- fp16, top-k and storage ----------------------------------------------------------------------
def test_float16_is_close_and_top_k_keeps_the_top_k_exactly():
    generator = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(300, 20, generator=generator)
    half = teacher_outputs.expand(teacher_outputs.compress(logits, "float16"))
    assert half.dtype == torch.float32 and torch.allclose(half, logits, rtol=1e-3, atol=1e-3)
    assert not torch.equal(half, logits)

    k = 5
    dense = teacher_outputs.expand(teacher_outputs.compress(logits, "float32", top_k=k))
    values, indices = logits.topk(k, dim=1)
    got_values, got_indices = dense.topk(k, dim=1)
    assert torch.equal(got_indices, indices) and torch.equal(got_values, values)
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, indices, False)
    rest = dense[others].view(300, 20 - k)
    assert bool((rest.max(dim=1).values <= values[:, -1]).all())
    assert torch.allclose(rest.mean(dim=1), logits[others].view(300, 20 - k).mean(dim=1), atol=1e-5)
    assert torch.equal(teacher_outputs.expand(teacher_outputs.compress(logits, top_k=20)), logits)


def test_stored_table_round_trips_and_a_broken_file_is_recomputed(tmp_path):
    x = torch.randn(50, 1, 4, 4)
    teacher = Echo(classes=6)
    table, source, path = teacher_outputs.obtain_table(teacher, x, tmp_path, "key", "float16", top_k=2)
    assert source == "miss" and path.parent == tmp_path / "outputs" and "float16-top2" in path.name
    stored = torch.load(path, weights_only=True)
    assert stored["values"].dtype == torch.float16 and stored["values"].shape == (50, 2)
    again, source, _ = teacher_outputs.obtain_table(teacher, x, tmp_path, "key", "float16", top_k=2)
    assert source == "hit" and torch.equal(again, table) and teacher.samples_seen == 50
    # other inputs, another teacher or other settings never get this table
    names = {
        teacher_outputs.obtain_table(teacher, x_, tmp_path, key, dtype, top_k=k)[2].name
        for x_, key, dtype, k in [
            (x + 1, "key", "float16", 2),
            (x, "other", "float16", 2),
            (x, "key", "float32", 2),
            (x, "key", "float16", None),
        ]
    }
    assert len(names) == 4 and path.name not in names
    path.write_bytes(b"truncated")
    seen = teacher.samples_seen
    _, source, _ = teacher_outputs.obtain_table(teacher, x, tmp_path, "key", "float16", top_k=2)
    assert source == "miss" and teacher.samples_seen == seen + 50


class SlowEcho(Echo):
    def forward(self, x: Tensor) -> Tensor:
        time.sleep(0.2)
        return super().forward(x)


def test_concurrent_jobs_compute_the_table_once(tmp_path):
    x = torch.randn(40, 1, 4, 4)
    teacher = SlowEcho(classes=3)
    results: list[tuple[Tensor, str, Path]] = []
    barrier = threading.Barrier(2)

    def job() -> None:
        barrier.wait()
        results.append(teacher_outputs.obtain_table(teacher, x, tmp_path, "key"))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2
    assert sorted(source for _, source, _ in results) == ["hit", "miss"]
    assert torch.equal(results[0][0], results[1][0]) and results[0][2] == results[1][2]
    assert teacher.samples_seen == len(x)
    assert [p.name for p in (tmp_path / "outputs").iterdir() if p.suffix == ".tmp"] == []
