"""Resumable backups: a backup interrupted at any point is continued by the next run.

Every interruption is real: SIGKILL of the whole process tree (a power cut), the
checkpoints of AAM_TEST_CRASH_AT, SIGTERM (a scheduler stopping the job), an upload
outage longer than boto3's retries (the counting proxy answering HTTP 500).  Then a
normal run continues the backup, and the restore of it is exact.  The proxy's log of
requests shows what went over the wire in each run: nothing a finished piece holds
goes up twice, and the volumes of the piece that was lost are named in the log and
the e-mail with their bytes.  Tests wait for events (a request seen by the proxy, a
checkpoint), never for a time.
"""

import datetime as dt
import os
import random
import signal
import subprocess
import sys

import pytest

import aam_auto_backup as aab
from conftest import KEY, PROGRAM, extract_pieces, file_times_pass, numbered_directories, \
    ok, snapshot, wait_for, write_file
from test_backup_safety import kill_tree

ONE_STEP = aab.ONE_STEP_RESTORE
# 64 KiB volumes, pieces of about 400 KB of files: 180 KB files go two to a piece, so a
# source of ten such files is five pieces of about six volumes each.
PIECES = {"AAM_VOLUME_SIZE": "65536", "AAM_PIECE_SIZE": "400000"}
SIZE = 180_000


def noise(stream, size=SIZE):
    return random.Random(stream).randbytes(size)


def pieced_source(sandbox, files=10):
    """One source of incompressible files, five pieces at PIECES (plus a small file and
    an empty directory, so that a piece holds more than one kind of entry)."""
    contents = {f"Documents/file{n:02d}.bin": noise(n) for n in range(files)}
    contents["Documents/notes.txt"] = b"small notes\n"
    mount = sandbox.single_source(contents)
    os.makedirs(os.path.join(mount, "Documents", "empty-dir"))
    return mount


def env_through(sandbox, proxy, **extra):
    return sandbox.env(**dict(PIECES, AWS_ENDPOINT_URL=proxy.endpoint_url, **extra))


def start_backup(sandbox, env):
    return subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def volume_puts(proxy):
    """The volume keys the proxy saw written, in order (every piece's)."""
    return [r["key"] for r in proxy.requests()
            if r["kind"] in ("PutObject", "CreateMultipartUpload") and r["key"]
            and (aab.ObjectName.parse(r["key"]) or aab.ObjectName).volume is not None]


def piece_seen(proxy, number):
    return any(f"_piece{number:04d}_" in key for key in volume_puts(proxy))


def kill_when(proxy, process, condition, sandbox):
    """SIGKILL the backup's whole process tree (a power cut) once condition() holds."""
    wait_for(lambda: condition() or process.poll() is not None, 180,
             "the event to interrupt at never came")
    assert process.poll() is None, "the backup ended before it could be interrupted"
    kill_tree(process.pid)
    process.wait()
    sandbox.wait_until_no_process_runs()


def crash_at(sandbox, env, point, **extra):
    """A backup killed (SIGKILL) at checkpoint point; what it left running has ended."""
    crashed = sandbox.run(sandbox.backup_args(),
                          env=dict(env, AAM_TEST_CRASH_AT=point, **extra))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    sandbox.wait_until_no_process_runs()


def manifests(sandbox):
    return {name.source: sandbox.indicator(name.key) for name in sandbox.object_names()
            if name and name.indicator}


def continue_backup(sandbox, proxy, env):
    """A normal run after the interruption: it continues the backup.  Returns its
    output and the volume keys it wrote."""
    before = volume_puts(proxy)
    proxy.reset_counters()
    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    sandbox.wait_until_no_process_runs()
    return result, before, volume_puts(proxy)


def assert_nothing_went_up_twice(sandbox, first, second):
    """Across both runs every volume of the backup went up once; the second run sent
    only what the backup still lacked; the first run's finished pieces were kept."""
    kept = {v["name"] for m in manifests(sandbox).values() for v in m["volumes"]}
    assert not set(first) & set(second)
    assert len(second) == len(set(second))
    assert set(second) == kept - set(first)
    assert kept & set(first), "no piece of the interrupted run was kept"
    return kept


