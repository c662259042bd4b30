"""``dispatch loadtest``: open-loop peak traffic against a daemon, then proof through
the API that nothing was oversold, duplicated or lost.

Modules: scenario (TOML scenarios and presets), client (the HTTP/1.1 pool), target
(``--spawn`` and seeding), run (the open-loop driver and HDR statistics), verify (the
checks), report (text, JSON, PNG), progress (the live view).

The HDR statistics and the plot need the ``loadtest`` extra (hdrhistogram, matplotlib):
``pip install 'card-dispatch[loadtest]'``. The engine and the daemon do without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main"]

_EXTRA = ("hdrh", "matplotlib")  # the modules of the `loadtest` extra


def main(*, scenario: str | None = None, preset: str | None = None, url: str | None = None,
         admin_token: str | None = None, spawn: bool = False, duration_s: float | None = None,
         rate_scale: float = 1.0, overrides: dict[str, Any] | None = None, json_path: str | None = None,
         plot_path: str | None = None, quiet: bool = False, keep: bool = False) -> int:
    """Run one load test and print its report; 0 if every check passed, 1 if one failed."""
    import sys

    import msgspec
    import uvloop

    from . import scenario as sc
    from .progress import live
    from .target import LoadtestError

    try:
        from . import report
        from .run import loadtest
        if plot_path:
            import matplotlib  # noqa: F401
    except ModuleNotFoundError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in _EXTRA:
            raise
        raise LoadtestError(f"the load tester needs the loadtest extra (no module {missing!r}): "
                            "pip install 'card-dispatch[loadtest]'") from None

    s = sc.load(scenario) if scenario else sc.preset(preset or "steady")
    if duration_s is not None or rate_scale != 1.0:
        s = sc.scaled(s, duration_s=duration_s, rate_scale=rate_scale)
    if overrides:
        s = msgspec.convert({**msgspec.to_builtins(s), **overrides}, sc.Scenario)
    result = uvloop.run(loadtest(s, url=url, admin_token=admin_token, spawn=spawn, keep=keep,
                                 progress=None if quiet else live))
    summary = report.summary(result)
    print(report.text(summary))
    if json_path:
        report.write_json(summary, json_path)
    if plot_path:
        report.plot(summary, plot_path)
    if not result.passed:
        failed = ", ".join(c.name for c in result.checks if not c.ok)
        print(f"error: verification failed: {failed}", file=sys.stderr)
        return 1
    return 0
