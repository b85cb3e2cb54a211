"""Admin resources for the maintenance jobs: the table with next and last
runs, run history, the figures, and starting a run by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import falcon
from sqlalchemy.orm import Session, sessionmaker

from domain import job_runs
from domain.job_runs import job_overview
from domain.job_table import JobTable
from ingress.admin import AdminResource
from ingress.errors import ApiError
from payfleet.platform.config import Settings, job_table
from payfleet.platform.outbox import start_manual_run
from payfleet.platform.publishing import Publisher


class Jobs(AdminResource):
    def __init__(self, sessions: sessionmaker[Session], table: JobTable, sender: Publisher) -> None:
        self._sessions, self._table, self._sender = sessions, table, sender

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            resp.media = {"jobs": job_overview(session, self._table, datetime.now(UTC))}

    def on_get_runs(self, req: falcon.Request, resp: falcon.Response) -> None:
        job = req.get_param("job")
        if job and self._table.get(job) is None:
            raise ApiError(falcon.HTTP_400, "invalid_request", f"no job {job!r}")
        limit = req.get_param_as_int("limit", min_value=1, max_value=500, default=50)
        with self._sessions() as session:
            resp.media = {"runs": job_runs.list_runs(session, job=job, limit=limit)}

    def on_get_metrics(self, req: falcon.Request, resp: falcon.Response) -> None:
        with self._sessions() as session:
            resp.media = job_runs.metrics(session)

    def on_post_run(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if self._table.get(name) is None:
            raise ApiError(falcon.HTTP_404, "not_found", f"no job {name!r}")
        run_id, published = start_manual_run(self._sessions, self._sender, self._table, name)
        resp.status = falcon.HTTP_202
        resp.media = {"run_id": run_id, "job": name, "state": "queued", "published": published}


def add_routes(
    app: falcon.App[falcon.Request, falcon.Response],
    sessions: sessionmaker[Session],
    settings: Settings,
    publisher: Publisher,
) -> None:
    # The app's one publisher (its deadline and pause): a run left
    # unpublished is published by the scheduler's next tick.
    jobs = Jobs(sessions, job_table(settings), publisher)
    app.add_route("/admin/jobs", jobs)
    app.add_route("/admin/jobs/runs", jobs, suffix="runs")
    app.add_route("/admin/jobs/metrics", jobs, suffix="metrics")
    app.add_route("/admin/jobs/{name}/run", jobs, suffix="run")
