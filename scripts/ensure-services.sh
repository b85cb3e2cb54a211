#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ answer on 127.0.0.1, starting the locally
# installed servers when they are stopped. Nothing is installed here: a machine
# without them gets a clear message; `docker compose up` runs the whole fleet instead.
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name port seconds
  for _ in $(seq 1 "$3"); do listening "$2" && return 0; sleep 1; done
  echo "ensure-services: $1 is not answering on 127.0.0.1:$2" >&2
  return 1
}

if ! listening 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "ensure-services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
  else
    echo "ensure-services: PostgreSQL is neither running nor installed here" >&2
  fi
fi
wait_for PostgreSQL 5432 60

if ! listening 5672; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-services: starting RabbitMQ"
    rabbitmq-server -detached
  else
    echo "ensure-services: RabbitMQ is neither running nor installed here" >&2
  fi
fi
wait_for RabbitMQ 5672 120
# The port opens before the broker accepts work; wait for it to be fully up.
if command -v rabbitmq-diagnostics >/dev/null 2>&1; then
  rabbitmq-diagnostics -q check_running >/dev/null 2>&1 || sleep 5
fi
