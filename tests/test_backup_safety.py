"""The lock, incremental-only, the full/incremental decision rules, crash safety.

Months are simulated through the time stamps in crafted object names, never by
sleeping or changing the clock.  Crashes are real SIGKILLs: at named checkpoints
(AAM_TEST_CRASH_AT) or from outside while 7-Zip is writing.
"""

import datetime as dt
import json
import os
import pty
import signal
import subprocess
import sys
import time

import filelock
import pytest

from conftest import PROGRAM, extract, read_terminal_until, read_until, wait_for
from sample_tree import read_tree

STAMP = "%Y%m%d_%H%M%S.%f"


# -- looking at the bucket the way a restore would ------------------------------

def parse_key(key):
    """(full, incremental or None, is_indicator, source, volume) or None."""
    import aam_auto_backup as aab    # the parser of the program under test is fine here:
    name = aab.ObjectName.parse(key)  # object-name formats are tested on their own
    if name is None:
        return None
    return (name.full, name.incremental, name.indicator, name.source, name.volume)


def complete_sets(sandbox):
    """{full: [complete incrementals, ascending]} judged from the indicator manifests."""
    objects = [parse_key(item["Key"]) + (item["Key"],) for item in sandbox.objects()
               if parse_key(item["Key"])]
    indicators = {}
    for full, incr, is_indicator, source, _volume, key in objects:
        if is_indicator:
            indicators.setdefault((full, incr), {})[source] = sandbox.indicator(key)

    def complete(group):
        sources = set(next(iter(group.values()))["sources"])
        return all(set(m["sources"]) == sources for m in group.values()) and \
            sources == set(group)

    sets = {}
    for (full, incr), group in indicators.items():
        if incr is None and complete(group):
            sets.setdefault(full, [])
    for (full, incr), group in indicators.items():
        if incr is not None and full in sets and complete(group):
            sets[full].append(incr)
    return {full: sorted(incrs) for full, incrs in sets.items()}


def restore_latest(sandbox, tmp_path):
    """Extract the latest complete full set and its incrementals with plain 7-Zip: every
    piece of the full backup, then of each incremental in time order."""
    sets = complete_sets(sandbox)
    assert sets, "no complete backup set"
    full = max(sets)
    restored = {}
    keys = [item["Key"] for item in sandbox.objects()]
    for incr in [None] + sets[full]:
        for key in keys:
            parsed = parse_key(key)
            if not parsed or parsed[0] != full or parsed[1] != incr or not parsed[2]:
                continue
            manifest = sandbox.indicator(key)
            target = tmp_path / "restore" / manifest["source"]
            target.mkdir(parents=True, exist_ok=True)
            for piece in manifest["pieces"]:
                volumes = [sandbox.fetch_volume(v["name"], str(tmp_path))
                           for v in piece["volumes"]]
                extract(volumes[0], str(target))
            restored[manifest["source_path"]] = target
    return {mount: read_tree(str(path)) for mount, path in restored.items()}


def assert_restores_to(sandbox, tmp_path, expected):
    restored = restore_latest(sandbox, tmp_path)
    assert restored == expected


def work_dirs(sandbox):
    return [n for n in os.listdir(sandbox.temp)] if os.path.isdir(sandbox.temp) else []


# -- crafting backup sets in other months -----------------------------------------

def craft_set(sandbox, full, sources, incremental=None, missing=()):
    """Upload indicator objects (and a dummy volume) for a set, as a past run would."""
    s3 = sandbox.s3()
    incr = "0_0.0" if incremental is None else incremental.strftime(STAMP)
    for source in sources:
        base = f"{sandbox.location}_{full.strftime(STAMP)}_{incr}"
        s3.put_object(Bucket=sandbox.bucket, Key=f"{base}_no_{source}.zip.001", Body=b"x",
                      StorageClass="DEEP_ARCHIVE")
        if source in missing:
            continue
        manifest = {"sources": sorted(sources), "source": source, "files": 1,
                    "source_path": source.replace("-", "/"),
                    "volumes": [{"name": f"{base}_no_{source}.zip.001", "size": 1,
                                 "sha256": "0" * 64}]}
        s3.put_object(Bucket=sandbox.bucket, Key=f"{base}_yes_{source}",
                      Body=json.dumps(manifest).encode())


