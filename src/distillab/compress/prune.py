"""Pruning, by the paths the configs, sweeps and saved runs name (``distillab.compress.prune.structured``):
unstructured pruning lives in ``prune_unstructured``, structured pruning in ``prune_structured``.

The configs name the methods here because a run's config hash covers ``_target_``: runs made
before the two were separate modules keep their hash (a resumed sweep skips them, the report
merges their replicates).
"""

from distillab.compress.budget import PRUNABLE
from distillab.compress.prune_structured import load_structured, structured
from distillab.compress.prune_unstructured import cubic_sparsity, load_unstructured, unstructured

__all__ = ["PRUNABLE", "cubic_sparsity", "load_structured", "load_unstructured", "structured", "unstructured"]
