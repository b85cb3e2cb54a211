"""gunicorn settings for running the ingress without the `payfleet` command:

    gunicorn -c deploy/gunicorn.conf.py 'ingress.app:get_app()'

The same settings `payfleet ingress` uses: they live in ingress/gunicorn_conf.py.
Importing it also sets PROMETHEUS_MULTIPROC_DIR before prometheus-client is
imported, so /metrics sums every gunicorn worker. Bind with `--bind HOST:PORT`
(gunicorn's default is 127.0.0.1:8000, as for `payfleet ingress`)."""

from ingress.gunicorn_conf import *  # noqa: F403
from ingress.gunicorn_conf import child_exit  # noqa: F401  (the hook that cleans a dead worker's metrics)
