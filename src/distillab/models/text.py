"""Text classifiers: a Hugging Face transformer, a BiLSTM (Tang et al. 2019) and a CNN (Kim 2014).

Each is a plain ``nn.Module`` for either role that takes **one argument**, the batch's inputs as
the text datamodules yield them (a dict with ``input_ids``, ``attention_mask`` and, for pairs,
``token_type_ids``; a tensor is taken as ``input_ids`` with every token attended), and returns
logits: ``model(inputs)``, the call every image model gets. A sample's logits do not depend on
how far its batch is padded.

Besides ``input_shape`` (``(max_length,)`` from a text datamodule: the longest sequence, which
sizes position embeddings) and ``num_classes``, a text model takes ``vocab_size``, the data's
tokenizer vocabulary: the run provides it like the other two when the data has one
(``conf.MODEL_PROVIDED``); None, the default, is data without a vocabulary (images or vectors),
which a text model refuses in one line. A model that declares ``vocab_size`` reads token ids
(``reads_tokens``).

``hf_classifier`` needs the text extra: ``pip install -e ".[text]"``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from distillab.data.text import hub_cache, hub_unreachable
from distillab.formats import require_extra
from distillab.models.cnn import Dropout
from distillab.settings import ConfigError, Count, checked, declaration

log = logging.getLogger(__name__)

#: the inputs a transformer may take from a batch
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# -- the contract -------------------------------------------------------------------------------------
def reads_tokens(target: str) -> bool:
    """Whether the model ``target`` (a ``_target_``) reads token ids: it declares ``vocab_size``.
    Read from the source, without importing it."""
    return "vocab_size" in declaration(target).settings


def check_inputs(key: str, target: str, text: bool) -> None:
    """One line when the model at ``key`` cannot read the data: a text model on images or vectors,
    or an image model on token ids (``text``: the data yields token ids)."""
    tokens = reads_tokens(target)
    name = target.rsplit(".", 1)[-1]
    if text and not tokens:
        raise ConfigError(
            f"{key}={name} is not allowed: it reads images or vectors and the data yields token ids; "
            "text models: bilstm, textcnn, hf_classifier"
        )
    if tokens and not text:
        raise ConfigError(f"{key}={name} is not allowed: it reads token ids and the data yields images or vectors")


def sequence_length(input_shape: Sequence[int], vocab_size: int | None, what: str) -> int:
    """The longest sequence, from the data's ``input_shape`` (``(max_length,)``); one line for data that
    is not token ids (an image shape, or no vocabulary)."""
    shape = [int(d) for d in input_shape]
    if len(shape) != 1 or shape[0] < 1 or vocab_size is None:
        raise ConfigError(
            f"input_shape={shape} is not allowed: {what} reads token ids, a (max_length,) shape and a vocabulary "
            "from a text datamodule (data=text or hf_text); this data yields images or vectors"
        )
    if vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size} is not allowed: an integer >= 1 (the data's tokenizer)")
    return shape[0]


def token_inputs(inputs: Tensor | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """A batch's inputs as a dict with ``input_ids`` and ``attention_mask``."""
    if isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise TypeError(f"{what} takes token ids: a dict with input_ids (a text datamodule's batch) or a tensor")
    ids = inputs["input_ids"]
    if ids.is_floating_point():
        raise TypeError(f"{what} takes integer token ids, not {ids.dtype} values (images or vectors?)")
    found = dict(inputs)
    if found.get("attention_mask") is None:
        found["attention_mask"] = torch.ones_like(ids)
    return found


