"""``python -m sdkern``: the ``sdkern`` command line."""

import sys

from sdkern.apps.cli import main

sys.exit(main())
