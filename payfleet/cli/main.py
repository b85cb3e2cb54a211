"""The `payfleet` command: one entry point for every process of the fleet."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from payfleet.cli import dead_letters, events, fleet, jobs
from payfleet.platform.config import ConfigError, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payfleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (fleet, events, dead_letters, jobs):
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"payfleet: {error}", file=sys.stderr)
        return 2
    return int(args.run(settings, args))
