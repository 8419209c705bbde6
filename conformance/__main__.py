"""``python -m conformance``: the same as ``dualprec conformance``."""

import sys

from .cli import main

sys.exit(main())
