"""No distillation, ``distill=none``: the student trains on the labels alone, CE(y, s).

With ``data.labelled_fraction`` < 1 the cross-entropy covers the labelled samples only, so this
is the baseline a transfer-set run is compared with.
"""

from __future__ import annotations

from torch import Tensor, nn

from distillab.labels import labelled_cross_entropy


class CrossEntropy(nn.Module):
    """Cross-entropy on the labels; it reads no teacher (``needs_teacher = False``), so none is run."""

    needs_teacher = False

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        ce = labelled_cross_entropy(student_logits, targets)
        return {"ce": ce, "loss": ce}
