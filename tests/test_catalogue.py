"""The catalogue of each backup: exact and point-in-time restores, change detection with
the local state, browsing without a thaw, and sets made before catalogues existed."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import aam_auto_backup as aab
from conftest import KEY, PROGRAM, file_times_pass, ok, snapshot, wait_for, write_file

ONE_STEP = aab.ONE_STEP_RESTORE
MULTI_STEP = [aab.THAW_STEP, aab.STATUS_STEP, aab.DOWNLOAD_STEP, aab.EXTRACT_STEP]

START = {
    "report.txt": b"quarterly report\n" * 50,
    "notes.md": b"# notes\n",
    "becomes-dir": b"a file that turns into a directory\n",
    "becomes-file/inside.txt": b"a directory that turns into a file\n",
    "projects/alpha/main.py": b"print('alpha')\n",
    "projects/alpha/data.csv": b"1,2,3\n" * 100,
    "projects/beta/readme.txt": b"beta\n",
    "photos/2024/a.jpg": os.urandom(20_000),
}


def restored(destination, number=1):
    return snapshot(os.path.join(destination, str(number)))


def catalogue_objects(sandbox):
    return sorted((n for n in sandbox.object_names() if n.catalogue),
                  key=lambda n: n.incremental or n.full)


def test_type_changes_and_deletions_restore_as_at_the_last_backup(sandbox, tmp_path):
    mount = sandbox.single_source(START)
    os.symlink("notes.md", os.path.join(mount, "link-becomes-file"))
    ok(sandbox.backup())                                            # full
    file_times_pass()
    os.remove(os.path.join(mount, "becomes-dir"))                   # file -> directory
    write_file(os.path.join(mount, "becomes-dir", "now-inside.txt"), b"inside\n")
    shutil.rmtree(os.path.join(mount, "becomes-file"))              # directory -> file
    write_file(os.path.join(mount, "becomes-file"), b"now a file\n")
    os.remove(os.path.join(mount, "link-becomes-file"))             # link -> file
    write_file(os.path.join(mount, "link-becomes-file"), b"a file now\n")
    os.remove(os.path.join(mount, "notes.md"))                      # deleted
    ok(sandbox.backup())                                            # incremental
    expected = snapshot(mount)

    destination = tmp_path / "restored"
    result = ok(sandbox.restore_chosen(ONE_STEP, destination))
    assert restored(destination) == expected
    assert "notes.md" not in restored(destination)
    assert "Restore point: the latest complete backup, the incremental backup" in result.stdout


def test_a_chain_of_eight_incrementals_restores_exactly_at_any_point(sandbox, tmp_path):
    mount = sandbox.single_source(START)
    m = lambda *parts: os.path.join(mount, *parts)                  # noqa: E731
    steps = [
        lambda: write_file(m("report.txt"), b"edited once\n"),                      # edit
        lambda: write_file(m("projects", "gamma", "new.txt"), b"added\n"),          # add
        lambda: os.remove(m("projects", "alpha", "data.csv")),                      # delete
        lambda: os.rename(m("notes.md"), m("notes-renamed.md")),                    # rename
        lambda: os.rename(m("projects", "beta"), m("archive-beta")),                # move dir
        lambda: (os.remove(m("becomes-dir")),                                       # type
                 write_file(m("becomes-dir", "child.txt"), b"was a file\n")),
        lambda: (write_file(m("report.txt"), b"edited twice\n"),                    # edits
                 os.chmod(m("projects", "alpha", "main.py"), 0o600)),
        lambda: (shutil.rmtree(m("becomes-file")),                                  # type
                 write_file(m("becomes-file"), b"was a directory\n"),
                 write_file(m("archive-beta", "more.txt"), b"moved, then added to\n")),
    ]
    ok(sandbox.backup())
    states = [snapshot(mount)]
    for step in steps:
        file_times_pass()
        step()
        result = ok(sandbox.backup())
        assert "cannot be used" not in result.stdout
        states.append(snapshot(mount))
    stamps = sandbox.backup_stamps()
    assert len(stamps) == 9
    kinds = [json.loads(sandbox.catalogue(n.key).split("\t", 2)[2].splitlines()[0])["kind"]
             for n in catalogue_objects(sandbox)]
    assert kinds == ["listing"] + ["delta"] * 8

    fourth = tmp_path / "fourth"
    result = ok(sandbox.restore_chosen(ONE_STEP, fourth, point=stamps[3]))
    assert restored(fourth) == states[3]
    assert f"Restore point {stamps[3]} UTC (argument 14)" in result.stdout
    latest = tmp_path / "latest"
    ok(sandbox.restore_chosen(ONE_STEP, latest))
    assert restored(latest) == states[-1] == snapshot(mount)

    steps_destination = tmp_path / "steps"
    for operation in MULTI_STEP:
        ok(sandbox.restore(operation, steps_destination, {"restore_point": stamps[3]}))
    assert restored(steps_destination) == states[3]


def test_each_catalogue_is_encrypted_standard_and_sized_by_the_changes(sandbox, tmp_path):
    files = {f"many/file-{n:04d}.txt": b"x" * n for n in range(300)}
    mount = sandbox.single_source(dict(files, **{"secret-name-visible.txt": b"s"}))
    ok(sandbox.backup())
    file_times_pass()
    write_file(os.path.join(mount, "many", "file-0007.txt"), b"changed\n")
    ok(sandbox.backup())
    full, incremental = catalogue_objects(sandbox)
    listed = {o["Key"]: o for o in sandbox.objects()}
    for name in (full, incremental):
        assert listed[name.key].get("StorageClass", "STANDARD") == "STANDARD"
        body = sandbox.s3().get_object(Bucket=sandbox.bucket, Key=name.key)["Body"].read()
        assert b"secret-name-visible" not in body and b"file-0007" not in body
    full_text, incremental_text = (sandbox.catalogue(n.key) for n in (full, incremental))
    assert "secret-name-visible.txt" in full_text
    with pytest.raises(AssertionError):
        sandbox.catalogue(full.key, key_text="not the key")
    # the incremental's catalogue names what changed, not the tree
    lines = [line for line in incremental_text.splitlines() if not line.startswith("#")]
    assert [line.split("\t")[1] for line in lines] == ["many/file-0007.txt"]
    indicator = sandbox.indicator(aab.ObjectName(incremental.location, incremental.full,
                                                 incremental.incremental, True,
                                                 incremental.source).key)
    assert indicator["catalogue"]["name"] == incremental.key
    assert indicator["catalogue"]["kind"] == "delta"


def test_a_file_arriving_with_old_times_is_in_the_next_incremental(sandbox, tmp_path):
    """Through the Windows platform's selection: a file moved into a listed directory
    keeps its modification and creation time there, so only the catalogue shows it."""
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    old = time.time() - 30 * 86400
    arrived = os.path.join(mount, "projects", "arrived.txt")
    write_file(arrived, b"moved in from elsewhere\n")
    os.utime(arrived, (old, old))
    windows = WindowsTimes(mount)
    plan = aab.SourcePlan(mount="q:\\", listed=[""], excluded_dir_paths=[],
                          excluded_file_paths=[], dir_patterns=[], file_patterns=[])
    (state,) = [os.path.join(sandbox.state_dir, n) for n in os.listdir(sandbox.state_dir)
                if n.endswith(".tsv")]
    since = aab.utc_now()
    walk = aab.TreeWalk("q:\\", plan, windows, since)
    archived = []
    recorder = aab.ChangeRecorder(walk, state, windows, False)
    recorder.run(Discard(), lambda walked: archived.append(walked.path))
    assert archived == ["projects\\arrived.txt"]
    # the time rule alone (no local state) misses it: why the catalogue is needed
    blind = []
    aab.ChangeRecorder(aab.TreeWalk("q:\\", plan, windows, since), None, windows,
                       False).run(Discard(), lambda walked: blind.append(walked.path))
    assert blind == []


class WindowsTimes(aab.WindowsPlatform):
    """The Windows platform on a directory shown at q:, with the times NTFS gives a
    file moved in from elsewhere on the volume: its old creation and write times."""

    def __init__(self, root):
        self.root = root

    def long_path(self, path):
        return os.path.join(self.root, *path[3:].split("\\")) if path[3:] else self.root

    def changed_time(self, st):
        return st.st_mtime          # creation time: as old as the file, not the move


class Discard:
    """A work file that keeps nothing (the test looks at what is archived)."""

    def write(self, *_line):
        pass

    write_line = write


EARLY_CONFIRMED = "was started before S3 answered, on a guess from the local catalogues; S3 confirmed"
EARLY_REFUSED = "on a guess from the local catalogues; S3 did not: it is started again"


def last_log(sandbox):
    with open(sandbox.log_files()[-1], encoding="utf-8") as handle:
        return handle.read()


def test_missing_or_foreign_local_state_falls_back_and_stays_exact(sandbox, tmp_path):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    # No local state and no backup in S3: the child was started early as a full one.
    assert EARLY_CONFIRMED in last_log(sandbox)
    after_full = str(tmp_path / "state-after-full")
    shutil.copytree(sandbox.state_dir, after_full)
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"second version\n")
    ok(sandbox.backup())
    second = snapshot(mount)
    # The child started before S3 answered, on the local state's word, and S3 agreed.
    assert EARLY_CONFIRMED in last_log(sandbox)

    shutil.rmtree(sandbox.state_dir)                # the state of another backup
    shutil.copytree(after_full, sandbox.state_dir)
    file_times_pass()
    os.remove(os.path.join(mount, "notes.md"))
    write_file(os.path.join(mount, "projects", "new.txt"), b"third\n")
    result = ok(sandbox.backup())
    assert "the local catalogue of the latest complete backup" in result.stdout
    assert "cannot be used: there is none" in result.stdout
    assert "Files are selected by their times alone" in result.stdout
    # The newest local state (the full's) is not what S3 names: the early child was
    # ended and a child for S3's answer ran instead (the restores below are exact).
    assert EARLY_REFUSED in last_log(sandbox) and EARLY_CONFIRMED not in last_log(sandbox)
    third = snapshot(mount)

    shutil.rmtree(sandbox.state_dir)                # no state at all
    file_times_pass()
    write_file(os.path.join(mount, "photos", "2024", "b.jpg"), b"fourth\n")
    result = ok(sandbox.backup())
    assert "cannot be used: there is none" in result.stdout
    # Guessed a full (no local state), but S3 holds this month's full: started again.
    assert EARLY_REFUSED in last_log(sandbox) and EARLY_CONFIRMED not in last_log(sandbox)
    kinds = [json.loads(sandbox.catalogue(n.key).split("\t", 2)[2].splitlines()[0])["kind"]
             for n in catalogue_objects(sandbox)]
    assert kinds == ["listing", "delta", "listing", "listing"]

    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == snapshot(mount)
    stamps = sandbox.backup_stamps()
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "third", point=stamps[2]))
    assert restored(tmp_path / "third") == third
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "second", point=stamps[1]))
    assert restored(tmp_path / "second") == second


def newest_state(sandbox):
    """The newest local state file of the sandbox's one source."""
    return sorted(os.path.join(sandbox.state_dir, n) for n in os.listdir(sandbox.state_dir)
                  if n.endswith(".tsv"))[-1]


