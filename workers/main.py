"""What a Dramatiq worker process imports (`dramatiq workers.main`): reads
the configuration once and wires the broker, the database and the actors."""

from __future__ import annotations

import logging

import dramatiq

from payfleet.platform.broker import build_broker
from payfleet.platform.config import load_settings
from payfleet.platform.db import engine_for, make_sessions
from workers.apply_events import declare_event_actors
from workers.job_runner import declare_job_actors, job_gateways
from workers.metrics import WorkerMetrics

# The stripe library logs two INFO lines per API call; in a worker each line
# also crosses a pipe to Dramatiq's parent process. Its failures reach us as
# exceptions, which the jobs log and count.
logging.getLogger("stripe").setLevel(logging.WARNING)

settings = load_settings()
broker = build_broker(settings)
# Dramatiq's Prometheus middleware, with an exporter that survives a taken port.
broker.add_middleware(WorkerMetrics())
dramatiq.set_broker(broker)
engine = engine_for(settings, pool_size=settings.db_pool_size, max_overflow=4)
sessions = make_sessions(engine)
declare_event_actors(broker, sessions, settings)
declare_job_actors(broker, sessions, settings, job_gateways(settings))
