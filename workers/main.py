"""What a Dramatiq worker process imports (`dramatiq workers.main`): reads
the configuration once and wires the broker, the database and the actors."""

from __future__ import annotations

import dramatiq

from payfleet.config import load_settings
from payfleet.db import make_engine, make_sessions
from workers.actors import declare_actors
from workers.broker import build_broker
from workers.jobs import declare_job_actors, job_gateways

settings = load_settings()
broker = build_broker(settings, metrics=True)
dramatiq.set_broker(broker)
sessions = make_sessions(make_engine(settings.database_url))
declare_actors(broker, sessions, settings)
declare_job_actors(broker, sessions, settings, job_gateways(settings))