def reseal(path, archive_key, bucket, location, source):
    """Give a state the end line another key, bucket or location would write (a state
    of another location or key, whole and sound in itself)."""
    with open(path, "rb") as handle:
        data = handle.read()
    body = data[:data.rindex(b"#end\t")]
    with open(path, "wb") as handle:
        handle.write(body)
    aab.seal_local_state(path, aab.local_state_key(archive_key, bucket, location), source)


def truncate(path, _sandbox):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:        # cut in the middle of a line
        handle.truncate(size * 3 // 5)


def garble(path, _sandbox):
    with open(path, "r+b") as handle:        # one entry's recorded size changes
        data = handle.read()
        at = data.index(b"\treport.txt\t") + len(b"\treport.txt\t")
        handle.seek(at)
        handle.write(b"9")


def another_location(path, sandbox):
    source = json.loads(open(path, encoding="utf-8").readline().split("\t", 2)[2])["source"]
    reseal(path, KEY, sandbox.bucket, "another-pc", source)


def another_key(path, sandbox):
    source = json.loads(open(path, encoding="utf-8").readline().split("\t", 2)[2])["source"]
    reseal(path, "not this backup's key, another one", sandbox.bucket, sandbox.location,
           source)


def written_by_1_1_0(path, _sandbox):
    with open(path, "rb") as handle:         # no end line: as version 1.1.0 wrote states
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:data.rindex(b"#end\t")])


