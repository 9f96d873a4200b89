"""Every experiment file composes and is checked on fixture data in the real on-disk formats.

The KD, Hinton and digits files run a handful of steps, and so does one file per CIFAR-100 method
(on its cheapest pair). Every other file is validated and prepared (``pipeline.prepare``: data and
models built, the method bound to the pair's layers on one batch, no training), which catches a
default layer that does not fit a pair without paying for a run of resnet32x4 or vgg13. The paper
recipes are what their comments say, and each method file names a published figure."""

import re

import pytest
from omegaconf import OmegaConf

from distillab import job, pipeline
from distillab.config import validate
from tests.conftest import CONF
from tests.fixtures_images import write_image_folder
from tests.fixtures_vision import WRITERS, trust_cifar_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
# the four benchmark pairs; a method's short run takes the first it has a file for (resnet56 -> resnet20 is by
# far the cheapest; resnet32x4 -> resnet8x4 ran faster than vgg13 -> vgg8 with reviewkd)
PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
}
KD_FILES = [f"cifar100_kd_{pair}" for pair in PAIRS]
RECIPES = [f"cifar100_recipe_{pair}" for pair in PAIRS]
# the method part of cifar100_<method>_<pair> -> the distill= option it selects
METHODS = {
    "vid": "vid",
    "nst": "nst",
    "crd": "crd",
    "crd_kd": "crd",
    "reviewkd": "reviewkd",
    "ofd": "ofd",
    "dist": "dist",
    "kd_ls": "kd",
    "dkd_ls": "dkd",
    "dkd": "dkd",
}


def _split(name: str) -> tuple[str, str] | None:
    """``(method, pair)`` of a ``cifar100_<method>_<pair>`` file, else None."""
    for pair in PAIRS:
        if name.startswith("cifar100_") and name.endswith(f"_{pair}"):
            return name[len("cifar100_") : -len(pair) - 1], pair
    return None


METHOD_FILES = {name: _split(name) for name in EXPERIMENTS if _split(name) and _split(name)[0] not in ("kd", "recipe")}
SHORT = sorted(
    min((n for n, (m, _) in METHOD_FILES.items() if m == method), key=lambda n: list(PAIRS).index(METHOD_FILES[n][1]))
    for method in {m for m, _ in METHOD_FILES.values()}
)
# the ImageNet files are prepared on a small image folder (a ResNet-34 run is not a unit test)
IMAGENET = [n for n in EXPERIMENTS if n.startswith("imagenet_")]
IMAGENET_METHODS = {"kd": "kd", "dkd": "dkd", "crd": "crd"}
RUN = [n for n in EXPERIMENTS if not n.startswith(("cifar100_", "imagenet_"))] + KD_FILES + SHORT
PREPARE = [n for n in EXPERIMENTS if n not in RUN]

