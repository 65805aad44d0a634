"""Command-line interface: `fmdefense <command> ...`, one module per command group.

data (fetch, info) · train (classifier, vae, magnet, defensegan) · calibrate · defend ·
reproduce · evaluate (classifier, vae) · attack · adaptive · baselines. Each module has
`register(sub)`; the pipeline never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from fmdefense.cli.common import ERROR_PREFIX, Parser, executor_of
from fmdefense.core.errors import FMDefenseError
from fmdefense.core.executor import using_executor

log = logging.getLogger("fmdefense")
DESCRIPTION = "FM-Defense: detect, purify or reject adversarial examples (and its baselines)."
# Modules that add their own subcommands, in `--help` order; one line each.
COMMAND_MODULES: list[str] = [
    "fmdefense.cli.data",
    "fmdefense.cli.train",
    "fmdefense.cli.defend",
    "fmdefense.cli.reproduce",
    "fmdefense.cli.evaluate",
    "fmdefense.cli.attack",
    "fmdefense.cli.adaptive",
    "fmdefense.cli.baselines",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each leaf command sets `func`."""
    parser = Parser(prog="fmdefense", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """Logging for a CLI run: the shared setup (`fmdefense.core.logs`), DEBUG with -v."""
    from fmdefense.core.logs import setup_logging

    setup_logging(verbose)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fmdefense` console script: 0 on success, 2 on any error that
    fmdefense raises on purpose or argparse reports (one line on stderr)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        with using_executor(executor_of(args)):  # where long stages' chunks run (--executor)
            func(args)
    except FMDefenseError as exc:
        print(f"{ERROR_PREFIX} {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0
