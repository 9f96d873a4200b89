"""The label convention of ``distillab.labels`` under the name methods written outside the package
import it by (``from distillab.distill.labels import labelled_cross_entropy``)."""

from distillab.labels import UNLABELLED, hide_labels, labelled_cross_entropy, labelled_nll, labelled_subset

__all__ = ["UNLABELLED", "hide_labels", "labelled_cross_entropy", "labelled_nll", "labelled_subset"]
