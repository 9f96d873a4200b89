"""What a launcher that trained a job's student (``hydra/launcher=stacked``) hands that job.

The launcher passes it to the job's run as an argument (``pipeline.run(cfg, handoff=...)``); the
run then skips its own preparation and fit, and ends as its own fit would have ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class Handoff:
    """What a member's job takes over from its group: the run's built parts (``pipeline.Parts``,
    the student not yet loaded with its best weights), the member's trained outcome
    (``stacked.fit.Trained``: state, best epoch and step, history, error), how the group got the
    teacher's logits, the group's identity, and the teacher the group obtained
    (``steps.teacher.cache.Teacher`` as this job reports it; None when the method reads no teacher)."""

    parts: Any
    trained: Any
    mode: str
    table_seconds: float  # filling the teacher-output table: the group's time for its first job, else 0
    seconds: float  # the member's share of the group's fit
    group: str
    size: int
    teacher: Any = None

    def fields(self) -> dict[str, Any]:
        """The results.json entries of a stacked job: ``launcher`` and ``stack`` {group, size}."""
        return {"launcher": "stacked", "stack": {"group": self.group, "size": self.size}}

    def complete(self, record: dict[str, Any]) -> None:
        """Add the job's ``fields`` to its ``record``, and to ``timing_s.total``, which otherwise
        counts the job's own time only, what its group spent for it before the job started: its share
        of the fit (its ``timing_s.student``) and, for the job that reports them, obtaining the teacher
        and filling its output table (its ``timing_s.teacher``)."""
        record.update(self.fields())
        if "timing_s" in record:
            teacher = self.teacher.seconds if self.teacher is not None else 0.0
            before = self.seconds + self.table_seconds + teacher
            record["timing_s"]["total"] = round(record["timing_s"]["total"] + before, 3)


def checkpoint(state: dict[str, torch.Tensor], epoch: int, step: int) -> dict[str, Any]:
    """A member's best weights as the basic launcher's ``checkpoints/best.ckpt`` holds them: the
    DistillationModule's state_dict (the student under ``model.``), its epoch and global step."""
    import pytorch_lightning as pl

    return {
        "epoch": int(epoch),
        "global_step": int(step),
        "pytorch-lightning_version": pl.__version__,
        "state_dict": {f"model.{name}": value for name, value in state.items()},
    }
