"""The ``dispatch`` command against a real redis-server: catalog, money, imports,
exports, master key rotation, and one-line errors."""

from __future__ import annotations

import base64
import getpass
import json
import re
import time
import secrets
from pathlib import Path

import pytest

from dispatch import SyncEngine
from dispatch.cli import main
from dispatch.errors import DispatchError

from .conftest import codes_text, make_config


@pytest.fixture
def env(flushed_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"DISPATCH_REDIS_URL": flushed_redis_url, "DISPATCH_DATA_DIR": str(tmp_path / "data"),
              "DISPATCH_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")
    return values


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def engine(env: dict[str, str], tmp_path: Path, **overrides: object) -> SyncEngine:
    values: dict[str, object] = dict(redis_url=env["DISPATCH_REDIS_URL"], master_key=env["DISPATCH_MASTER_KEY"])
    values.update(overrides)
    return SyncEngine(make_config(tmp_path, **values), sweep=False)


def test_catalog_money_and_errors(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "sku", "create", "g100", "--name", "Game 100", "--face-value", "10000", "--currency", "CNY",
               "--price", "9500", "--low-stock", "3")[0] == 0
    rc, out, _ = run(capsys, "sku", "update", "g100", "--price", "9400", "--status", "paused", "--sale-order",
                     "best_rated", "--after-sales", "replace")
    assert rc == 0 and "9400" in out and "paused" in out and "best_rated" in out and "replace" in out
    rc, out, _ = run(capsys, "sku", "list")
    assert "g100" in out and "Game 100" in out
    assert run(capsys, "supplier", "create", "sup", "--name", "Supplier", "--deposit", "100")[0] == 0
    assert "Supplier" in run(capsys, "supplier", "list")[1]
    assert run(capsys, "tier", "create", "gold", "--discount-bps", "500", "--price", "g100=9000")[0] == 0
    assert "g100=9000" in run(capsys, "tier", "list")[1]
    rc, out, _ = run(capsys, "distributor", "create", "shop", "--name", "Shop", "--tier", "gold",
                     "--allowed-skus", "g100", "--rate-limit", "20")
    assert rc == 0
    key = re.search(r"dk_[A-Za-z0-9_-]+", out)
    assert key is not None
    rc, out, _ = run(capsys, "distributor", "update", "shop", "--status", "suspended", "--credit-limit", "50")
    assert rc == 0 and "suspended" in out
    rc, out, _ = run(capsys, "topup", "shop", "5000", "--reference", "w-1")
    assert rc == 0 and "5000" in out
    rc, out, _ = run(capsys, "distributor", "list")
    assert "shop" in out and "suspended" in out and "20" in out
    rc, out, _ = run(capsys, "stock", "g100")
    assert rc == 0 and "out_of_stock" in out
    with engine(env, tmp_path) as e:
        assert e.authenticate(key[0]) == "shop"
        assert e.rate_limit("shop") == 20
        d = e.get_distributor("shop")
        assert (d.tier, d.credit_limit, d.balance, d.allowed_skus) == ("gold", 50, 5000, ["g100"])

    t = time.gmtime()
    month = f"{t.tm_year:04d}-{t.tm_mon:02d}"
    rc, out, _ = run(capsys, "statement", "shop", month)
    assert rc == 0 and "opening" in out and "topup" in out and "closing" in out and "5000" in out
    assert "NOT reconciled" not in out
    rc, out, _ = run(capsys, "statement", "shop", month, "--csv")
    assert rc == 0 and out.splitlines()[-1] == f"shop,{month},closing,,,,5000,0"
    rc, _, err = run(capsys, "statement", "shop", "2026-1")
    assert rc == 1 and "month must be YYYY-MM" in err and "Traceback" not in err

    rc, out, _ = run(capsys, "limits", "shop", "--daily", "7000", "--max-order-qty", "2")
    assert rc == 0 and "7000" in out and "max_order_qty" in out
    rc, out, _ = run(capsys, "limits", "shop")
    assert rc == 0 and "7000" in out and "spent_today" in out
    rc, _, err = run(capsys, "limits", "shop", "--daily", "-5")
    assert rc == 1 and "daily" in err and "Traceback" not in err
    rc, out, _ = run(capsys, "verify", "shop", "--legal-name", "Zhao Liu", "--id-type", "passport",
                     "--id-number", "P00011122", "--by", "ops")
    assert rc == 0 and "verified" in out and "1122" in out and "P00011122" not in out
    rc, _, err = run(capsys, "verify", "shop", "--legal-name", "Zhao Liu")
    assert rc == 1 and "--id-type, --id-number, --by" in err
    rc, out, _ = run(capsys, "verify", "shop", "--withdraw")
    assert rc == 0 and "unverified" in out

    rc, out, _ = run(capsys, "tier", "rules", "--rule", "gold=100000")
    assert rc == 0 and re.search(r"1\s+.\s+rolling_30d\s+.\s+100000\s+.\s+gold", out)
    rc, _, err = run(capsys, "tier", "rules", "--rule", "gold=100000", "--rule", "platinum=900000")
    assert (rc, err) == (1, "error: rules[1].tier: unknown tier platinum\n")
    rc, _, err = run(capsys, "tier", "rules", "--rule", "gold=-1")
    assert rc == 1 and "TIER=MIN_SPEND" in err and "Traceback" not in err
    rc, out, _ = run(capsys, "tier", "pin", "shop", "gold")
    assert rc == 0 and re.search(r"pinned\s+.\s+True", out) and re.search(r"\btier\s+.\s+gold", out)
    rc, out, _ = run(capsys, "tier", "unpin", "shop")  # 0 spent: no rule reached
    assert rc == 0 and re.search(r"pinned\s+.\s+False", out) and re.search(r"next_tier\s+.\s+gold", out)
    rc, out, _ = run(capsys, "tier", "status", "shop")
    assert rc == 0 and re.search(r"spend\s+.\s+0", out) and re.search(r"next_min_spend\s+.\s+100000", out)
    rc, out, _ = run(capsys, "tier", "rules", "--clear")
    assert rc == 0 and re.search(r"2\s+.\s+.\s+.\s+none: tiers are set by hand", out)

    rc, out, err = run(capsys, "stock", "nope")
    assert (rc, out, err) == (1, "", "error: unknown SKU nope\n")
    rc, _, err = run(capsys, "topup", "shop", "6000", "--reference", "w-1")
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1
    rc, _, err = run(capsys, "import", str(tmp_path / "missing.txt"), "--sku", "g100", "--supplier", "sup",
                     "--cost", "1")
    assert rc == 1 and err.startswith("error: ") and "Traceback" not in err


