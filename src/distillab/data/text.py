"""Text classification data: labelled sentences (or sentence pairs) as token ids, held in memory.

``TextFileDataModule`` (``data=text``) reads CSV, TSV or JSON-lines files with a text column (or
two, for sentence pairs) and a label column; GLUE's TSV files read as they are (tab-separated,
no quoting; CoLA's have no header: ``header: false`` and columns by position). The splits come
from files (``train_path``, ``validation_path``, ``test_path``); a split without a file is cut
from the training file by a fixed-seed stratified split (``val_fraction``, ``test_fraction``),
as the array datasets do (``data.base.stratified_split``). ``data.hf_text`` reads a Hugging Face
``datasets`` dataset the same way.

Tokenization: ``tokenizer`` is ``bpe`` or ``wordpiece`` (a tokenizer of ``vocab_size`` tokens
trained on the training split with the ``tokenizers`` library, so everything works offline; BPE
training gives the same tokens every time, WordPiece training breaks ties between equally frequent
merges differently in each process, so only its cached ids are reproducible) or
a pretrained tokenizer by name or folder (``transformers.AutoTokenizer``: a local folder or the
Hugging Face cache, downloaded once when the Hub can be reached). Sequences are cut to
``max_length`` tokens, special tokens included. The token ids of every split are computed once
per dataset and tokenizer and kept under ``cache_dir``, keyed by the content hash of the data
files and the tokenizer's identity (its name or training settings and a hash of its vocabulary);
a second datamodule on the same files loads them (``cache == "hit"``).

Batches are ``(inputs, targets, index)``: ``inputs`` a dict of int64 tensors ``input_ids``,
``attention_mask`` and, for pairs, ``token_type_ids``, padded to the longest sequence of the
batch (dynamic padding, on the right); ``index`` the samples' positions in their split. The split
tensors (``splits[name][0]``) hold the three rows of each sample padded to the longest sequence
of the dataset, shape ``(N, len(keys), length)``; ``unpack`` turns rows into a batch dict.

What a model needs from the data: ``input_shape`` is ``(max_length,)`` (the longest sequence a
model receives, for position embeddings and measurement), ``num_classes`` and ``vocab_size``
(the tokenizer's; ids are below it), besides ``name`` and ``describe()``.

Needs the text extra: ``pip install -e ".[text]"``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from distillab.data.base import InMemoryDataModule, TensorBatches, stratified_split
from distillab.data.tables import Column, Table, file_digest, file_format, label_value, read_table, sort_key
from distillab.formats import require_extra
from distillab.io import atomic_save
from distillab.settings import ConfigError, Count, Fraction, Range, checked

log = logging.getLogger(__name__)

#: the most tokens of a sequence, special tokens included
MaxLength = Annotated[int, Range(2, what="a token count", note="special tokens included: [CLS] and [SEP] take 2")]
#: tokenizers trained on the training split
TRAINED = ("wordpiece", "bpe")
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: the rows of a sample in the split tensors, in order; pairs add token_type_ids
KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: bump when the cached tensors change meaning
CACHE_VERSION = 1
#: seconds to wait for the Hub before saying it cannot be reached (the libraries retry for a minute)
HUB_TIMEOUT_S = 3.0


# -- the Hugging Face Hub, offline first ----------------------------------------------------------
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (one clause), or None when it answers.

    Asked before a library downloads anything: without a network the libraries retry for about
    a minute before they fail, this answers in at most ``HUB_TIMEOUT_S``."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_TIMEOUT_S).close()
    except OSError as error:
        return f"{host} cannot be reached ({error.strerror or error})"
    return None


def hub_cache() -> str:
    """The folder the Hugging Face libraries keep downloaded models and tokenizers in."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:300]


def pretrained_tokenizer(name: str) -> Any:
    """``AutoTokenizer`` ``name``: a folder, the Hugging Face cache, or the Hub when it answers."""
    require_extra(f"tokenizer={name}", "text")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        local = error
    if Path(name).exists():
        raise ConfigError(f"tokenizer={name!r} is not allowed: the folder holds no tokenizer ({_one_line(local)})")
    offline = hub_unreachable()
    if offline is not None:
        raise ConfigError(
            f"tokenizer={name!r} is not allowed: not a folder, not in the Hugging Face cache ({hub_cache()}) and "
            f"not downloadable: {offline}; fix: run once with network access to download it, set tokenizer to a "
            f"folder saved with save_pretrained, or train one offline with tokenizer=wordpiece or bpe"
        )
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"tokenizer={name!r} is not allowed: no such tokenizer on the Hugging Face Hub ({_one_line(error)})"
        ) from None


