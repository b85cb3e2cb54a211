"""`payfleet dead-letters list|summary|requeue|archive|purge`: messages that
exhausted their retries, in `<queue>.XQ` (all three queues unless `--queue`
names one), and the archive that keeps them in PostgreSQL."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pika.exceptions

from domain.throttle import RateLimiter
from payfleet.platform import dead_letter_queues as dead_letters
from payfleet.platform.config import Settings
from payfleet.platform.db import engine_for, make_sessions
from payfleet.platform.publishing import QUEUES

Letter = dead_letters.DeadLetter

# --- arguments -------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    """`90`, `90s`, `15m`, `2h`, `3d`, or several (`1h30m`)."""
    parts = re.fullmatch(r"(?:\d+[smhd])+|\d+", text.strip())
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 3d")
    if text.strip().isdigit():
        return timedelta(seconds=int(text))
    return timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text)))


def rate(text: str) -> float:
    """`10/s` or `10`: messages per second, more than 0."""
    number = text.strip().removesuffix("/s")
    try:
        value = float(number)
    except ValueError:
        value = 0.0
    if not 0 < value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 10/s")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def _queues(args: argparse.Namespace) -> tuple[str, ...]:
    return (args.queue,) if args.queue else QUEUES


def _filter(args: argparse.Namespace) -> dead_letters.LetterFilter:
    ids = getattr(args, "message_id", None)
    return dead_letters.LetterFilter(
        actor=args.actor,
        error=args.error,
        older_than=args.older_than,
        message_ids=frozenset(ids) if ids else None,
        limit=getattr(args, "limit", None),
    )


# --- output --------------------------------------------------------------------


def _age(letter: Letter, now: datetime) -> str:
    age = letter.age(now)
    return "?" if age is None else _duration(age)


def _duration(age: timedelta) -> str:
    seconds, parts = int(age.total_seconds()), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2]) or f"{seconds}s"


def _line(letter: Letter, now: datetime) -> str:
    args = ", ".join(repr(arg) for arg in letter.args)
    return (
        f"{letter.queue}  {letter.message_id}  {letter.actor}({args})  retries={letter.retries}"
        f"  age={_age(letter, now)}  {letter.error or '-'}"
    )


def _show(letters: list[Letter], as_json: bool) -> None:
    now = datetime.now(UTC)
    for letter in letters:
        print(json.dumps(letter.summary(now), default=str) if as_json else _line(letter, now))


def _progress(verb: str) -> dead_letters.Progress:
    """Progress on a terminal only (stderr), so piped output stays clean."""
    if not sys.stderr.isatty():
        return lambda done, total: None

    def show(done: int, total: int) -> None:
        print(f"\r{verb} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def _pace(args: argparse.Namespace) -> Callable[[], None]:
    return RateLimiter(args.rate).wait if args.rate else lambda: None


# --- commands ------------------------------------------------------------------


class Tools:
    """What the commands need, built from the settings once."""

    def __init__(self, settings: Settings) -> None:
        self.engine = engine_for(settings)
        self.sessions = make_sessions(self.engine)
        self.parameters = dead_letters.parameters_for(settings)
        actors = dead_letters.job_actors(settings)
        self.explain = dead_letters.recorded_errors(self.sessions, actors)
        self.revive = dead_letters.reviver(self.sessions, actors)

    def letters(self, args: argparse.Namespace, chosen: dead_letters.LetterFilter) -> list[Letter]:
        if args.archived:
            return dead_letters.list_archived(self.sessions, _queues(args), chosen)
        return dead_letters.list_dead(self.parameters, _queues(args), chosen, explain=self.explain)


def dead_letters_list(tools: Tools, args: argparse.Namespace) -> int:
    _show(tools.letters(args, _filter(args)), args.json)
    return 0


def dead_letters_summary(tools: Tools, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    found = tools.letters(args, dead_letters.EVERY_LETTER)
    for queue in _queues(args):
        summary = {"queue": queue, **dead_letters.summarize([x for x in found if x.queue == queue], now)}
        print(json.dumps(summary) if args.json else _summary_text(summary))
    return 0


def _summary_text(summary: dict[str, Any]) -> str:
    oldest = summary["oldest_age_seconds"]
    lines = [f"{summary['queue']}: {summary['count']} letter(s)"]
    if oldest is not None:
        lines[0] += f", the oldest dead for {_duration(timedelta(seconds=oldest))}"
    lines += [f"  actor {actor}: {count}" for actor, count in summary["by_actor"].items()]
    lines += [f"  error {error}: {count}" for error, count in summary["by_error"].items()]
    return "\n".join(lines)


def dead_letters_requeue(tools: Tools, args: argparse.Namespace) -> int:
    if not args.all and not args.message_id:
        print("payfleet: name messages with --id, or pass --all (with filters to narrow it)", file=sys.stderr)
        return 2
    progress = (lambda done, total: None) if args.dry_run else _progress("requeued")
    kwargs: dict[str, Any] = {"dry_run": args.dry_run, "pace": _pace(args), "progress": progress}
    if args.archived:
        outcome = dead_letters.requeue_archived(
            tools.parameters, tools.sessions, tools.revive, _queues(args), _filter(args), **kwargs
        )
    else:
        outcome = dead_letters.requeue(
            tools.parameters, tools.revive, _queues(args), _filter(args), explain=tools.explain, **kwargs
        )
    now = datetime.now(UTC)
    moved, left = ("would requeue", "would leave") if args.dry_run else ("requeued", "left")
    for letter in outcome.moved:
        print(f"{moved}: {_line(letter, now)}")
    for letter, reason in outcome.left:
        print(f"{left}: {_line(letter, now)}\n  because {reason}")
    print(f"{moved} {len(outcome.moved)} message(s), {left} {len(outcome.left)}")
    return 0


def dead_letters_archive(tools: Tools, args: argparse.Namespace) -> int:
    moved = dead_letters.archive(
        tools.parameters,
        tools.sessions,
        _queues(args),
        _filter(args),
        dry_run=args.dry_run,
        explain=tools.explain,
        progress=_progress("archived"),
    )
    now = datetime.now(UTC)
    verb = "would archive" if args.dry_run else "archived"
    for letter in moved:
        print(f"{verb}: {_line(letter, now)}")
    print(f"{verb} {len(moved)} message(s)")
    return 0


def dead_letters_purge(tools: Tools, args: argparse.Namespace) -> int:
    where = "archived letters" if args.archived else "dead letters"
    if not args.yes:
        print(
            f"payfleet: purging deletes {where} for good; list them first, then pass --yes", file=sys.stderr
        )
        return 2
    if args.archived:
        print(f"purged {dead_letters.purge_archived(tools.sessions, _queues(args))} archived message(s)")
        return 0
    removed = dead_letters.purge(tools.parameters, _queues(args))
    print(f"purged {sum(removed.values())} message(s) ({', '.join(f'{q}: {n}' for q, n in removed.items())})")
    return 0


Command = Callable[[Tools, argparse.Namespace], int]


def _run(command: Command) -> Callable[[Settings, argparse.Namespace], int]:
    def run(settings: Settings, args: argparse.Namespace) -> int:
        tools = Tools(settings)
        try:
            return command(tools, args)
        except pika.exceptions.AMQPError as error:
            # Whatever was not acknowledged is still a dead letter.
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            print(
                f"payfleet: RabbitMQ failed ({why}); a letter not yet moved is still there", file=sys.stderr
            )
            return 1
        finally:
            tools.engine.dispose()

    return run


def add_commands(commands: Any) -> None:
    dl = commands.add_parser("dead-letters", help="messages that exhausted their retries")
    actions = dl.add_subparsers(dest="action", required=True)
    for name, command, text in (
        ("list", dead_letters_list, "show dead letters, one per line (nothing is removed)"),
        ("summary", dead_letters_summary, "count dead letters by actor and by error"),
        ("requeue", dead_letters_requeue, "make dead letters run again, on their queue"),
        ("archive", dead_letters_archive, "move dead letters into PostgreSQL"),
        ("purge", dead_letters_purge, "delete dead letters for good"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--queue", choices=QUEUES, help="one queue (default: all three)")
        action.set_defaults(run=_run(command))
        if name in ("list", "requeue", "archive"):
            action.add_argument("--actor", help="only this actor's letters")
            action.add_argument("--error", help="only letters whose last error line contains this")
            action.add_argument("--older-than", type=duration, help="only letters dead this long (2h, 3d)")
        if name in ("list", "summary", "requeue", "purge"):
            action.add_argument("--archived", action="store_true", help="the archive, not the queues")
        if name in ("list", "summary"):
            action.add_argument("--json", action="store_true", help="one JSON object per line")
        if name in ("list", "requeue", "archive"):
            action.add_argument("--limit", type=_positive, help="at most N letters (in queue order)")
        if name in ("requeue", "archive"):
            action.add_argument("--dry-run", action="store_true", help="show what would move; change nothing")
        if name == "requeue":
            chosen = action.add_mutually_exclusive_group()
            chosen.add_argument("--id", dest="message_id", action="append", help="a message id (repeatable)")
            chosen.add_argument("--all", action="store_true", help="every letter the filters take")
            action.add_argument("--rate", type=rate, help="at most N messages a second (10/s)")
        if name == "purge":
            action.add_argument("--yes", action="store_true")
