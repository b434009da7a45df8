"""tools/bench.py works: a tiny configuration with every tool installed.

A benchmark is not a test: nothing here looks at times, only that each tool
ran, was measured, and restored the tree.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

BENCH = os.path.join(REPO, "tools", "bench.py")
ALL_TOOLS = ["aam", "7zip", "restic", "duplicity"]


def test_a_tiny_bench_measures_every_tool(tmp_path):
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, BENCH, "--files", "40", "--total-bytes", "400k",
         "--volume-size", "100k", "--tools", ",".join(ALL_TOOLS), "--work", str(tmp_path),
         "--json", str(report)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(report.read_text())
    ran = data["tools"]
    assert ran[:2] == ["aam", "7zip"]
    if os.environ.get("CI"):        # .ci/run installs restic and duplicity
        assert ran == ALL_TOOLS
    for key, measured in data["results"].items():
        scenario, tool = key.split("/")
        if key in ("incr-none/7zip", "restore/aam") and measured["status"] is None:
            continue                # nothing to archive; restoration not built yet
        assert measured["status"] == 0, (key, measured["note"])
        assert measured["wall"] > 0, key
        # a run shorter than the 50 ms sampling period may end before its first sample
        assert measured["rss"] is None or measured["rss"] > 0, key
        if measured["wall"] > 0.5:
            assert measured["rss"] > 0, key
        if scenario == "restore":
            assert measured["note"] == "", (key, measured["note"])
        if tool != "7zip":
            assert measured["requests"] > 0, key
    assert data["results"]["full/aam"]["lists"] == 1
    assert data["results"]["full/aam"]["uploaded"] > 0
    assert "| full | aam |" in result.stdout
    assert not [name for name in os.listdir(tmp_path) if name.startswith("aam-bench-")]
