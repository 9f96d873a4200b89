"""Sweeps that train many students at once: ``hydra/launcher=stacked``.

The launcher (``hydra_plugins.distillab_launcher``) groups the jobs of a sweep that differ only in
values that can be stacked (``plan``), trains each group's students together as one vectorised
model (``fit``), then runs every job as the basic launcher would, with its student already
trained: the job evaluates, compresses, measures and writes its own folder. The launcher hands
each job what its group trained as an argument of the job's run (``steps.handoff.Handoff``).
"""