# a handful of steps: one epoch of two small batches for teacher and student, quick timing
TINY = [
    "num_threads=1",
    "trainer.max_epochs=1",
    "teacher.recipe.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
    "data.batch_size=8",
    "measure.warmup=0",
    "measure.repeats=1",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The fixture datasets, written once for the module: dataset name -> root folder."""
    roots = {}

    def root(dataset: str):
        if dataset not in roots:
            roots[dataset] = tmp_path_factory.mktemp(dataset)
            if dataset == "imagenet":
                write_image_folder(roots[dataset], per_class=6, splits={"val": 2})
            else:
                WRITERS[dataset](roots[dataset])
        return roots[dataset]

    return root


def _compose(name, make_cfg, data_root, monkeypatch, *extra):
    """The experiment composed with fixture data for the dataset it picks; (config, dataset)."""
    make_cfg(f"experiment={name}", fast=False)
    dataset = job.choice("data")
    overrides = [f"experiment={name}", *extra]
    if dataset in WRITERS:
        trust_cifar_fixtures(monkeypatch)
        overrides += [f"data.root={data_root(dataset)}", "data.val_size=20", "data.download=false"]
    if dataset == "imagenet":  # a few classes of small JPEG/PNG files; no download of the teacher's weights
        overrides += [
            f"data.root={data_root('imagenet')}",
            "data.val_size=6",
            "data.crop_size=32",
            "data.resize_size=36",
            "data.num_workers=0",
            "teacher.weights=null",
        ]
    return make_cfg(*overrides, fast=False), dataset


@pytest.mark.parametrize("name", RUN)
def test_experiment_runs_a_few_steps(name, make_cfg, data_root, monkeypatch):
    cfg, dataset = _compose(name, make_cfg, data_root, monkeypatch, *TINY)
    record = pipeline.run(cfg)
    assert record["status"] == "ok", record
    assert record["dataset"] == dataset


@pytest.mark.parametrize("name", PREPARE)
def test_experiment_is_prepared(name, make_cfg, data_root, monkeypatch):
    cfg, _ = _compose(name, make_cfg, data_root, monkeypatch)
    validate(cfg)
    pipeline.prepare(cfg)  # builds the models and binds the method to the pair's layers


def test_every_method_runs_once_and_every_file_is_checked():
    assert set(METHODS) >= {m for m, _ in METHOD_FILES.values()}, "a method file of an unknown method"
    assert {METHOD_FILES[n][0] for n in SHORT} == {m for m, _ in METHOD_FILES.values()}
    for name in SHORT:  # on resnet56 -> resnet20, the cheapest pair, where the method has a file for it
        method, pair = METHOD_FILES[name]
        assert pair == "resnet56_resnet20" or f"cifar100_{method}_resnet56_resnet20" not in METHOD_FILES
    assert sorted(RUN + PREPARE) == EXPERIMENTS and not set(RUN) & set(PREPARE) and set(IMAGENET) <= set(PREPARE)
    assert set(KD_FILES + RECIPES) <= set(EXPERIMENTS)


def _assert_benchmark_recipe(cfg, pair):
    teacher, student = PAIRS[pair]
    model = lambda arch: OmegaConf.load(CONF / "model" / f"{arch}.yaml")._target_  # noqa: E731
    assert (cfg.teacher._target_, cfg.student._target_) == (model(teacher), model(student))
    for recipe in (cfg.optim, cfg.teacher.recipe.optim):
        assert recipe.optimizer._target_ == "torch.optim.SGD"
        assert (recipe.optimizer.lr, recipe.optimizer.momentum, recipe.optimizer.weight_decay) == (0.05, 0.9, 5e-4)
        assert list(recipe.scheduler.milestones) == [150, 180, 210] and recipe.scheduler.gamma == 0.1
    assert cfg.trainer.max_epochs == cfg.teacher.recipe.max_epochs == 240
    assert cfg.data._target_.endswith("CIFAR100DataModule")
    assert cfg.data.batch_size == 64 and cfg.data.augment and cfg.data.max_shift == 4 and cfg.data.val_size == 5000


def test_the_cifar100_recipes_are_the_benchmark_recipe(make_cfg):
    for pair in PAIRS:
        for name in (f"cifar100_recipe_{pair}", f"cifar100_kd_{pair}"):
            _assert_benchmark_recipe(make_cfg(f"experiment={name}", fast=False), pair)
        assert (make_cfg(f"experiment=cifar100_kd_{pair}", fast=False).distill.lam) == 0.9


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("pair", PAIRS)
def test_the_kd_files_compose_as_before(pair, make_cfg):
    """cifar100_kd_<pair> is the recipe plus the KD weights: the same config as the file that held both."""
    teacher, student = PAIRS[pair]
    spelled_out = [
        "data=cifar100",
        f"teacher={teacher}",
        f"student={student}",
        "distill=kd",
        "optim=sgd",
        "optim/scheduler=multistep",
        "optim@teacher.recipe.optim=sgd",
        "optim/scheduler@teacher.recipe.optim.scheduler=multistep",
        "data.augment=true",
        "data.max_shift=4",
        "data.batch_size=64",
        "data.val_size=5000",
        "teacher.recipe.max_epochs=240",
        "trainer.max_epochs=240",
        "distill.lam=0.9",
        "distill.temperature=4.0",
    ]
    kd = _plain(make_cfg(f"experiment=cifar100_kd_{pair}", fast=False))
    assert kd == _plain(make_cfg(*spelled_out, fast=False))
    recipe = f"experiment=cifar100_recipe_{pair}"
    assert kd == _plain(make_cfg(recipe, "distill=kd", "distill.lam=0.9", "distill.temperature=4.0", fast=False))


@pytest.mark.parametrize("pair", PAIRS)
def test_a_recipe_takes_any_method(pair, make_cfg):
    recipe = f"experiment=cifar100_recipe_{pair}"
    assert "distill" not in OmegaConf.load(CONF / "experiment" / f"cifar100_recipe_{pair}.yaml")
    for option in ("none", "crd", "dkd"):
        cfg = make_cfg(recipe, f"distill={option}", fast=False)
        validate(cfg)
        assert cfg.distill == OmegaConf.load(CONF / "distill" / f"{option}.yaml")
        _assert_benchmark_recipe(cfg, pair)


@pytest.mark.parametrize("name", sorted(METHOD_FILES))
def test_a_method_file_is_its_method_on_its_pairs_recipe(name, make_cfg):
    method, pair = METHOD_FILES[name]
    cfg = make_cfg(f"experiment={name}", fast=False)
    option = OmegaConf.load(CONF / "distill" / f"{METHODS[method]}.yaml")
    assert cfg.distill._target_ == option._target_
    assert set(cfg.distill) == set(option), "a method file sets only its method's own settings"
    _assert_benchmark_recipe(cfg, pair)
    # everything but the method is the pair's recipe file
    recipe = _plain(make_cfg(f"experiment=cifar100_recipe_{pair}", fast=False))
    mine = _plain(cfg)
    assert {k: v for k, v in mine.items() if k != "distill"} == {k: v for k, v in recipe.items() if k != "distill"}
    if METHODS[method] in ("kd", "dkd"):
        assert cfg.distill.standardize is method.endswith("_ls")


def test_the_per_pair_weights(make_cfg):
    """DKD's β per pair (mdistiller's configs/cifar100/dkd/) and logit standardization's λ = 9/9.1."""
    betas = {"resnet56_resnet20": 2.0, "wrn_40_2_wrn_16_2": 6.0, "resnet32x4_resnet8x4": 8.0, "vgg13_vgg8": 6.0}
    for pair, beta in betas.items():
        cfg = make_cfg(f"experiment=cifar100_dkd_{pair}", fast=False).distill
        assert (cfg.beta, cfg.alpha, cfg.temperature, cfg.warmup_epochs) == (beta, 1.0, 4.0, 20)
    for name in (n for n, (m, _) in METHOD_FILES.items() if m == "kd_ls"):
        assert make_cfg(f"experiment={name}", fast=False).distill.lam == pytest.approx(9 / 9.1)


