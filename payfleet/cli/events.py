"""`payfleet events list|replay`: stored provider events."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from domain import events, views
from domain.errors import DomainError
from domain.models import ProviderEvent
from domain.throttle import RateLimiter
from payfleet.cli import print_json
from payfleet.cli.dead_letters import rate
from payfleet.platform.broker import build_broker
from payfleet.platform.config import Settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.outbox import REPLAY_SLICE, EventInbox
from payfleet.platform.publishing import Publisher


def events_list(settings: Settings, args: argparse.Namespace) -> int:
    with make_sessions(engine_for(settings))() as session:
        print_json(views.list_events(session, provider=args.provider, status=args.status, limit=args.limit))
    return 0


def _fail(message: str) -> int:
    print(f"payfleet: {message}", file=sys.stderr)
    return 2


def events_replay(settings: Settings, args: argparse.Namespace) -> int:
    filters = (args.status, args.provider, args.type, args.since, args.until)
    if args.event_ids and any(value is not None for value in filters):
        return _fail("give event ids or filters (--status …), not both")
    if not args.event_ids and all(value is None for value in filters):
        return _fail("name event ids, or choose events with --status failed|unmatched|ignored")
    try:
        chosen = None if args.event_ids else events.replay_filter(*filters)
    except DomainError as error:
        return _fail(error.detail)
    engine = engine_for(settings)
    try:
        sessions = make_sessions(engine)
        if chosen is None:
            return _replay_ids(settings, sessions, args)
        return _replay_filtered(settings, sessions, chosen, args)
    finally:
        engine.dispose()


def _replay_ids(settings: Settings, sessions: sessionmaker[Session], args: argparse.Namespace) -> int:
    """Each named event on its own, as `POST /admin/events/{id}/replay`: a
    processed or unknown one is refused and said so."""
    if args.dry_run:
        with sessions() as session:
            found = dict(
                session.execute(
                    select(ProviderEvent.id, ProviderEvent.status).where(ProviderEvent.id.in_(args.event_ids))
                ).all()
            )
        for event_id in args.event_ids:
            status = found.get(event_id)
            replayable = status in (*events.REPLAYABLE, "received")
            print(
                f"would {'replay' if replayable else 'leave'} event {event_id} ({status or 'no such event'})"
            )
        return 0
    inbox = EventInbox(sessions, Publisher(build_broker(settings)))
    refused = 0
    for event_id in args.event_ids:
        try:
            published = inbox.replay(event_id)
        except DomainError as error:
            print(f"payfleet: {error.detail}")
            refused += 1
            continue
        print(f"event {event_id} reopened; " + ("published" if published else "left to the outbox relay"))
    return 1 if refused else 0


def _replay_filtered(
    settings: Settings, sessions: sessionmaker[Session], chosen: events.ReplayFilter, args: argparse.Namespace
) -> int:
    with sessions() as session:
        selected = events.replay_selection(session, chosen)
    if args.dry_run:
        for event_id in selected:
            print(f"would replay event {event_id}")
        print(f"would replay {len(selected)} event(s)")
        return 0
    inbox = EventInbox(sessions, Publisher(build_broker(settings)))
    # --rate N/s: slices of about N events, one slice a second.
    size = max(1, min(REPLAY_SLICE, int(args.rate))) if args.rate else REPLAY_SLICE
    pace: Callable[[], None] = RateLimiter(args.rate / size).wait if args.rate else lambda: None
    reopened, published = inbox.replay_many(selected, slice_size=size, pace=pace, progress=_progress())
    confirmed = set(published)
    for event_id in reopened:
        print(f"replayed event {event_id}" + ("" if event_id in confirmed else " (left to the outbox relay)"))
    skipped = len(selected) - len(reopened)
    print(
        f"replayed {len(reopened)} event(s): {len(published)} published, "
        f"{len(reopened) - len(published)} left to the outbox relay"
        + (f"; {skipped} settled meanwhile and left alone" if skipped else "")
    )
    return 0


def _progress() -> Callable[[int, int], None]:
    if not sys.stderr.isatty():
        return lambda done, total: None

    def show(done: int, total: int) -> None:
        print(f"\rreplayed {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def add_commands(commands: Any) -> None:
    ev = commands.add_parser("events", help="stored provider events").add_subparsers(
        dest="action", required=True
    )
    listing = ev.add_parser("list", help="newest first")
    listing.add_argument("--provider")
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(run=events_list)
    replay = ev.add_parser(
        "replay", help="reopen unmatched, failed or ignored events (by id or by filter) and publish them"
    )
    replay.add_argument("event_ids", type=int, nargs="*", metavar="ID")
    replay.add_argument("--status", help="failed, unmatched or ignored (required with filters)")
    replay.add_argument("--provider", help="stripe or monetbil")
    replay.add_argument("--type", help="the provider's event type, e.g. payment_intent.succeeded")
    replay.add_argument("--since", help="received at or after this ISO 8601 time (UTC if no offset)")
    replay.add_argument("--until", help="received before this ISO 8601 time")
    replay.add_argument(
        "--dry-run", action="store_true", help="list the events it would replay; change nothing"
    )
    replay.add_argument("--rate", type=rate, help="at most N events a second (10/s)")
    replay.set_defaults(run=events_replay)