# -- the datamodules -------------------------------------------------------------------------------------
class TokenBatches(TensorBatches):
    """``TensorBatches`` whose inputs are token rows: each batch's become a dict of tensors padded to
    the batch's longest sequence (``unpack``)."""

    def __init__(self, x: Tensor, y: Tensor, keys: Sequence[str], **kwargs: Any) -> None:
        super().__init__(x, y, **kwargs)
        self.keys = tuple(keys)

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:  # type: ignore[override]
        for x, y, index in super().__iter__():
            yield unpack(x, self.keys), y, index


def unpack(rows: Tensor, keys: Sequence[str]) -> dict[str, Tensor]:
    """Token rows ``(N, len(keys), length)`` as a batch dict, padded to the longest sequence in it."""
    longest = max(int(rows[:, 1].sum(1).max()) if len(rows) else 1, 1)
    return {key: rows[:, i, :longest].contiguous() for i, key in enumerate(keys)}


@checked
class TextDataModule(InMemoryDataModule):
    """The text datamodules' common part: labels to classes, the split, tokenization and its cache,
    and batches of token dicts. A subclass implements ``tables()`` (the labelled rows of each split)
    and ``source()`` (what identifies its data in the cache key).

    ``classes`` fixes the classes and their order (labels written as in the files; numbers as text);
    null takes the training split's labels, sorted. Settings of the tokenizer: ``tokenizer``,
    ``vocab_size`` and ``lowercase`` (for a trained one; a pretrained one has its own)."""

    name = "text"

    def __init__(
        self,
        text_column: Column,
        text_pair_column: Column | None,
        label_column: Column,
        classes: Sequence[str | int] | None,
        tokenizer: str,
        vocab_size: Count,
        lowercase: bool,
        max_length: MaxLength,
        val_fraction: Fraction,
        test_fraction: Fraction,
        cache_dir: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"val_fraction={val_fraction!r} is not allowed: val_fraction + test_fraction must be < 1 "
                f"(now {val_fraction + test_fraction:g})"
            )
        require_extra(f"tokenizer={tokenizer}", "text")
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.classes = None if classes is None else [str(c) for c in classes]
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes={self.classes!r} is not allowed: a list of distinct labels")
        self.tokenizer, self.vocab_size_wanted, self.lowercase = str(tokenizer), int(vocab_size), bool(lowercase)
        self.max_length = int(max_length)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.cache_dir = Path(cache_dir)
        self.keys: tuple[str, ...] = KEYS[:3] if text_pair_column is not None else KEYS[:2]
        self.cache: str | None = None  # "hit" or "miss" once set up
        self._meta: dict[str, Any] = {}
        self._pretrained: Any = None  # a pretrained tokenizer, once loaded

    # what a subclass provides
    @abc.abstractmethod
    def tables(self) -> dict[str, Table | None]:
        """``{"train"|"val"|"test": Table}``; None for a split cut from the training table."""

    @abc.abstractmethod
    def source(self) -> dict[str, Any]:
        """What identifies the data (content hashes), for the cache key."""

    def default_classes(self) -> list[str] | None:
        """The classes in the data's own order when it declares them (a dataset's class names)."""
        return None

    # what the run reads
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self._meta["classes"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: every token id is below it."""
        self.setup()
        return int(self._meta["vocab_size"])

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return list(self._meta["classes"])

    def _batches(self, split: str, shuffle: bool, batch_size: int) -> TokenBatches:
        plain = super()._batches(split, shuffle, batch_size)
        return TokenBatches(
            plain.x,
            plain.y,
            self.keys,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=plain.seed,
            rank=plain.rank,
            world_size=plain.world_size,
        )

    def describe(self) -> str:
        lengths = {name: int(x[:, 1].sum(1).float().mean()) for name, (x, _) in self.splits.items() if len(x)}
        return (
            super().describe()
            + f"; tokenizer {self.tokenizer} ({self.vocab_size} tokens), max_length {self.max_length}, "
            f"mean train length {lengths.get('train', 0)}; tokens cache {self.cache}"
        )

    # building the splits
    def make_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        tables = self.tables()
        texts, labels = self._columns(tables)
        classes = self._classes(labels)
        targets = {name: self._targets(tables[name].source, values, classes) for name, values in labels.items()}
        rows = self._assign(texts, targets)
        identity = self._tokenizer_identity()
        key = self._cache_key(identity, classes)
        path = self.cache_dir / f"{key}.pt"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                stored = torch.load(path, weights_only=True)
                self.cache = "hit"
                log.info("data: token ids of %s read from %s", self.name, path)
            else:
                stored = self._tokenize(rows, classes)
                atomic_save(path, lambda handle: torch.save(stored, handle))
                self.cache = "miss"
                log.info("data: %s tokenized once, kept in %s", self.name, path)
        self._meta = {"classes": stored["classes"], "vocab_size": stored["vocab_size"]}
        return {name: (stored["inputs"][name], stored["targets"][name]) for name in ("train", "val", "test")}

    def _columns(self, tables: dict[str, Table | None]) -> tuple[dict[str, list], dict[str, list]]:
        """The texts (a list per text column) and raw labels of each table, checked."""
        texts: dict[str, list] = {}
        labels: dict[str, list] = {}
        columns = [("text_column", self.text_column)]
        if self.text_pair_column is not None:
            columns.append(("text_pair_column", self.text_pair_column))
        for name, table in tables.items():
            if table is None:
                continue
            found = []
            for key, column in columns:
                values = table.column(key, column)
                for number, value in enumerate(values, 1):
                    if not isinstance(value, str) or not value.strip():
                        raise ConfigError(
                            f"{key}={column!r} is not allowed: {table.source} row {number} has an empty text "
                            f"({value!r}); every row needs one"
                        )
                found.append(values)
            texts[name] = found
            labels[name] = table.column("label_column", self.label_column)
        return texts, labels

    def _classes(self, labels: dict[str, list]) -> list[str]:
        classes = self.classes or self.default_classes()
        if classes is not None:
            return list(classes)
        seen = {label_value(value) for value in labels["train"]} - {None}
        found = sorted(seen, key=sort_key)
        if len(found) < 2:
            raise ConfigError(
                f"label_column={self.label_column!r} is not allowed: the training split has {len(found)} class"
                f"{'' if len(found) == 1 else 'es'} ({', '.join(map(str, found))}); a classifier needs two or more"
            )
        return [str(c) for c in found]

    def _targets(self, source: str, values: list, classes: list[str]) -> Tensor:
        index = {name: i for i, name in enumerate(classes)}
        targets = []
        for number, value in enumerate(values, 1):
            label = label_value(value)
            if label is None or (isinstance(label, int) and label < 0):
                what = "no label" if value is None or value == "" else f"label {value!r}"
                raise ConfigError(
                    f"label_column={self.label_column!r} is not allowed: {source} row {number} has {what}, not a "
                    "class (an integer >= 0 or a string; unlabelled rows, as in GLUE's test files, and regression "
                    "targets cannot train a classifier)"
                )
            if str(label) not in index:
                raise ConfigError(
                    f"label_column={self.label_column!r} is not allowed: {source} row {number} has label "
                    f"{value!r}, which is not one of the classes ({', '.join(classes)})"
                )
            targets.append(index[str(label)])
        return torch.tensor(targets, dtype=torch.long)

    def _assign(self, texts: dict[str, list], targets: dict[str, Tensor]) -> dict[str, tuple[list, Tensor]]:
        """The three splits' texts and targets: those without a table cut from the training one."""
        cut = {"val": self.val_fraction if "val" not in targets else 0.0}
        cut["test"] = self.test_fraction if "test" not in targets else 0.0
        try:
            train_idx, val_idx, test_idx = stratified_split(
                targets["train"].numpy(), cut["val"], cut["test"], self.split_seed
            )
        except ValueError as error:  # too few samples of a class to cut a stratified share
            key = "val_fraction" if cut["val"] else "test_fraction"
            raise ConfigError(
                f"{key}={cut['val'] or cut['test']!r} is not allowed: the training split cannot be cut stratified "
                f"({' '.join(str(error).split())})"
            ) from None
        rows = {}
        for name, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
            if name in targets and name != "train":
                rows[name] = (texts[name], targets[name])
            else:
                idx = np.sort(idx)
                rows[name] = ([[column[i] for i in idx] for column in texts["train"]], targets["train"][idx])
        return rows

    # tokenization
    def _tokenizer_identity(self) -> dict[str, Any]:
        if self.tokenizer in TRAINED:
            # trained on the training split, which the source, the columns and the split settings fix
            return {"trained": self.tokenizer, "vocab_size": self.vocab_size_wanted, "lowercase": self.lowercase}
        loaded = pretrained_tokenizer(self.tokenizer)
        self._pretrained = loaded
        backend = getattr(loaded, "backend_tokenizer", None)
        vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(loaded.get_vocab().items()))
        return {
            "pretrained": self.tokenizer,
            "class": type(loaded).__name__,
            "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest(),
        }

    def _cache_key(self, identity: dict[str, Any], classes: list[str]) -> str:
        blob = json.dumps(
            {
                "version": CACHE_VERSION,
                "source": self.source(),
                "columns": [self.text_column, self.text_pair_column, self.label_column],
                "classes": classes,
                "tokenizer": identity,
                "max_length": self.max_length,
                "split": [self.val_fraction, self.test_fraction, self.split_seed],
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _tokenize(self, rows: dict[str, tuple[list, Tensor]], classes: list[str]) -> dict[str, Any]:
        """Token rows of every split, and what a model needs to know of the tokenizer."""
        if self.tokenizer in TRAINED:
            encode, vocab_size, pad_id = self._trained(rows["train"][0])
        else:
            encode, vocab_size, pad_id = self._from_pretrained()
        inputs = {name: pack(encode(texts), len(self.keys), pad_id) for name, (texts, _) in rows.items()}
        return {
            "inputs": inputs,
            "targets": {name: targets for name, (_, targets) in rows.items()},
            "classes": classes,
            "vocab_size": int(vocab_size),
        }

    def _trained(self, train_texts: list[list[str]]) -> tuple[Any, int, int]:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        if self.tokenizer == "wordpiece":
            tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            trainer = trainers.WordPieceTrainer(
                vocab_size=self.vocab_size_wanted, special_tokens=SPECIAL_TOKENS, show_progress=False
            )
            tok.decoder = decoders.WordPiece()
        else:
            tok = Tokenizer(models.BPE(unk_token="[UNK]"))
            trainer = trainers.BpeTrainer(
                vocab_size=self.vocab_size_wanted, special_tokens=SPECIAL_TOKENS, show_progress=False
            )
        steps = [normalizers.NFD(), normalizers.StripAccents()]
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Lowercase()] if self.lowercase else steps)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator((text for column in train_texts for text in column), trainer=trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        tok.enable_truncation(self.max_length)

        def encode(texts: list[list[str]]) -> list[tuple[list[int], list[int]]]:
            items = list(zip(*texts)) if len(texts) == 2 else texts[0]
            return [(e.ids, e.type_ids) for e in tok.encode_batch(items)]

        return encode, tok.get_vocab_size(), tok.token_to_id("[PAD]")

    def _from_pretrained(self) -> tuple[Any, int, int]:
        tok = self._pretrained or pretrained_tokenizer(self.tokenizer)

        def encode(texts: list[list[str]]) -> list[tuple[list[int], list[int]]]:
            pairs = texts[1] if len(texts) == 2 else None
            found = tok(texts[0], pairs, truncation=True, max_length=self.max_length, return_token_type_ids=True)
            types = found.get("token_type_ids") or [[0] * len(ids) for ids in found["input_ids"]]
            return list(zip(found["input_ids"], types))

        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return encode, len(tok), int(pad)


def pack(encoded: list[tuple[list[int], list[int]]], rows: int, pad_id: int) -> Tensor:
    """Encoded sequences as token rows ``(N, rows, longest)``: ids (padded with ``pad_id``), the
    attention mask and, with 3 rows, the token type ids."""
    longest = max((len(ids) for ids, _ in encoded), default=1)
    out = torch.zeros(len(encoded), rows, longest, dtype=torch.long)
    out[:, 0] = pad_id
    for i, (ids, types) in enumerate(encoded):
        out[i, 0, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        out[i, 1, : len(ids)] = 1
        if rows == 3:
            out[i, 2, : len(types)] = torch.tensor(types, dtype=torch.long)
    return out


@checked
class TextFileDataModule(TextDataModule):
    """``data=text``: CSV, TSV or JSON-lines files (``format: auto`` goes by the suffix: .csv, .tsv,
    .jsonl/.json/.ndjson). ``header: false`` reads CSV/TSV files whose first row is data (columns by
    position from 0). Paths are relative to the folder the run starts in."""

    def __init__(
        self,
        train_path: str | None,
        validation_path: str | None,
        test_path: str | None,
        format: Literal["auto", "csv", "tsv", "jsonl"],
        header: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if train_path is None:
            raise ConfigError(
                "train_path=None is not allowed: a CSV, TSV or JSON-lines file of labelled texts (set data.train_path)"
            )
        self.paths: dict[str, Path] = {}
        for key, split, path in (
            ("train_path", "train", train_path),
            ("validation_path", "val", validation_path),
            ("test_path", "test", test_path),
        ):
            if path is None:
                continue
            found = Path(path).expanduser()
            if not found.is_file():
                raise ConfigError(f"{key}={path!r} is not allowed: no such file (from {Path.cwd()})")
            file_format(found, format)  # a suffix that names no format is refused now
            self.paths[split] = found
        self.format, self.header = format, bool(header)
        self.name = f"text:{self.paths['train'].stem}"

    def tables(self) -> dict[str, Table | None]:
        found: dict[str, Table | None] = {}
        for split, path in self.paths.items():
            found[split] = read_table(path, file_format(path, self.format), self.header)
        return found

    def source(self) -> dict[str, Any]:
        return {
            split: [file_digest(path), file_format(path, self.format), self.header]
            for split, path in self.paths.items()
        }
