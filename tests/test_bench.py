"""tools/bench.py works: tiny configurations of its compare and scale modes.

A benchmark is not a test: nothing here looks at times, only that each tool
ran, was measured (with the memory split between our processes and 7-Zip's),
and restored the tree, and that a failed run makes the bench fail.
"""

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))

import bench  # noqa: E402

BENCH = os.path.join(REPO, "tools", "bench.py")
ALL_TOOLS = ["aam", "7zip", "restic", "duplicity"]
# Plain 7-Zip has nothing to archive when nothing changed; every other run must succeed.
NOT_APPLICABLE = {"incr-none/7zip"}


def run_bench(tmp_path, *arguments):
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, BENCH, *arguments, "--work", str(tmp_path), "--json", str(report)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not [name for name in os.listdir(tmp_path) if name.startswith("aam-bench-")]
    return json.loads(report.read_text()), result.stdout


def check_ran(key, measured):
    """Ran to its end with exit code 0 and was measured; a restore gave the tree back."""
    if key in NOT_APPLICABLE:
        assert measured["status"] is None, key
        return
    assert measured["status"] == 0, (key, measured["note"])
    assert measured["wall"] > 0, key
    # a run shorter than the sampling period may end before its first sample
    assert measured["rss"] is None or measured["rss"] > 0, key
    if measured["wall"] > 0.5:
        assert measured["rss"] > 0, key
    if key.startswith("restore/"):
        assert measured["note"] == "", (key, measured["note"])


def test_a_tiny_bench_measures_every_tool(tmp_path):
    data, stdout = run_bench(tmp_path, "--files", "40", "--total-bytes", "400k",
                             "--volume-size", "100k", "--tools", ",".join(ALL_TOOLS))
    ran = data["tools"]
    assert ran[:2] == ["aam", "7zip"]
    if os.environ.get("CI"):        # .ci/run installs restic and duplicity
        assert ran == ALL_TOOLS
    assert set(data["results"]) == {f"{s}/{t}" for s in bench.SCENARIOS for t in ran}
    for key, measured in data["results"].items():
        check_ran(key, measured)
        if not key.endswith("/7zip") and key not in NOT_APPLICABLE:
            assert measured["requests"] > 0, key
    assert data["results"]["full/aam"]["lists"] == 2       # the key checks, the month
    assert data["results"]["full/aam"]["uploaded"] > 0
    assert "| full | aam |" in stdout


def test_the_scale_mode_splits_memory_between_our_processes_and_7zip(tmp_path):
    # Sampled every 5 ms, so that even these tiny 7-Zip runs are seen.
    data, stdout = run_bench(tmp_path, "scale", "--counts", "300,600", "--mean-size", "1k",
                             "--volume-size", "100k", "--sample-seconds", "0.005")
    assert data["mode"] == "scale"
    assert [step["files"] for step in data["steps"]] == [300, 600]
    for step in data["steps"]:
        assert step["tools"] == ["aam", "7zip"]
        results = step["results"]
        assert set(results) == {f"{s}/{t}" for s in bench.SCALE_SCENARIOS
                                for t in ("aam", "7zip")}
        for key, measured in results.items():
            check_ran(key, measured)
        for scenario in bench.SCALE_SCENARIOS:
            ours = results[f"{scenario}/aam"]
            # our two Python processes, and (where 7-Zip ran) 7-Zip, separately
            assert ours["rss_python"] > 0, scenario
            assert ours["rss"] >= ours["rss_python"], scenario
            assert ours["endpoint_cpu"] is not None, scenario
        for key in ("full/aam", "restore/aam"):     # the time around 7-Zip's archive work
            assert 0 < results[key]["before_7zip"] < results[key]["wall"], key
        for key in ("full/aam", "restore/aam", "full/7zip", "restore/7zip"):
            assert results[key]["rss_7zip"] > 0, key
            assert results[key]["rss"] >= results[key]["rss_7zip"], key
        # (7-Zip's CPU time is not asserted: sampled, a run this short may be seen
        # before its first clock tick on a loaded machine; its memory was seen above)
        assert results["full/7zip"]["rss_python"] is None    # plain 7-Zip: no Python
        assert results["full/aam"]["uploaded"] > 0
    header = stdout[stdout.index("| files | scenario |"):].splitlines()[0]
    assert "our RSS MB" in header and "7-Zip RSS MB" in header
    assert "| 600 | full | aam |" in stdout
    assert "KB/file" in stdout      # the growth per file between the two counts


def test_a_failed_or_wrong_restore_fails_the_bench():
    fine = bench.Result(1.0, 1.0, status=0)
    results = {("full", "aam"): fine, ("incr-none", "7zip"): bench.Result.not_available("-")}
    assert bench.failures(results) == []
    failed = {**results, ("restore", "aam"): bench.Result(1.0, 1.0, status=1)}
    assert bench.failures(failed) == [("restore", "aam")]
    wrong = {**results, ("restore", "aam"): bench.Result(1.0, 1.0, status=0,
                                                         note="restored (1, 2)")}
    assert bench.failures(wrong) == [("restore", "aam")]