@pytest.mark.parametrize("damage, said", [
    (truncate, "it has no end line: it was cut short"),
    (garble, "its digest does not match"),
    (another_location, "its digest does not match"),
    (another_key, "its digest does not match"),
    (written_by_1_1_0, "or written by version 1.1.0 or earlier"),
], ids=["truncated", "garbled", "another location", "another key", "version 1.1.0"])
def test_a_damaged_local_state_is_found_and_the_restore_stays_exact(sandbox, tmp_path,
                                                                    damage, said):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    file_times_pass()
    write_file(os.path.join(mount, "projects", "beta", "readme.txt"), b"beta, second\n")
    ok(sandbox.backup())                     # an incremental: its state is the newest
    state = newest_state(sandbox)
    damage(state, sandbox)
    file_times_pass()
    os.remove(os.path.join(mount, "notes.md"))                    # deleted
    shutil.rmtree(os.path.join(mount, "projects", "alpha"))       # deleted with its files
    write_file(os.path.join(mount, "report.txt"), b"third version\n")
    result = ok(sandbox.backup())
    third = snapshot(mount)
    assert (f"the local catalogue of the latest complete backup "
            f"{aab.describe_stamp(aab.parse_arg_stamp(sandbox.backup_stamps()[1]))} cannot be "
            f"used: {state}: ") in result.stdout
    assert said in result.stdout
    assert "Files are selected by their times alone" in result.stdout
    # The child started before S3 answered compared with the state unread; once read
    # through, it was ended and started again without it.
    assert ("S3 confirmed it, but the local catalogue it compares with cannot be used: it "
            "is started again") in last_log(sandbox)
    # no false failure for a file 7-Zip was never asked to read
    assert "validation failure" not in last_log(sandbox) and "not in the archive" not in \
        result.stdout
    kinds = [json.loads(sandbox.catalogue(n.key).split("\t", 2)[2].splitlines()[0])["kind"]
             for n in catalogue_objects(sandbox)]
    assert kinds == ["listing", "delta", "listing"]
    # The state this run wrote is sound: the next incremental compares with it.
    file_times_pass()
    write_file(os.path.join(mount, "photos", "2024", "b.jpg"), b"fourth\n")
    result = ok(sandbox.backup())
    assert "cannot be used" not in result.stdout

    stamps = sandbox.backup_stamps()
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "third", point=stamps[2]))
    assert restored(tmp_path / "third") == third          # the deleted files stay deleted
    assert "notes.md" not in restored(tmp_path / "third")
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == snapshot(mount)