FIGURE = re.compile(r"Published top-1 \(%\): [^;(]*\b\d{2}\.\d{2}\b[^;(]* \(([^;]+)\);")
BASELINES = re.compile(r"teacher \d{2}\.\d{2}, student alone \d{2}\.\d{2} \(")


def _header(name: str) -> str:
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    comment = [line.removeprefix("#").strip() for line in lines if line.startswith("#")]
    return " ".join(comment)


@pytest.mark.parametrize("name", sorted(METHOD_FILES))
def test_a_method_files_header_names_a_published_figure(name):
    header = _header(name)
    found = FIGURE.search(header)
    assert found, f"{name}: no 'Published top-1 (%): <figure> (<source>);' in its header"
    assert re.search(r"README|Papers with Code|Table", found.group(1)), f"{name}: the figure's source is not named"
    assert BASELINES.search(header), f"{name}: the teacher's and the student's own figures are missing"
    assert f"python train.py experiment={name}" in header


def test_hinton_mnist_is_the_papers_setup(make_cfg):
    cfg = make_cfg("experiment=hinton_mnist", fast=False)
    assert list(cfg.teacher.hidden) == [1200, 1200] and cfg.teacher.dropout == 0.5
    assert cfg.teacher.recipe.augment is True and cfg.data.augment is False and cfg.data.max_shift == 2
    assert list(cfg.student.hidden) == [800, 800] and cfg.student.dropout == 0.0
    assert cfg.distill.temperature == 20.0


@pytest.mark.parametrize("name", [n for n in IMAGENET if n != "imagenet_recipe_resnet34_resnet18"])
def test_an_imagenet_file_is_its_method_on_the_imagenet_recipe(name, make_cfg):
    """The papers' ImageNet setting: torchvision's pretrained ResNet-34 teacher, ResNet-18 from scratch,
    100 epochs of SGD lr 0.1 (momentum 0.9, weight decay 1e-4) x0.1 at 30/60/90, batch 256, and a
    published figure in the header."""
    method = name.removeprefix("imagenet_").removesuffix("_resnet34_resnet18")
    cfg = make_cfg(f"experiment={name}", fast=False)
    assert cfg.distill._target_ == OmegaConf.load(CONF / "distill" / f"{IMAGENET_METHODS[method]}.yaml")._target_
    assert cfg.data._target_.endswith("ImageFolderDataModule") and cfg.data.name == "imagenet"
    assert (cfg.data.batch_size, cfg.data.crop_size, cfg.data.test_dir) == (256, 224, "val")
    assert cfg.teacher._target_ == cfg.student._target_ == "distillab.models.torchvision_model"
    assert (cfg.teacher.name, cfg.teacher.weights, cfg.student.name, cfg.student.pretrained) == (
        "resnet34",
        "IMAGENET1K_V1",
        "resnet18",
        False,
    )
    optimizer, scheduler = cfg.optim.optimizer, cfg.optim.scheduler
    assert optimizer._target_ == "torch.optim.SGD"
    assert (optimizer.lr, optimizer.momentum, optimizer.weight_decay) == (0.1, 0.9, 1e-4)
    assert list(scheduler.milestones) == [30, 60, 90] and scheduler.gamma == 0.1 and cfg.trainer.max_epochs == 100
    # the pretrained teacher is used as built: zero recipe epochs, never fitted
    assert cfg.teacher.recipe.max_epochs == 0
    recipe = _plain(make_cfg("experiment=imagenet_recipe_resnet34_resnet18", fast=False))
    mine = _plain(cfg)
    assert {k: v for k, v in mine.items() if k != "distill"} == {k: v for k, v in recipe.items() if k != "distill"}
    header = _header(name)
    found = FIGURE.search(header)
    assert found and "Table" in found.group(1), f"{name}: no published figure with its table"
    assert "teacher 73.31, student alone 69.75 (" in header and f"python train.py experiment={name}" in header