def test_against_the_sink_backups_run_and_restore_is_left_out(tmp_path):
    data, _stdout = run_bench(tmp_path, "scale", "--endpoint", "sink", "--counts", "300",
                              "--mean-size", "1k", "--volume-size", "100k")
    results = data["steps"][0]["results"]
    assert set(results) == {"full/aam", "full/7zip", "incr-none/aam", "incr-none/7zip"}
    for key, measured in results.items():
        check_ran(key, measured)
    full, nothing = results["full/aam"], results["incr-none/aam"]
    assert full["uploaded"] > 300 * 1000 // 4      # the archive went up
    # nothing changed: the sink listed the full backup, so only an indicator went up
    assert 0 < nothing["uploaded"] < 10_000 and nothing["lists"] == 2
    assert full["endpoint_server_cpu"] == 0 and full["endpoint_local_cpu"] is not None


def test_the_sink_keeps_sizes_of_deep_archive_volumes_and_bodies_of_the_rest(tmp_path):
    from boto3.s3.transfer import TransferConfig
    from local_aws import isolated_client
    from s3_sink import S3Sink

    volume = tmp_path / "volume"
    volume.write_bytes(os.urandom(11 * 1024 * 1024))
    with S3Sink() as sink:
        sink.create_bucket("b")
        s3 = isolated_client("s3", sink.endpoint_url, "us-east-1", "k", "s", None)
        s3.upload_file(str(volume), "b", "p/vol.001", ExtraArgs={"StorageClass": "DEEP_ARCHIVE"},
                       Config=TransferConfig(multipart_threshold=5 * 1024 * 1024,
                                             multipart_chunksize=5 * 1024 * 1024))
        s3.put_object(Bucket="b", Key="p/indicator", Body=b'{"volumes": 1}')
        listed = {item["Key"]: item["Size"] for item in
                  s3.list_objects_v2(Bucket="b", Prefix="p/")["Contents"]}
        assert listed == {"p/vol.001": 11 * 1024 * 1024, "p/indicator": 14}
        assert s3.get_object(Bucket="b", Key="p/indicator")["Body"].read() == b'{"volumes": 1}'
        try:
            s3.get_object(Bucket="b", Key="p/vol.001")
            raise AssertionError("a Deep Archive volume was readable")
        except s3.exceptions.ClientError as problem:
            assert problem.response["Error"]["Code"] == "InvalidObjectState"
        counted = sink.counters()
    assert counted["by_kind"]["UPLOAD_PART"] == 3 and counted["by_kind"]["LIST"] == 1
    assert counted["bytes_received"] >= 11 * 1024 * 1024


def test_the_endpoint_at_low_priority_is_low_against_a_tool_in_its_own_session():
    """AAM's child and its 7-Zip run in a session of their own; with autogroup
    scheduling a niced server in the bench's session would still take half the
    cores from them. The server must be niced in a session of its own."""
    from local_aws import LocalAws
    with LocalAws(niceness=19) as aws:
        pid = aws.server_pid
        assert os.getpriority(os.PRIO_PROCESS, pid) == 19
        assert os.getsid(pid) == pid != os.getsid(0)
        if os.path.exists(f"/proc/{pid}/autogroup"):
            with open(f"/proc/{pid}/autogroup", encoding="ascii") as handle:
                assert handle.read().split()[-1] == "19"


def test_the_uplink_mode_cuts_a_run_and_continues_it(tmp_path):
    """AAM and restic (where installed) over a throttled link: uncut, cut at 60% of the
    stored bytes by killing the tree, run again; and under their own upload limit."""
    data, stdout = run_bench(tmp_path, "uplink", "--files", "12", "--total-bytes", "1200k",
                             "--volume-size", "256k", "--rate", "4M")
    assert data["mode"] == "uplink" and data["rate"] == 4_000_000
    ran = data["tools"]
    assert ran[0] == "aam"
    if os.environ.get("CI"):
        assert ran == ["aam", "restic"]
    runs = {(run["scenario"], run["tool"]): run for run in data["runs"]}
    assert set(runs) == {(s, t) for s in bench.UPLINK_SCENARIOS for t in ran}
    for (scenario, tool), run in runs.items():
        measured = run["runs"]
        assert len(measured) == (2 if scenario == "cut" else 1), (scenario, tool)
        assert measured[-1]["status"] == 0, (scenario, tool, measured[-1]["note"])
        assert run["wire"] > 1_200_000 * 0.9 and run["stored"] > 0, (scenario, tool)
        assert measured[0]["wire_first"] is not None, (scenario, tool)
        if scenario == "cut":
            # killed with its tree once 60% of an uncut run's stored bytes were on the wire
            first = measured[0]
            assert first["cut"] and first["status"] == -9, tool
            assert first["uploaded"] >= 0.6 * runs[("uplink", tool)]["stored"], tool
    assert "| cut | aam | 2 |" in stdout and "busiest 5 s ÷ limit" in stdout
    assert "AAM cut and continued:" in stdout