def month_start(now=None):
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def months_before(moment, months):
    year, month = moment.year, moment.month - months
    while month < 1:
        year, month = year - 1, month + 12
    return moment.replace(year=year, month=month, day=15)


def source_names(tree):
    return [m.replace("/", "-") for m in tree.mounts]


def scopes(sandbox):
    """Indicator keys grouped: {'full': {stamps}, 'incremental': {(full, incr)}}."""
    found = {"full": set(), "incremental": set()}
    for item in sandbox.objects():
        parsed = parse_key(item["Key"])
        if parsed and parsed[2]:
            if parsed[1] is None:
                found["full"].add(parsed[0])
            else:
                found["incremental"].add((parsed[0], parsed[1]))
    return found


def expected_now(tree):
    """What the listed directories hold now (the files a backup must restore)."""
    result = {}
    for mount, files in tree.expected.items():
        current = {}
        for rel in files:
            path = os.path.join(mount, rel)
            if os.path.isdir(path):
                current[rel] = None
            elif os.path.exists(path):
                current[rel] = open(path, "rb").read()
        result[mount] = current
    return result


# -- the lock -------------------------------------------------------------------

def hold_lock(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = filelock.FileLock(path, fallback_to_soft=False, preserve_lock_file=True)
    lock.acquire(timeout=0)
    return lock


def test_a_backup_waits_for_the_lock_then_runs(sandbox):
    tree = sandbox.sample()
    lock = hold_lock(sandbox.lock)
    process = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(
        changes={"lock_poll": "1", "lock_wait": "60"}), env=sandbox.env(),
        stdout=subprocess.PIPE, text=True)
    waited = read_until(process, "Another backup is running")
    waited += read_until(process, "Another backup is running")     # the next poll's
    assert process.poll() is None            # still waiting
    lock.release()
    out = waited + process.communicate(timeout=120)[0]
    assert process.returncode == 0, out
    assert out.count("Another backup is running") >= 2      # a message at each poll
    assert scopes(sandbox)["full"]
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]


def test_a_backup_gives_up_after_the_total_wait(sandbox):
    sandbox.sample()
    lock = hold_lock(sandbox.lock)
    try:
        started = time.monotonic()
        result = sandbox.backup({"lock_poll": "1", "lock_wait": "2"})
        elapsed = time.monotonic() - started
    finally:
        lock.release()
    assert result.returncode == 4
    assert "held the lock" in result.stdout and "2 seconds (argument 5)" in result.stdout
    assert elapsed >= 2
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "(if applicable) file lock acquisition failure." in log
    (message,) = sandbox.emails()
    assert message["subject"].startswith("FAILURE, ")
    assert sandbox.objects() == [] and not os.path.exists(sandbox.mirror)


