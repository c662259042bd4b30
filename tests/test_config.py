"""Configuration: defaults, TOML file, environment, and clear errors."""

from __future__ import annotations

import pytest

from dispatch.config import Config
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