def assert_unused_volumes_named(sandbox, kept, result):
    """Every volume in the bucket that the backup does not use is named with its bytes
    in the log of the run that found it, and in that run's e-mail."""
    sizes = {o["Key"]: o["Size"] for o in sandbox.objects()}
    unused = {k for k, n in ((k, aab.ObjectName.parse(k)) for k in sizes)
              if n and n.volume is not None and k not in kept}
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    body = sandbox.emails()[-1]["body"]
    for key in unused:
        assert f"  {key} ({sizes[key]:,} bytes)" in log
        assert f"  {key} ({sizes[key]:,} bytes)" in body
    if unused:
        assert f"Unused volumes in S3: {len(unused)} volume(s), " \
            f"{sum(sizes[k] for k in unused):,} bytes" in log
    return unused


def assert_restores_exactly(sandbox, tmp_path, mount, expected=None, point=None,
                            selection=()):
    destination = tmp_path / f"restored-{len(os.listdir(tmp_path))}"
    ok(sandbox.restore_chosen(ONE_STEP, destination, point, selection,
                              sandbox.restore_env(**PIECES)))
    assert snapshot(os.path.join(destination, "1")) == (expected or snapshot(mount))


# -- the four points of issue 25, and the two softer interruptions ------------------

def test_killed_during_7zip_of_a_middle_piece_loses_only_that_piece(sandbox, proxy,
                                                                    tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    process = start_backup(sandbox, env)
    kill_when(proxy, process, lambda: piece_seen(proxy, 3), sandbox)
    assert not manifests(sandbox)                      # nothing counts as complete yet
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "Backup scope: continuing the full backup" in result.stdout
    assert "2 piece(s)" in result.stdout or "3 piece(s)" in result.stdout
    kept = assert_nothing_went_up_twice(sandbox, first, second)
    unused = assert_unused_volumes_named(sandbox, kept, result)
    assert unused <= set(first)                        # the lost piece's, nothing else
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_killed_between_pieces_keeps_every_finished_piece(sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "continuing the full backup" in result.stdout and "2 piece(s)" in result.stdout
    kept = assert_nothing_went_up_twice(sandbox, first, second)
    (manifest,) = manifests(sandbox).values()
    assert [p["number"] for p in manifest["pieces"]][:2] == [1, 2]
    assert min(aab.ObjectName.parse(k).piece for k in second) >= 3
    assert_unused_volumes_named(sandbox, kept, result)
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_killed_before_the_indicator_uploads_only_the_indicator(sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "before-indicator:1")
    catalogue = [n.key for n in sandbox.object_names() if n.catalogue]
    assert len(catalogue) == 1 and not manifests(sandbox)
    result, first, second = continue_backup(sandbox, proxy, env)
    assert second == []                                        # no volume,
    puts = [r["key"] for r in proxy.requests() if r["kind"] == "PutObject"]
    assert len(puts) == 1 and aab.ObjectName.parse(puts[0]).indicator   # only the indicator
    assert "is in the bucket already" in result.stdout
    assert_nothing_went_up_twice(sandbox, first, second)
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_a_catalogue_missing_from_the_bucket_is_put_again_from_the_kept_file(
        sandbox, proxy, tmp_path):
    """Killed after the catalogue went up, which then vanished (or its PUT never arrived):
    the next run puts the kept file again, the same bytes under the same name."""
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "before-indicator:1")
    (catalogue,) = [n.key for n in sandbox.object_names() if n.catalogue]
    first_body = sandbox.s3().get_object(Bucket=sandbox.bucket, Key=catalogue)["Body"].read()
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=catalogue)
    result, first, second = continue_backup(sandbox, proxy, env)
    assert second == [] and f"Uploaded the catalogue {catalogue}" in result.stdout
    again = sandbox.s3().get_object(Bucket=sandbox.bucket, Key=catalogue)["Body"].read()
    assert again == first_body
    (manifest,) = manifests(sandbox).values()
    assert manifest["catalogue"]["name"] == catalogue
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_incremental_only_continues_a_pending_full_backup(sandbox, proxy, tmp_path):
    """incremental-only-backup never starts a full backup, but it finishes one."""
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    first = volume_puts(proxy)
    proxy.reset_counters()
    result = ok(sandbox.run(sandbox.backup_args(aab.INCREMENTAL_ONLY_BACKUP), env=env))
    assert "Backup scope: continuing the full backup" in result.stdout
    assert_nothing_went_up_twice(sandbox, first, volume_puts(proxy))
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_killed_between_sources_backs_up_only_the_unfinished_source(sandbox, proxy,
                                                                    tmp_path):
    tree = sandbox.sample(picture_size=300_000)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "source-done:1")
    first_source = aab.PosixPlatform().source_name(tree.first_mount)
    assert set(manifests(sandbox)) == {first_source}     # one indicator: not complete
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "complete for " + first_source in result.stdout
    written = [r["key"] for r in proxy.requests() if r["kind"] == "PutObject"]
    assert not any(first_source in key for key in written)    # nothing of it again
    assert set(manifests(sandbox)) == {first_source, aab.PosixPlatform().source_name(
        tree.second_mount)}
    assert_nothing_went_up_twice(sandbox, first, second)
    destination = tmp_path / "restored"
    ok(sandbox.restore_chosen(ONE_STEP, destination, env=sandbox.restore_env(**PIECES)))
    assert numbered_directories(destination, tree) == tree.expected


