"""`payfleet events list|replay`: stored provider events."""

from __future__ import annotations

import argparse
from typing import Any

from domain import views
from domain.errors import DomainError
from payfleet.cli import print_json
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.outbox import EventInbox
from payfleet.platform.publishing import Publisher


def events_list(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(engine_for(settings))() as session:
        print_json(views.list_events(session, provider=args.provider, status=args.status, limit=args.limit))
    return 0


def events_replay(settings: Settings, args: argparse.Namespace) -> int:
    inbox = EventInbox(make_sessions(engine_for(settings)), Publisher(build_broker(settings)))
    try:
        published = inbox.replay(args.event_id)
    except DomainError as error:
        print(f"payfleet: {error.detail}")
        return 1
    print(f"event {args.event_id} reopened; " + ("published" if published else "left to the outbox relay"))
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