def test_a_refused_early_child_that_had_begun_its_archive_leaves_nothing_behind(
        sandbox, proxy, tmp_path):
    """Without a mirror an early child's 7-Zip runs before S3 answers; when S3's answer
    refuses the guess, those volumes are removed unsent and the right child runs."""
    mount = sandbox.single_source(START)
    write_file(os.path.join(mount, "big.bin"), os.urandom(1_000_000))
    aws_only = {"destinations": "AWS", "mirror_root": ""}
    # Small volumes: before S3 answers, the guessed full's 7-Zip has written
    # WAITING_VOLUMES and is paused (nothing is uploaded before the go).
    env = sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url, AAM_VOLUME_SIZE="65536")
    ok(sandbox.backup(aws_only, env=env))
    assert EARLY_CONFIRMED in last_log(sandbox)
    file_times_pass()
    shutil.rmtree(sandbox.state_dir)         # no state: the early child guesses a full
    write_file(os.path.join(mount, "report.txt"), b"second version\n")
    os.remove(os.path.join(mount, "notes.md"))
    # S3 answers once the guessed full's 7-Zip has begun WAITING_VOLUMES volumes.
    proxy.hold_requests({"LIST"})
    backup = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(
        changes=aws_only), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    wait_for(lambda: (volumes_begun(sandbox) >= aab.WAITING_VOLUMES
                      or backup.poll() is not None),
             120, "the guessed full's 7-Zip never began its volumes")
    assert backup.poll() is None, "the backup ended before S3 answered"
    proxy.release_requests()
    output = backup.communicate(timeout=300)[0]
    assert backup.returncode == 0, output
    log = last_log(sandbox)
    assert EARLY_REFUSED in log
    begun = re.search(r"the (\d+) volume\(s\) its 7-Zip had begun are removed unsent", log)
    assert begun and int(begun[1]) >= aab.WAITING_VOLUMES, log
    # The set S3 holds for this run is the incremental S3 called for: only the changed
    # file, in exactly the volumes of the indicator (none of the guessed full's).
    second = snapshot(mount)
    indicators = sorted((n for n in sandbox.object_names() if n.indicator),
                        key=lambda n: n.incremental or n.full)
    manifest = sandbox.indicator(indicators[-1].key)
    assert manifest["scope"] == "incremental" and manifest["files"] == 1
    run_volumes = sorted(n.key for n in sandbox.object_names()
                         if n.incremental == indicators[-1].incremental and not n.indicator
                         and not n.catalogue)
    assert run_volumes == sorted(v["name"] for v in manifest["volumes"])
    assert not os.listdir(sandbox.temp)

    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == second