def test_two_backups_started_together_both_succeed(sandbox, tmp_path):
    tree = sandbox.sample()
    args = [sys.executable, PROGRAM] + sandbox.backup_args(
        changes={"lock_poll": "1", "lock_wait": "120"})
    processes = [subprocess.Popen(args, env=sandbox.env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    found = scopes(sandbox)
    assert len(found["full"]) == 1 and len(found["incremental"]) == 1
    assert_restores_to(sandbox, tmp_path, tree.expected)
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]


def test_a_lock_left_by_a_killed_process_does_not_block(sandbox):
    sandbox.sample()
    os.makedirs(os.path.dirname(sandbox.lock), exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, sys, time; "
        f"filelock.FileLock({sandbox.lock!r}, fallback_to_soft=False).acquire(); "
        "print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = sandbox.backup({"lock_wait": "0"})
    assert result.returncode == 0, result.stdout + result.stderr


# -- decision rules ----------------------------------------------------------------

def test_force_full_makes_a_second_full_backup(sandbox):
    sandbox.sample()
    assert sandbox.backup().returncode == 0
    result = sandbox.backup({"force_full": "yes"})
    assert result.returncode == 0 and "full (forced by argument 21)" in result.stdout
    assert len(scopes(sandbox)["full"]) == 2


def test_automatic_force_full_follows_an_instruction_file_change(sandbox):
    tree = sandbox.sample()
    assert sandbox.backup().returncode == 0
    assert sandbox.backup({"auto_force_full": "yes"}).returncode == 0   # unchanged: incremental
    assert len(scopes(sandbox)["incremental"]) == 1
    sandbox.write_instructions(tree.instruction_text)           # changed after the full
    off = sandbox.backup({"auto_force_full": "no"})
    assert off.returncode == 0 and "Backup scope: incremental" in off.stdout
    on = sandbox.backup({"auto_force_full": "yes"})
    assert on.returncode == 0 and "the instruction file changed" in on.stdout
    assert len(scopes(sandbox)["full"]) == 2


def test_the_latest_complete_full_of_the_month_is_the_base(sandbox, tmp_path):
    tree = sandbox.sample()
    start = month_start()
    older, newer = start + dt.timedelta(seconds=1), start + dt.timedelta(seconds=2)
    names = source_names(tree)
    craft_set(sandbox, older, names)                       # complete
    craft_set(sandbox, newer, names, missing=names[1:])    # incomplete: one indicator missing
    result = sandbox.backup({"auto_force_full": "no"})   # the instruction file is newer than both
    assert result.returncode == 0, result.stdout + result.stderr
    increments = scopes(sandbox)["incremental"]
    assert [full for full, _incr in increments] == [older.replace(tzinfo=dt.timezone.utc)]


def test_a_source_added_to_the_instruction_file_gets_a_full_backup(sandbox):
    tree = sandbox.sample()
    first_only = tree.instruction_text.replace(f"{tree.second_mount}/\n", "")
    sandbox.write_instructions(first_only)
    assert sandbox.backup({"auto_force_full": "no"}).returncode == 0
    sandbox.write_instructions(tree.instruction_text)
    result = sandbox.backup({"auto_force_full": "no"})
    assert result.returncode == 0
    assert "Backup scope: full (no complete full backup of the 2 current sources" in result.stdout


def test_the_first_run_of_a_new_month_is_a_full_backup(sandbox):
    tree = sandbox.sample()
    last_month = month_start() - dt.timedelta(days=3)
    craft_set(sandbox, last_month, source_names(tree))
    result = sandbox.backup()
    assert result.returncode == 0 and "Backup scope: full" in result.stdout
    this_month = {f for f in scopes(sandbox)["full"] if f >= month_start()}
    assert len(this_month) == 1


# -- incremental-only ------------------------------------------------------------------

def test_incremental_only_builds_on_a_full_backup_of_an_earlier_month(sandbox):
    tree = sandbox.sample()
    earlier = months_before(month_start(), 3)
    craft_set(sandbox, earlier, source_names(tree))
    result = sandbox.backup({"auto_force_full": "no"}, operation="incremental-only-backup")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {full for full, _i in scopes(sandbox)["incremental"]} == {earlier}
    assert sandbox.emails() == []                     # incremental-only sends no e-mail


@pytest.mark.parametrize("months_back", [None, 6])
def test_incremental_only_refuses_without_a_full_backup(sandbox, months_back):
    tree = sandbox.sample()
    if months_back:      # outside the current and previous five months
        craft_set(sandbox, months_before(month_start(), months_back), source_names(tree))
    before = len(sandbox.objects())
    result = sandbox.backup(operation="incremental-only-backup")
    assert result.returncode == 5
    assert "No complete full backup of the current sources in the last 6 months" in result.stdout
    assert "Run a regular backup first" in result.stdout
    assert len(sandbox.objects()) == before and sandbox.emails() == []


def test_incremental_only_refuses_when_a_full_backup_is_required(sandbox):
    tree = sandbox.sample()
    assert sandbox.backup().returncode == 0
    sandbox.write_instructions(tree.instruction_text)
    before = len(sandbox.objects())
    result = sandbox.backup({"auto_force_full": "yes"}, operation="incremental-only-backup")
    assert result.returncode == 6
    assert "a full backup is required (argument 22)" in result.stdout
    assert len(sandbox.objects()) == before
    assert len(sandbox.emails()) == 1                 # only the regular backup's


def test_incremental_only_on_a_terminal_asks_before_waiting_and_waits_for_enter(sandbox):
    sandbox.sample()
    assert sandbox.backup().returncode == 0
    lock = hold_lock(sandbox.lock)
    try:
        master, slave = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, PROGRAM] + sandbox.backup_args(
                "incremental-only-backup",
                {"lock_poll": "1", "lock_wait": "600", "auto_force_full": "no"}),
            env=sandbox.env(), stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        read_terminal_until(master, "[y/n]")
        os.write(master, b"n\n")
        read_terminal_until(master, "Press Enter to close")
        # Nothing marks "waiting for Enter" but the lack of an exit: give it a moment.
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.3)
        os.write(master, b"\n")
        assert process.wait(timeout=30) == 4
        os.close(master)
    finally:
        lock.release()


