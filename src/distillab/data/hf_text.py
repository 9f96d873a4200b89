"""``data=hf_text``: a Hugging Face ``datasets`` dataset by name and subset (``glue``, ``sst2``).

The dataset is downloaded once (``datasets.load_dataset``) and saved into the data folder,
``<data_dir>/hf/<dataset>/<subset>`` (``DatasetDict.save_to_disk``); every later run reads that
folder and needs no network. When the folder is missing and the Hub cannot be reached, one line
names the dataset, the folder and the fix. The splits are the dataset's own, by name
(``train_split``, ``validation_split``, ``test_split``); one set to null is cut from the training
split, stratified. GLUE's test splits have no labels, so ``conf/data/hf_text.yaml`` tests on
``validation`` and cuts its validation split from ``train``. Class names come from the label
column's ``ClassLabel`` feature when it has one. Everything else (columns, tokenizer, cache,
batches) is ``TextDataModule``'s.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from filelock import FileLock

from distillab.data.tables import Table, file_digest
from distillab.data.text import TextDataModule, hub_unreachable
from distillab.settings import ConfigError, checked

log = logging.getLogger(__name__)


@checked
class HFTextDataModule(TextDataModule):
    """A Hugging Face dataset of labelled texts, kept in ``data_dir`` after one download."""

    def __init__(
        self,
        dataset: str,
        subset: str | None,
        data_dir: str,
        train_split: str,
        validation_split: str | None,
        test_split: str | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset, self.subset = dataset, subset
        self.folder = Path(data_dir) / "hf" / dataset.replace("/", "--") / (subset or "default")
        self.split_names = {"train": train_split, "val": validation_split, "test": test_split}
        self.name = f"{dataset}/{subset}" if subset else dataset
        self._loaded: Any = None
        self._class_names: list[str] | None = None

    def prepare_data(self) -> None:
        """Download the dataset into ``folder`` unless it is there."""
        if (self.folder / "dataset_dict.json").exists():
            return
        what = f"dataset={self.dataset!r}" + (f" (subset {self.subset!r})" if self.subset else "")
        offline = hub_unreachable()
        if offline is not None:
            raise ConfigError(
                f"{what} is not allowed: it is not in {self.folder} and cannot be downloaded: {offline}; fix: run "
                f"once with network access, or save it there with DatasetDict.save_to_disk"
            )
        import datasets

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder) + ".lock"):
            if (self.folder / "dataset_dict.json").exists():
                return
            try:
                loaded = datasets.load_dataset(self.dataset, self.subset, cache_dir=str(self.folder.parent / "cache"))
            except Exception as error:  # noqa: BLE001 - the libraries raise many kinds; one line says which
                message = " ".join(str(error).split())[:300]
                raise ConfigError(f"{what} is not allowed: {type(error).__name__}: {message}") from None
            loaded.save_to_disk(str(self.folder))
            log.info("data: %s downloaded into %s", self.name, self.folder)

    def _dataset(self) -> Any:
        if self._loaded is None:
            self.prepare_data()
            import datasets

            self._loaded = datasets.load_from_disk(str(self.folder))
        return self._loaded

    def tables(self) -> dict[str, Table | None]:
        loaded = self._dataset()
        found: dict[str, Table | None] = {}
        for split, name in self.split_names.items():
            if name is None:
                continue
            if name not in loaded:
                key = {"train": "train_split", "val": "validation_split", "test": "test_split"}[split]
                raise ConfigError(f"{key}={name!r} is not allowed: {self.name} has splits {', '.join(loaded)}")
            part = loaded[name]
            found[split] = Table(f"{self.name}[{name}]", {column: part[column] for column in part.column_names}, True)
            feature = part.features.get(self.label_column) if isinstance(self.label_column, str) else None
            if split == "train" and hasattr(feature, "names"):
                self._class_names = list(feature.names)
        return found

    def default_classes(self) -> list[str] | None:
        # a ClassLabel's integers index its names
        return None if self._class_names is None else [str(i) for i in range(len(self._class_names))]

    @property
    def class_names(self) -> list[str]:
        names = super().class_names
        if self._class_names is not None and names == [str(i) for i in range(len(self._class_names))]:
            return list(self._class_names)
        return names

    def source(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(self.folder)).encode())
            digest.update(file_digest(path).encode())
        return {"dataset": self.name, "splits": self.split_names, "files": digest.hexdigest()}