def test_import_and_export(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "sku", "create", "g100", "--name", "G", "--face-value", "100", "--currency", "CNY", "--price", "90")
    run(capsys, "supplier", "create", "sup", "--name", "S")
    f = tmp_path / "codes.txt"
    f.write_bytes(codes_text("CLI", 50) + b"CLI0000000000001\nbad\x01\n")
    rc, out, _ = run(capsys, "import", str(f), "--sku", "g100", "--supplier", "sup", "--cost", "80",
                     "--batch-id", "cli-1")
    assert rc == 0 and "cli-1" in out
    row = re.search(r"g100\s*│\s*sup\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)", out)
    assert row is not None and row.groups() == ("50", "1", "1"), out
    assert "control character" in out
    with engine(env, tmp_path) as e:
        e.create_distributor("shop", "Shop")
        e.topup("shop", 10_000, "w")
        order = e.purchase("shop", "g100", 2, "po-1")
    out_file = tmp_path / "orders.csv"
    rc, _, err = run(capsys, "export", "orders", "--from", "2000-01-01", "--out", str(out_file))
    assert rc == 0 and "1 orders written" in err
    lines = out_file.read_text().splitlines()
    assert lines[0].startswith("order_id,") and lines[1].startswith(f"{order.order_id},shop,po-1,g100,2,2,90,180,")
    assert order.codes[0].code not in out_file.read_text()
    rc, out, _ = run(capsys, "export", "orders", "--to", "2000-01-01")
    assert rc == 0 and out.count("\n") == 1


