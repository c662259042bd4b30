"""``dispatch loadtest``: every preset in a short form against ``--spawn`` passes its
verification; a store corrupted on purpose (a sold code pushed back into its pool)
fails it; scenarios load from TOML; the CLI exits non-zero naming the failed check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
import uvloop

from dispatch.cli import main as cli
from dispatch.loadtest.client import Pool
from dispatch.loadtest.run import loadtest
from dispatch.loadtest.scenario import PRESETS, load, preset, scaled
from dispatch.loadtest.target import Seeded, Spawned
from dispatch.records import decode_codes, decode_order
from dispatch.store.keys import PIN_FIELD, AcctKeys, SkuKeys

# short forms: a few seconds each, at rates a shared 2-core CI box sustains
SHORT = {"steady": (3, 0.5), "ramp": (4, 0.4), "flash-sale": (5, 0.5), "holiday-recharge": (5, 0.4)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_short_form_passes_verification(name: str) -> None:
    seconds, rate = SHORT[name]
    s = scaled(preset(name), duration_s=seconds, rate_scale=rate)
    r = uvloop.run(loadtest(s, spawn=True))
    assert r.passed, [c for c in r.checks if not c.ok]
    assert {c.name for c in r.checks} >= {"unique_delivery", "codes_from_stock", "order_qty", "stock_conservation",
                                          "balances", "replays", "acknowledged_orders"}
    st = r.stats
    assert st.sent > 0.5 * s.expected_requests()
    assert r.totals["orders_by_status"].get("delivered", 0) > 0
    assert st.errors.keys() <= {"out_of_stock"}, st.errors  # no timeouts, no 5xx
    if s.retry_share:
        assert st.kinds["replay"] > 0 and r.totals["replays_answered"] > 0
    if s.reserve_share:
        assert st.kinds["confirm"] + st.kinds["cancel"] > 0
    if name == "flash-sale":  # the thin SKUs sell out: refusals, never oversell
        assert st.errors["out_of_stock"] > 0
        for sku in ("flash-a", "flash-b", "flash-c"):
            stock = r.totals["stock"][f"lt{r.run_id}-{sku}"]
            assert stock["available"] == 0 and stock["sold"] + stock["reserved"] == stock["accepted"]


def test_a_sold_code_pushed_back_into_its_pool_is_caught() -> None:
    """Corrupt the store under the API: a delivered code's ciphertext back at the head of
    its SKU's pool with the available counter bumped, then one more purchase of that SKU
    sells it again. Both the conservation and the unique-delivery checks must fail."""
    s = scaled(preset("steady"), duration_s=2, rate_scale=0.25)
    s = msgspec.structs.replace(s, reserve_share=0.0, retry_share=0.0)
    hit: dict[str, str] = {}

    async def corrupt(seeded: Seeded, daemon: Spawned | None) -> None:
        assert daemon is not None
        r = aioredis.Redis.from_url(daemon.redis_url)
        try:
            for dist in seeded.distributors:
                a = AcctKeys(dist)
                for oid, codes in (await r.hgetall(a.codes)).items():
                    if oid == PIN_FIELD:
                        continue
                    sku = decode_order(await r.hget(a.orders, oid)).sku
                    k = SkuKeys(sku)
                    head = await r.zrange(k.queue, 0, 0)
                    if codes and head:
                        await r.lpush(k.pool(int(head[0])), decode_codes(codes)[0])
                        await r.hincrby(k.stats, "available", 1)
                        hit["sku"] = sku
                        break
                if hit:
                    break
        finally:
            await r.aclose()
        assert hit, "no delivered order to corrupt"
        pool = Pool(daemon.url, max_connections=1)
        try:
            body = json.dumps({"sku": hit["sku"], "qty": 1, "external_ref": "after-corruption"}).encode()
            status, _ = await pool.request("POST", "/v1/orders", body, {"Authorization": f"Bearer {seeded.keys[0]}"})
            assert status == 201
        finally:
            await pool.close()

    r = uvloop.run(loadtest(s, spawn=True, after_load=corrupt))
    failed = {c.name: c for c in r.checks if not c.ok}
    assert not r.passed
    assert {"unique_delivery", "stock_conservation"} <= failed.keys(), failed
    assert hit["sku"] in " ".join(failed["stock_conservation"].examples)
    assert failed.keys() <= {"unique_delivery", "stock_conservation"}, failed


def test_cli_runs_a_toml_scenario_and_writes_the_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "peak.toml"
    f.write_text('name = "tiny"\ndistributors = 2\nqty_mix = {1 = 0.9, 3 = 0.1}\nreserve_share = 0.2\n'
                 'retry_share = 0.1\n[catalog]\nsku_count = 3\nzipf_s = 1.0\nstock = 2000\n'
                 '[[phase]]\nduration_s = 1\nrate = 50\nrate_end = 200\n[[phase]]\nduration_s = 1\nrate = 200\n')
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    assert cli(["loadtest", str(f), "--spawn", "--quiet", "--json", str(out), "--plot", str(plot)]) == 0
    report = json.loads(out.read_text())
    assert report["scenario"] == "tiny" and report["verification"]["passed"]
    assert report["latency_ms"]["p99"] > 0 and report["series"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verification PASSED" in capsys.readouterr().out


def test_scenarios_are_strict(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('name = "x"\nbogus = 1\n[[phase]]\nduration_s = 1\nrate = 1\n[catalog]\n')
    with pytest.raises(msgspec.ValidationError, match="bogus"):
        load(f)
    f.write_text('name = "x"\n[[phase]]\nduration_s = 1\nrate = 1\nskus = ["nope"]\n[catalog]\n')
    with pytest.raises(msgspec.ValidationError, match="nope"):
        load(f)
    s = scaled(preset("flash-sale"), duration_s=4.2, rate_scale=2)
    assert s.duration_s == pytest.approx(4.2)
    assert s.phase[2].rate == 2 * preset("flash-sale").phase[2].rate
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope")


def test_cli_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["loadtest", "--preset", "steady"]) == 1
    assert "--spawn" in capsys.readouterr().err


@pytest.mark.parametrize("missing, args", [("hdrh", []), ("matplotlib", ["--plot", "r.png"])])
def test_without_the_extra_the_cli_names_it(missing: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A plain `pip install card-dispatch` has no hdrhistogram or matplotlib: one line says what to install."""
    for name in list(sys.modules):
        if name.partition(".")[0] == missing or name in ("dispatch.loadtest.run", "dispatch.loadtest.report"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    assert cli(["loadtest", "--spawn", "--quiet", *args]) == 1
    assert capsys.readouterr().err == (f"error: the load tester needs the loadtest extra (no module {missing!r}): "
                                       "pip install 'card-dispatch[loadtest]'\n")
