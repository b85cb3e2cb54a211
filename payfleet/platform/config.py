"""The one place where payfleet reads its environment.

Each process calls `load_settings()` once at start-up and passes the frozen
result down; nothing else reads `os.environ`. Hosts and ports default to the
local PostgreSQL and RabbitMQ; secrets have no defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from domain.job_table import JobTable, ScheduleError
from domain.job_table import job_table as _job_table

N = TypeVar("N", int, float)


class ConfigError(ValueError):
    """An environment variable holds a value payfleet cannot use."""


@dataclass(frozen=True)
class Settings:
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/payfleet"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    admin_token: str = ""
    stripe_api_key: str = ""
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_base: str = "https://api.stripe.com"
    stripe_timeout_seconds: float = 10.0
    monetbil_service_key: str = ""
    monetbil_service_secret: str = ""
    monetbil_api_base: str = "https://api.monetbil.com"
    monetbil_timeout_seconds: float = 10.0
    public_base_url: str = "http://127.0.0.1:8000"
    monetbil_return_url: str = ""
    schedule_tz: str = "Europe/Paris"
    order_payment_window_seconds: int = 1800
    reservation_ttl_seconds: int = 1800
    cart_ttl_seconds: int = 86400
    webhook_tolerance_seconds: int = 300
    max_body_bytes: int = 1024 * 1024
    event_max_attempts: int = 3
    event_retry_delays_seconds: tuple[float, ...] = (10.0, 30.0)
    event_time_limit_seconds: float = 60.0
    publish_timeout_seconds: float = 0.5
    publish_pause_seconds: float = 5.0
    outbox_relay_interval_seconds: float = 2.0
    outbox_relay_grace_seconds: float = 5.0
    outbox_stuck_after_seconds: float = 900.0
    dead_letter_ttl_seconds: int = 30 * 86400
    scheduler_metrics_port: int = 9192
    worker_metrics_port: int = 9191
    metrics_host: str = "127.0.0.1"
    prometheus_multiproc_dir: str = ""
    web_concurrency: int = 2
    web_threads: int = 64
    db_pool_size: int = 12
    stripe_max_rps: float = 20.0
    provider_concurrency: int = 8
    whatsapp_api_base: str = "https://api.twilio.com"
    whatsapp_account_sid: str = ""
    whatsapp_auth_token: str = ""
    whatsapp_from: str = ""
    whatsapp_timeout_seconds: float = 10.0
    job_schedules: tuple[tuple[str, str], ...] = ()
    job_time_limit_seconds: float = 600.0
    notification_max_attempts: int = 4
    notification_retry_delays_seconds: tuple[float, ...] = (30.0, 120.0, 600.0)
    # Session bounds (issue 9): a vanished client or a stuck statement must
    # not hold row locks for long; all well under the 60 s actor time limit.
    db_lock_timeout_seconds: float = 5.0
    db_statement_timeout_seconds: float = 30.0
    db_idle_in_transaction_timeout_seconds: float = 30.0
    # Abuse bounds on the anonymous routes.
    max_order_units: int = 100
    max_order_lines: int = 50
    # An order a provider keeps calling pending this long past its window
    # stops being polled and needs an operator.
    pending_attention_after_seconds: int = 86400
    readyz_cache_seconds: float = 2.0
    readyz_timeout_seconds: float = 2.0
    # Logs (issue 10): "text" or "json"; empty picks text on a terminal,
    # json otherwise.
    log_format: str = ""
    # Dead letters older than this are archived into PostgreSQL by a job,
    # so none expires unseen (issue 10).
    dead_letter_archive_after_seconds: int = 3 * 86400
    # Payment routing (issue 11): a provider that failed this many times in
    # the window is skipped, fleet-wide, for the cool-down.
    routing_circuit_failures: int = 3
    routing_circuit_window_seconds: float = 60.0
    routing_circuit_cooldown_seconds: float = 30.0
    # The local provider sandbox (issue 12).
    sandbox_bind: str = "127.0.0.1:12111"


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    return env.get(name, "").strip() or default


def _number(env: Mapping[str, str], name: str, default: N, kind: type[N]) -> N:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {raw!r}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


def _log_format(env: Mapping[str, str]) -> str:
    value = _text(env, "LOG_FORMAT", "").lower()
    if value not in ("", "text", "json"):
        raise ConfigError(f"LOG_FORMAT must be 'text' or 'json', got {value!r}")
    return value


def _delays(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    parts = _list(env, name)
    try:
        delays = tuple(float(part) for part in parts)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds, got {env[name]!r}") from None
    return delays or default


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a child process of the fleet starts with: this
    process's, plus `extra` (given to the child directly, never on a command
    line where the process list would show a secret)."""
    return {**os.environ, **extra}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    base = Settings()
    settings = Settings(
        database_url=_text(env, "DATABASE_URL", base.database_url),
        broker_url=_text(env, "BROKER_URL", base.broker_url),
        admin_token=_text(env, "ADMIN_TOKEN", ""),
        stripe_api_key=_text(env, "STRIPE_API_KEY", ""),
        stripe_webhook_secrets=_list(env, "STRIPE_WEBHOOK_SECRETS"),
        stripe_api_base=_text(env, "STRIPE_API_BASE", base.stripe_api_base).rstrip("/"),
        stripe_timeout_seconds=_number(env, "STRIPE_TIMEOUT_SECONDS", base.stripe_timeout_seconds, float),
        monetbil_service_key=_text(env, "MONETBIL_SERVICE_KEY", ""),
        monetbil_service_secret=_text(env, "MONETBIL_SERVICE_SECRET", ""),
        monetbil_api_base=_text(env, "MONETBIL_API_BASE", base.monetbil_api_base).rstrip("/"),
        monetbil_timeout_seconds=_number(
            env, "MONETBIL_TIMEOUT_SECONDS", base.monetbil_timeout_seconds, float
        ),
        public_base_url=_text(env, "PUBLIC_BASE_URL", base.public_base_url).rstrip("/"),
        monetbil_return_url=_text(env, "MONETBIL_RETURN_URL", ""),
        schedule_tz=_text(env, "SCHEDULE_TZ", base.schedule_tz),
        order_payment_window_seconds=_number(
            env, "ORDER_PAYMENT_WINDOW_SECONDS", base.order_payment_window_seconds, int
        ),
        reservation_ttl_seconds=_number(env, "RESERVATION_TTL_SECONDS", base.reservation_ttl_seconds, int),
        cart_ttl_seconds=_number(env, "CART_TTL_SECONDS", base.cart_ttl_seconds, int),
        webhook_tolerance_seconds=_number(
            env, "WEBHOOK_TOLERANCE_SECONDS", base.webhook_tolerance_seconds, int
        ),
        max_body_bytes=_number(env, "MAX_BODY_BYTES", base.max_body_bytes, int),
        event_max_attempts=max(1, _number(env, "EVENT_MAX_ATTEMPTS", base.event_max_attempts, int)),
        event_retry_delays_seconds=_delays(
            env, "EVENT_RETRY_DELAYS_SECONDS", base.event_retry_delays_seconds
        ),
        event_time_limit_seconds=_number(
            env, "EVENT_TIME_LIMIT_SECONDS", base.event_time_limit_seconds, float
        ),
        publish_timeout_seconds=_number(env, "PUBLISH_TIMEOUT_SECONDS", base.publish_timeout_seconds, float),
        publish_pause_seconds=_number(env, "PUBLISH_PAUSE_SECONDS", base.publish_pause_seconds, float),
        outbox_relay_interval_seconds=_number(
            env, "OUTBOX_RELAY_INTERVAL_SECONDS", base.outbox_relay_interval_seconds, float
        ),
        outbox_relay_grace_seconds=_number(
            env, "OUTBOX_RELAY_GRACE_SECONDS", base.outbox_relay_grace_seconds, float
        ),
        outbox_stuck_after_seconds=_number(
            env, "OUTBOX_STUCK_AFTER_SECONDS", base.outbox_stuck_after_seconds, float
        ),
        dead_letter_ttl_seconds=_number(env, "DEAD_LETTER_TTL_SECONDS", base.dead_letter_ttl_seconds, int),
        scheduler_metrics_port=_number(env, "SCHEDULER_METRICS_PORT", base.scheduler_metrics_port, int),
        metrics_host=_text(env, "METRICS_HOST", base.metrics_host),
        worker_metrics_port=_number(env, "WORKER_METRICS_PORT", base.worker_metrics_port, int),
        prometheus_multiproc_dir=_text(env, "PROMETHEUS_MULTIPROC_DIR", ""),
        web_concurrency=max(1, _number(env, "WEB_CONCURRENCY", base.web_concurrency, int)),
        web_threads=max(1, _number(env, "WEB_THREADS", base.web_threads, int)),
        db_pool_size=max(1, _number(env, "DB_POOL_SIZE", base.db_pool_size, int)),
        db_lock_timeout_seconds=_number(env, "DB_LOCK_TIMEOUT_SECONDS", base.db_lock_timeout_seconds, float),
        db_statement_timeout_seconds=_number(
            env, "DB_STATEMENT_TIMEOUT_SECONDS", base.db_statement_timeout_seconds, float
        ),
        db_idle_in_transaction_timeout_seconds=_number(
            env, "DB_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS", base.db_idle_in_transaction_timeout_seconds, float
        ),
        max_order_units=max(1, _number(env, "MAX_ORDER_UNITS", base.max_order_units, int)),
        max_order_lines=max(1, _number(env, "MAX_ORDER_LINES", base.max_order_lines, int)),
        pending_attention_after_seconds=_number(
            env, "PENDING_ATTENTION_AFTER_SECONDS", base.pending_attention_after_seconds, int
        ),
        readyz_cache_seconds=_number(env, "READYZ_CACHE_SECONDS", base.readyz_cache_seconds, float),
        readyz_timeout_seconds=_number(env, "READYZ_TIMEOUT_SECONDS", base.readyz_timeout_seconds, float),
        log_format=_log_format(env),
        dead_letter_archive_after_seconds=_number(
            env, "DEAD_LETTER_ARCHIVE_AFTER_SECONDS", base.dead_letter_archive_after_seconds, int
        ),
        routing_circuit_failures=max(
            1, _number(env, "ROUTING_CIRCUIT_FAILURES", base.routing_circuit_failures, int)
        ),
        routing_circuit_window_seconds=_number(
            env, "ROUTING_CIRCUIT_WINDOW_SECONDS", base.routing_circuit_window_seconds, float
        ),
        routing_circuit_cooldown_seconds=_number(
            env, "ROUTING_CIRCUIT_COOLDOWN_SECONDS", base.routing_circuit_cooldown_seconds, float
        ),
        sandbox_bind=_text(env, "SANDBOX_BIND", base.sandbox_bind),
        **_job_settings(env, base),
    )
    _check_backoff(settings)
    return settings


