"""The restore drill (drill-aws-backups) through the CLI: the local endpoint's thaw
simulation keeps a thaw in progress for a number of look-ups, and the proxy counts
the RestoreObject requests (only the chosen volumes are thawed)."""

import json
import os
import random
import re

import pytest

import aam_auto_backup as aab
from conftest import ACCESS_KEY_ID, KEY, SECRET, ok

DRILL = aab.DRILL_OPERATION
VOLUME = 65536


def noise(stream, size):
    return random.Random(stream).randbytes(size)


def tree():
    """About 700 KB of incompressible files, one piece over ten volumes and more; the
    small file is archived last, beside the central directory."""
    files = {f"albums/{a}/photo-{n}.jpg": noise(int(a) * 10 + n, 40_000)
             for a in ("2023", "2024") for n in range(6)}
    files.update({f"letters/letter-{n}.txt": noise(100 + n, 30_000) for n in range(6)})
    files["letters/small.txt"] = b"the one small file\n"
    return files


@pytest.fixture
def slow_thaw(aws):
    """Thaws that stay in progress for `checks` look-ups of the volume."""
    try:
        yield aws.set_restore_progression
    finally:
        aws.set_restore_immediate()


def backed_up(sandbox):
    mount = sandbox.single_source(tree())
    ok(sandbox.backup({"send_email": "False"}, env=env(sandbox)))
    return mount


def env(sandbox):
    return sandbox.env(AAM_VOLUME_SIZE=str(VOLUME))


def drill_args(sandbox, **changes):
    values = dict(operation=DRILL, key=KEY, bucket=sandbox.bucket, location=sandbox.location,
                  access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET)
    values.update(changes)
    return aab.DRILL_ARGS.argv(**values)


def run_drill(sandbox, proxy, **changes):
    """A drill through the proxy: (result, keys of the RestoreObject requests, the
    requests by kind)."""
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.reset_counters()
    result = sandbox.run(drill_args(sandbox, **changes), env=env(sandbox))
    requests = proxy.requests()
    return (result, [r["key"] for r in requests if r["kind"] == "RestoreObject"],
            [r for r in requests if r["kind"] == "GetObject"])


def health(sandbox):
    (name,) = [n for n in os.listdir(sandbox.state_dir) if n.endswith(".health.json")]
    assert name.startswith(f"{sandbox.location}-")
    path = os.path.join(sandbox.state_dir, name)
    assert os.stat(path).st_mode & 0o077 == 0          # owner-only
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def planned_volumes(stdout):
    return re.findall(r"^  (\S+\.zip\.\d{3})  \([\d,]+ bytes\)$", stdout, re.M)


def full_volumes(sandbox):
    return [n.key for n in sandbox.object_names() if n.volume and n.incremental is None]


def full_stamp(sandbox):
    (stamp,) = {aab.format_stamp(n.full) for n in sandbox.object_names()}
    return stamp


