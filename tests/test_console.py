"""The operator's console in a real headless browser: Debian's chromium driven by
Playwright (``executable_path``, no browser download), against a real daemon process
(``python -m dispatch serve``) on a free port and a real redis-server.

Each test signs in and works one page as an operator would. With
DISPATCH_CONSOLE_SHOTS=<dir> (``make screenshots``), each page's screenshot is saved
there (docs/console/ holds the ones the README shows).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from .conftest import RedisProcess, _free_port, codes_text
from .httpkit import ADMIN

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")

CHROMIUM = os.environ.get("DISPATCH_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("DISPATCH_CONSOLE_SHOTS")
expect = playwright.expect


# ---- a daemon, its API, and a browser ---------------------------------------------------

class Daemon:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = ADMIN,
            ctype: str = "application/json") -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = ctype
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        return r.status, json.loads(raw) if raw and r.getheader("content-type", "").startswith("application/json") \
            else raw

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, data = self.api(method, path, body, **kw)
        assert status < 300, (method, path, status, data)
        return data

    def until(self, cond: Callable[[], Any], what: str, deadline_s: float = 30.0) -> Any:
        """Poll *cond* until it is truthy (a generous deadline: this waits for the daemon's own loop)."""
        end = time.monotonic() + deadline_s
        while not (got := cond()):
            assert time.monotonic() < end, f"{what}: not reached in time\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        return got

    def shop(self, codes: int = 5) -> None:
        """SKU g100 (low stock at 3), supplier sup, and *codes* codes of it in batch b1."""
        self.ok("POST", "/admin/skus", {"sku": "g100", "name": "Game card 100", "face_value": 10000, "currency": "CNY",
                                        "price": 9500, "low_stock_threshold": 3})
        self.ok("POST", "/admin/suppliers", {"supplier": "sup", "name": "Supplier"})
        if codes:
            self.ok("POST", "/admin/batches?sku=g100&supplier=sup&unit_cost=9000&batch_id=b1",
                    codes_text("SEED", codes), ctype="text/plain")

    def distributor(self, name: str = "shop", funds: int = 1_000_000) -> str:
        key = self.ok("POST", "/admin/distributors", {"distributor": name, "name": name.title()})["api_key"]
        if funds:
            self.ok("POST", f"/admin/distributors/{name}/topup", {"amount": funds, "reference": f"seed-{name}"})
        return key


@pytest.fixture(scope="module")
def redis_server(redis_factory: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_factory()


@pytest.fixture
def daemon(redis_server: RedisProcess, tmp_path: Path) -> Iterator[Daemon]:
    with redis.Redis.from_url(redis_server.tcp_url) as client:
        client.flushall()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(DISPATCH_REDIS_URL=redis_server.tcp_url, DISPATCH_ADMIN_TOKEN=ADMIN,
               DISPATCH_DATA_DIR=str(tmp_path / "data"), DISPATCH_AUTH_CACHE_TTL_S="0",
               DISPATCH_WEBHOOK_MAX_ATTEMPTS="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dispatch", "serve", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    d = Daemon(port, proc, log)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return d.api("GET", "/readyz", token=None)[0] == 200
            except OSError:
                return False
        d.until(up, "the daemon answers")
        yield d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the console tests need Debian's chromium at {CHROMIUM}: `make browser` installs it "
                    "(apt-get install -y chromium); DISPATCH_CHROMIUM names another binary")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Tab:
    """One browser tab on the console, recording what the page must never do."""

    def __init__(self, page: Any, daemon: Daemon) -> None:
        self.page, self.daemon = page, daemon
        self.dialogs: list[str] = []
        self.problems: list[str] = []    # script errors and refused (CSP) loads
        self.urls: list[str] = []
        self.auth: list[str | None] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
                and self.problems.append(m.text))
        page.on("request", self._request)

    def _request(self, request: Any) -> None:
        self.urls.append(request.url)
        if "/admin/" in request.url:
            self.auth.append(request.headers.get("authorization"))

    def open(self) -> Any:
        return self.page.goto(f"{self.daemon.url}/console")

    def sign_in(self, token: str = ADMIN) -> None:
        self.open()
        self.page.fill("#token", token)
        self.page.click("#sign-in button[type=submit]")
        expect(self.page.locator("#page-overview")).to_be_visible()

    def go(self, name: str) -> Any:
        self.page.click(f'#nav a[data-page="{name}"]')
        view = self.page.locator(f"#page-{name}")
        expect(view.locator("h2")).to_be_visible()
        return view

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)

    def row(self, container: str, id_: str) -> Any:
        return self.page.locator(f'{container} tr[data-id="{id_}"]')


