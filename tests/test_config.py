"""Configuration: defaults, TOML file, environment, and clear errors."""

from __future__ import annotations

import pytest

from dispatch.config import Config, cluster_url, sentinel_url
from dispatch.errors import ConfigError


def test_defaults_need_nothing() -> None:
    cfg = Config.load(environ={})
    assert (cfg.redis_url, cfg.port, cfg.appendfsync, cfg.data_dir) == (None, 8080, "always", "data")


def test_environment_overrides_file(tmp_path) -> None:
    f = tmp_path / "dispatch.toml"
    f.write_text('port = 9000\ndata_dir = "/srv/d"\nreserve_ttl_s = 60\n')
    cfg = Config.load(f, environ={"DISPATCH_PORT": "9100", "DISPATCH_OLD_MASTER_KEYS": "a, b",
                                  "DISPATCH_UNRELATED_TOOL": "x"})
    assert (cfg.port, cfg.data_dir, cfg.reserve_ttl_s, cfg.old_master_keys) == (9100, "/srv/d", 60, ("a", "b"))
    assert Config.from_file(f).port == 9000


@pytest.mark.parametrize("env, message", [
    ({"DISPATCH_PORT": "eighty"}, "port"),
    ({"DISPATCH_PORT": "70000"}, "port"),
    ({"DISPATCH_APPENDFSYNC": "sometimes"}, "appendfsync"),
    ({"DISPATCH_RESERVE_TTL_S": "600", "DISPATCH_MAX_RESERVE_TTL_S": "60"}, "max_reserve_ttl_s"),
    ({"DISPATCH_SWEEP_INTERVAL_S": "0"}, "sweep_interval_s"),
])
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=env)


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad, environ={})
    typo = tmp_path / "typo.toml"
    typo.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        Config.load(typo, environ={})