def volumes_begun(sandbox):
    """The volumes 7-Zip has begun in the work directories of the sandbox's runs."""
    return sum(len(aab.volumes_on_disk(os.path.join(sandbox.temp, work, aab.ARCHIVE_DIR)))
               for work in os.listdir(sandbox.temp)) if os.path.isdir(sandbox.temp) else 0


def test_a_set_without_catalogues_restores_by_replay_and_a_type_change_does_not_fail(
        sandbox, tmp_path):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    file_times_pass()
    os.remove(os.path.join(mount, "becomes-dir"))
    write_file(os.path.join(mount, "becomes-dir", "now-inside.txt"), b"inside\n")
    shutil.rmtree(os.path.join(mount, "becomes-file"))
    write_file(os.path.join(mount, "becomes-file"), b"now a file\n")
    os.remove(os.path.join(mount, "notes.md"))
    ok(sandbox.backup())
    sandbox.as_made_by("1.0.0", tmp_path)

    destination = tmp_path / "restored"
    result = ok(sandbox.restore_chosen(ONE_STEP, destination))
    assert "This set has no catalogues (made by version 1.0.0)" in result.stdout
    got = restored(destination)
    now = snapshot(mount)
    # replay: the later backup wins where a path changed type; every file it held is
    # as it was backed up; a deleted file comes back (nothing recorded its deletion)
    for rel in ("becomes-dir/now-inside.txt", "becomes-file", "report.txt"):
        assert got[rel][:2] == now[rel][:2]
    assert got["becomes-dir"][0] == "d" and "becomes-file/inside.txt" not in got
    assert got["notes.md"][1] == START["notes.md"]

    selective = sandbox.restore_chosen(ONE_STEP, tmp_path / "part", selection=["report.txt"])
    assert selective.returncode == 1
    assert "has no catalogue, so it cannot be restored in part" in selective.stdout