def _schedules(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`JOB_SCHEDULES="name=cron;name=cron"` (cron fields hold spaces and commas)."""
    pairs = []
    for part in filter(None, (p.strip() for p in env.get("JOB_SCHEDULES", "").split(";"))):
        name, sep, cron = part.partition("=")
        if not sep or not name.strip() or not cron.strip():
            raise ConfigError(f"JOB_SCHEDULES entries are name=cron, got {part!r}")
        pairs.append((name.strip(), cron.strip()))
    return tuple(pairs)


def _job_settings(env: Mapping[str, str], base: Settings) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "stripe_max_rps": _number(env, "STRIPE_MAX_RPS", base.stripe_max_rps, float),
        "provider_concurrency": max(1, _number(env, "PROVIDER_CONCURRENCY", base.provider_concurrency, int)),
        "whatsapp_api_base": _text(env, "WHATSAPP_API_BASE", base.whatsapp_api_base).rstrip("/"),
        "whatsapp_account_sid": _text(env, "WHATSAPP_ACCOUNT_SID", ""),
        "whatsapp_auth_token": _text(env, "WHATSAPP_AUTH_TOKEN", ""),
        "whatsapp_from": _text(env, "WHATSAPP_FROM", ""),
        "whatsapp_timeout_seconds": _number(
            env, "WHATSAPP_TIMEOUT_SECONDS", base.whatsapp_timeout_seconds, float
        ),
        "job_schedules": _schedules(env),
        "job_time_limit_seconds": _number(env, "JOB_TIME_LIMIT_SECONDS", base.job_time_limit_seconds, float),
        "notification_max_attempts": max(
            1, _number(env, "NOTIFICATION_MAX_ATTEMPTS", base.notification_max_attempts, int)
        ),
        "notification_retry_delays_seconds": _delays(
            env, "NOTIFICATION_RETRY_DELAYS_SECONDS", base.notification_retry_delays_seconds
        ),
    }
    longest = max((settings["job_time_limit_seconds"], *settings["notification_retry_delays_seconds"]))
    if longest >= _CONSUMER_TIMEOUT_SECONDS / 2:
        raise ConfigError("job time limits and notification retry delays must stay under 15 minutes")
    return settings


# RabbitMQ closes a consumer that holds an unacknowledged delivery for 30
# minutes; every wait and time limit must stay well inside that.
_CONSUMER_TIMEOUT_SECONDS = 30 * 60


def _check_backoff(settings: Settings) -> None:
    longest = max((*settings.event_retry_delays_seconds, settings.event_time_limit_seconds))
    if longest >= _CONSUMER_TIMEOUT_SECONDS / 2:
        raise ConfigError(
            "event retry delays and time limit must stay under 15 minutes "
            "(half of RabbitMQ's 30-minute consumer timeout)"
        )


def job_table(settings: Settings) -> JobTable:
    """The job table with the configured time zone and schedule overrides."""
    try:
        return _job_table(settings.schedule_tz, settings.job_schedules)
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
