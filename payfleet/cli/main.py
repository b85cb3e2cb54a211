"""The `payfleet` command: one entry point for every process of the fleet."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from payfleet.cli import fleet
from payfleet.platform import logs
from payfleet.platform.config import ConfigError, load_settings

# The commands that run a process of the fleet need only the settings: the
# operator commands' modules (the ORM, the domain: a second of imports) are
# loaded only for them, so `payfleet worker` and `payfleet ingress` hand over
# to Dramatiq and gunicorn at once.
FLEET_COMMANDS = frozenset({"up", "ingress", "worker", "scheduler", "migrate"})
PROCESSES = frozenset({"ingress", "worker", "scheduler", "sandbox"})


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="payfleet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    groups = [fleet]
    if command not in FLEET_COMMANDS:
        from payfleet.cli import dead_letters, events, jobs

        groups += [events, dead_letters, jobs]
    if command not in FLEET_COMMANDS:
        from payfleet.cli import routing

        groups += [routing]
    if command not in FLEET_COMMANDS:
        from payfleet.cli import demo, sandbox

        groups += [sandbox, demo]
    for group in groups:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"payfleet: {error}", file=sys.stderr)
        return 2
    # A long-running process names itself in its JSON lines; gunicorn and
    # Dramatiq (exec'd by ingress and worker) set up their own the same way.
    logs.configure(args.command if args.command in PROCESSES else "cli", settings.log_format)
    return int(args.run(settings, args))
