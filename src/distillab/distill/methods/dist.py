"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"),
``distill=dist``, a logit method:

    loss = ce_weight·CE(y, s) + T²·(beta·inter + gamma·intra)

with p = softmax(z/T) for the student's and the teacher's logits: the inter-class relation
inter = 1 − mean over samples i of Pearson(p_s[i, :], p_t[i, :]) (each sample's distribution over
the classes) and the intra-class relation intra = 1 − mean over classes c of
Pearson(p_s[:, c], p_t[:, c]) (each class's probabilities across the batch). Matching correlations
rather than the probabilities themselves leaves the student free of the teacher's exact scale and
offset, which the paper argues helps when the teacher is much stronger.
"""

from __future__ import annotations

from torch import Tensor, nn

from distillab.labels import labelled_cross_entropy
from distillab.settings import Temperature, Weight, checked

#: added to the product of the norms of the centred vectors in the Pearson correlation
PEARSON_EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = PEARSON_EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: the cosine of the
    rows centred on their means, Σ a'b' / (‖a'‖·‖b'‖ + eps). A constant row gives 0."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """1 − the mean over samples of the Pearson correlation of their class distributions."""
    return 1.0 - pearson_rows(p_student, p_teacher).mean()


def intra_class_relation(p_student: Tensor, p_teacher: Tensor) -> Tensor:
    """1 − the mean over classes of the Pearson correlation of their probabilities over the batch."""
    return inter_class_relation(p_student.t(), p_teacher.t())


def dist_parts(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Unweighted (inter, intra) of DIST at temperature T, without the T² factor."""
    p_student = (student_logits / temperature).softmax(dim=1)
    p_teacher = (teacher_logits / temperature).softmax(dim=1)
    return inter_class_relation(p_student, p_teacher), intra_class_relation(p_student, p_teacher)


@checked
class DIST(nn.Module):
    """DIST (Huang et al., NeurIPS 2022), a logit method:

        ce = ce_weight·CE(y, s),  inter = beta·T²·inter_relation,  intra = gamma·T²·intra_relation

    (``dist_parts``). The intra-class term correlates each class's probabilities across the batch,
    so it depends on the whole batch (and is 1 for a batch of one sample). A sample without a label
    is left out of the cross-entropy only. Logs ``ce``, ``inter`` and ``intra``.
    """

    def __init__(self, ce_weight: Weight, beta: Weight, gamma: Weight, temperature: Temperature) -> None:
        super().__init__()
        self.ce_weight, self.beta, self.gamma = float(ce_weight), float(beta), float(gamma)
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        zero = student_logits.new_zeros(())
        ce = self.ce_weight * labelled_cross_entropy(student_logits, targets) if self.ce_weight > 0 else zero
        inter, intra = dist_parts(student_logits, teacher_logits.detach(), self.temperature)
        scale = self.temperature**2
        terms = {"ce": ce, "inter": scale * self.beta * inter, "intra": scale * self.gamma * intra}
        terms["loss"] = terms["ce"] + terms["inter"] + terms["intra"]
        return terms

    def extra_repr(self) -> str:
        return f"ce_weight={self.ce_weight}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}"
