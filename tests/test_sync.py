"""The blocking facade, and the engine on its embedded default store."""

from __future__ import annotations

import os
import stat

import pytest

from dispatch import Config, OutOfStockError, SyncEngine
from dispatch.errors import ConfigError


def test_sync_engine_on_the_embedded_store(tmp_path) -> None:
    cfg = Config(data_dir=str(tmp_path / "data"), appendfsync="everysec")  # no redis_url, no master key
    with SyncEngine(cfg) as engine:
        engine.create_sku("s", "S", 100, "EUR", 90)
        engine.create_supplier("p", "P")
        assert engine.import_codes(b"ONE\nTWO\n", sku="s", supplier="p", unit_cost=50).accepted == 2
        engine.create_distributor("d", "D")
        engine.topup("d", 1000, "t")
        order = engine.purchase("d", "s", 2, "r")
        assert sorted(c.code for c in order.codes) == ["ONE", "TWO"]
        with pytest.raises(OutOfStockError):
            engine.purchase("d", "s", 1, "r2")
        assert engine.audit() == []
        sock = engine.store.embedded.socket_path
    key = tmp_path / "data" / "master.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600  # generated once, private
    assert not os.path.exists(sock)  # the embedded server was stopped
    # the same data dir and generated key read the same codes back
    with SyncEngine(cfg, sweep=False) as engine:
        assert [c.code for c in engine.get_order_by_ref("d", "r").codes] == [c.code for c in order.codes]


def test_bad_master_key_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="master_key"):
        SyncEngine(Config(data_dir=str(tmp_path), master_key="not base64!"))
    with pytest.raises(ConfigError, match="32 bytes"):
        SyncEngine(Config(data_dir=str(tmp_path), master_key="c2hvcnQ="))