def test_a_set_made_by_1_1_0_restores_whole_in_part_and_as_of_a_point(sandbox, tmp_path):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    at_full = snapshot(mount)
    file_times_pass()
    write_file(os.path.join(mount, "projects", "alpha", "main.py"), b"print('changed')\n")
    os.remove(os.path.join(mount, "notes.md"))
    ok(sandbox.backup())
    sandbox.as_made_by("1.1.0", tmp_path)
    assert not any("_piece" in o["Key"] for o in sandbox.objects())
    now = snapshot(mount)
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == now
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "full", sandbox.backup_stamps()[0]))
    assert restored(tmp_path / "full") == at_full
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "part", selection=["alpha"]))
    assert {rel for rel in restored(tmp_path / "part")} == {
        "projects", "projects/alpha", "projects/alpha/main.py", "projects/alpha/data.csv"}


def test_incrementals_of_this_version_over_a_full_made_by_1_1_0_restore_exactly(
        sandbox, tmp_path):
    """The month's full backup was made by 1.1.0 (before an upgrade): this version's
    incrementals build on its archive (its local state has no end line: the first
    incremental is a listing made by the time rule) and restore exactly."""
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    at_full = snapshot(mount)
    sandbox.as_made_by("1.1.0", tmp_path)
    file_times_pass()
    write_file(os.path.join(mount, "projects", "beta", "readme.txt"), b"beta 2\n")
    os.remove(os.path.join(mount, "becomes-dir"))
    write_file(os.path.join(mount, "becomes-dir", "now-inside.txt"), b"inside\n")
    result = ok(sandbox.backup())
    assert "Backup scope: incremental" in result.stdout
    assert "written by version 1.1.0 or earlier" in result.stdout
    pieces = [n for n in sandbox.object_names() if n.volume is not None and n.incremental]
    assert pieces and all(n.piece == 1 for n in pieces)
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == snapshot(mount)
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "full", sandbox.backup_stamps()[0]))
    assert restored(tmp_path / "full") == at_full


def test_a_1_0_0_chain_continued_restores_exactly_from_its_first_listing(sandbox, tmp_path):
    """Version 1.0.0 made the full backup and an incremental (no catalogue, no local
    state); this version continues the chain: its first incremental's catalogue is a
    listing (made without a local state), the next one's a delta."""
    mount = sandbox.single_source(START)
    ok(sandbox.backup())                                          # 1.0.0: the full
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"second version, in 1.0.0's incr\n")
    os.remove(os.path.join(mount, "notes.md"))                    # deleted before the listing
    ok(sandbox.backup())                                          # 1.0.0: an incremental
    sandbox.as_made_by("1.0.0", tmp_path)
    replayed = snapshot(mount)

    file_times_pass()
    shutil.rmtree(os.path.join(mount, "projects", "beta"))        # deleted before the listing
    write_file(os.path.join(mount, "projects", "alpha", "main.py"), b"print('alpha 3')\n")
    first = ok(sandbox.backup())                                  # this version: a listing
    assert "cannot be used: there is none" in first.stdout
    at_listing = snapshot(mount)

    file_times_pass()
    os.remove(os.path.join(mount, "photos", "2024", "a.jpg"))     # deleted after it
    write_file(os.path.join(mount, "projects", "new.txt"), b"new\n")
    ok(sandbox.backup())                                          # this version: a delta
    latest = snapshot(mount)
    stamps = sandbox.backup_stamps()
    assert len(stamps) == 4

    result = ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "at-listing", point=stamps[2]))
    assert restored(tmp_path / "at-listing") == at_listing
    assert ("The first backups of this set have no catalogue (made by version 1.0.0); the "
            "state is exact from the backup") in result.stdout
    got = restored(tmp_path / "at-listing")
    assert "notes.md" not in got and "projects/beta" not in got        # deleted stay deleted
    assert got["report.txt"][1] == b"second version, in 1.0.0's incr\n"  # from 1.0.0's incr

    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert restored(tmp_path / "latest") == latest

    # A selection: a file only the 1.0.0 full holds; those archives are thawed whole.
    part = ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "part", selection=["data.csv"]))
    assert restored(tmp_path / "part") == {
        path: latest[path] for path in ("projects", "projects/alpha", "projects/alpha/data.csv")}
    full_volumes = [n.key for n in sandbox.object_names() if n.volume and n.incremental is None]
    assert all(key in part.stdout for key in full_volumes)

    # browse shows the versions from the first listing on, and says so
    found = browse(sandbox, "main.py")
    assert found.returncode == 0, found.stdout + found.stderr
    assert ("have no catalogue: made by version 1.0.0; whether they hold what is asked for "
            "is unknown; versions are shown from that backup on)") in found.stdout
    assert found.stdout.count(", modified ") == 1     # main.py, as the listing has it

    # Before the first listing the set is replayed, as version 1.0.0 restores it.
    old = ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "old", point=stamps[1]))
    assert "This set has no catalogues (made by version 1.0.0)" in old.stdout
    got = restored(tmp_path / "old")
    assert {p: e[:2] for p, e in got.items() if e[0] == "f"} == {
        p: e[:2] for p, e in replayed.items() if e[0] == "f"} | {
        "notes.md": ("f", START["notes.md"])}            # replay brings a deleted file back


