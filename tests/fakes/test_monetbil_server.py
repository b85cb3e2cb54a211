"""The fake Monetbil server and the Monetbil signing helpers, exercised over real HTTP."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import requests

from tests.fakes.monetbil_server import CHECK_PATH, FakeMonetbil
from tests.support.monetbil_signing import sign_monetbil, signed_callback, verify_monetbil

SECRET = "svc_test_secret"


@pytest.fixture
def fake() -> Iterator[FakeMonetbil]:
    with FakeMonetbil() as server:
        yield server
    assert server.internal_errors == []


def _widget(
    fake: FakeMonetbil,
    key: str | None = None,
    timeout: float = 5,
    extra: dict[str, str] | None = None,
    **overrides: str,
) -> Any:
    form = {
        "amount": "1500",
        "currency": "XAF",
        "payment_ref": "ord_1",
        "item_ref": "order-1",
        "notify_url": "http://shop.test/webhooks/monetbil",
        "return_url": "http://shop.test/done",
        "phone": "237699000111",
        "email": "a@b.test",
        **(extra or {}),
        **overrides,
    }
    url = f"{fake.base_url}/widget/v2.1/{key or fake.service_key}"
    return requests.post(url, data=form, timeout=timeout)


def _check(fake: FakeMonetbil, payment_id: str) -> requests.Response:
    return requests.post(fake.base_url + CHECK_PATH, data={"paymentId": payment_id}, timeout=5)


# --------------------------------------------------------------------------- widget


def test_widget_returns_a_payment_url_and_remembers_the_request(fake: FakeMonetbil) -> None:
    answer = _widget(fake)
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert body["payment_url"].startswith(fake.base_url + "/pay/")

    remembered = fake.payment_request("ord_1")
    assert remembered is not None
    assert remembered["amount"] == "1500"
    assert remembered["currency"] == "XAF"
    assert remembered["notify_url"] == "http://shop.test/webhooks/monetbil"
    assert remembered["payment_url"] == body["payment_url"]
    assert list(fake.payment_requests) == ["ord_1"]
    assert requests.get(body["payment_url"], timeout=5).status_code == 200
    assert requests.get(fake.base_url + "/pay/nope", timeout=5).status_code == 404

    req = fake.requests[0]
    assert (req.method, req.path, req.status) == ("POST", "/widget/v2.1/svc_test_key", 200)
    assert req.form["payment_ref"] == "ord_1"
    assert req.header("content-type") == "application/x-www-form-urlencoded"


def test_widget_currency_defaults_to_xaf(fake: FakeMonetbil) -> None:
    requests.post(
        f"{fake.base_url}/widget/v2.1/svc_test_key", data={"amount": "10", "payment_ref": "r"}, timeout=5
    )
    remembered = fake.payment_request("r")
    assert remembered is not None and remembered["currency"] == "XAF"


def test_widget_refuses_unknown_service_key(fake: FakeMonetbil) -> None:
    answer = _widget(fake, key="someone_else")
    assert answer.status_code == 200
    assert answer.json() == {"success": False, "message": "Invalid service key"}
    assert fake.payment_requests == {}


@pytest.mark.parametrize(
    ("overrides", "word"),
    [({"amount": ""}, "amount"), ({"payment_ref": ""}, "payment_ref"), ({"amount": "-3"}, "amount")],
)
def test_widget_refuses_missing_or_bad_fields(
    fake: FakeMonetbil, overrides: dict[str, str], word: str
) -> None:
    answer = _widget(fake, extra=overrides)
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is False
    assert word in body["message"]
    assert fake.payment_requests == {}


def test_refuse_all_until_heal(fake: FakeMonetbil) -> None:
    fake.refuse_all("Service suspended")
    assert _widget(fake).json() == {"success": False, "message": "Service suspended"}
    fake.heal()
    assert _widget(fake).json()["success"] is True


def test_fail_next_then_fail_all(fake: FakeMonetbil) -> None:
    fake.fail_next(2, status=502)
    assert [_widget(fake).status_code for _ in range(3)] == [502, 502, 200]
    fake.fail_all(503)
    assert _widget(fake).status_code == 503
    assert _widget(fake).json()["success"] is False
    # widget faults leave checkPayment alone
    assert _check(fake, "TX1").status_code == 200
    fake.heal()
    assert _widget(fake).status_code == 200
    assert fake.count("/widget/") == 6
    assert fake.count("/widget/", method="get") == 0


def test_delay_changes_state_before_the_client_times_out(fake: FakeMonetbil) -> None:
    fake.delay(0.5)
    with pytest.raises(requests.Timeout):
        _widget(fake, timeout=0.1)
    assert fake.payment_request("ord_1") is not None
    fake.delay(None)
    assert _widget(fake).status_code == 200


# --------------------------------------------------------------------------- checkPayment


@pytest.mark.parametrize(("status", "message"), [(1, "successful"), (0, "failed"), (-1, "cancelled")])
def test_check_known_transaction(fake: FakeMonetbil, status: int, message: str) -> None:
    fake.set_transaction("TX1", status, amount="1500", currency="XAF", payment_ref="ord_1", msisdn="2376")
    body = _check(fake, "TX1").json()
    assert body["transaction"] == {
        "transaction_id": "TX1",
        "status": status,
        "amount": 1500,
        "currency": "XAF",
        "payment_ref": "ord_1",
        "msisdn": "2376",
    }
    assert message in body["message"].lower()
    assert fake.checks("TX1") == 1


def test_check_unknown_transaction(fake: FakeMonetbil) -> None:
    answer = _check(fake, "TX_missing")
    assert answer.status_code == 200
    assert answer.json() == {"message": "Transaction not found", "transaction": None}
    assert fake.checks("TX_missing") == 1
    assert fake.checks("TX_other") == 0


def test_set_transaction_updates(fake: FakeMonetbil) -> None:
    fake.set_transaction("TX1", 1, amount="100")
    updated = fake.set_transaction("TX1", 0)
    assert updated == {"transaction_id": "TX1", "status": 0, "amount": 100}
    assert _check(fake, "TX1").json()["transaction"]["status"] == 0


def test_check_faults_are_counted_and_healed(fake: FakeMonetbil) -> None:
    fake.set_transaction("TX1", 1)
    fake.check_fail_next(1)
    assert _check(fake, "TX1").status_code == 500
    assert _check(fake, "TX1").status_code == 200
    fake.check_fail_all(503)
    assert _check(fake, "TX1").status_code == 503
    # check faults leave the widget alone
    assert _widget(fake).status_code == 200
    fake.heal()
    assert _check(fake, "TX1").json()["transaction"]["status"] == 1
    assert fake.checks("TX1") == 4
    assert fake.count(CHECK_PATH) == 4


def test_unknown_path_is_404(fake: FakeMonetbil) -> None:
    assert requests.post(fake.base_url + "/nope", timeout=5).status_code == 404


def test_concurrent_checks_are_all_counted(fake: FakeMonetbil) -> None:
    fake.set_transaction("TX1", 1)
    threads = [threading.Thread(target=_check, args=(fake, "TX1")) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.checks("TX1") == 10


# --------------------------------------------------------------------------- signing


def test_sign_is_md5_of_secret_then_values_in_key_order() -> None:
    fields = {"payment_ref": "ord_1", "amount": "1500", "currency": "XAF", "sign": "ignored"}
    expected = hashlib.md5(b"s3cret" + b"1500" + b"XAF" + b"ord_1").hexdigest()
    assert sign_monetbil(fields, "s3cret") == expected
    assert sign_monetbil(dict(reversed(fields.items())), "s3cret") == expected


def test_sign_is_deterministic_and_changes_with_any_field() -> None:
    fields = {"amount": "1500", "currency": "XAF", "payment_ref": "ord_1", "status": "success", "email": ""}
    base = sign_monetbil(fields, SECRET)
    assert base == sign_monetbil(dict(fields), SECRET)
    assert len(base) == 32 and base == base.lower()
    for key in fields:
        assert sign_monetbil({**fields, key: fields[key] + "x"}, SECRET) != base, key
        without = sign_monetbil({k: v for k, v in fields.items() if k != key}, SECRET)
        # Only values are hashed: dropping a blank field cannot show, any other can.
        assert (without == base) == (fields[key] == ""), key
    assert sign_monetbil({**fields, "extra": "1"}, SECRET) != base
    assert sign_monetbil(fields, SECRET + "x") != base


def test_signed_callback_and_verify() -> None:
    form = signed_callback(SECRET, transaction_id="TX1", status="success")
    assert form["sign"] == sign_monetbil({"transaction_id": "TX1", "status": "success"}, SECRET)
    assert verify_monetbil(form, SECRET)
    assert not verify_monetbil(form, "other")
    assert not verify_monetbil({**form, "status": "failed"}, SECRET)
    assert not verify_monetbil({"status": "success"}, SECRET)


# --------------------------------------------------------------------------- pay


def test_pay_returns_a_signed_callback_and_marks_the_transaction(fake: FakeMonetbil) -> None:
    _widget(fake, user="u42")
    form = fake.pay("ord_1")
    assert verify_monetbil(form, SECRET)
    assert form["service"] == "svc_test_key"
    assert form["payment_ref"] == "ord_1"
    assert form["item_ref"] == "order-1"
    assert form["status"] == "success"
    assert (form["amount"], form["currency"]) == ("1500", "XAF")
    assert form["msisdn"] == "237699000111"
    assert form["email"] == "a@b.test"
    assert form["user"] == "u42"
    assert form["transaction_uuid"]
    assert all(isinstance(v, str) for v in form.values())

    # survives form encoding, blank fields included
    assert verify_monetbil(dict(parse_qsl(urlencode(form), keep_blank_values=True)), SECRET)

    transaction = _check(fake, form["transaction_id"]).json()["transaction"]
    assert transaction["status"] == 1
    assert transaction["payment_ref"] == "ord_1"
    assert transaction["amount"] == 1500


@pytest.mark.parametrize(("status", "check_status"), [("failed", 0), ("cancelled", -1), ("success", 1)])
def test_pay_statuses(fake: FakeMonetbil, status: str, check_status: int) -> None:
    _widget(fake)
    form = fake.pay("ord_1", status=status, transaction_id="TX9", msisdn="237600000001")
    assert (form["status"], form["transaction_id"], form["msisdn"]) == (status, "TX9", "237600000001")
    assert fake.transaction("TX9") is not None
    assert _check(fake, "TX9").json()["transaction"]["status"] == check_status


def test_pay_pending_leaves_check_alone(fake: FakeMonetbil) -> None:
    _widget(fake)
    form = fake.pay("ord_1", status="pending")
    assert verify_monetbil(form, SECRET)
    assert _check(fake, form["transaction_id"]).json()["transaction"] is None


def test_pay_with_other_secret_overrides_and_unknown_ref(fake: FakeMonetbil) -> None:
    with pytest.raises(KeyError):
        fake.pay("never_started")
    form = fake.pay("never_started", amount="700", secret="wrong", fee=None, channel="mobile")
    assert not verify_monetbil(form, SECRET)
    assert verify_monetbil(form, "wrong")
    assert "fee" not in form and form["channel"] == "mobile"
    assert form["amount"] == "700"
    assert fake.pay("never_started", amount="1")["transaction_id"] != form["transaction_id"]


def test_service_secret_is_configurable() -> None:
    with FakeMonetbil(service_key="k2", service_secret="s2") as fake:
        requests.post(
            f"{fake.base_url}/widget/v2.1/k2", data={"amount": "5", "payment_ref": "r"}, timeout=5
        ).raise_for_status()
        form = fake.pay("r")
        assert form["service"] == "k2"
        assert verify_monetbil(form, "s2")
