"""Text models (``model=bilstm``, ``textcnn``, ``hf_classifier``): built from their YAML with what the
data provides, a forward on a real batch, padding that does not change a sample's logits, a few
optimizer steps that lower the loss, the transformer shapes of the papers, and one-line errors."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distillab import build, measure
from distillab.config import MODEL_PROVIDED
from distillab.data.text import TextFileDataModule
from distillab.models.text import HFClassifier, check_inputs, reads_tokens
from distillab.settings import ConfigError
from tests.conftest import CONF
from tests.fixtures_text import pairs, reviews, write

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_MODELS = ("bilstm", "textcnn", "hf_classifier")
#: small sizes, so that each model trains in a moment on one thread
SMALL = {
    "bilstm": {"embedding_dim": 16, "hidden_size": 16, "head_size": 16},
    "textcnn": {"embedding_dim": 16, "channels": 8},
    "hf_classifier": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
}


def data_settings(tmp: Path, **overrides) -> dict:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "text.yaml"))
    values.pop("_target_")
    values.update(cache_dir=str(tmp / "tokenized"), vocab_size=200, max_length=32, batch_size=32)
    return {**values, **overrides}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TextFileDataModule:
    folder = tmp_path_factory.mktemp("text_models")
    module = TextFileDataModule(**data_settings(folder, train_path=str(write(folder / "reviews.csv", reviews(240)))))
    module.setup()
    return module


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> TextFileDataModule:
    folder = tmp_path_factory.mktemp("text_pairs")
    path = write(folder / "pairs.csv", pairs(120))
    module = TextFileDataModule(
        **data_settings(folder, train_path=str(path), text_column="sentence1", text_pair_column="sentence2")
    )
    module.setup()
    return module


def model(option: str, data: TextFileDataModule, input_shape=None, **overrides) -> torch.nn.Module:
    """``conf/model/<option>.yaml`` (with ``overrides``) built with what the data provides, as a run does."""
    node = OmegaConf.load(CONF / "model" / f"{option}.yaml")
    node.merge_with({**SMALL[option], **overrides})
    shape = list(data.input_shape if input_shape is None else input_shape)
    provided = dict(zip(MODEL_PROVIDED, (shape, data.num_classes, data.vocab_size)))
    torch.manual_seed(0)
    return instantiate(node, **provided)


def batch(data: TextFileDataModule, split: str = "train"):
    loader = data.train_dataloader() if split == "train" else data.test_dataloader()
    return next(iter(loader))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_a_text_model_takes_a_batch_dict_and_returns_logits(name, data, pair_data):
    for source in (data, pair_data):
        net = model(name, source).eval()
        inputs, targets, _ = batch(source)
        with torch.no_grad():
            logits = net(inputs)
        assert logits.shape == (len(targets), source.num_classes) and torch.isfinite(logits).all()
    # a tensor is input_ids with every token attended
    ids = torch.randint(0, data.vocab_size, (3, 7))
    net = model(name, data).eval()
    with torch.no_grad():
        assert torch.allclose(net(ids), net({"input_ids": ids, "attention_mask": torch.ones_like(ids)}))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_padding_does_not_change_a_samples_logits(name, data):
    net = model(name, data).eval()
    inputs, _, _ = batch(data, "test")
    lengths = inputs["attention_mask"].sum(1)
    with torch.no_grad():
        together = net(inputs)
        for i in range(4):
            alone = {key: value[i : i + 1, : int(lengths[i])] for key, value in inputs.items()}
            assert torch.allclose(net(alone)[0], together[i], atol=1e-5), (i, int(lengths[i]))
            extra = {key: torch.nn.functional.pad(value, (0, 5)) for key, value in alone.items()}
            assert torch.allclose(net(extra)[0], together[i], atol=1e-5)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_a_few_optimizer_steps_lower_the_loss(name, data):
    net = model(name, data, dropout=0.0).train()
    inputs, targets, _ = batch(data)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(net(inputs), targets)

    with torch.no_grad():
        before = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)


# -- transformers -----------------------------------------------------------------------------------------
def bert_params(layers: int, hidden: int, intermediate: int, vocab: int, positions: int, classes: int) -> int:
    """BERT's parameter count from its sizes: embeddings (words, positions, 2 token types, LayerNorm),
    per layer 4 attention projections, the feed-forward pair and 2 LayerNorms, the pooler, the classifier."""
    embeddings = (vocab + positions + 2) * hidden + 2 * hidden
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * intermediate + intermediate + hidden + 4 * hidden
    return embeddings + layers * layer + hidden * hidden + hidden + hidden * classes + classes


@pytest.mark.parametrize(
    ("sizes", "published"),
    [
        ({"num_layers": 12, "hidden_size": 768, "num_heads": 12, "intermediate_size": 3072}, 110e6),  # BERT-base
        ({"num_layers": 4, "hidden_size": 312, "num_heads": 12, "intermediate_size": 1200}, 14.5e6),  # TinyBERT-4
    ],
)
def test_bert_base_and_tinybert_shapes_are_built_offline(sizes, published):
    node = OmegaConf.load(CONF / "model" / "hf_classifier.yaml")
    node.merge_with(sizes)
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        net = instantiate(node, input_shape=[512], num_classes=2, vocab_size=30522)
    count = measure.params(net)
    assert count == bert_params(sizes["num_layers"], sizes["hidden_size"], sizes["intermediate_size"], 30522, 512, 2)
    assert abs(count - published) / published < 0.02  # Devlin et al. 2019; Jiao et al. 2020
    config = net.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == tuple(
        sizes[k] for k in ("num_layers", "hidden_size", "num_heads")
    )


def test_the_yaml_default_is_bert_base():
    node = OmegaConf.load(CONF / "model" / "hf_classifier.yaml")
    assert (node.model_type, node.num_layers, node.hidden_size, node.num_heads, node.intermediate_size) == (
        "bert",
        12,
        768,
        12,
        3072,
    )


def test_pretrained_weights_are_loaded_from_a_folder_with_a_new_classifier(data, tmp_path):
    source = model("hf_classifier", data)
    source.model.save_pretrained(tmp_path / "tiny-bert")
    loaded = model(
        "hf_classifier",
        data,
        name=str(tmp_path / "tiny-bert"),
        pretrained=True,
        **dict.fromkeys(SMALL["hf_classifier"]),
    )
    saved, found = source.model.state_dict(), loaded.model.state_dict()
    encoder = [key for key in saved if ".encoder." in key]
    assert encoder and all(torch.equal(saved[key], found[key]) for key in encoder)
    three = instantiate(
        OmegaConf.create(
            {
                **OmegaConf.to_container(OmegaConf.load(CONF / "model" / "hf_classifier.yaml")),
                **dict.fromkeys(SMALL["hf_classifier"]),
                "name": str(tmp_path / "tiny-bert"),
                "pretrained": True,
            }
        ),
        input_shape=[32],
        num_classes=3,
        vocab_size=data.vocab_size,
    )
    inputs, _, _ = batch(data)
    assert three(inputs).shape[1] == 3


def hf(data: TextFileDataModule, **settings) -> HFClassifier:
    values = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "hf_classifier.yaml"))
    values.pop("_target_")
    values.update(SMALL["hf_classifier"])
    values.update(settings)
    return HFClassifier(input_shape=list(data.input_shape), num_classes=2, vocab_size=data.vocab_size, **values)


def test_a_model_name_neither_cached_nor_downloadable_is_one_line_and_fast(data, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        hf(data, name="distillab-tests/no-such-model", pretrained=True, **dict.fromkeys(SMALL["hf_classifier"]))
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "\n" not in message and message.startswith("name='distillab-tests/no-such-model' is not allowed")
    assert ("cannot be reached" in message and "fix:" in message) or "not found on the Hugging Face Hub" in message


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pretrained": True}, "name=None is not allowed: pretrained: true loads"),
        ({"name": "bert-base-uncased", "pretrained": True}, "num_layers=2 is not allowed: null with pretrained"),
        ({"num_heads": 5}, "num_heads=5 is not allowed: a divisor of hidden_size=32"),
        ({"model_type": "no-such-type"}, "model_type='no-such-type' is not allowed: a transformers model type"),
        ({"num_layers": 0}, "num_layers=0 is not allowed: an integer >= 1"),
    ],
)
def test_bad_transformer_settings_are_one_line(data, settings, message):
    with pytest.raises(ConfigError) as error:
        hf(data, **settings)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_pretrained_model_too_small_for_the_data_is_one_line(data, tmp_path):
    small = hf(data, num_layers=1)
    small.model.config.vocab_size = 10  # the saved config says so; the weights are not read before the check
    small.model.save_pretrained(tmp_path / "small")
    with pytest.raises(ConfigError) as error:
        hf(data, name=str(tmp_path / "small"), pretrained=True, **dict.fromkeys(SMALL["hf_classifier"]))
    assert "its embeddings cover 10 tokens" in str(error.value) or "holds no model" in str(error.value)


# -- what reads what ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT_MODELS)
def test_a_text_model_given_images_is_one_line(name, data):
    node = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    node.merge_with(SMALL[name])
    with pytest.raises(ConfigError) as error:  # as a run builds it: the key in front
        build.part("student", node, input_shape=[1, 8, 8], num_classes=10, vocab_size=data.vocab_size)
    message = str(error.value)
    assert message.startswith("student.input_shape=[1, 8, 8] is not allowed: ") and "\n" not in message
    assert "reads token ids" in message
    net = model(name, data)
    with pytest.raises(TypeError, match="token ids"):
        net(torch.randn(2, 8))


def test_which_models_read_tokens_is_read_from_their_declaration():
    target = {name: OmegaConf.load(CONF / "model" / f"{name}.yaml")._target_ for name in (*TEXT_MODELS, "cnn", "mlp")}
    assert all(reads_tokens(target[name]) for name in TEXT_MODELS)
    assert not reads_tokens(target["cnn"]) and not reads_tokens(target["mlp"])
    with pytest.raises(ConfigError, match="student=CNN is not allowed: it reads images or vectors and the data"):
        check_inputs("student", target["cnn"], text=True)
    with pytest.raises(ConfigError, match="teacher=BiLSTM is not allowed: it reads token ids"):
        check_inputs("teacher", target["bilstm"], text=False)
    check_inputs("student", target["textcnn"], text=True)
    check_inputs("student", target["mlp"], text=False)


def test_the_text_extra_missing_is_one_line(data, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "transformers" else found(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r'needs the text extra \(transformers missing\): pip install -e "\.\[text\]"'
    ):
        hf(data)


def test_the_python_shown_in_the_text_docs_runs(tmp_path, monkeypatch, capsys):
    page = (CONF.parent / "docs" / "text.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks, "docs/text.md shows Python"
    write(tmp_path / "reviews.csv", reviews(200))
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/text.md", "exec"), {})
    shown = capsys.readouterr().out
    assert "text:reviews: 200 samples" in shown and "torch.Size([" in shown
    assert (tmp_path / "tokenized").is_dir()
