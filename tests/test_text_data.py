"""Text data (``data=text``, ``data=hf_text``): files in every layout, the split, tokenization and
its cache, dynamic padding, and every bad input as one line before any training."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distillab import build, conf
from distillab.data.base import stratified_split
from distillab.data.hf_text import HFTextDataModule
from distillab.data.text import TextDataModule, TextFileDataModule
from distillab.settings import ConfigError
from tests.conftest import CONF
from tests.fixtures_text import LABELS, pairs, reviews, write

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(option: str, tmp: Path, **overrides) -> dict:
    """The values of ``conf/data/<option>.yaml`` with the cache under ``tmp`` and ``overrides``."""
    values = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{option}.yaml"))
    values.pop("_target_")
    values.update(cache_dir=str(tmp / "tokenized"), vocab_size=300, max_length=24, batch_size=16)
    values.update(overrides)
    return values


def text(tmp: Path, **overrides) -> TextFileDataModule:
    data = TextFileDataModule(**settings("text", tmp, **overrides))
    data.setup()
    return data


def one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    rows = reviews(300)
    write(folder / "reviews.csv", rows)
    write(folder / "reviews.tsv", rows)
    write(folder / "reviews.jsonl", rows)
    write(folder / "train.tsv", reviews(200, seed=1))
    write(folder / "dev.tsv", reviews(40, seed=2))
    write(folder / "test.tsv", reviews(60, seed=3))
    write(folder / "pairs.csv", pairs(200))
    # CoLA's layout: no header; source, label, original label, sentence
    cola = [
        {"source": "gj04", "label": int(r["label"] == "positive"), "mark": "", "sentence": r["sentence"]} for r in rows
    ]
    write(folder / "cola.tsv", cola, header=False)
    return folder


# -- layouts -----------------------------------------------------------------------------------------
def test_csv_tsv_and_json_lines_of_the_same_rows_give_the_same_data(files, tmp_path):
    found = [text(tmp_path, train_path=str(files / f"reviews.{suffix}")) for suffix in ("csv", "tsv", "jsonl")]
    first = found[0]
    assert first.class_names == sorted(LABELS) and first.num_classes == 2
    assert first.input_shape == (24,) and first.vocab_size <= 300
    for other in found[1:]:
        for split in ("train", "val", "test"):
            assert torch.equal(other.splits[split][0], first.splits[split][0])
            assert torch.equal(other.splits[split][1], first.splits[split][1])


def test_one_file_is_split_stratified_with_a_fixed_seed(files, tmp_path):
    data = text(tmp_path, train_path=str(files / "reviews.csv"), val_fraction=0.1, test_fraction=0.2)
    sizes = data.split_sizes
    assert sum(sizes.values()) == 300 and abs(sizes["val"] - 30) <= 1 and abs(sizes["test"] - 60) <= 1
    for split in ("train", "val", "test"):
        counts = torch.bincount(data.splits[split][1], minlength=2)
        assert abs(counts[0] - counts[1]) <= 1  # the classes are balanced in the file, so in every split
    rows = {split: {tuple(row.flatten().tolist()) for row in x} for split, (x, _) in data.splits.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    again = text(tmp_path, train_path=str(files / "reviews.csv"), val_fraction=0.1, test_fraction=0.2)
    assert torch.equal(again.splits["test"][0], data.splits["test"][0])


def test_the_split_is_the_array_datasets_stratified_split():
    labels = torch.arange(300) % 3
    train, val, test = stratified_split(labels.numpy(), 0.1, 0.2, seed=0)
    assert sorted([*train, *val, *test]) == list(range(300))
    assert abs(len(val) - 30) <= 1 and abs(len(test) - 60) <= 1  # sklearn rounds the sizes
    assert max(torch.bincount(labels[test])) - min(torch.bincount(labels[test])) <= 1
    assert not set(stratified_split(labels.numpy(), 0.1, 0.2, seed=1)[2]) == set(test)
    only_val = stratified_split(labels.numpy(), 0.25, 0.0, seed=0)
    assert (len(only_val[0]), len(only_val[1]), len(only_val[2])) == (225, 75, 0)
    only_test = stratified_split(labels.numpy(), 0.0, 0.25, seed=0)
    assert (len(only_test[1]), len(only_test[2])) == (0, 75) and set(only_test[2]) == set(only_val[1])


def test_splits_from_files_are_used_as_given_and_a_missing_one_is_cut_from_train(files, tmp_path):
    given = text(
        tmp_path,
        train_path=str(files / "train.tsv"),
        validation_path=str(files / "dev.tsv"),
        test_path=str(files / "test.tsv"),
    )
    assert given.split_sizes == {"train": 200, "val": 40, "test": 60}
    cut = text(tmp_path, train_path=str(files / "train.tsv"), test_path=str(files / "test.tsv"), val_fraction=0.25)
    assert cut.split_sizes == {"train": 150, "val": 50, "test": 60}
    assert torch.equal(cut.splits["test"][1], given.splits["test"][1])


def test_glue_tsv_without_header_reads_columns_by_position(files, tmp_path):
    data = text(tmp_path, train_path=str(files / "cola.tsv"), header=False, text_column=3, label_column=1, classes=None)
    assert data.class_names == ["0", "1"] and data.split_sizes["train"] == 240
    named = text(tmp_path, train_path=str(files / "reviews.tsv"))
    # the same sentences and labels (positive = 1 in both), so the same tokens
    assert torch.equal(data.splits["train"][1], named.splits["train"][1])


def test_sentence_pairs_have_token_type_ids(files, tmp_path):
    data = text(tmp_path, train_path=str(files / "pairs.csv"), text_column="sentence1", text_pair_column="sentence2")
    inputs, targets, index = next(iter(data.train_dataloader()))
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    types, mask = inputs["token_type_ids"], inputs["attention_mask"]
    assert types.shape == mask.shape and set(types.unique().tolist()) == {0, 1}
    for row_types, row_mask in zip(types, mask):
        used = row_types[row_mask.bool()]
        first_one = int(used.argmax())
        assert used[0] == 0 and (used[first_one:] == 1).all() and (used[:first_one] == 0).all()
    assert data.class_names == ["different", "same"]


def test_classes_fix_the_order(files, tmp_path):
    paths = {"train_path": str(files / "train.tsv"), "validation_path": str(files / "dev.tsv")}
    paths["test_path"] = str(files / "test.tsv")
    data = text(tmp_path, classes=["positive", "negative"], **paths)
    sorted_order = text(tmp_path, **paths)
    assert data.class_names == ["positive", "negative"]
    assert torch.equal(data.splits["train"][1], 1 - sorted_order.splits["train"][1])


# -- batches ---------------------------------------------------------------------------------------------
def test_batches_are_padded_to_their_longest_sequence_and_cut_at_max_length(files, tmp_path):
    data = text(tmp_path, train_path=str(files / "reviews.csv"), max_length=6)
    assert data.splits["train"][0].shape[-1] == 6  # every review is longer than 6 tokens: all cut
    long = text(tmp_path, train_path=str(files / "reviews.csv"), max_length=64, batch_size=4)
    seen = 0
    for inputs, targets, index in long.train_dataloader():
        mask, ids = inputs["attention_mask"], inputs["input_ids"]
        assert ids.dtype == torch.long and ids.shape == mask.shape
        lengths = mask.sum(1)
        assert ids.shape[1] == int(lengths.max())  # dynamic padding: the batch's longest, no more
        for row, length in zip(ids, lengths):
            assert (row[length:] == 0).all()  # [PAD] after the text
        assert torch.equal(targets, long.splits["train"][1][index])  # index: the position in the split
        seen += len(index)
    assert seen == long.split_sizes["train"]
    assert long.splits["train"][0].shape[-1] < 64


def test_the_training_order_follows_the_shuffle_seed(files, tmp_path):
    data = text(tmp_path, train_path=str(files / "reviews.csv"))
    first = [index for _, _, index in data.train_dataloader()]
    data.shuffle_seed = 1
    other = [index for _, _, index in data.train_dataloader()]
    assert torch.equal(torch.cat(first).sort().values, torch.cat(other).sort().values)
    assert not torch.equal(torch.cat(first), torch.cat(other))


# -- tokenizers and the cache ------------------------------------------------------------------------------
def test_tokens_are_computed_once_and_read_from_the_cache(files, tmp_path, monkeypatch):
    first = text(tmp_path, train_path=str(files / "reviews.csv"))
    assert first.cache == "miss"

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(TextDataModule, "_tokenize", refuse)
    second = text(tmp_path, train_path=str(files / "reviews.csv"))
    assert second.cache == "hit" and second.vocab_size == first.vocab_size
    for split in ("train", "val", "test"):
        assert torch.equal(second.splits[split][0], first.splits[split][0])
    monkeypatch.undo()
    # another max_length, tokenizer or file content is another entry
    assert text(tmp_path, train_path=str(files / "reviews.csv"), max_length=12).cache == "miss"
    assert text(tmp_path, train_path=str(files / "reviews.csv"), tokenizer="wordpiece").cache == "miss"
    changed = write(tmp_path / "reviews.csv", reviews(300, seed=7))
    assert text(tmp_path, train_path=str(changed)).cache == "miss"


def test_bpe_and_wordpiece_are_trained_on_the_training_split_only(files, tmp_path):
    for kind in ("wordpiece", "bpe"):
        data = text(
            tmp_path,
            train_path=str(files / "train.tsv"),
            test_path=str(files / "test.tsv"),
            tokenizer=kind,
            vocab_size=60,
        )
        assert data.vocab_size <= 60
        for split in ("train", "val", "test"):
            assert int(data.splits[split][0][:, 0].max()) < data.vocab_size
    big = text(tmp_path, train_path=str(files / "train.tsv"), vocab_size=5000)
    assert big.vocab_size < 5000  # no more tokens than the training text has


def test_a_fresh_cache_gives_the_same_bpe_ids(files, tmp_path):
    first = text(tmp_path / "one", train_path=str(files / "reviews.csv"), tokenizer="bpe")
    second = text(tmp_path / "two", train_path=str(files / "reviews.csv"), tokenizer="bpe")
    assert first.cache == second.cache == "miss"
    assert torch.equal(first.splits["train"][0], second.splits["train"][0])


def saved_tokenizer(files: Path, folder: Path) -> Path:
    """A trained WordPiece tokenizer saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines = [line.split(",")[0] for line in (files / "reviews.csv").read_text().splitlines()[1:]]
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(vocab_size=100, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    fast.save_pretrained(folder)
    return folder


def test_a_pretrained_tokenizer_from_a_folder(files, tmp_path):
    folder = saved_tokenizer(files, tmp_path / "tok")
    data = text(tmp_path, train_path=str(files / "reviews.csv"), tokenizer=str(folder))
    from transformers import AutoTokenizer

    assert data.vocab_size == len(AutoTokenizer.from_pretrained(folder))
    inputs, _, _ = next(iter(data.train_dataloader()))
    assert int(inputs["input_ids"].max()) < data.vocab_size
    assert data.cache == "miss"
    assert text(tmp_path, train_path=str(files / "reviews.csv"), tokenizer=str(folder)).cache == "hit"


def test_a_tokenizer_neither_cached_nor_downloadable_is_one_line_and_fast(files, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(files / "reviews.csv"), tokenizer="distillab-tests/no-such-tokenizer")
    assert time.monotonic() - start < 30
    message = one_line(error, "tokenizer='distillab-tests/no-such-tokenizer'")
    # no network here: not downloadable, with the cache and the fix; with one: not on the Hub
    assert ("cannot be reached" in message and "fix:" in message) or "not found on the Hugging Face Hub" in message


# -- hf_text ------------------------------------------------------------------------------------------------
def hf_settings(tmp: Path, **overrides) -> dict:
    return settings("hf_text", tmp, data_dir=str(tmp / "data"), **overrides)


def test_a_hub_dataset_that_cannot_be_downloaded_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    data = HFTextDataModule(**hf_settings(tmp_path, dataset="distillab-tests/no-such-dataset", subset="sst2"))
    with pytest.raises(ConfigError) as error:
        data.setup()
    assert time.monotonic() - start < 30
    folder = str(tmp_path / "data" / "hf" / "distillab-tests--no-such-dataset" / "sst2")
    message = one_line(error, "dataset='distillab-tests/no-such-dataset'")
    # no network here: the folder and the fix; with one, the Hub's own answer that there is no such dataset
    assert (folder in message and "fix:" in message) or "Error" in message


def test_a_dataset_in_the_data_folder_is_read_offline_with_its_class_names(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = reviews(240)
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def split(part):
        return datasets.Dataset.from_dict(
            {"sentence": [r["sentence"] for r in part], "label": [LABELS.index(r["label"]) for r in part]},
            features=features,
        )

    folder = tmp_path / "data" / "hf" / "glue" / "sst2"
    datasets.DatasetDict({"train": split(rows[:200]), "validation": split(rows[200:])}).save_to_disk(str(folder))
    data = HFTextDataModule(**hf_settings(tmp_path))
    data.setup()
    assert data.name == "glue/sst2" and data.class_names == ["neg", "pos"]
    assert data.split_sizes == {"train": 180, "val": 20, "test": 40}
    files_version = text(tmp_path, train_path=str(write(tmp_path / "sst.csv", rows[:200])), val_fraction=0.1)
    assert data.vocab_size == files_version.vocab_size  # the same training text, the same tokenizer
    with pytest.raises(ConfigError) as error:
        HFTextDataModule(**hf_settings(tmp_path, test_split="test")).setup()
    one_line(error, "test_split='test' is not allowed", "train, validation")


# -- bad input: one line each -------------------------------------------------------------------------
def test_a_missing_text_or_label_column_is_one_line_listing_the_columns(files, tmp_path):
    for key in ("text_column", "label_column"):
        with pytest.raises(ConfigError) as error:
            text(tmp_path, train_path=str(files / "reviews.csv"), **{key: "review"})
        one_line(error, f"{key}='review' is not allowed", "reviews.csv has no such column", "sentence, label")
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(files / "cola.tsv"), header=False, text_column="sentence", label_column=1)
    one_line(error, "text_column='sentence'", "by position", "0, 1, 2, 3")


@pytest.mark.parametrize(
    ("label", "shown"),
    [("0.5", "label '0.5'"), ("", "no label"), ("-1", "label '-1'"), ("nan", "label 'nan'")],
)
def test_labels_that_are_not_classes_are_one_line(label, shown, tmp_path):
    rows = reviews(60)
    rows[7]["label"] = label
    path = write(tmp_path / "bad.csv", rows)
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(path))
    one_line(error, "label_column='label' is not allowed", "bad.csv row 8", shown, "not a class")