def test_importing_the_package_is_cheap() -> None:
    """`import dispatch` loads neither Redis nor cryptography (the engine loads on first use)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import dispatch, sys; "
                          "print(sorted(m for m in ('redis', 'cryptography', 'dispatch.engine') if m in sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("url, tls, seeds", [
    ("redis+cluster://10.0.0.1:7000", False, ((("10.0.0.1", 7000),))),
    ("redis+cluster://a:7000,b:7001,[::1]:7002/0", False, (("a", 7000), ("b", 7001), ("::1", 7002))),
    ("rediss+cluster://u:p%40ss@h1:6380", True, (("h1", 6380),)),
])
def test_cluster_urls_name_their_seed_nodes(url: str, tls: bool, seeds: tuple) -> None:
    cfg = Config.load(environ={"DISPATCH_REDIS_URL": url})
    assert cfg.redis_url == url
    got = cluster_url(url)
    assert got is not None and (got.tls, got.seeds) == (tls, seeds)
    if "@" in url:
        assert (got.username, got.password) == ("u", "p@ss")


def test_a_cluster_url_in_the_file(tmp_path) -> None:
    f = tmp_path / "dispatch.toml"
    f.write_text('redis_url = "redis+cluster://h1:7000,h2:7000"\n')
    assert cluster_url(Config.load(f, environ={}).redis_url).seeds == (("h1", 7000), ("h2", 7000))
    f.write_text('redis_url = "redis+cluster://h1"\n')
    with pytest.raises(ConfigError, match="'h1' has no port"):
        Config.load(f, environ={})


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:1", "unix:///tmp/r.sock", "nonsense"])
def test_other_urls_are_one_redis(url: str) -> None:
    assert cluster_url(url) is None and sentinel_url(url) is None
    assert Config.load(environ={"DISPATCH_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url, message", [
    ("redis+cluster://", "no seed node"),
    ("redis+cluster://u:p@", "no seed node"),
    ("redis+cluster://h1", "seed node 'h1' has no port"),
    ("redis+cluster://h1:7000,,h2:7000", "an empty seed node"),
    ("redis+cluster://:7000", "seed node ':7000' has no host"),
    ("redis+cluster://h1:70000", "'h1:70000': the port must be a number from 1 to 65535"),
    ("redis+cluster://h1:x", "'h1:x': the port must be a number"),
    ("redis+cluster://h1:0", "the port must be a number from 1"),
    ("redis+cluster://[::1:7000", r"'\[::1:7000' is not \[ipv6\]:port"),
    ("redis+cluster://h1:7000/2", "only database 0, not '2'"),
    ("rediss+cluster://h1:7000?ssl_cert_reqs=none", "no query"),
])
def test_malformed_cluster_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ={"DISPATCH_REDIS_URL": url})


@pytest.mark.parametrize("url, tls, sentinels, service", [
    ("redis+sentinel://10.0.0.1:26379/mymaster", False, (("10.0.0.1", 26379),), "mymaster"),
    ("redis+sentinel://a:26379,b:26380,[::1]:26381/shop", False, (("a", 26379), ("b", 26380), ("::1", 26381)), "shop"),
    ("rediss+sentinel://u:p%40ss@h1:26379/cards%201", True, (("h1", 26379),), "cards 1"),
])
def test_sentinel_urls_name_their_sentinels_and_service(url: str, tls: bool, sentinels: tuple, service: str) -> None:
    cfg = Config.load(environ={"DISPATCH_REDIS_URL": url})
    assert cfg.redis_url == url and cluster_url(url) is None
    got = sentinel_url(url)
    assert got is not None and (got.tls, got.sentinels, got.service) == (tls, sentinels, service)
    assert (got.username, got.password) == (("u", "p@ss") if "@" in url else (None, None))


def test_a_sentinel_url_in_the_file(tmp_path) -> None:
    f = tmp_path / "dispatch.toml"
    f.write_text('redis_url = "redis+sentinel://s1:26379,s2:26379/mymaster"\nmin_replicas_acked = 1\n')
    cfg = Config.load(f, environ={})
    assert sentinel_url(cfg.redis_url).sentinels == (("s1", 26379), ("s2", 26379))
    assert (cfg.min_replicas_acked, cfg.replica_ack_timeout_ms) == (1, 1000)
    f.write_text('redis_url = "redis+sentinel://s1:26379"\n')
    with pytest.raises(ConfigError, match="no service name"):
        Config.load(f, environ={})


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://", "no service name"),
    ("redis+sentinel://h1:26379", "no service name"),
    ("redis+sentinel://h1:26379/", "no service name"),
    ("redis+sentinel:///mymaster", "no sentinel"),
    ("redis+sentinel://u:p@/mymaster", "no sentinel"),
    ("redis+sentinel://h1/mymaster", "sentinel 'h1' has no port"),
    ("redis+sentinel://h1:26379,,h2:26379/m", "an empty sentinel"),
    ("redis+sentinel://:26379/m", "sentinel ':26379' has no host"),
    ("redis+sentinel://h1:99999/m", "'h1:99999': the port must be a number from 1 to 65535"),
    ("redis+sentinel://h1:x/m", "'h1:x': the port must be a number"),
    ("redis+sentinel://[::1:26379/m", r"'\[::1:26379' is not \[ipv6\]:port"),
    ("redis+sentinel://h1:26379/mymaster/2", "one service name"),
    ("rediss+sentinel://h1:26379/m?ssl_cert_reqs=none", "no query"),
    ("redis+sentinel://h1:26379/m#x", "no query or fragment"),
])
def test_malformed_sentinel_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ={"DISPATCH_REDIS_URL": url})


@pytest.mark.parametrize("env, message", [
    ({"DISPATCH_MIN_REPLICAS_ACKED": "1"}, "the embedded Redis has none"),
    ({"DISPATCH_MIN_REPLICAS_ACKED": "-1", "DISPATCH_REDIS_URL": "redis://h:6379"}, "min_replicas_acked"),
    ({"DISPATCH_MIN_REPLICAS_ACKED": "one", "DISPATCH_REDIS_URL": "redis://h:6379"}, "min_replicas_acked"),
    ({"DISPATCH_REPLICA_ACK_TIMEOUT_MS": "0"}, "replica_ack_timeout_ms"),
])
def test_bad_replication_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.load(environ=env)


@pytest.mark.parametrize("url", ["redis+sentinel://h:26379/m", "redis+cluster://h:7000,h:7001"])
def test_replicas_acked_with_an_external_redis(url: str) -> None:
    cfg = Config.load(environ={"DISPATCH_MIN_REPLICAS_ACKED": "2", "DISPATCH_REPLICA_ACK_TIMEOUT_MS": "250",
                               "DISPATCH_REDIS_URL": url})
    assert (cfg.min_replicas_acked, cfg.replica_ack_timeout_ms) == (2, 250)
