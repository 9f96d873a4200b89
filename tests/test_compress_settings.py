"""The compressors' settings: declared once on each function's typed signature, valued once in
``conf/compress/<option>.yaml``, checked before anything is imported; and the pipeline's keys
of a ``compress`` node (``CompressSettings``, ``methods``, ``apply``)."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import pytest
import torch
from omegaconf import OmegaConf

from distillab import compress, conf, settings
from distillab.compress import PIPELINE_KEYS, CompressSettings, Context
from distillab.models import CNN
from distillab.settings import ConfigError

OPTIONS = conf.options("compress")
#: the parameters every compressor gets from the run
PROVIDED = ("model", "context")
SHAPE = (1, 8, 8)


def node_of(option: str) -> dict:
    return OmegaConf.to_container(conf.load("compress", option), resolve=True)


def steps_of(node: dict) -> list[dict]:
    """The method nodes of an option: the node itself, or the steps of a chain."""
    return node["steps"] if node.get("steps") else [node]


def values_of(step: dict) -> dict:
    """A method node's settings: everything but ``_target_``, ``_partial_`` and the pipeline's keys."""
    return {key: value for key, value in step.items() if key not in ("_target_", "_partial_", *PIPELINE_KEYS)}


def test_every_option_is_listed():
    assert set(OPTIONS) == {
        "none",
        "ort_int8_dynamic",
        "ort_int8_static",
        "prune_structured",
        "prune_structured+quant_static",
        "prune_unstructured",
        "qat",
        "quant_dynamic",
        "quant_static",
    }


def test_none_is_only_an_amount():
    node = node_of("none")
    assert node == {"amount": None} and compress.is_none(node)
    assert compress.is_none(conf.load("compress", "none"))
    assert not any(compress.is_none(conf.load("compress", option)) for option in OPTIONS if option != "none")


#: what configs (and so runs' config hashes and saved .hydra/config.yaml files), docs and user code name
PUBLIC_PATHS = {
    "prune": ["unstructured", "structured", "load_unstructured", "load_structured", "cubic_sparsity", "PRUNABLE"],
    "quantize": ["dynamic", "static", "qat", "load", "load_dynamic", "load_static", "load_qat", "int8_layers"],
    "ort": ["int8_dynamic", "int8_static", "load", "OrtModel"],
}


def test_the_public_paths_still_name_the_methods_after_the_split():
    from distillab.compress import prune, prune_structured, prune_unstructured

    for module, names in PUBLIC_PATHS.items():
        imported = importlib.import_module(f"distillab.compress.{module}")
        assert [name for name in names if not hasattr(imported, name)] == [], module
    # one function each, under its public path and in the module of its subject
    assert prune.structured is prune_structured.structured and prune.unstructured is prune_unstructured.unstructured
    assert prune.load_unstructured is prune_unstructured.load_unstructured
    targets = [step.get("_target_") for option in OPTIONS for step in steps_of(node_of(option))]
    assert {t.rsplit(".", 1)[0] for t in targets if t} == {f"distillab.compress.{m}" for m in PUBLIC_PATHS}


@pytest.mark.parametrize("option", OPTIONS)
def test_pipeline_keys_pass_compress_settings(option):
    node = node_of(option)
    keys = {key: node[key] for key in compress.PIPELINE_KEYS if key in node and key != "steps"}
    settings.check("compress", keys, "distillab.compress.CompressSettings", partial=option == "none")
    if option != "none":
        assert settings.build(CompressSettings, keys) == CompressSettings(**keys)


def test_compress_settings_declaration():
    declared = settings.declaration("distillab.compress.CompressSettings")
    assert list(declared.settings) == ["target", "finetune_epochs", "amount", "max_acc_drop", "cycles"]
    assert all(setting.required and setting.kind != "any" for setting in declared.settings.values())
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(CompressSettings))


@pytest.mark.parametrize(
    "option,key,value,allowed",
    [
        ("prune_structured", "importance", "l3", "one of l1, l2, bn_scale, taylor"),
        ("prune_structured", "amount", 1.5, "a fraction in (0, 1), or null"),
        ("prune_structured", "iterative_steps", 0, "an integer >= 1"),
        ("prune_structured", "target_params", 0, "an integer >= 1, or null"),
        ("prune_unstructured", "amount", 1.5, "a fraction in (0, 1), or null"),
        ("prune_unstructured", "scope", "net", "one of global, layer"),
        ("prune_unstructured", "schedule", "slow", "one of oneshot, gradual"),
        ("quant_static", "calibration_batches", 0, "an integer >= 1"),
        ("quant_static", "engine", "arm", "one of x86, fbgemm, qnnpack"),
        ("quant_static", "per_channel", "yes", "true or false"),
        ("qat", "engine", "arm", "one of x86, fbgemm, qnnpack"),
        ("qat", "calibration_batches", 0, "an integer >= 1"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_the_allowed_values(option, key, value, allowed):
    node = node_of(option)
    values = {**values_of(node), key: value}
    with pytest.raises(ConfigError) as caught:
        settings.check("compress", values, node["_target_"], provided=PROVIDED, partial=True)
    assert str(caught.value) == f"compress.{key}={value!r} is not allowed: {allowed}"


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("amount", 1.5, "a fraction in (0, 1), or null"),
        ("target", "both", "one of student, teacher"),
        ("finetune_epochs", -1, "an integer >= 0"),
    ],
)
def test_a_bad_pipeline_key_is_one_line(key, value, allowed):
    keys = {"target": "student", "finetune_epochs": 0, "amount": None, key: value}
    with pytest.raises(ConfigError) as caught:
        settings.build(CompressSettings, keys)
    assert str(caught.value) == f"{key}={value!r} is not allowed: {allowed}"


def test_an_unknown_setting_is_one_line():
    with pytest.raises(ConfigError) as caught:
        settings.check(
            "compress", {"engines": "x86"}, "distillab.compress.quantize.static", provided=PROVIDED, partial=True
        )
    assert str(caught.value) == (
        "compress.engines is not a known key; allowed keys of compress: calibration_batches, per_channel, engine, "
        "max_acc_drop"
    )


# -- methods() and apply() ------------------------------------------------------------------------
def unwrapped(method: functools.partial) -> tuple[object, dict]:
    """The function of a (possibly nested) partial and all its keywords."""
    keywords: dict = {}
    while isinstance(method, functools.partial):
        keywords = {**method.keywords, **keywords}
        method = method.func
    return method, keywords


def test_methods_give_amount_only_to_methods_that_take_it():
    ((function, keywords),) = map(unwrapped, compress.methods(conf.load("compress", "prune_structured")))
    assert function.__name__ == "structured" and keywords["amount"] == 0.5
    assert keywords["importance"] == "l1" and "target" not in keywords and "finetune_epochs" not in keywords
    ((function, keywords),) = map(unwrapped, compress.methods(conf.load("compress", "quant_static")))
    assert function.__name__ == "static" and "amount" not in keywords and keywords["engine"] == "x86"
    node = conf.load("compress", "prune_structured+quant_static")
    node.amount = 0.3
    (_, pruning), (_, static) = map(unwrapped, compress.methods(node))
    assert pruning["amount"] == 0.3 and "amount" not in static
    # a budget instead of amount: null still reaches the function, whose declaration allows it
    node = conf.load("compress", "prune_structured")
    node.amount, node.target_params = None, 1000
    ((_, keywords),) = map(unwrapped, compress.methods(node))
    assert keywords["amount"] is None and keywords["target_params"] == 1000


def _batches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        yield torch.randn(16, *SHAPE, generator=generator), torch.randint(0, 10, (16,)), torch.arange(16)


def test_apply_names_a_chain_after_its_option():
    torch.manual_seed(0)
    model = CNN(SHAPE, 10, width=8, blocks=2, dropout=0.0).eval()
    node = conf.load("compress", "prune_structured+quant_static")
    result, float_model = compress.apply(node, model, Context(SHAPE, _batches), "prune_structured+quant_static")
    assert result.method == "prune_structured+quant_static"
    assert float_model is not model and float_model.classifier.in_features == model.classifier.in_features // 2
    single, _ = compress.apply(conf.load("compress", "quant_static"), model, Context(SHAPE, _batches), "quant_static")
    assert single.method == "quant_static"


def test_a_method_called_with_a_bad_value_says_so():
    node = conf.load("compress", "prune_unstructured")
    node.amount = 1.5
    with pytest.raises(ConfigError) as caught:
        compress.apply(
            node, CNN(SHAPE, 10, width=8, blocks=1, dropout=0.0), Context(SHAPE, _batches), "prune_unstructured"
        )
    assert str(caught.value) == "amount=1.5 is not allowed: a fraction in (0, 1), or null"


def test_cycles_reach_only_the_methods_that_take_them_and_others_refuse_in_one_line():
    node = conf.load("compress", "prune_structured+quant_static")
    node.cycles, node.finetune_epochs = 3, 2
    (_, pruning), (_, static) = map(unwrapped, compress.methods(node))
    assert pruning["cycles"] == 3 and "cycles" not in static
    node = conf.load("compress", "quant_static")
    node.cycles = 2
    with pytest.raises(ConfigError) as caught:
        compress.methods(node)
    assert str(caught.value) == (
        "cycles=2 is not allowed with static: only these methods take it: "
        "prune_structured, prune_structured+quant_static, prune_unstructured"
    )
    assert compress.takes("max_acc_drop") == [o for o in OPTIONS if o != "none"]


def test_a_chain_keeps_the_tables_of_every_step(monkeypatch):
    def step(name: str):
        def method(model, context):
            return compress.Compressed(model, name, "test", lambda path: None, tables={name: [{"step": name}]})

        return functools.partial(method)

    monkeypatch.setattr(compress, "methods", lambda node: [step("first"), step("second")])
    node = conf.load("compress", "prune_structured+quant_static")
    result, _ = compress.apply(node, torch.nn.Linear(2, 2), Context((2,), _batches), "chain")
    assert result.tables == {"first": [{"step": "first"}], "second": [{"step": "second"}]}
    assert result.method == "chain"
