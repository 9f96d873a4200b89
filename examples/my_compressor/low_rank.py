"""Low-rank factorisation of Linear layers by truncated SVD (Denton et al. 2014; Xue et al. 2013),
``compress=low_rank``.

Each Linear layer W (out × in) is replaced by two, W ≈ (U_r·√S_r)(√S_r·V_rᵀ), keeping the r =
⌈rank_fraction · min(out, in)⌉ largest singular values: r·(in + out) weights instead of in·out.
A layer whose factors would not be smaller stays as it is. The result is a smaller dense
model, really faster on large layers; the truncation error is then recovered by fine-tuning
with the run's distillation loss and the uncompressed model as teacher (``finetune_epochs``).

A compressor is a function ``(model, context, **settings) -> Compressed`` that returns a new
model; its settings are its typed keyword parameters, their values in ``conf/compress/low_rank.yaml``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from distillab.compress import Compressed, Context
from distillab.settings import ConfigError, Fraction, checked

FORMAT = "my_compressor.low_rank/1"


def factorise(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``layer`` as Linear(in → rank, no bias) then Linear(rank → out, the bias), by truncated SVD."""
    u, s, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    root = s[:rank].sqrt()
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(root[:, None] * vh[:rank])
        second.weight.copy_(u[:, :rank] * root)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def factorise_model(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace, in place, each Linear layer named in ``ranks`` by its factors of that rank."""
    for name, rank in ranks.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, factorise(getattr(owner, child), rank))


def choose_ranks(model: nn.Module, rank_fraction: float, keep_last: bool) -> dict[str, int]:
    """The rank of each Linear layer whose factors have fewer weights than the layer itself."""
    linear = [(name, layer) for name, layer in model.named_modules() if isinstance(layer, nn.Linear)]
    ranks = {}
    for name, layer in linear[:-1] if keep_last else linear:
        rank = max(1, math.ceil(rank_fraction * min(layer.in_features, layer.out_features)))
        if rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features:
            ranks[name] = rank
    return ranks


@checked
def low_rank(model: nn.Module, context: Context, *, rank_fraction: Fraction, keep_last: bool) -> Compressed:
    """Factorise the Linear layers of a copy of ``model`` to ``rank_fraction`` of their full rank;
    ``keep_last``: not the last one (the classifier: its rank bounds the classes its logits separate)."""
    ranks = choose_ranks(model, rank_fraction, keep_last)
    if not ranks:
        besides = " besides the classifier (keep_last)" if keep_last else ""
        raise ConfigError(
            f"rank_fraction={rank_fraction} is not allowed: no Linear layer of {type(model).__name__}"
            f"{besides} gets smaller at that rank"
        )
    factorised = copy.deepcopy(model)
    factorise_model(factorised, ranks)
    if context.finetune is not None:
        context.finetune(factorised, context.finetune_epochs)
    shapes = {
        name: [layer.in_features, layer.out_features, ranks[name]]
        for name, layer in model.named_modules()
        if name in ranks
    }
    return Compressed(
        model=factorised,
        method="low_rank",
        backend="torch.linalg.svd",
        save=lambda path: torch.save({"format": FORMAT, "ranks": ranks, "state_dict": factorised.state_dict()}, path),
        details={
            "rank_fraction": float(rank_fraction),
            "keep_last": keep_last,
            "layers": shapes,
            "params_before": sum(p.numel() for p in model.parameters()),
            "params_after": sum(p.numel() for p in factorised.parameters()),
        },
    )


def load(path: str | Path, model: nn.Module) -> nn.Module:
    """The factorised model saved at ``path``, rebuilt on ``model`` (the uncompressed architecture)."""
    artifact = torch.load(path, map_location="cpu", weights_only=True)
    factorise_model(model, artifact["ranks"])
    model.load_state_dict(artifact["state_dict"])
    return model
