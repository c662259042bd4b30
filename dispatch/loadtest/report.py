"""The final report: a dict (written as JSON), a text rendering, and a PNG plot of
throughput and latency over time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from .run import Result

__all__ = ["summary", "text", "write_json", "plot"]

_PCTS = (50, 90, 99, 99.9)


def _pcts(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {}
    out = {f"p{p:g}": round(h.get_value_at_percentile(p) / 1000, 3) for p in _PCTS}
    out["max"] = round(h.get_max_value() / 1000, 3)
    out["mean"] = round(h.get_mean_value() / 1000, 3)
    return out


def summary(r: Result) -> dict[str, Any]:
    """Everything in the report, JSON-ready (times in milliseconds)."""
    st = r.stats
    series = []
    for i in range(len(st.sec_ok)):
        h = st.sec_hist[i]
        n = h.get_total_count()
        series.append({"t": i, "target_rate": round(r.per_second_rate[i], 1) if i < len(r.per_second_rate) else 0,
                       "sent": st.sec_sent[i], "ok": st.sec_ok[i], "errors": st.sec_err[i],
                       "p50_ms": round(h.get_value_at_percentile(50) / 1000, 3) if n else None,
                       "p99_ms": round(h.get_value_at_percentile(99) / 1000, 3) if n else None})
    completed = st.ok + st.failed
    return {
        "scenario": r.scenario.name, "target": r.target, "spawned": r.spawned, "run_id": r.run_id,
        "duration_s": round(r.seconds, 3), "seed_s": round(r.seed_s, 3),
        "requests": {"sent": st.sent, "completed": completed, "ok": st.ok, "failed": st.failed,
                     "per_second": round(completed / r.seconds, 1) if r.seconds else 0.0,
                     "by_kind": dict(st.kinds), "by_status": {str(k): v for k, v in sorted(st.statuses.items())}},
        "errors": dict(st.errors.most_common()),
        "latency_ms": _pcts(st.latency),
        "latency_ms_by_kind": {k: _pcts(h) for k, h in sorted(st.by_kind.items())},
        "service_time_ms": _pcts(st.service),
        "generator": {"wait_ms": _pcts(st.lag), "cpu_s": round(r.cpu_s, 3)},
        "verification": {"passed": r.passed, "checks": [c.as_dict() for c in r.checks]},
        "store": {k: v for k, v in r.totals.items() if k != "stock"},
        "series": series,
    }


def text(s: dict[str, Any]) -> str:
    rq = s["requests"]
    lines = [f"scenario {s['scenario']} against {s['target']}{' (spawned)' if s['spawned'] else ''}, "
             f"run {s['run_id']}",
             f"  {rq['completed']} requests in {s['duration_s']:.1f} s: {rq['per_second']:.0f}/s; "
             f"{rq['ok']} ok, {rq['failed']} not",
             "  by kind:   " + ", ".join(f"{k} {v}" for k, v in rq["by_kind"].items()),
             "  by status: " + ", ".join(f"{k}: {v}" for k, v in rq["by_status"].items()),
             "  errors:    " + (", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none")]
    lines.append("  latency ms (from the intended start)")
    head = ["", *[f"p{p:g}" for p in _PCTS], "max"]
    rows = [("all", s["latency_ms"])] + list(s["latency_ms_by_kind"].items()) + [
        ("service", s["service_time_ms"]), ("wait", s["generator"]["wait_ms"])]
    lines.append("    " + "".join(f"{h:>10}" for h in head))
    for name, p in rows:
        if p:
            lines.append("    " + f"{name:>10}" + "".join(f"{p[k]:>10.2f}" for k in head[1:]))
    lines.append(f"  generator CPU {s['generator']['cpu_s']:.1f} s")
    st = s["store"]
    lines.append(f"  store: {st.get('orders', 0)} orders ({', '.join(f'{k} {v}' for k, v in st.get('orders_by_status', {}).items())}), "
                 f"{st.get('codes_delivered', 0)} codes delivered")
    v = s["verification"]
    lines.append(f"verification {'PASSED' if v['passed'] else 'FAILED'}")
    for c in v["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
        lines += [f"         {e}" for e in c["examples"]]
    return "\n".join(lines)


def write_json(s: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(s, indent=2) + "\n")


def plot(s: dict[str, Any], path: str | Path) -> None:
    """Throughput (target, ok, errors) and latency (p50, p99) per second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = s["series"]
    t = [x["t"] for x in series]
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    a.plot(t, [x["target_rate"] for x in series], "--", color="grey", label="scheduled orders/s")
    a.plot(t, [x["ok"] for x in series], color="tab:green", label="2xx/s (all kinds)")
    a.plot(t, [x["errors"] for x in series], color="tab:red", label="non-2xx or failed/s")
    a.set_ylabel("requests / s")
    a.legend(loc="upper left", fontsize=8)
    a.grid(alpha=0.3)
    b.plot(t, [x["p50_ms"] for x in series], color="tab:blue", label="p50")
    b.plot(t, [x["p99_ms"] for x in series], color="tab:orange", label="p99")
    b.set_yscale("log")
    b.set_ylabel("latency ms (from intended start)")
    b.set_xlabel("seconds")
    b.legend(loc="upper left", fontsize=8)
    b.grid(alpha=0.3, which="both")
    v = "verification passed" if s["verification"]["passed"] else "verification FAILED"
    fig.suptitle(f"dispatch loadtest: {s['scenario']} — {s['requests']['per_second']:.0f} req/s, "
                 f"p99 {s['latency_ms'].get('p99', 0):.1f} ms, {v}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