def test_sigterm_stops_the_backup_and_the_next_run_continues_it(sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    process = start_backup(sandbox, env)
    wait_for(lambda: piece_seen(proxy, 2) or process.poll() is not None, 180)
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0]
    assert process.returncode == aab.EXIT_INTERRUPTED, out
    assert "the next run continues it from its journal" in out
    sandbox.wait_until_no_process_runs()
    interrupted_log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "continuing the full backup" in result.stdout
    # what went up before the signal is in the interrupted run's log
    assert all(f"Uploading {key} (" in interrupted_log for key in first)
    kept = assert_nothing_went_up_twice(sandbox, first, second)
    assert_unused_volumes_named(sandbox, kept, result)
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_a_sigterm_while_a_piece_is_being_recorded_keeps_that_piece(sandbox, proxy,
                                                                   tmp_path):
    """The signal comes as piece 1, all of whose volumes are up, is about to be recorded
    in the journal: the record is made whole first, so the next run sends nothing of it."""
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    stopped = sandbox.run(sandbox.backup_args(), env=dict(
        env, AAM_TEST_CRASH_AT="piece-ending:1", AAM_TEST_CRASH_SIGNAL="SIGTERM"))
    assert stopped.returncode == aab.EXIT_INTERRUPTED, stopped.stdout + stopped.stderr
    sandbox.wait_until_no_process_runs()
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "continuing the full backup" in result.stdout
    kept = assert_nothing_went_up_twice(sandbox, first, second)
    assert {key for key in first if "_piece0001_" in key} <= kept
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_an_upload_outage_longer_than_the_retries_is_continued_later(
        sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    # the LIST and nine volumes (piece 1 and part of piece 2) go through, then HTTP 500
    proxy.fail_after(10, services={"s3"})
    failed = sandbox.run(sandbox.backup_args(), env=env)
    assert failed.returncode == aab.EXIT_FAILURE, failed.stdout + failed.stderr
    assert "the next run continues it" in failed.stdout
    body = sandbox.emails()[-1]["body"]
    assert "is not complete: the next run continues it (1 piece(s)" in body
    proxy.clear_faults()
    sandbox.wait_until_no_process_runs()
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "continuing the full backup" in result.stdout
    assert_nothing_went_up_twice(sandbox, [k for k in first if sandbox_has(sandbox, k)],
                                 second)
    assert_restores_exactly(sandbox, tmp_path, mount)


def sandbox_has(sandbox, key):
    return key in {o["Key"] for o in sandbox.objects()}


def test_an_incremental_killed_midway_is_continued_as_that_incremental(
        sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox, files=4)
    env = env_through(sandbox, proxy)
    ok(sandbox.run(sandbox.backup_args(), env=env))
    full = snapshot(mount)
    file_times_pass()
    for n in range(4, 12):
        write_file(os.path.join(mount, "Documents", f"file{n:02d}.bin"), noise(n))
    crash_at(sandbox, env, "piece-done:2")
    result, first, second = continue_backup(sandbox, proxy, env)
    assert "continuing the incremental backup" in result.stdout
    assert_nothing_went_up_twice(sandbox, first, second)
    assert_restores_exactly(sandbox, tmp_path, mount)
    stamps = sandbox.backup_stamps()
    assert_restores_exactly(sandbox, tmp_path, mount, full, point=stamps[0])


# -- what changes while a backup is interrupted ----------------------------------

def test_files_changed_added_and_deleted_before_the_continuation(sandbox, proxy, tmp_path):
    """The continued backup holds what it found in each run: a file a finished piece
    holds keeps that version (the next incremental takes the new one), a file deleted
    meanwhile is not in it, one added is; a path that became a directory restores as a
    directory though a finished piece holds it as a file."""
    mount = pieced_source(sandbox)
    write_file(os.path.join(mount, "Documents", "a-turns-dir"), b"a file first\n")
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    archived = snapshot(mount)
    docs = os.path.join(mount, "Documents")
    # pieces 1 and 2 hold a-turns-dir, file00 ... file02 (catalogue order)
    file_times_pass()
    write_file(os.path.join(docs, "file00.bin"), noise(100))           # changed
    os.remove(os.path.join(docs, "file01.bin"))                         # deleted
    os.remove(os.path.join(docs, "a-turns-dir"))                        # file -> directory
    write_file(os.path.join(docs, "a-turns-dir", "inside.txt"), b"now inside\n")
    write_file(os.path.join(docs, "file99.bin"), noise(99))             # added
    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert "continuing the full backup" in result.stdout
    continued = snapshot(mount)
    continued["Documents/file00.bin"] = archived["Documents/file00.bin"]   # as archived
    # the continued backup restores exactly the state its catalogue describes
    assert_restores_exactly(sandbox, tmp_path, mount, continued)
    # the next incremental takes the changed file: then everything is as it is now
    ok(sandbox.run(sandbox.backup_args(), env=env))
    assert_restores_exactly(sandbox, tmp_path, mount)
    assert_restores_exactly(sandbox, tmp_path, mount, continued,
                            point=sandbox.backup_stamps()[0])


def test_a_full_begun_in_one_month_is_finished_in_the_next_and_keeps_its_month(
        sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    now = aab.utc_now()
    last_month = now.replace(day=1) - dt.timedelta(days=1)
    begun = last_month.replace(hour=23, minute=30, second=0, microsecond=0)
    crash_at(sandbox, env, "piece-done:2", AAM_TEST_NOW=aab.format_arg_stamp(begun))
    result, first, second = continue_backup(sandbox, proxy, env)
    assert f"continuing the full backup {aab.describe_stamp(begun)}" in result.stdout
    assert_nothing_went_up_twice(sandbox, first, second)
    (name,) = [n for n in sandbox.object_names() if n.indicator]
    assert name.full == begun                           # it keeps the month it began in
    assert_restores_exactly(sandbox, tmp_path, mount)
    # the current month has no full backup yet: the next run makes one
    following = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert "Backup scope: full (no complete full backup" in following.stdout
    assert_restores_exactly(sandbox, tmp_path, mount)


def pending_incremental(sandbox, proxy):
    """A full backup of two files, then eight more, and an incremental of them killed
    after its second piece: it is pending.  Returns the source and the environment."""
    mount = pieced_source(sandbox, files=2)
    env = env_through(sandbox, proxy)
    ok(sandbox.run(sandbox.backup_args(), env=env))
    file_times_pass()
    for n in range(2, 10):
        write_file(os.path.join(mount, "Documents", f"file{n:02d}.bin"), noise(n))
    crash_at(sandbox, env, "piece-done:2")
    return mount, env


def test_a_pending_incremental_is_given_up_for_a_forced_full(sandbox, proxy, tmp_path):
    mount, env = pending_incremental(sandbox, proxy)
    lost = [k for k in volume_puts(proxy) if "_0_0.0_" not in k and sandbox_has(sandbox, k)]
    forced = ok(sandbox.run(sandbox.backup_args(changes={"force_full": "yes"}), env=env))
    assert "is not continued: argument 21 asks for a full backup" in forced.stdout
    assert "Backup scope: full (forced by argument 21)" in forced.stdout
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    sizes = {o["Key"]: o["Size"] for o in sandbox.objects()}
    assert lost and all(f"  {key} ({sizes[key]:,} bytes)" in log for key in lost)
    assert_restores_exactly(sandbox, tmp_path, mount)


# -- one unreadable file, one that changes while 7-Zip reads it ------------------------

@pytest.fixture
def unreadable_file(tmp_path):
    """A file whose every read fails with EIO, as on a bad sector: a bind mount of a
    process's memory file (reading an address it has not mapped), as root."""
    if os.geteuid() != 0:
        pytest.skip("the bind mount of a file that fails on read needs root (CI runs the "
                    "suite as root)")
    holder = subprocess.Popen(["sleep", "100000"])
    mounted = []

    def make(path):
        write_file(path, b"")
        result = subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/mem", path],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        mounted.append(path)
        with pytest.raises(OSError) as failed:
            open(path, "rb").read()
        assert failed.value.errno == 5            # EIO
        return path

    def unmount():
        while mounted:
            subprocess.run(["umount", mounted.pop()], capture_output=True)
    make.unmount = unmount
    try:
        yield make
    finally:
        unmount()
        holder.kill()
        holder.wait()


def test_a_file_that_cannot_be_read_costs_only_itself(sandbox, proxy, tmp_path,
                                                      unreadable_file):
    mount = pieced_source(sandbox, files=4)
    bad = unreadable_file(os.path.join(mount, "Documents", "file01b-bad-sector.bin"))
    env = env_through(sandbox, proxy)
    result = sandbox.run(sandbox.backup_args(), env=env)
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert "7-Zip could not read Documents/file01b-bad-sector.bin" in log
    assert ("validation failure: Documents/file01b-bad-sector.bin: not in the archive "
            "(7-Zip could not read it)") in log
    summary = log.split("===== Summary. =====")[1]
    assert "Documents/file01b-bad-sector.bin" in summary
    (manifest,) = manifests(sandbox).values()        # the set is complete
    assert manifest["files"] == 5
    # the rest restores exactly; the unreadable file is named as not restored
    destination = tmp_path / "restored"
    restore = sandbox.restore_chosen(ONE_STEP, destination, env=sandbox.restore_env(**PIECES))
    assert restore.returncode == aab.EXIT_FAILURE
    assert f"NOT RESTORED (no archive holds it: it could not be read when it was backed " \
        f"up): {bad}" in restore.stdout
    unreadable_file.unmount()                # (a snapshot reads every file)
    expected = snapshot(mount)
    expected.pop("Documents/file01b-bad-sector.bin")
    assert snapshot(os.path.join(destination, "1")) == expected
    # the next backup tries it again; readable now, it is in the backup
    write_file(bad, b"readable again\n")
    ok(sandbox.run(sandbox.backup_args(), env=env))
    assert "Documents/file01b-bad-sector.bin" in open(sandbox.log_files()[-1]).read()
    assert_restores_exactly(sandbox, tmp_path, mount)


def test_an_unreadable_file_alone_in_its_piece_costs_only_itself(
        sandbox, proxy, unreadable_file):
    """Pieces of one entry each (AAM_PIECE_SIZE=1): the unreadable file's piece holds
    nothing else, so nothing is made again; the set is complete all the same."""
    mount = pieced_source(sandbox, files=2)
    unreadable_file(os.path.join(mount, "Documents", "file00b-bad-sector.bin"))
    env = env_through(sandbox, proxy, AAM_PIECE_SIZE="1")
    result = sandbox.run(sandbox.backup_args(), env=env)
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert "7-Zip could not read Documents/file00b-bad-sector.bin" in log
    assert "held nothing else" in log
    (manifest,) = manifests(sandbox).values()
    assert manifest["files"] == 3 and len(manifest["pieces"]) == 4    # the directory too
    catalogue = sandbox.catalogue(manifest["catalogue"]["name"])
    (line,) = [t for t in catalogue.splitlines() if "file00b-bad-sector.bin" in t]
    assert line.split("\t")[5] == "!"                  # held by no archive


def test_a_file_that_grows_while_it_is_read_restores_as_archived_without_failure(
        sandbox, tmp_path):
    mount = sandbox.single_source({"log/app.log": b"first line\n", "other.txt": b"x\n"})
    wrapper = tmp_path / "7zz-stand-in.sh"
    # emulates: the application appends to its log after the walk, before 7-Zip reads it
    wrapper.write_text(f"#!/bin/sh\nprintf 'appended\\n' >> '{mount}/log/app.log'\n"
                       'exec 7zz "$@"\n')
    wrapper.chmod(0o755)
    ok(sandbox.backup(env=sandbox.env(AAM_7ZIP=str(wrapper))))
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert f"Changed while it was read: {mount}/log/app.log (11 bytes when listed, 20 " \
        "archived)" in log
    assert "validation failure" not in log and "SUCCESS" in log
    destination = tmp_path / "restored"
    restore = ok(sandbox.restore_chosen(ONE_STEP, destination))
    assert "NOT RESTORED" not in restore.stdout
    assert open(os.path.join(destination, "1", "log", "app.log"), "rb").read() == \
        b"first line\nappended\n"
    # its size and time differ from the catalogue's now: the next backup takes it again
    write_file(os.path.join(mount, "log", "app.log"), b"first line\nappended\nmore\n")
    ok(sandbox.backup())
    assert "log/app.log" in open(sandbox.log_files()[-1], encoding="utf-8").read()


# -- a backup in many pieces: every way to read it back --------------------------

def test_a_set_in_many_pieces_restores_whole_in_part_and_as_of_a_point(
        sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    ok(sandbox.run(sandbox.backup_args(), env=env))
    full = snapshot(mount)
    file_times_pass()
    write_file(os.path.join(mount, "Documents", "file03.bin"), noise(303))
    os.remove(os.path.join(mount, "Documents", "file07.bin"))
    ok(sandbox.run(sandbox.backup_args(), env=env))
    (manifest,) = [m for m in manifests(sandbox).values()]
    assert len(manifest["pieces"]) >= 1
    full_pieces = {aab.ObjectName.parse(k).piece for k in volume_puts(proxy)}
    # whole, latest
    assert_restores_exactly(sandbox, tmp_path, mount)
    # as of the full backup
    assert_restores_exactly(sandbox, tmp_path, mount, full, point=sandbox.backup_stamps()[0])
    # one file: only the volumes of its piece (and that piece's central directory)
    proxy.reset_counters()
    destination = tmp_path / "one-file"
    ok(sandbox.restore_chosen(ONE_STEP, destination, selection=["file05.bin"],
                              env=dict(sandbox.restore_env(**PIECES),
                                       AWS_ENDPOINT_URL=proxy.endpoint_url)))
    # (thawed by the restores before: only downloads show which volumes it needed)
    fetched = [r["key"] for r in proxy.requests() if r["kind"] == "GetObject"
               and aab.ObjectName.parse(r["key"]).volume is not None]
    assert fetched and len({aab.ObjectName.parse(k).piece for k in fetched}) == 1
    now = snapshot(mount)
    assert snapshot(os.path.join(destination, "1")) == {
        "Documents": now["Documents"], "Documents/file05.bin": now["Documents/file05.bin"]}
    # browse names each version of the changed file
    browse = ok(sandbox.run(aab.BROWSE_ARGS.argv(
        operation=aab.BROWSE_OPERATION, key=KEY, bucket=sandbox.bucket,
        location=sandbox.location, access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCY", selection=["file03.bin"]),
        env=sandbox.env()))
    assert browse.stdout.count(f"file, {SIZE:,} bytes") == 2
    assert len(full_pieces) >= 5


def test_each_piece_opens_with_plain_7zip_and_the_manual_restore_is_exact(sandbox, proxy,
                                                                          tmp_path):
    """docs/restore.md, by hand: every piece of the full backup, then of each incremental
    in time order, extracted over one directory with plain 7-Zip and the key."""
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    ok(sandbox.run(sandbox.backup_args(), env=env))
    file_times_pass()
    write_file(os.path.join(mount, "Documents", "file03.bin"), noise(303))
    write_file(os.path.join(mount, "Documents", "new.txt"), b"new\n")
    ok(sandbox.run(sandbox.backup_args(), env=env))
    by_backup = {}
    for name in sandbox.object_names():
        if name and name.volume is not None:
            by_backup.setdefault(name.incremental or name.full, []).append(name.key)
    destination = tmp_path / "by-hand"
    for backup in sorted(by_backup):
        extract_pieces(sandbox, by_backup[backup], destination, tmp_path / "downloads")
    expected, got = snapshot(mount), snapshot(destination)
    assert {r: e[1] for r, e in got.items() if e[0] == "f"} == \
        {r: e[1] for r, e in expected.items() if e[0] == "f"}
    assert got["Documents/empty-dir"][0] == "d"
