"""`payfleet dead-letters list|requeue|purge`: messages that exhausted their
retries, in `<queue>.XQ`."""

from __future__ import annotations

import argparse
from typing import Any

from dramatiq import Message

from domain import events
from payfleet.cli import print_json
from payfleet.platform import dead_letter_queues as dead_letters
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.publishing import APPLY_EVENT


def dead_letters_list(settings: Settings, args: argparse.Namespace) -> int:
    found = dead_letters.list_dead(build_broker(settings), args.queue, limit=args.limit)
    print_json([letter.summary() for letter in found])
    return 0


def dead_letters_requeue(settings: Settings, args: argparse.Namespace) -> int:
    if not args.all and not args.message_id:
        print("payfleet: name messages with --id, or pass --all")
        return 2
    sessions = make_sessions(engine_for(settings))

    def reopen_event(message: Message[Any]) -> None:
        # An apply_event message that gave up left its event settled as
        # unmatched or failed; reopen it, or the worker would skip it.
        if message.actor_name == APPLY_EVENT:
            with sessions.begin() as session:
                events.reopen(session, int(message.args[0]))

    moved = dead_letters.requeue(
        build_broker(settings),
        args.queue,
        message_ids=None if args.all else set(args.message_id),
        before_requeue=reopen_event,
    )
    print(f"requeued {len(moved)} message(s) to {args.queue}")
    return 0


def dead_letters_purge(settings: Settings, args: argparse.Namespace) -> int:
    if not args.yes:
        print("payfleet: purging deletes dead letters for good; pass --yes (list them first)")
        return 2
    print(f"purged {dead_letters.purge(build_broker(settings), args.queue)} message(s)")
    return 0


def add_commands(commands: Any) -> None:
    dl = commands.add_parser("dead-letters", help="messages that exhausted their retries")
    actions = dl.add_subparsers(dest="action", required=True)
    for name, run, text in (
        ("list", dead_letters_list, "show dead letters (nothing is removed)"),
        ("requeue", dead_letters_requeue, "move dead letters back to their queue"),
        ("purge", dead_letters_purge, "delete every dead letter of a queue"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--queue", default="payments")
        action.set_defaults(run=run)
        if name == "list":
            action.add_argument("--limit", type=int, default=1000)
        if name == "requeue":
            action.add_argument("--id", dest="message_id", action="append", help="a message id (repeatable)")
            action.add_argument("--all", action="store_true")
        if name == "purge":
            action.add_argument("--yes", action="store_true")
