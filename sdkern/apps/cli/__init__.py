"""The ``sdkern`` command line.

- :mod:`~sdkern.apps.cli.parser`: the argument parser (``build_parser``);
- :mod:`~sdkern.apps.cli.options`: argument types and checks shared with ``optimize`` and the video path;
- :mod:`~sdkern.apps.cli.commands`: the commands and :func:`main`, the console script's entry point.
"""

from sdkern.apps.cli.commands import main
from sdkern.apps.cli.parser import build_parser

__all__ = ["build_parser", "main"]
