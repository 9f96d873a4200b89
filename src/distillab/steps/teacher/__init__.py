"""The teacher of a run: trained once and cached (``cache``), how it is trained (``training``),
several teachers as one (``ensemble``) and its logits computed once for the whole training set
(``outputs``)."""