def test_incremental_only_under_a_scheduler_never_prompts(sandbox):
    sandbox.sample()
    assert sandbox.backup().returncode == 0
    lock = hold_lock(sandbox.lock)
    try:
        result = sandbox.run(sandbox.backup_args("incremental-only-backup", {"lock_wait": "1"}),
                             stdin=subprocess.DEVNULL)
    finally:
        lock.release()
    assert result.returncode == 4
    assert "[y/n]" not in result.stdout and "Press Enter" not in result.stdout


# -- crash safety -------------------------------------------------------------------------

def kill_tree(pid):
    """SIGKILL a process and all its descendants (a power cut, as far as we can)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    victims, stack = [], [pid]
    while stack:
        current = stack.pop()
        victims.append(current)
        stack.extend(children.get(current, []))
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def seven_zip_writes(sandbox):
    """A volume 7-Zip is writing (its .tmp name) is in the work directory."""
    return any(name.endswith(".tmp") for _folder, _dirs, files in os.walk(sandbox.temp)
               for name in files)


def crash_while_7zip_writes(sandbox, env):
    process = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Only the volume's .tmp file tells that 7-Zip is writing.  It is there for as
    # long as the volumes take to upload (7-Zip is paused while two wait), many
    # times the 10 ms between looks.
    wait_for(lambda: seven_zip_writes(sandbox) or process.poll() is not None, 120,
             interval=0.01)
    if process.poll() is not None:
        pytest.fail("7-Zip was never seen writing a volume")
    kill_tree(process.pid)
    process.wait()


CRASH_POINTS = ["child-done:1", "volume-uploaded:1", "before-indicator:1", "source-done:1",
                "while-7zip-writes"]


def crash(sandbox, point):
    env = sandbox.env(AAM_VOLUME_SIZE="65536")
    if point == "while-7zip-writes":
        # enough new data that 7-Zip is seen writing its volumes
        tree = sandbox.tree
        with open(os.path.join(tree.first_mount, "Documents", "video.bin"), "wb") as handle:
            handle.write(os.urandom(4 * 1024 * 1024))
        tree.expected[tree.first_mount]["Documents/video.bin"] = b""
        crash_while_7zip_writes(sandbox, env)
        return
    result = sandbox.run(sandbox.backup_args(),
                         env=dict(env, AAM_TEST_CRASH_AT=point))
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr


def normal_run(sandbox):
    result = sandbox.run(sandbox.backup_args(), env=sandbox.env(AAM_VOLUME_SIZE="65536"))
    assert result.returncode == 0, result.stdout + result.stderr
    sandbox.wait_until_no_process_runs()     # what a killed run left: gone on its own
    return result


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_during_a_full_backup_is_repaired_by_the_next_run(sandbox, tmp_path, point):
    tree = sandbox.sample(picture_size=300_000)        # several volumes per source
    crash(sandbox, point)
    assert complete_sets(sandbox) == {}                 # nothing counts as complete
    result = normal_run(sandbox)
    assert "Backup scope: continuing the full backup" in result.stdout
    assert_restores_to(sandbox, tmp_path, expected_now(tree))
    assert work_dirs(sandbox) == []                     # the killed run's leftovers are gone


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_during_an_incremental_backup_loses_no_change(sandbox, tmp_path, point):
    tree = sandbox.sample(picture_size=300_000)
    normal_run(sandbox)
    sets_before = complete_sets(sandbox)
    picture = os.path.join(tree.first_mount, "Pictures", "2024", "beach.jpg")
    with open(picture, "wb") as handle:
        handle.write(os.urandom(300_000))               # changed before the crashed run
    with open(os.path.join(tree.first_mount, "Documents", "added.txt"), "w") as handle:
        handle.write("added before the crashed run\n")
    tree.expected[tree.first_mount]["Documents/added.txt"] = b""
    crash(sandbox, point)
    assert complete_sets(sandbox) == sets_before        # the crashed incremental does not count
    result = normal_run(sandbox)
    assert "Backup scope: continuing the incremental backup" in result.stdout
    assert_restores_to(sandbox, tmp_path, expected_now(tree))
    assert work_dirs(sandbox) == []


def test_s3_failing_mid_upload_leaves_no_indicator_and_reports_it(sandbox, proxy):
    tree = sandbox.sample(picture_size=300_000)
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.fail_after(5, services={"s3"})   # 2 LISTs, the key check, two volumes, then 500s
    result = sandbox.run(sandbox.backup_args(), env=sandbox.env(AAM_VOLUME_SIZE="65536"))
    assert result.returncode == 1
    assert "Upload to s3://" in result.stdout and "no completion indicator" in result.stdout
    (failed,) = {r["key"] for r in proxy.requests() if r["kind"] == "PutObject"
                 and r["key"].endswith(".zip.003")}
    assert f"the volume s3://{sandbox.bucket}/{failed} could not be uploaded: " \
        "PutObject failed, InternalError" in result.stdout
    assert complete_sets(sandbox) == {}
    assert not [i for i in sandbox.objects() if "_yes_" in i["Key"]]
    (message,) = sandbox.emails()
    assert message["subject"].startswith("FAILURE, ")
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "(if applicable) AWS upload error." in log
    for mount in tree.mounts:                    # the mirror is still made
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]
    assert work_dirs(sandbox) == []
    proxy.clear_faults()
    assert sandbox.run(sandbox.backup_args()).returncode == 0      # the next run repairs it
    assert len(complete_sets(sandbox)) == 1


@pytest.mark.parametrize("kind, after", [("key check", 2), ("volume", 3), ("catalogue", 4),
                                         ("completion indicator", 5)])
def test_an_upload_that_fails_for_good_names_the_object_and_its_kind(sandbox, proxy, kind,
                                                                       after):
    """A first full backup of one small source writes, after the two LISTs: the key
    check, one volume, the catalogue, the indicator; S3 fails from the nth on."""
    sandbox.single_source({"a.txt": b"a small file\n"})
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.fail_after(after, services={"s3"})
    result = sandbox.backup()
    assert result.returncode == 1, result.stdout + result.stderr
    puts = [r["key"] for r in proxy.requests() if r["kind"] == "PutObject"]
    failed = puts[-1]              # retried by botocore, then given up
    assert puts.count(failed) > 1 and len(set(puts)) == after - 1
    message = (f"the {kind} s3://{sandbox.bucket}/{failed} could not be uploaded: "
               "PutObject failed, InternalError")
    assert message in result.stdout
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert message in log and sandbox.emails()[-1]["subject"].startswith("FAILURE, ")
    assert complete_sets(sandbox) == {}


def test_an_interrupted_multipart_upload_is_aborted(sandbox, proxy):
    tree = sandbox.sample()
    with open(os.path.join(tree.second_mount, "big.bin"), "wb") as handle:
        handle.write(os.urandom(70 * 1024 * 1024))   # above the 64 MiB multipart threshold
    sandbox.endpoint_url = proxy.endpoint_url
    process = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(
        changes={"send_email": "False"}), env=sandbox.env(), stdout=subprocess.PIPE, text=True)
    assert proxy.wait_for(lambda counters: counters["by_kind"].get("UploadPart", 0) >= 1,
                          timeout=120), "no part was uploaded"
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 130, out
    uploads = sandbox.s3().list_multipart_uploads(Bucket=sandbox.bucket).get("Uploads", [])
    assert uploads == []
    assert complete_sets(sandbox) == {}
    assert work_dirs(sandbox) == []


def test_a_stopped_script_group_is_waited_for_until_none_of_it_is_left():
    """A refused early child's 7-Zip must be gone before the next child writes the same
    work directory: the wait ends only when the whole group is, with SIGKILL for a
    process that does not act on SIGTERM."""
    import aam_auto_backup as aab
    platform = aab.PosixPlatform()
    # the shell and its sleep both ignore SIGTERM (an ignored signal stays so across exec)
    process = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & wait"],
                               **platform.group_popen_options())
    time.sleep(0.2)
    platform.stop_group(process)
    platform.wait_group_gone(process, grace=0.5)
    assert process.poll() == -signal.SIGKILL          # it did not act on SIGTERM
    assert not platform.group_running(process.pid)    # nothing of the group runs
    # (a zombie, ended but not yet collected by init, may still hold the group id)
    listing = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True,
                             text=True, check=True).stdout.split("\n")
    members = [line.split()[1] for line in listing
               if line.split() and line.split()[0] == str(process.pid)]
    assert all(state.startswith("Z") for state in members), members
