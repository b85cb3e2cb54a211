"""Operator commands: `payfleet events …` and `payfleet dead-letters …`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dramatiq import Message

from domain import catalog, events
from domain.errors import DomainError
from payfleet.config import Settings
from payfleet.db import make_engine, make_sessions
from workers import dead_letters
from workers.broker import build_broker
from workers.publisher import APPLY_EVENT, EventInbox, EventPublisher


def _print(document: Any) -> None:
    print(json.dumps(document, indent=2, default=str))


def events_list(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(make_engine(settings.database_url))() as session:
        _print(catalog.list_events(session, provider=args.provider, status=args.status, limit=args.limit))
    return 0


def events_replay(settings: Settings, args: argparse.Namespace) -> int:
    inbox = EventInbox(
        make_sessions(make_engine(settings.database_url)), EventPublisher(build_broker(settings))
    )
    try:
        published = inbox.replay(args.event_id)
    except DomainError as error:
        print(f"payfleet: {error.detail}")
        return 1
    print(f"event {args.event_id} reopened; " + ("published" if published else "left to the outbox relay"))
    return 0


def dead_letters_list(settings: Settings, args: argparse.Namespace) -> int:
    found = dead_letters.list_dead(build_broker(settings), args.queue, limit=args.limit)
    _print([letter.summary() for letter in found])
    return 0


def dead_letters_requeue(settings: Settings, args: argparse.Namespace) -> int:
    if not args.all and not args.message_id:
        print("payfleet: name messages with --id, or pass --all")
        return 2
    sessions = make_sessions(make_engine(settings.database_url))

    def reopen_event(message: Message[Any]) -> None:
        # An apply_event message that gave up left its event settled as
        # unmatched or failed; reopen it, or the worker would skip it.
        if message.actor_name == APPLY_EVENT:
            with sessions() as session:
                events.reopen(session, int(message.args[0]))
                session.commit()

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
    ev = commands.add_parser("events", help="stored provider events").add_subparsers(
        dest="action", required=True
    )
    listing = ev.add_parser("list", help="newest first")
    listing.add_argument("--provider")
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=events_list)
    replay = ev.add_parser("replay", help="reopen an unmatched, failed or ignored event and publish it")
    replay.add_argument("event_id", type=int)
    replay.set_defaults(run=events_replay)

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