# -- Tang et al. 2019: BiLSTM ---------------------------------------------------------------------------------
@checked
class BiLSTM(nn.Module):
    """Embeddings, a bidirectional LSTM and an MLP head on the last forward and backward states: the
    student of Tang et al. (2019), "Distilling Task-Specific Knowledge from BERT into Simple Neural
    Networks" (300-d embeddings, one layer of 150 units each way, a 400-unit ReLU layer). Padding is
    skipped (packed sequences), so a sample's logits do not depend on its batch. Sentence pairs are
    read as one sequence, as the tokenizer joins them."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        embedding_dim: Count,
        hidden_size: Count,
        num_layers: Count,
        head_size: Count,
        dropout: Dropout,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        sequence_length(input_shape, vocab_size, "bilstm")
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(
            embedding_dim,
            hidden_size,
            num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(2 * hidden_size, head_size), nn.ReLU(), nn.Linear(head_size, num_classes)
        )

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        found = token_inputs(inputs, "bilstm")
        ids, mask = found["input_ids"], found["attention_mask"]
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        return self.head(torch.cat([hidden[-2], hidden[-1]], dim=1))


# -- Kim 2014: TextCNN --------------------------------------------------------------------------------------
@checked
class TextCNN(nn.Module):
    """Kim (2014), "Convolutional Neural Networks for Sentence Classification": embeddings, one
    convolution per width in ``kernel_sizes`` with ``channels`` maps each, ReLU, max over time,
    dropout and a linear classifier (widths 3, 4, 5 with 100 maps and dropout 0.5 in the paper).
    The max runs over the windows inside the sequence only (a sequence shorter than a window gets
    one window, padded with zero vectors), so padding does not change a sample's logits."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        embedding_dim: Count,
        kernel_sizes: Sequence[Count],
        channels: Count,
        dropout: Dropout,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        sequence_length(input_shape, vocab_size, "textcnn")
        if not kernel_sizes:
            raise ConfigError("kernel_sizes=[] is not allowed: a list of window widths >= 1")
        self.kernel_sizes = [int(k) for k in kernel_sizes]
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, channels, k) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels * len(self.kernel_sizes), num_classes)

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        found = token_inputs(inputs, "textcnn")
        ids, mask = found["input_ids"], found["attention_mask"]
        embedded = self.embedding(ids) * mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        short = max(self.kernel_sizes) - ids.shape[1]
        if short > 0:
            embedded = nn.functional.pad(embedded, (0, 0, 0, short))
        x, lengths = embedded.transpose(1, 2), mask.sum(1, keepdim=True)
        pooled = []
        for width, conv in zip(self.kernel_sizes, self.convs):
            maps = torch.relu(conv(x))
            start = torch.arange(maps.shape[-1], device=maps.device).unsqueeze(0)
            inside = (start + width <= lengths) | (start == 0)
            pooled.append(maps.masked_fill(~inside.unsqueeze(1), float("-inf")).amax(dim=-1))
        return self.classifier(self.dropout(torch.cat(pooled, dim=1)))


# -- Hugging Face transformers -----------------------------------------------------------------------------
#: what ``hf_classifier``'s size settings set on a transformers config, by their standard names
SIZES = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
}


