#!/usr/bin/env bash
# Create the development database named in DATABASE_URL when it is missing.
set -euo pipefail
url="${DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/payfleet}"
"${PYTHON:-.venv/bin/python}" - "$url" <<'PY'
import sys
import psycopg
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1])
admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
with psycopg.connect(admin, autocommit=True) as conn:
    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,)).fetchone():
        conn.execute(f'CREATE DATABASE "{url.database}"')
        print(f"created database {url.database}")
PY