def test_a_reader_of_the_original_object_names_passes_over_catalogues_and_key_checks(
        sandbox):
    """The object-name pattern version 1.0.0 matched keys with: catalogues and key checks
    are not its, and a key check is no backup set's object for this version either."""


def test_a_reader_of_the_original_object_names_passes_over_catalogues_and_pieces(sandbox):
    """The object-name pattern versions 1.0.0 and 1.1.0 matched keys with: catalogues, key
    checks and the volumes of pieces are not theirs; the indicator is (and says it is of
    format 2, which 1.1.0 refuses: use the newer version to restore)."""
    original = re.compile(r"^(?P<location>[^_]+)_(?P<full>\d{8}_\d{6}\.\d{6})_"
                          r"(?P<incr>0_0\.0|\d{8}_\d{6}\.\d{6})_(?P<flag>no|yes)_(?P<rest>.+)$")
    sandbox.single_source(START)
    ok(sandbox.backup())
    keys = [o["Key"] for o in sandbox.objects()]
    names = {k: aab.ObjectName.parse(k) for k in keys}
    catalogue = [k for k in keys if names[k] and names[k].catalogue]
    pieces = [k for k in keys if names[k] and names[k].volume is not None]
    (indicator,) = [k for k in keys if names[k] and names[k].indicator]
    (keycheck,) = [k for k in keys if aab.KeyCheck.parse(k)]
    assert names[keycheck] is None
    new = catalogue + pieces + [keycheck]
    assert catalogue and pieces and not any(original.match(k) for k in new)
    assert all("_piece0001_" in k for k in pieces) and original.match(indicator)
    assert sandbox.indicator(indicator)["format_version"] == 2


def browse(sandbox, *selection, key=KEY, keys=None):
    return browse_bucket(sandbox, sandbox.bucket, keys, *selection, key=key)


def browse_bucket(sandbox, bucket, keys=None, *selection, key=KEY):
    key_id, secret = keys or ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY")
    return sandbox.run(aab.BROWSE_ARGS.argv(
        operation=aab.BROWSE_OPERATION, key=key, bucket=bucket,
        location=sandbox.location, access_key_id=key_id, secret_access_key=secret,
        selection=list(selection)))


