"""What several scenarios share: counting rows, the bare endpoint's server,
and the stock invariants checked after events are applied."""

from __future__ import annotations

import sys
from typing import Any

import psycopg
import requests

from bench import bare_endpoint
from bench.fleet import BENCH_ROOT, WEBHOOK_SECRET, World, free_port
from bench.procs import Proc, wait_until
from bench.report import Outcome

Conn = psycopg.Connection[tuple[Any, ...]]


def scalar(conn: Conn, sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]


def count(conn: Conn, sql: str, *params: Any) -> int:
    return int(scalar(conn, sql, *params) or 0)


def start_bare(w: World) -> tuple[str, Proc]:
    """The bare endpoint under gunicorn, on this world's database and vhost."""
    bare_endpoint.prepare(w.dsn)
    port = free_port()
    env = w.env(
        BARE_DSN=w.dsn,
        BARE_BROKER_URL=w.broker_url,
        BARE_SECRET=WEBHOOK_SECRET,
        PYTHONPATH=str(BENCH_ROOT),
    )
    argv = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:bench.bare_gunicorn_conf",
        "--bind", f"127.0.0.1:{port}",
        "bench.bare_endpoint:app",
    ]  # fmt: skip
    proc = w.procs.spawn("bare", argv, env, cwd=BENCH_ROOT)
    base = f"http://127.0.0.1:{port}"
    _wait_answering(base, proc)
    return base, proc


def _wait_answering(base: str, proc: Proc) -> None:
    """Up once an unsigned delivery gets its 400."""

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"bare endpoint exited; see {proc.log}")
        try:
            return requests.post(f"{base}/webhooks/stripe", data=b"{}", timeout=5).status_code == 400
        except requests.RequestException:
            return False

    wait_until(up, 30, 0.2, "bare endpoint answering")


def check_sales(
    conn: Conn,
    outcome: Outcome,
    label: str,
    orders: int,
    lines: int,
    sold_by_sku: dict[str, int],
    initial: int,
) -> None:
    """After every order of the scenario was paid: one sale per line, on_hand
    down by exactly the sold units, nothing reserved, ledger sums right."""
    paid = scalar(conn, "SELECT count(*) FROM orders WHERE status = 'paid'")
    outcome.check(f"{label}: every order paid", paid == orders, f"{paid}/{orders}")
    sales = scalar(conn, "SELECT count(*) FROM stock_movements WHERE type = 'sale'")
    outcome.check(f"{label}: one sale movement per line", sales == lines, f"{sales} sales for {lines} lines")
    rows = conn.execute("SELECT sku, on_hand, reserved FROM products ORDER BY sku").fetchall()
    wrong = [sku for sku, on_hand, _ in rows if on_hand != initial - sold_by_sku.get(sku, 0)]
    outcome.check(
        f"{label}: on_hand dropped by exactly the sold units",
        not wrong,
        f"wrong: {wrong[:5]}" if wrong else "",
    )
    reserved = sum(int(r) for _, _, r in rows)
    outcome.check(f"{label}: nothing reserved", reserved == 0, f"reserved {reserved}")
    active = scalar(conn, "SELECT count(*) FROM stock_reservations WHERE status = 'active'")
    outcome.check(f"{label}: no active reservation", active == 0, f"{active} active")
    ledger = scalar(
        conn,
        "SELECT count(*) FROM products p"
        " JOIN (SELECT sku, sum(quantity) AS s FROM stock_movements GROUP BY sku) m USING (sku)"
        " WHERE m.s <> p.on_hand",
    )
    outcome.check(f"{label}: movements sum to on_hand", ledger == 0, f"{ledger} SKUs off")