def test_labels_outside_the_classes_are_one_line(files, tmp_path):
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(files / "reviews.csv"), classes=["negative", "neutral"])
    one_line(error, "row 2 has label 'positive'", "not one of the classes (negative, neutral)")
    test_rows = reviews(40, seed=4)
    test_rows[3]["label"] = "neutral"
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(files / "train.tsv"), test_path=str(write(tmp_path / "t.tsv", test_rows)))
    one_line(error, "t.tsv row 4 has label 'neutral'")
    single = [r for r in reviews(60) if r["label"] == "positive"]
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(write(tmp_path / "one.csv", single)))
    one_line(error, "the training split has 1 class (positive)", "two or more")


def test_an_empty_text_is_one_line(tmp_path):
    rows = reviews(60)
    rows[4]["sentence"] = "   "
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(write(tmp_path / "empty.jsonl", rows)))
    one_line(error, "text_column='sentence' is not allowed", "empty.jsonl row 5 has an empty text")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 1}, "max_length=1 is not allowed: a token count >= 2"),
        ({"train_path": None}, "train_path=None is not allowed: a CSV, TSV or JSON-lines file"),
        ({"train_path": "no/such/file.csv"}, "train_path='no/such/file.csv' is not allowed: no such file"),
        ({"format": "xml"}, "format='xml' is not allowed: one of auto, csv, tsv, jsonl"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction=0.6 is not allowed: val_fraction + test_fraction"),
        ({"tokenizer": "wordpiece", "vocab_size": 0}, "vocab_size=0 is not allowed: an integer >= 1"),
    ],
)
def test_bad_settings_are_one_line_when_the_datamodule_is_built(files, tmp_path, overrides, message):
    values = {"train_path": str(files / "reviews.csv"), **overrides}
    with pytest.raises(ConfigError) as error:
        TextFileDataModule(**settings("text", tmp_path, **values))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_file_whose_suffix_names_no_format_is_one_line(files, tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text((files / "reviews.csv").read_text())
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(path))
    one_line(error, "format='auto' is not allowed", "reviews.txt", "csv, tsv or jsonl")
    assert text(tmp_path, train_path=str(path), format="csv").split_sizes["train"] == 240


