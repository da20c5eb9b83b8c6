"""Logging through the standard logging module, with rich's handler on a terminal."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Send the 'wartok' logger to stderr: rich on a terminal, plain timestamped lines otherwise."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    logger = logging.getLogger("wartok")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    # Accelerate and webdataset log through their own loggers; keep them at warnings.
    for name in ("accelerate", "webdataset"):
        logging.getLogger(name).setLevel(logging.WARNING)