@pytest.fixture
def tab(browser: Any, daemon: Daemon) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    t = Tab(context.new_page(), daemon)
    yield t
    context.close()
    assert t.dialogs == [] and t.problems == []
    assert all(ADMIN not in u for u in t.urls)  # the token never goes in a URL
    assert t.auth and all(a == f"Bearer {ADMIN}" for a in t.auth[1:])


# ---- the pages ------------------------------------------------------------------------------

def test_sign_in_refuses_a_wrong_token_and_keeps_the_right_one_in_the_tab(tab: Tab) -> None:
    page = tab.page
    response = tab.open()
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["content-type"].startswith("text/html")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#nav")).to_be_hidden()

    page.fill("#token", "not-the-token")
    page.click("#sign-in button[type=submit]")
    expect(page.locator('#sign-in [data-for="token"]')).to_have_text("missing or invalid admin token")
    expect(page.locator("#nav")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    page.fill("#token", ADMIN)
    page.click("#sign-in button[type=submit]")
    expect(page.locator("#page-overview")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('dispatch.adminToken')") == ADMIN
    assert page.evaluate("localStorage.length") == 0
    expect(page.locator("#store-health")).to_contain_text("ready")
    expect(page.locator("#refusals")).to_contain_text("no order refused")
    assert page.locator("canvas#rates").is_visible()

    page.reload()  # the tab keeps the token
    expect(page.locator("#page-overview")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_overview_shows_live_figures(tab: Tab) -> None:
    d = tab.daemon
    d.shop()
    key = d.distributor()
    for ref, qty in (("a", 2), ("b", 50)):
        d.api("POST", "/v1/orders", {"sku": "g100", "qty": qty, "external_ref": ref}, token=key)
    tab.sign_in()
    figures = tab.page.locator("#page-overview .figures")
    expect(figures).to_contain_text("orders since start")
    expect(tab.page.locator("#refusals")).to_contain_text("out_of_stock")
    expect(figures.locator(".figure").nth(4).locator(".value")).to_have_text("2")
    expect(figures.locator(".figure").nth(5).locator(".value")).to_have_text("2")
    tab.page.wait_for_timeout(2500)  # a second point on the chart (only for the screenshot)
    tab.shot("overview")


def test_stock_page_reads_stock_imports_and_voids(tab: Tab) -> None:
    d = tab.daemon
    d.shop(codes=5)
    tab.sign_in()
    view = tab.go("stock")
    row = tab.row("#skus", "g100")
    expect(row).to_contain_text("Game card 100")
    cells = row.locator("td")
    expect(cells.nth(3)).to_have_text("5")      # available
    expect(cells.nth(2)).to_have_text("in stock")
    row.get_by_role("button", name="Batches").click()
    expect(tab.row("#batches", "b1")).to_contain_text("sup")

    form = view.locator("#import-form")
    form.locator("select[name=sku]").select_option("g100")
    form.locator("select[name=supplier]").select_option("sup")
    form.locator("input[name=unit_cost]").fill("lots")
    form.locator("input[name=batch_id]").fill("up-1")
    form.locator("input[name=file]").set_input_files(
        files=[{"name": "codes.txt", "mimeType": "text/plain", "buffer": b"NEWCODE00001\nNEWCODE00002\nbad\x01\n"
                                                                          b"NEWCODE00003\n"}])
    form.get_by_role("button", name="Upload").click()
    expect(form.locator('[data-for="unit_cost"]')).to_contain_text("unit_cost")  # the API's own message
    assert [b["batch_id"] for b in d.ok("GET", "/admin/skus/g100/batches")["batches"]] == ["b1"]  # nothing written

    form.locator("input[name=unit_cost]").fill("9100")
    form.get_by_role("button", name="Upload").click()
    report = view.locator("#import-report")
    expect(report).to_contain_text("Batch up-1: 3 accepted, 0 duplicate, 1 malformed.")
    expect(report.locator("tbody tr")).to_have_text(["3control character"])
    expect(form.locator('[data-for="unit_cost"]')).to_have_text("")
    expect(tab.row("#skus", "g100").locator("td").nth(3)).to_have_text("8")
    tab.shot("stock")

    batch = tab.row("#batches", "up-1")
    batch.get_by_role("button", name="Void").click()
    batch.get_by_role("button", name="Void its unsold codes?").click()
    expect(tab.row("#batches", "up-1").locator("td").nth(3)).to_have_text("voided")
    assert d.ok("GET", "/admin/skus/g100/stock")["voided"] == 3
    assert "NEWCODE" not in tab.page.content() and "SEED" not in tab.page.content()  # codes are never shown


def test_suppliers_page_shows_names_as_text_and_manages_deposits(tab: Tab) -> None:
    d = tab.daemon
    d.shop(codes=0)
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    d.ok("POST", "/admin/suppliers", {"supplier": "evil", "name": evil})
    tab.sign_in()
    view = tab.go("suppliers")
    row = tab.row("#page-suppliers", "evil")
    expect(row.locator("td").nth(1)).to_have_text(evil)
    assert tab.page.evaluate("document.querySelectorAll('script').length") == 1  # app.js alone
    assert tab.page.evaluate("document.querySelectorAll('img').length") == 0
    tab.shot("suppliers")

    row.get_by_role("button", name="Manage").click()
    panel = view.locator("#supplier-panel")
    expect(panel.locator("h3")).to_contain_text(evil)
    deposit = panel.locator("#deposit-form")
    deposit.locator("input[name=amount]").fill("0")
    deposit.locator("input[name=reference]").fill("wire-1")
    deposit.get_by_role("button", name="Top up").click()
    expect(deposit.locator('[data-for="amount"]')).to_contain_text("amount")
    assert d.ok("GET", "/admin/suppliers/evil")["deposit"] == 0
    deposit.locator("input[name=amount]").fill("500")
    deposit.get_by_role("button", name="Top up").click()
    expect(panel).to_contain_text("Deposit 500")
    expect(tab.row("#page-suppliers", "evil").locator("td").nth(3)).to_have_text("500")

    blacklist = panel.locator("#blacklist-form")
    blacklist.locator("input[name=reason]").fill("fraud")
    blacklist.get_by_role("button", name="Blacklist").click()
    expect(panel).to_contain_text("Blacklisted: fraud")
    assert d.ok("GET", "/admin/suppliers/evil")["status"] == "blacklisted"
    panel.get_by_role("button", name="Reinstate").click()
    panel.get_by_role("button", name="Put its parked codes back on sale?").click()
    expect(panel.locator("#blacklist-form")).to_be_visible()
    assert d.ok("GET", "/admin/suppliers/evil")["status"] == "active"


def test_distributors_page_tops_up_suspends_and_rotates_a_key(tab: Tab) -> None:
    d = tab.daemon
    d.shop()
    old_key = d.distributor("shop-1", funds=0)
    tab.sign_in()
    view = tab.go("distributors")
    tab.row("#page-distributors", "shop-1").get_by_role("button", name="Manage").click()
    panel = view.locator("#distributor-panel")
    topup = panel.locator("#topup-form")
    topup.locator("input[name=amount]").fill("25000")
    topup.locator("input[name=reference]").fill("wire-9")
    topup.get_by_role("button", name="Top up").click()
    expect(panel).to_contain_text("Balance 25000")
    expect(tab.row("#page-distributors", "shop-1").locator("td").nth(4)).to_have_text("25000")
    tab.shot("distributors")

    panel.get_by_role("button", name="Suspend").click()
    panel.get_by_role("button", name="Stop its orders now?").click()
    expect(panel.locator("h3")).to_contain_text("suspended")
    status, body = d.api("POST", "/v1/orders", {"sku": "g100", "qty": 1, "external_ref": "x"}, token=old_key)
    assert (status, body["error"]["code"]) == (403, "distributor_suspended")
    panel.get_by_role("button", name="Reactivate").click()
    panel.get_by_role("button", name="Let it order again?").click()
    expect(panel.locator("h3")).to_contain_text("active")

    panel.get_by_role("button", name="Rotate API key").click()
    panel.get_by_role("button", name="The old key stops working: rotate?").click()
    shown = panel.locator("#new-key p").nth(1)
    expect(shown).to_have_text(__import__("re").compile(r"^dk_\S+$"))
    new_key = shown.inner_text()
    assert d.api("GET", "/v1/balance", token=new_key)[0] == 200
    assert d.api("GET", "/v1/balance", token=old_key)[0] == 401
    tab.go("stock")
    tab.go("distributors")
    assert new_key not in tab.page.content()  # shown once


def test_tickets_page_resolves_the_open_queue(tab: Tab) -> None:
    d = tab.daemon
    d.shop()
    key = d.distributor()
    order = d.ok("POST", "/v1/orders", {"sku": "g100", "qty": 3, "external_ref": "po-1"}, token=key)
    tickets = [d.ok("POST", "/v1/tickets", {"order_id": order["order_id"], "code": c["code"], "reason": "used"},
                    token=key)["ticket_id"] for c in order["codes"]]
    tab.sign_in()
    view = tab.go("tickets")
    for t in tickets:
        expect(tab.row("#page-tickets", t)).to_contain_text("shop")
    tab.shot("tickets")

    tab.row("#page-tickets", tickets[0]).get_by_role("button", name="Resolve").click()
    panel = view.locator("#ticket-panel")
    panel.locator("#approve-refund input[name=note]").fill("supplier confirmed")
    panel.get_by_role("button", name="Approve: refund").click()
    expect(panel.locator("#ticket-outcome")).to_have_text(f"Ticket {tickets[0]} approved (refund), 9500 refunded.")
    expect(tab.row("#page-tickets", tickets[0])).to_have_count(0)
    tab.row("#page-tickets", tickets[1]).get_by_role("button", name="Resolve").click()
    panel.get_by_role("button", name="Reject").click()
    expect(panel.locator("#ticket-outcome")).to_have_text(f"Ticket {tickets[1]} rejected.")

    tab.row("#page-tickets", tickets[2]).get_by_role("button", name="Resolve").click()
    d.ok("POST", f"/admin/tickets/{tickets[2]}/resolve", {"decision": "approve"})  # meanwhile, elsewhere
    panel.get_by_role("button", name="Reject").click()
    expect(panel.locator('#reject [data-for="_form"]')).to_contain_text(tickets[2])  # the API's own 409 message
    expect(panel.locator("#ticket-outcome")).to_have_text("")
    tab.go("overview")
    tab.go("tickets")
    expect(view).to_contain_text("no open ticket")
    got = [d.ok("GET", f"/admin/tickets/{t}") for t in tickets]
    assert [(t["status"], t["refund"], t["note"]) for t in got] == [("approved", 9500, "supplier confirmed"),
                                                                    ("rejected", 0, None), ("approved", 9500, None)]
    assert all(c["code"] not in tab.page.content() for c in order["codes"])


class _Receiver:
    """A webhook receiver on a free port answering *status* (changeable)."""

    def __init__(self) -> None:
        self.status = 500
        self.got: list[tuple[int, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = receiver.status
                receiver.got.append((status, body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_page_replays_a_failed_delivery(tab: Tab) -> None:
    d = tab.daemon
    receiver = _Receiver()
    try:
        d.shop()
        key = d.distributor()
        d.ok("PUT", "/admin/distributors/shop/webhook", {"url": receiver.url})
        d.ok("POST", "/v1/orders", {"sku": "g100", "qty": 1, "external_ref": "po-1"}, token=key)
        [failed] = d.until(lambda: d.ok("GET", "/admin/webhooks/failed")["deliveries"], "the delivery fails")
        assert failed["last_error"] == "HTTP 500"
        tab.sign_in()
        view = tab.go("webhooks")
        row = tab.row("#failed", failed["job_id"])
        expect(row).to_contain_text("order.delivered")
        expect(row).to_contain_text("HTTP 500")
        tab.shot("webhooks")

        receiver.status = 200
        row.get_by_role("button", name="Replay").click()
        expect(view.locator("#replay-notice")).to_have_text("1 delivery will be tried again now.")
        expect(view.locator("#failed")).to_contain_text("no failed delivery")
        d.until(lambda: any(s == 200 for s, _ in receiver.got), "the replayed delivery arrives")
        [(_, body)] = [g for g in receiver.got if g[0] == 200]
        assert (body["type"], body["data"]["order_id"]) == ("order.delivered", failed["entity"].split(":", 1)[1])
        assert d.ok("GET", "/admin/webhooks/failed")["deliveries"] == []
    finally:
        receiver.close()