def test_the_yaml_builds_through_the_run_with_key_prefixed_errors(files, tmp_path):
    node = conf.load("data", "text")
    node.merge_with({"train_path": str(files / "reviews.csv"), "cache_dir": str(tmp_path), "max_length": 1})
    with pytest.raises(ConfigError) as error:
        build.part("data", node)
    assert str(error.value).startswith("data.max_length=1 is not allowed")
    node.merge_with({"max_length": 16})
    data = build.part("data", node)
    assert isinstance(data, TextFileDataModule) and data.input_shape == (16,)


def test_the_text_extra_missing_is_one_line_with_the_install_command(files, tmp_path, monkeypatch):
    found = importlib.util.find_spec

    def without_transformers(name, *args):
        return None if name == "transformers" else found(name, *args)

    monkeypatch.setattr("importlib.util.find_spec", without_transformers)
    with pytest.raises(ConfigError) as error:
        TextFileDataModule(**settings("text", tmp_path, train_path=str(files / "reviews.csv")))
    one_line(error, "needs the text extra (transformers missing)", 'pip install -e ".[text]"')


def test_a_class_too_small_to_cut_a_stratified_split_is_one_line(tmp_path):
    rows = [{"sentence": "a good film", "label": "pos"}, {"sentence": "a bad film", "label": "neg"}] * 2
    rows.append({"sentence": "an odd film", "label": "odd"})
    with pytest.raises(ConfigError) as error:
        text(tmp_path, train_path=str(write(tmp_path / "tiny.csv", rows)))
    one_line(error, "val_fraction=0.1 is not allowed: the training split cannot be cut stratified")
