"""The soak harness (`python -m loadtest soak`) runs end to end for 60 s on loopback.

The run churns sessions through a real router with a real Valkey store (and a trickle of ACP
sessions when the acp extra is installed), samples the router every 5 s and writes the JSON
and HTML report with its plot. The RSS-slope verdict of a 60 s run is printed, not asserted
(far too short to mean anything); sizes that must hold on any run are asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RETENTION_S = 10.0
SAMPLE_S = 5.0


@pytest.mark.timeout(300)
def test_soak_60s_samples_the_router_and_sizes_stay_bounded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "soak", "--seconds", "60", "--sample-s",
         str(SAMPLE_S), "--retention-s", str(RETENTION_S), "--rate", "15", "--warmup-s", "20",
         "--quiet", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)  # the verdict of a 60 s run is informational
    result = json.loads((out / "latest-soak.json").read_text())
    samples = result["samples"]
    assert len(samples) >= 60 / SAMPLE_S  # one at the start, then every SAMPLE_S
    assert all(s["rss_bytes"] > 0 and s["fds"] > 0 and s["metrics_bytes"] > 0
               for s in samples)
    load = result["load"]
    assert load["sessions_started"] > 0 and load["misses"] > 0
    assert load["sessions_resolved"] == load["sessions_started"]
    assert not load["errors"], load["errors"]
    assert load["in_flight_bound_hits"] == 0  # the generator kept up at this rate
    acp_sessions = load["acp"].get("sessions", 0)
    trickle = result["acp"].startswith("trickle")
    if trickle:
        assert acp_sessions > 0 and not [k for k in load["acp"] if k.startswith("error")]
        # every ACP session is closed again (the last one may be cut short by the stop)
        assert load["acp"].get("closed", 0) >= acp_sessions - 1, load["acp"]
    for s in samples:
        # the near-cache never holds more sessions than were ever started through the router
        assert s["cached_sessions"] <= s["started"] + s["acp_sessions"] + 1, s
        assert s["store_keys"] is not None
        # a miss's negative entry lives --negative-cache-ms (1 s), a look-up a probe's time
        assert s["negative_cache"] is not None and s["negative_cache"] <= 64, s
        assert s["inflight_lookups"] is not None and s["inflight_lookups"] <= 64, s
        if trickle:  # the ACP trickle opens and closes one client connection at a time
            assert s["acp_connections"] is not None and s["acp_connections"] <= 4, s
    v = result["verdict"]
    assert v["rss_slope_mib_per_10min"] is not None and v["samples_after_warmup"] >= 2
    assert set(v["sizes"]) == {"fds", "asyncio_tasks", "cached_sessions", "store_keys",
                               "metrics_bytes", "negative_cache", "inflight_lookups",
                               "acp_connections", "acp_session_streams"}
    # every size the router exports is sampled and judged ("n/a" only for ACP without it)
    not_judged = {name for name, d in v["sizes"].items() if d["status"] == "n/a"}
    assert not_judged == (set() if trickle else {"acp_connections", "acp_session_streams"}), (
        v["sizes"])
    assert v["retention"]["status"] == "PASS", v["retention"]
    assert v["retention"]["samples_checked"] >= 2
    assert "RSS slope after warm-up" in proc.stdout and "bounded" in proc.stdout
    html = (out / "latest-soak.html").read_text()
    assert "data:image/png;base64," in html and "Verdict" in html
    # Ended sessions leave the near-cache after --retention-s, so at the end it holds at most
    # the sessions started within retention + two sampling intervals (+ slack), not every
    # session ever started (it kept them for a reservation's 300 s TTL while the near-cache's
    # expiry queue was a FIFO).
    final, end = samples[-1], samples[-1]["t_s"]
    earlier = [s for s in samples if s["t_s"] <= end - RETENTION_S - 2 * SAMPLE_S]
    assert earlier, samples
    recent = final["started"] - earlier[-1]["started"] + final["acp_sessions"]
    assert final["cached_sessions"] <= recent + 16, (
        f"near-cache keeps ended sessions past --retention-s {RETENTION_S:g}: "
        f"{final['cached_sessions']:g} cached ({final['cached_by_state']}) at "
        f"t={end:g}s, but only {recent} started in the last "
        f"{end - earlier[-1]['t_s']:.0f} s")