def test_master_key_rotation(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = env["DISPATCH_MASTER_KEY"]
    with engine(env, tmp_path) as e:
        e.create_sku("g100", "G", 100, "CNY", 90)
        e.create_supplier("sup", "S")
        e.import_codes(codes_text("ROT", 5), sku="g100", supplier="sup", unit_cost=80)
        e.create_distributor("shop", "Shop")
        e.topup("shop", 10_000, "w")
        before = e.purchase("shop", "g100", 1, "po-1")
    rc, out, _ = run(capsys, "keys")
    assert rc == 0
    new = re.search(r"DISPATCH_MASTER_KEY=(\S+)", out)
    kept = re.search(r'DISPATCH_OLD_MASTER_KEYS="([^"]+)"', out)
    assert new is not None and kept is not None and kept[1] == old and new[1] != old
    # with the new key first and the old one kept: old codes read, fingerprints unchanged
    with engine(env, tmp_path, master_key=new[1], old_master_keys=(old,)) as e:
        assert e.get_order("shop", before.order_id).codes == before.codes
        again = e.import_codes(codes_text("ROT", 5), sku="g100", supplier="sup", unit_cost=80)
        assert (again.accepted, again.duplicate) == (0, 5)
        assert e.purchase("shop", "g100", 1, "po-2").status == "delivered"
        assert e.audit() == []
    # the old configuration can no longer read the fingerprint key
    with pytest.raises(DispatchError):
        engine(env, tmp_path)


def test_after_sales_commands(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "sku", "create", "g100", "--name", "G", "--face-value", "100", "--currency", "CNY", "--price", "90")
    run(capsys, "supplier", "create", "sup", "--name", "S")
    rc, out, _ = run(capsys, "supplier", "deposit", "sup", "5000", "--reference", "wire-1")
    assert rc == 0 and "5000" in out
    with engine(env, tmp_path) as e:
        e.import_codes(codes_text("AS", 10), sku="g100", supplier="sup", unit_cost=80, batch_id="b1")
        e.create_distributor("shop", "Shop")
        e.topup("shop", 10_000, "w")
        order = e.purchase("shop", "g100", 2, "po-1")
        ticket = e.open_ticket("shop", order.order_id, order.codes[1].code, "does not work")
    rc, out, _ = run(capsys, "ticket", "list", "--status", "open")
    assert rc == 0 and ticket.ticket_id in out
    rc, out, _ = run(capsys, "ticket", "resolve", ticket.ticket_id, "approve", "--note", "ok")
    assert rc == 0 and "approved" in out
    rc, out, _ = run(capsys, "supplier", "report", "sup")
    assert rc == 0 and "50.00%" in out and "b1" in out and "4920" in out  # 5000 - unit cost 80
    rc, out, _ = run(capsys, "supplier", "update", "sup", "--status", "blacklisted", "--reason", "fraud")
    assert rc == 0 and "blacklisted" in out
    rc, out, _ = run(capsys, "stock", "g100")
    assert rc == 0 and "parked" in out
    rc, out, _ = run(capsys, "export", "ledger")
    assert rc == 0 and "supplier,sup,1,charge,%s,-80" % ticket.ticket_id in out and "refund" in out
    rc, out, _ = run(capsys, "export", "orders", "--codes", "plain")
    assert rc == 0 and order.codes[0].code in out
    rc, _, err = run(capsys, "ticket", "resolve", "tk_nope", "reject")
    assert (rc, err) == (1, "error: no ticket tk_nope\n")


def test_webhook_commands(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with engine(env, tmp_path) as e:
        e.create_distributor("shop", "Shop")
    rc, out, _ = run(capsys, "webhook", "set", "http://127.0.0.1:9/hooks", "--distributor", "shop")
    assert rc == 0 and re.search(r"whsec_\S+", out)
    rc, _, err = run(capsys, "webhook", "set", "ftp://nowhere")
    assert rc == 1 and "http" in err
    with engine(env, tmp_path) as e:
        hooks = e.engine.webhooks
        assert e._call(hooks.target("shop")).url == "http://127.0.0.1:9/hooks"
        assert e._call(hooks.target(None)) is None
    rc, out, _ = run(capsys, "webhook", "failed")
    assert rc == 0 and "failed deliveries" in out
    rc, out, _ = run(capsys, "webhook", "replay")
    assert rc == 0 and "0 deliveries" in out
    assert run(capsys, "webhook", "remove", "--distributor", "shop")[0] == 0
    rc, _, err = run(capsys, "webhook", "remove", "--distributor", "shop")
    assert (rc, err) == (1, "error: no webhook is registered\n")


def test_tables_show_whole_values_as_text(env: dict[str, str], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "sku", "create", "g100", "--name", "G", "--face-value", "100", "--currency", "CNY", "--price", "90")
    run(capsys, "supplier", "create", "sup", "--name", "[bold]S[/bold] :a:")
    with engine(env, tmp_path, webhook_max_attempts=1) as e:
        e.import_codes(codes_text("TB", 10), sku="g100", supplier="sup", unit_cost=80, batch_id="b1")
        e.create_distributor("shop-with-a-long-name", "Shop")
        e.topup("shop-with-a-long-name", 10_000, "w")
        e._call(e.engine.webhooks.set_target(None, "http://127.0.0.1:9/hooks"))  # nothing listens there
        order = e.purchase("shop-with-a-long-name", "g100", 3, "po-1")
        tickets = [e.open_ticket("shop-with-a-long-name", order.order_id, c.code, "does not work").ticket_id
                   for c in order.codes]
        hooks = e.engine.webhooks
        e._call(hooks.pump())
        e._call(hooks.deliver_due())
        failed = [f.job_id for f in e._call(hooks.failed())]
    assert sum(":a:" in j for j in failed) == 4  # the order and three tickets
    rc, out, _ = run(capsys, "ticket", "list")  # wider than 80 columns: the table grows, ids stay whole
    assert rc == 0 and all(t in out for t in tickets) and order.order_id in out and "…" not in out
    rc, out, _ = run(capsys, "webhook", "failed")
    assert rc == 0 and all(j in out for j in failed) and "🅰" not in out
    rc, out, _ = run(capsys, "supplier", "list")
    assert rc == 0 and "[bold]S[/bold] :a:" in out
    rc, out, _ = run(capsys, "stock", "g100")
    assert rc == 0 and "Forecast(" not in out
    assert re.search(r"forecast\.daily_velocity\s*│\s*\d+\.\d\d\b", out) and "forecast.reorder_qty" in out


def test_import_refusals_rules_and_expiry(env: dict[str, str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "sku", "create", "pin", "--name", "P", "--face-value", "100", "--currency", "EUR",
                     "--price", "90", "--code-rule", '{"charset": "digits"}', "--min-shelf-life", "3600",
                     "--sale-order", "first_expiring")
    assert rc == 0 and "first_expiring" in out
    rc, _, err = run(capsys, "sku", "create", "bad", "--name", "B", "--face-value", "100", "--currency", "eur",
                     "--price", "90")
    assert rc == 1 and "currency" in err
    run(capsys, "supplier", "create", "sup", "--name", "S")
    png = tmp_path / "codes.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    rc, _, err = run(capsys, "import", str(png), "--sku", "pin", "--supplier", "sup", "--cost", "1")
    assert rc == 1 and "not text" in err and "Traceback" not in err
    f = tmp_path / "codes.csv"
    f.write_text("code,expires_at\n12345678,2020-01-01\n1234567X,2999-01-01\n22222222,2999-01-01\n"
                 "22222222,2999-01-01\n")
    rc, out, _ = run(capsys, "import", str(f), "--sku", "pin", "--supplier", "sup", "--cost", "1", "--batch-id", "b")
    assert rc == 0 and "expired (expires_at is past)" in out and "code has characters outside digits" in out
    assert re.search(r"5\s*│\s*this_file", out), out
    with engine(env, tmp_path) as e:
        stock = e.stock("pin")
        assert (stock.accepted, stock.available) == (1, 1)
        assert [b.batch_id for b in e.supplier_report("sup").batches] == ["b"]


def test_admin_tokens_and_the_audit_log(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "admin-token", "create", "ann", "--role", "finance")
    token = re.search(r"adm_[A-Za-z0-9_-]+", out)
    assert rc == 0 and token is not None and "finance" in out
    rc, out, _ = run(capsys, "admin-token", "list")
    assert rc == 0 and "ann" in out and token[0] not in out
    assert run(capsys, "distributor", "create", "shop", "--name", "Shop")[0] == 0
    assert run(capsys, "topup", "shop", "700", "--reference", "w-1")[0] == 0
    rc, out, _ = run(capsys, "audit-log", "--json", "--target", "shop")
    page = json.loads(out)
    user = f"cli:{getpass.getuser()}"
    assert rc == 0 and [(e["actor"], e["via"], e["action"]) for e in page["entries"]] == [
        (user, "cli", "topup"), (user, "cli", "create_distributor")]
    assert (page["entries"][0]["before"]["balance"], page["entries"][0]["after"]["balance"]) == (0, 700)
    rc, out, err = run(capsys, "audit-log", "--limit", "1")
    assert rc == 0 and "topup" in out and "--cursor" in err and token[0] not in out
    assert run(capsys, "admin-token", "revoke", "ann")[0] == 0
    rc, _, err = run(capsys, "admin-token", "revoke", "ann")
    assert rc == 1 and "no admin token ann" in err
