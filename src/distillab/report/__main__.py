"""``python -m distillab.report DIR [DIR ...] [--out DIR] [--x params]``: the sweep report."""

import sys

from distillab.report import main

sys.exit(main())
