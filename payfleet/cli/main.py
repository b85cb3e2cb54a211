"""The `payfleet` command: one entry point for every process of the fleet."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from payfleet.cli import fleet
from payfleet.platform.config import ConfigError, load_settings

# The commands that run a process of the fleet need only the settings: the
# operator commands' modules (the ORM, the domain: a second of imports) are
# loaded only for them, so `payfleet worker` and `payfleet ingress` hand over
# to Dramatiq and gunicorn at once.
FLEET_COMMANDS = frozenset({"up", "ingress", "worker", "scheduler", "migrate"})


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payfleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    groups = [fleet]
    if command not in FLEET_COMMANDS:
        from payfleet.cli import dead_letters, events, jobs

        groups += [events, dead_letters, jobs]
    for group in groups:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv[0] if argv else None).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"payfleet: {error}", file=sys.stderr)
        return 2
    return int(args.run(settings, args))
