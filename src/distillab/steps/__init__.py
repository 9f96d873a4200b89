"""The steps of one run, in the order ``pipeline.run`` tells them: obtain the teacher (``teacher/``),
fit the student (``fit``), compress it (``compression``), export it (``export``), assemble and write
the record (``assembly``); ``resume`` decides whether a sweep job has anything left to do.

This is the orchestration layer: it builds on the libraries (``distill``, ``data``, ``models``,
``compress``, ``measure``, ``evaluate``) and is called by the entry points (``cli``, the stacked
launcher); nothing below it imports it.
"""
