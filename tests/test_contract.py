"""The contract matches the server: Schemathesis, black-box, against a ``dispatch serve``
process and its own ``/openapi.json``, with the admin token and with a distributor's
key, every check it has, bounded examples (the shortened form of a long fuzz run).

Two checks are left out, for what they count as failures is what this API means to
do: ``positive_data_acceptance`` (a request the document allows may still be refused
with 422 naming what is wrong: a CSV header without ``code``, a code rule whose
max_length is below its min_length, an order query naming external_ref and a cursor)
and ``ensure_resource_availability`` (a new distributor's webhook is 404 until one is
registered). Nothing may answer 5xx, and every answer must match the document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dispatch.engine import Engine

from .conftest import codes_text, make_config
from .httpkit import ADMIN
from .test_server_process import Daemon

pytest.importorskip("schemathesis")

CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance,ensure_resource_availability"]


def schemathesis(port: int, token: str, paths: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", "run",
         f"http://127.0.0.1:{port}/openapi.json", "-H", f"Authorization: Bearer {token}", *CHECKS,
         "--include-path-regex", paths, "--max-examples", "5", "--workers", "1", "--seed", "16",
         "--generation-database", "none", "--no-color"],
        capture_output=True, text=True, cwd=tmp, timeout=600)


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
        flushed_redis_url: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "engine", redis_url=flushed_redis_url)
    async with Engine(cfg, sweep=False) as e:
        await e.create_sku("g100", "Game card", 10000, "USD", 9500, code_rule={"min_length": 4})
        await e.create_supplier("sup", "Supplier")
        await e.import_codes(codes_text("FUZZ", 200), sku="g100", supplier="sup", unit_cost=9000)
        key = (await e.create_distributor("acme", "Acme")).api_key
        await e.topup("acme", 10_000_000, "seed")
    daemon = Daemon(tmp_path, {"DISPATCH_REDIS_URL": flushed_redis_url, "DISPATCH_MASTER_KEY": cfg.master_key,
                               "DISPATCH_DATA_DIR": str(tmp_path / "engine")})
    try:
        await daemon.ready()
        for token, paths in ((key, "^/v1/"), (ADMIN, "^/(admin|healthz|readyz|metrics|openapi)")):
            run = schemathesis(daemon.port, token, paths, tmp_path)
            assert run.returncode == 0, run.stdout[-6000:]
            assert " 0 generated" not in run.stdout and "generated" in run.stdout, run.stdout[-2000:]
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.logs()
    async with Engine(cfg, sweep=False) as e:
        assert await e.audit() == []