def test_browse_lists_the_backups_and_the_versions_of_a_file_without_a_thaw(
        sandbox, proxy, tmp_path):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"second version\n")
    ok(sandbox.backup())
    file_times_pass()
    os.remove(os.path.join(mount, "report.txt"))
    ok(sandbox.backup())
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.reset_counters()

    listing = ok(browse(sandbox, key=""))
    rows = [line for line in listing.stdout.splitlines() if line.endswith("minimum")]
    assert [row.split()[3] for row in rows] == ["full", "incremental", "incremental"]
    assert all("180 day(s) to Deep Archive's 180-day minimum" in row for row in rows)

    found = ok(browse(sandbox, os.path.join(mount, "report.txt")))
    lines = found.stdout.splitlines()
    at = lines.index(os.path.join(mount, "report.txt"))
    versions = lines[at + 1:at + 4]
    assert "full" in versions[0] and f"{len(START['report.txt']):,} bytes" in versions[0]
    assert "incremental" in versions[1] and "15 bytes" in versions[1]
    assert versions[2].rstrip().endswith("deleted")
    assert "RestoreObject" not in proxy.counters()["by_kind"]

    nothing = browse(sandbox, "no-such-name*")
    assert nothing.returncode == aab.EXIT_NOTHING_SELECTED
    assert "matches no-such-name*" in nothing.stderr


def test_browse_with_the_backup_keys_names_the_missing_permission(sandbox, aws):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    backup_keys, restore_keys = sandbox.user_keys()
    with aws.iam_enforced():
        refused = browse(sandbox, "report.txt", keys=backup_keys)
        allowed = browse(sandbox, "report.txt", keys=restore_keys)
    assert refused.returncode == 1
    assert "credentials of arguments 5 and 6 lack the permission s3:GetObject" \
        in refused.stderr
    assert backup_keys[1] not in refused.stdout + refused.stderr
    ok(allowed)
    assert os.path.join(mount, "report.txt") in allowed.stdout


def test_browse_of_a_set_without_catalogues_says_the_answer_is_unknown(sandbox, tmp_path):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    sandbox.as_made_by("1.0.0", tmp_path)
    result = browse(sandbox, "report.txt")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Nothing in any backup" not in result.stdout + result.stderr
    assert re.search(rf"Unknown for the backups without a catalogue \(made by version "
                     rf"1\.0\.0; only a restore can tell what they hold\): {re.escape(mount)} "
                     rf"from \d{{8}} \d{{6}}\.\d{{6}} UTC\. Nothing in the backups with a "
                     rf"catalogue matches report\.txt\.", result.stderr), result.stderr
    # a later backup with a catalogue is searched, the one without is still named
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"changed\n")
    ok(sandbox.backup({"force_full": "yes"}))
    found = browse(sandbox, "report.txt")
    assert found.returncode == 0, found.stdout + found.stderr
    assert os.path.join(mount, "report.txt") in found.stdout
    assert "Unknown for the backups without a catalogue" in found.stdout


def test_a_missing_or_forbidden_bucket_is_named_by_its_argument_number(
        sandbox, aws, tmp_path):
    # The bucket is argument 3 of a browse and argument 9 of a restore: each message
    # names the operation's own.
    assert (aab.BROWSE_ARGS.number("bucket"), aab.RESTORE_ARGS.number("bucket")) == (3, 9)
    missing = f"{sandbox.bucket}-gone"
    browse_missing = browse_bucket(sandbox, missing)
    assert browse_missing.returncode == 1
    assert f"The bucket {missing} (argument 3) does not exist." in browse_missing.stderr
    restore_missing = sandbox.restore(aab.THAW_STEP, tmp_path / "restored",
                                      {"bucket": missing})
    assert restore_missing.returncode == 1
    assert f"ERROR: The bucket {missing} (argument 9) does not exist." in restore_missing.stdout

    # Another's bucket: the restore keys of this one are refused there.
    other = f"{sandbox.bucket}-other"
    aws.create_bucket(other)
    _backup_keys, restore_keys = sandbox.user_keys()
    with aws.iam_enforced():
        forbidden = browse_bucket(sandbox, other, restore_keys)
    assert forbidden.returncode == 1
    assert (f"on the bucket {other} (argument 3) (access denied): the credentials of "
            "arguments 5 and 6 lack the permission s3:ListBucket") in forbidden.stderr
