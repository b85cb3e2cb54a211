# One image for every payfleet process; docker-compose.yml picks the command:
#   payfleet ingress --bind 0.0.0.0:8000   (the default below)
#   payfleet worker | payfleet scheduler | payfleet migrate
#   payfleet dead-letters list|requeue|purge, payfleet events list|replay, ...

# Build stage: `pip install .` into a virtual environment that the runtime
# stage copies whole, so neither the sources nor the build backend ship.
# Only the files the package is built from are copied, so a local .venv/ or
# .git/ in the build context never reaches a layer.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/payfleet
WORKDIR /src
COPY pyproject.toml README.md ./
COPY payfleet ./payfleet
COPY ingress ./ingress
COPY workers ./workers
COPY domain ./domain
COPY schedules ./schedules
RUN /opt/payfleet/bin/pip install .


FROM python:3.11-slim

ENV PATH=/opt/payfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed uid, so mounted volumes and file ownership are predictable.
RUN useradd --system --uid 10001 --user-group --home-dir /home/payfleet --create-home payfleet

COPY --from=build /opt/payfleet /opt/payfleet
# For `gunicorn -c deploy/gunicorn.conf.py 'ingress.app:get_app()'`, run from /app.
COPY deploy/gunicorn.conf.py /app/deploy/gunicorn.conf.py

WORKDIR /app
USER payfleet

# 8000: ingress (HTTP and /metrics); 9191: the worker's Dramatiq Prometheus
# exporter; 9192: the scheduler's metrics (set METRICS_HOST=0.0.0.0 to reach it).
EXPOSE 8000 9191 9192

CMD ["payfleet", "ingress", "--bind", "0.0.0.0:8000"]