def test_the_drill_thaws_a_few_volumes_waits_for_them_then_passes(
        sandbox, proxy, slow_thaw):
    mount = backed_up(sandbox)
    volumes = full_volumes(sandbox)
    assert len(volumes) >= 10
    slow_thaw(1)                     # the run after the request still finds it in progress

    first, thawed, _read = run_drill(sandbox, proxy)
    assert first.returncode == aab.EXIT_NOT_READY, first.stdout + first.stderr
    planned = planned_volumes(first.stdout)
    assert sorted(thawed) == sorted(planned) and 1 <= len(planned) <= 2
    assert set(planned) <= set(volumes)
    assert planned[-1] == max(volumes)                  # the central directory's volume
    # the estimate comes before the request
    assert "Estimated retrieval cost" in first.stdout
    assert re.search(r"^  Bulk .*<- this restore \(AAM_RESTORE_TIER\)$", first.stdout, re.M)
    assert "run drill-aws-backups again later" in first.stderr
    pending = health(sandbox)["drill_pending"]
    assert pending["volumes"] == planned and pending["backup"] == full_stamp(sandbox)
    assert pending["tier"] == "Bulk"
    assert os.path.join(mount, "letters", "small.txt") in pending["files"]
    assert "drill" not in health(sandbox)

    second, thawed, read = run_drill(sandbox, proxy)
    assert second.returncode == aab.EXIT_NOT_READY, second.stdout + second.stderr
    assert thawed == [] and "Continuing the drill pending since" in second.stdout
    assert not [r for r in read if r["key"] in volumes]
    assert health(sandbox)["drill_pending"]["requested"] == pending["requested"]

    third, thawed, read = run_drill(sandbox, proxy)
    ok(third)
    assert thawed == []
    assert sorted(r["key"] for r in read if r["key"] in volumes) == sorted(planned)
    assert "Restore drill PASSED" in third.stdout
    record = health(sandbox)
    assert "drill_pending" not in record
    drill = record["drill"]
    assert drill["result"] == "passed" and drill["problem"] is None
    assert drill["backup"] == full_stamp(sandbox)
    assert os.path.join(mount, "letters", "small.txt") in drill["files"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", drill["date"])
    assert not os.listdir(sandbox.temp) or not [n for n in os.listdir(sandbox.temp)
                                                 if n.startswith("aam-drill-")]


def test_a_damaged_volume_fails_the_drill_and_names_it(sandbox, proxy, slow_thaw):
    backed_up(sandbox)
    s3 = sandbox.s3()
    for key in full_volumes(sandbox):      # same size, other bytes, as bit rot would give
        size = s3.head_object(Bucket=sandbox.bucket, Key=key)["ContentLength"]
        s3.put_object(Bucket=sandbox.bucket, Key=key, Body=noise(key, size),
                      StorageClass="DEEP_ARCHIVE")
    slow_thaw(0)
    first, thawed, _read = run_drill(sandbox, proxy)
    assert first.returncode == aab.EXIT_NOT_READY, first.stdout + first.stderr
    failed, _thawed, _read = run_drill(sandbox, proxy)
    assert failed.returncode == aab.EXIT_FAILURE, failed.stdout + failed.stderr
    damaged = re.search(r"The volume (\S+) in the bucket does not match its completion "
                        r"indicator \(SHA-256 [0-9a-f]{64}, expected [0-9a-f]{64}\): the copy "
                        r"in S3 is damaged", failed.stderr)
    assert damaged and damaged[1] in thawed, failed.stderr
    assert "Restore drill FAILED" in failed.stdout
    record = health(sandbox)
    assert "drill_pending" not in record
    assert record["drill"]["result"] == "failed"
    assert damaged[1] in record["drill"]["problem"]


def test_a_wrong_key_fails_the_drill_before_any_thaw(sandbox, proxy):
    backed_up(sandbox)
    result, thawed, _read = run_drill(sandbox, proxy, key="Incorrect horse battery staple")
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    assert thawed == []
    assert (f"The decryption key (argument {aab.DRILL_ARGS.number('key')}) is wrong"
            in result.stderr)
    record = health(sandbox)
    assert record["drill"]["result"] == "failed" and "drill_pending" not in record


def test_a_pending_drill_whose_backup_is_gone_is_given_up_for_the_latest_full(
        sandbox, proxy, slow_thaw):
    backed_up(sandbox)
    slow_thaw(5)
    first, _thawed, _read = run_drill(sandbox, proxy)
    assert first.returncode == aab.EXIT_NOT_READY, first.stdout + first.stderr
    old = health(sandbox)["drill_pending"]["backup"]
    ok(sandbox.backup({"send_email": "False", "force_full": "yes"}, env=env(sandbox)))
    s3 = sandbox.s3()
    for name in sandbox.object_names():
        if aab.format_stamp(name.full) == old and name.indicator:
            s3.delete_object(Bucket=sandbox.bucket, Key=name.key)

    again, thawed, _read = run_drill(sandbox, proxy)
    assert again.returncode == aab.EXIT_NOT_READY, again.stdout + again.stderr
    assert "is no longer a complete set in the bucket" in again.stdout
    pending = health(sandbox)["drill_pending"]
    assert pending["backup"] != old and thawed == pending["volumes"]
    assert all(old not in key for key in thawed)


def test_a_pending_drill_is_finished_on_its_backup_though_a_newer_full_exists(
        sandbox, proxy, slow_thaw):
    """Its thaw is paid for: the pending drill finishes on the backup it chose, and says
    that a newer full exists; the drill after it takes the newer full."""
    backed_up(sandbox)
    slow_thaw(1)
    first, _thawed, _read = run_drill(sandbox, proxy)
    assert first.returncode == aab.EXIT_NOT_READY, first.stdout + first.stderr
    old = health(sandbox)["drill_pending"]
    ok(sandbox.backup({"send_email": "False", "force_full": "yes"}, env=env(sandbox)))
    newer = max({aab.format_stamp(n.full) for n in sandbox.object_names()})
    assert newer != old["backup"]

    said = f"A newer full backup, {aab.describe_stamp(aab.parse_stamp(newer))}, exists"
    waiting, thawed, _read = run_drill(sandbox, proxy)     # the thaw is still in progress
    assert waiting.returncode == aab.EXIT_NOT_READY, waiting.stdout + waiting.stderr
    assert thawed == [] and said in waiting.stdout
    assert health(sandbox)["drill_pending"] == old

    second, thawed, read = run_drill(sandbox, proxy)
    ok(second)
    assert thawed == [] and "Restore drill PASSED" in second.stdout and said in second.stdout
    assert sorted(r["key"] for r in read if r["key"] in old["volumes"]) == \
        sorted(old["volumes"])
    assert health(sandbox)["drill"]["backup"] == old["backup"]

    third, thawed, _read = run_drill(sandbox, proxy)
    assert third.returncode == aab.EXIT_NOT_READY, third.stdout + third.stderr
    assert thawed and all(newer in key for key in thawed)
    assert health(sandbox)["drill_pending"]["backup"] == newer


def test_the_drill_takes_its_arguments_like_the_other_operations(sandbox):
    result = sandbox.run([DRILL, "--help"])
    ok(result)
    assert "days" in result.stdout and "drill-aws-backups" in result.stdout
    short = sandbox.run([DRILL, KEY, sandbox.bucket])
    assert short.returncode == aab.EXIT_USAGE
    assert f"{DRILL} takes 6 to 7 arguments, 3 were given" in short.stderr
    bad = sandbox.run(drill_args(sandbox, days="0"))
    assert bad.returncode == aab.EXIT_USAGE
    assert f"argument {aab.DRILL_ARGS.number('days')} (restoration period (days)) must be" \
        in bad.stderr
    named = sandbox.run([DRILL, "--bucket", sandbox.bucket, "--location", sandbox.location,
                         "--key", "env:NO_SUCH_VARIABLE_HERE"])
    assert named.returncode == aab.EXIT_USAGE and "NO_SUCH_VARIABLE_HERE" in named.stderr
