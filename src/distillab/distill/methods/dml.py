"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018), ``distill=dml``: a cohort of
``peers`` models, none pre-trained, trained together; each learns from the labels and from the
others' current predictions:

    L_k = CE(y, z_k) + kl_weight · T² · 1/(K − 1) · Σ_{l ≠ k} KL( softmax(z_l / T) ‖ softmax(z_k / T) )

with the other peers' probabilities taken as constants in L_k (each peer is pulled towards the
others, never the others towards it through its own loss). The paper updates the peers one
after another within a step; here all peers' losses are summed and take one optimizer step on
the same batch, with each peer's targets detached, which is the same gradient for each peer
given the step's predictions. Peer 0 has the student's architecture and is the model kept as
the student; the others have ``peer_arch``: the student's architecture again, or the teacher's
(trained from scratch, as in the paper's mixed cohorts).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distillab.distill.methods.kd import KD
from distillab.labels import labelled_cross_entropy
from distillab.settings import Range, Temperature, Weight, checked

#: the size of the cohort
Peers = Annotated[int, Range(2, what="a number of models", note="the cohort, the student included")]


def mutual_terms(logits: list[Tensor], targets: Tensor, temperature: float, kl_weight: float) -> dict[str, Tensor]:
    """``ce<k>`` and ``kl<k>`` (weighted, T² included) of every peer k, and their sum ``loss``."""
    log_probs = [F.log_softmax(z / temperature, dim=1) for z in logits]
    fixed = [lp.detach() for lp in log_probs]  # a peer's targets: the others' predictions, as constants
    terms: dict[str, Tensor] = {}
    others = len(logits) - 1
    for k, z in enumerate(logits):
        kl = sum((fixed[j].exp() * (fixed[j] - log_probs[k])).sum(dim=1).mean() for j in range(len(logits)) if j != k)
        terms[f"ce{k}"] = labelled_cross_entropy(z, targets)
        terms[f"kl{k}"] = kl_weight * temperature**2 * kl / others
    terms["loss"] = sum(terms.values())
    return terms


@checked
class DeepMutualLearning(nn.Module):
    """DML over ``peers`` models; logs ``ce<k>`` and ``kl<k>`` per peer (peer 0: the student)."""

    cotrains = True
    needs_teacher = False

    def __init__(
        self, peers: Peers, peer_arch: Literal["student", "teacher"], temperature: Temperature, kl_weight: Weight
    ) -> None:
        super().__init__()
        self.peers, self.peer_arch = int(peers), str(peer_arch)
        self.temperature, self.kl_weight = float(temperature), float(kl_weight)
        self.peer_roles = ["student"] + [self.peer_arch] * (self.peers - 1)

    def forward(self, logits: list[Tensor], targets: Tensor) -> dict[str, Tensor]:
        return mutual_terms(list(logits), targets, self.temperature, self.kl_weight)

    def finetune_method(self) -> nn.Module:
        """KD from the uncompressed student as the one fixed peer: CE + w·T²·KL is (1 + w) times
        the Hinton loss with λ = w / (1 + w)."""
        return KD(lam=self.kl_weight / (1 + self.kl_weight), temperature=self.temperature, standardize=False)

    def extra_repr(self) -> str:
        return f"peers={self.peers}, peer_arch={self.peer_arch}, T={self.temperature}, kl_weight={self.kl_weight}"
