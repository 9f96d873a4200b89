"""Distillation methods, one file each: its maths (pure functions), its module, its settings.

``conf/distill/<name>.yaml`` names the module by ``_target_`` and holds the values of its
settings; the module's typed constructor declares them (``distillab.settings``). A logit method
is any ``nn.Module`` with ``forward(student_logits, teacher_logits, targets)`` returning its
terms by name with the total under ``"loss"``; a feature method derives from
``base.FeatureMethod``. See docs/extending.md.
"""
