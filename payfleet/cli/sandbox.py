"""`payfleet sandbox`: run the local provider sandbox, or act in it as the
customer: `pay|fail|cancel|refund ORDER_ID`, `trigger EVENT_TYPE --order ID`,
`show ORDER_ID` (each a call to the running sandbox's /sandbox routes)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any
from urllib.parse import quote

import requests

from payfleet import sandbox
from payfleet.cli import print_json
from payfleet.platform.config import Settings


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from payfleet.sandbox.server import Sandbox, SandboxConfig, SandboxRefused, refuse_live_keys

    try:
        refuse_live_keys(settings.stripe_api_key)
    except SandboxRefused as refusal:
        print(f"payfleet sandbox: {refusal}", file=sys.stderr)
        return 2
    host, _, port = (args.bind or settings.sandbox_bind).rpartition(":")
    config = SandboxConfig(
        webhook_url=(args.webhook_url or settings.public_base_url).rstrip("/"),
        stripe_webhook_secret=next(
            iter(settings.stripe_webhook_secrets), sandbox.DEFAULT_STRIPE_WEBHOOK_SECRET
        ),
        monetbil_service_key=settings.monetbil_service_key or sandbox.SANDBOX_MONETBIL_KEY,
        monetbil_service_secret=settings.monetbil_service_secret or sandbox.DEFAULT_MONETBIL_SECRET,
    )
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    running = Sandbox(config, host or "127.0.0.1", int(port))
    try:
        running.start()
    except OSError as error:
        print(
            f"payfleet sandbox: cannot listen on {host}:{port} (SANDBOX_BIND): {error.strerror}",
            file=sys.stderr,
        )
        return 2
    with running:
        print(
            f"payfleet sandbox on {running.base_url} (Stripe and Monetbil APIs), "
            f"webhooks to {config.webhook_url}; no real money moves",
            flush=True,
        )
        if not settings.stripe_webhook_secrets or not settings.monetbil_service_secret:
            print(_ingress_hint(running.base_url, config), flush=True)
        stopping.wait()
    return 0


def _ingress_hint(base: str, config: Any) -> str:
    return (
        "the ingress verifies these webhooks with: "
        f"STRIPE_API_KEY={sandbox.SANDBOX_STRIPE_KEY} STRIPE_API_BASE={base} "
        f"STRIPE_WEBHOOK_SECRETS={config.stripe_webhook_secret} "
        f"MONETBIL_SERVICE_KEY={config.monetbil_service_key} MONETBIL_API_BASE={base} "
        f"MONETBIL_SERVICE_SECRET={config.monetbil_service_secret}"
    )


def _act(settings: Settings, args: argparse.Namespace) -> int:
    base = (args.sandbox or f"http://{settings.sandbox_bind}").rstrip("/")
    order_id = args.order if args.action == "trigger" else args.order_id
    body: dict[str, Any] = {"duplicate": args.duplicate, "delay": args.delay}
    if args.action == "trigger":
        body["event"] = args.event_type
    if args.provider:
        body["provider"] = args.provider
    url = f"{base}/sandbox/orders/{quote(order_id, safe='')}/{args.action}"
    # Every delivery may take its own timeout and the delays add up.
    timeout = (1 + args.duplicate) * (args.delay + 15)
    try:
        answer = requests.post(url, json=body, timeout=timeout)
    except requests.RequestException as error:
        print(f"payfleet sandbox: no sandbox answering at {base} ({type(error).__name__})", file=sys.stderr)
        return 2
    result = answer.json()
    if answer.status_code != 200:
        print(f"payfleet sandbox: {result.get('detail', answer.text)}", file=sys.stderr)
        return 2
    return _report(result)


def _report(result: dict[str, Any]) -> int:
    print(f"order {result['order_id']} ({result['provider']}): sent {result['event']}")
    for delivery in result["deliveries"]:
        outcome = f"HTTP {delivery['status']}" if delivery["status"] else f"no answer ({delivery['error']})"
        print(f"  {delivery['label']} -> {delivery['url']}: {outcome}")
    if all(delivery["delivered"] for delivery in result["deliveries"]):
        return 0
    print("  not accepted yet: the sandbox keeps retrying, as the provider would")
    return 1


def _show(settings: Settings, args: argparse.Namespace) -> int:
    base = (args.sandbox or f"http://{settings.sandbox_bind}").rstrip("/")
    try:
        answer = requests.get(f"{base}/sandbox/orders/{quote(args.order_id, safe='')}", timeout=10)
    except requests.RequestException as error:
        print(f"payfleet sandbox: no sandbox answering at {base} ({type(error).__name__})", file=sys.stderr)
        return 2
    print_json(answer.json())
    return 0 if answer.status_code == 200 else 1


def add_commands(commands: Any) -> None:
    command = commands.add_parser("sandbox", help="the local Stripe + Monetbil stand-in (no real money)")
    command.add_argument("--bind", help="HOST:PORT to serve on (default SANDBOX_BIND, 127.0.0.1:12111)")
    command.add_argument("--webhook-url", help="the ingress's base address (default PUBLIC_BASE_URL)")
    command.set_defaults(run=_serve)
    actions = command.add_subparsers(dest="action")

    def acting(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--duplicate", type=int, default=0, help="send the webhook N more times")
        parser.add_argument("--delay", type=float, default=0.0, help="wait S seconds before each sending")
        parser.add_argument("--provider", choices=("stripe", "monetbil"), help="when both know the order")
        parser.add_argument("--sandbox", help="the sandbox's address (default http://SANDBOX_BIND)")
        parser.set_defaults(run=_act)

    for action, what in (
        ("pay", "the customer pays"),
        ("fail", "the payment fails (card declined, mobile money refused)"),
        ("cancel", "the customer cancels"),
        ("refund", "the payment is refunded in full (Stripe)"),
    ):
        parser = actions.add_parser(action, help=what)
        parser.add_argument("order_id")
        acting(parser)
    trigger = actions.add_parser("trigger", help="send any event payfleet maps, whatever the state")
    trigger.add_argument("event_type", help="a Stripe event type, or a Monetbil callback status")
    trigger.add_argument("--order", required=True, help="the order id")
    acting(trigger)
    show = actions.add_parser("show", help="the order's payment as the sandbox holds it")
    show.add_argument("order_id")
    show.add_argument("--sandbox", help="the sandbox's address (default http://SANDBOX_BIND)")
    show.set_defaults(run=_show)