@checked
class HFClassifier(nn.Module):
    """``AutoModelForSequenceClassification``, returning its logits.

    ``pretrained: true`` loads the weights of ``name`` (a folder, the Hugging Face cache, or the
    Hub when it answers) with a fresh classifier of ``num_classes`` outputs. ``pretrained: false``
    builds the architecture from a config: ``name``'s when set, else ``model_type``'s defaults
    (``bert``: BERT-base), with the sizes set (null keeps the config's): ``num_layers``,
    ``hidden_size``, ``num_heads``, ``intermediate_size``; the vocabulary is the data's and the
    position embeddings cover ``max_length``. So a BERT-base-shaped teacher (12 layers, 768 wide,
    12 heads, 3072) and a TinyBERT-shaped student (4 layers, 312 wide, 12 heads, 1200) exist
    offline. The transformer is ``model`` (module paths ``model.bert.encoder.layer.3`` and so on).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        name: str | None,
        pretrained: bool,
        model_type: str,
        num_layers: Count | None,
        hidden_size: Count | None,
        num_heads: Count | None,
        intermediate_size: Count | None,
        dropout: Dropout,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        max_length = sequence_length(input_shape, vocab_size, "hf_classifier")
        require_extra(f"name={name}" if name else f"model_type={model_type}", "text")
        given = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_heads}
        given["intermediate_size"] = intermediate_size
        sizes = {key: value for key, value in given.items() if value is not None}
        if pretrained:
            if name is None:
                raise ConfigError("name=None is not allowed: pretrained: true loads the weights of a model by name")
            if sizes:
                raise ConfigError(
                    f"{next(iter(sizes))}={next(iter(sizes.values()))} is not allowed: null with pretrained: true "
                    "(the weights fix the sizes)"
                )
            self.model = _pretrained(name, num_classes)
            _check_fits(self.model.config, name, vocab_size, max_length)
        else:
            config = _config(name, model_type, num_classes, vocab_size, max_length, sizes, dropout)
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_config(config)
        accepted = inspect.signature(self.model.forward).parameters
        self.keys = tuple(key for key in TOKEN_KEYS if key in accepted)

    def forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        found = token_inputs(inputs, "hf_classifier")
        return self.model(**{key: found[key] for key in self.keys if key in found}).logits


def _config(
    name: str | None,
    model_type: str,
    num_classes: int,
    vocab_size: int,
    max_length: int,
    sizes: dict[str, int],
    dropout: float,
) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig

    if name is not None:
        config = _from_hub(name, "name", lambda **kw: AutoConfig.from_pretrained(name, **kw))
    elif model_type not in CONFIG_MAPPING:
        known = ", ".join(sorted(k for k in CONFIG_MAPPING if k in ("bert", "distilbert", "roberta", "albert")))
        raise ConfigError(f"model_type={model_type!r} is not allowed: a transformers model type ({known}, ...)")
    else:
        config = AutoConfig.for_model(model_type)
    for key, value in sizes.items():
        attribute = SIZES[key]
        if not hasattr(config, attribute):
            raise ConfigError(
                f"{key}={value} is not allowed: null for {config.model_type}, whose config has no {attribute}"
            )
        setattr(config, attribute, int(value))
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(
            f"num_heads={config.num_attention_heads} is not allowed: a divisor of hidden_size={config.hidden_size}"
        )
    for attribute in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(config, attribute) and isinstance(getattr(config, attribute), float):
            setattr(config, attribute, float(dropout))
    config.vocab_size, config.max_position_embeddings, config.num_labels = vocab_size, max_length, num_classes
    return config


def _pretrained(name: str, num_classes: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the notice that the new classifier is untrained: it is, on purpose
    try:
        return _from_hub(
            name,
            "name",
            lambda **kw: AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=num_classes, ignore_mismatched_sizes=True, **kw
            ),
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _from_hub(name: str, key: str, load: Any) -> Any:
    """``load()`` from a folder or the cache; from the Hub when it answers; one line otherwise."""
    try:
        return load(local_files_only=True)
    except (OSError, ValueError) as error:
        local = " ".join(str(error).split())[:200]
    if Path(name).exists():
        raise ConfigError(f"{key}={name!r} is not allowed: the folder holds no model ({local})")
    offline = hub_unreachable()
    if offline is not None:
        raise ConfigError(
            f"{key}={name!r} is not allowed: not a folder, not in the Hugging Face cache ({hub_cache()}) and not "
            f"downloadable: {offline}; fix: run once with network access to download it, or set {key} to a folder "
            "saved with save_pretrained"
        )
    try:
        return load()
    except (OSError, ValueError) as error:
        found = " ".join(str(error).split())[:200]
        raise ConfigError(f"{key}={name!r} is not allowed: not found on the Hugging Face Hub ({found})") from None


def _check_fits(config: Any, name: str, vocab_size: int, max_length: int) -> None:
    if vocab_size > config.vocab_size:
        raise ConfigError(
            f"name={name!r} is not allowed: its embeddings cover {config.vocab_size} tokens and the data's tokenizer "
            f"has {vocab_size}; tokenize with the model's own tokenizer (data.tokenizer={name})"
        )
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(
            f"name={name!r} is not allowed: it reads at most {positions} tokens and the data's max_length is "
            f"{max_length}; set data.max_length <= {positions}"
        )
