"""``python -m sdkern.apps.cli`` (also ``python -m sdkern``)."""

import sys

from sdkern.apps.cli.commands import main

sys.exit(main())
