"""Pipelined upload: volumes go up while 7-Zip writes the next, the disk holds a few.

Real parts: the CLI as a subprocess, real 7-Zip, a real moto server over HTTP
behind the counting proxy (which also plays a slow uplink).
"""

import glob
import json
import os
import random
import re
import subprocess
import sys
import threading

import pytest

import aam_auto_backup as aam
from conftest import extract

VOLUME_SIZE = 2_000_000
SLOW_PUT_SECONDS = 0.25      # per PutObject: uploads lag behind 7-Zip
# 7-Zip writes its output a megabyte at a time and, from 1 MB files, up to about
# 5 MB at once when the machine is busy (measured), while the throttle looks every
# 20 ms.  Against 2 MB volumes such a burst finishes two or three volumes before
# the throttle can pause 7-Zip; from 200 KB files (bursts of 1-2 MB) into 4 MB
# volumes it stays under the one volume of lag the bound allows.
THROTTLED_VOLUME_SIZE = 4_000_000


def make_source(sandbox, files=30, size=1_000_000):
    """Random (incompressible) files: 7-Zip stores them, one volume per two files."""
    root = os.path.join(sandbox.root, "data", "home", "ann", "Documents")
    os.makedirs(root)
    rng = random.Random(6)
    for index in range(files):
        with open(os.path.join(root, f"file{index:02d}.bin"), "wb") as handle:
            handle.write(rng.randbytes(size))
    sandbox.write_instructions(root + "/\n\n\n")
    return root


class ArchiveDirWatcher(threading.Thread):
    """Samples the volumes in the work directories' archives/<piece>/ every 10 ms while
    a backup runs.

    A state the bound is about (finished volumes waiting while 7-Zip is paused)
    lasts at least one slowed upload (SLOW_PUT_SECONDS), many times 10 ms."""

    def __init__(self, temp_root, proxy):
        super().__init__(daemon=True)
        self.temp_root, self.proxy = temp_root, proxy
        self.most_volumes = self.most_bytes = 0
        self.fullest = []
        self.uploads_while_writing = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            for archive_dir in glob.glob(os.path.join(self.temp_root, "*", "archives")):
                self.sample(archive_dir)
            self.done.wait(0.01)

    def sample(self, archive_dir):
        try:
            names = [os.path.join(piece, name) for piece in os.listdir(archive_dir)
                     if os.path.isdir(os.path.join(archive_dir, piece))
                     for name in os.listdir(os.path.join(archive_dir, piece))]
            sizes = [os.path.getsize(os.path.join(archive_dir, n)) for n in names]
        except OSError:
            return
        if len(names) > self.most_volumes:
            self.most_volumes, self.fullest = len(names), sorted(names)
        self.most_bytes = max(self.most_bytes, sum(sizes))
        if any(name.endswith(".tmp") for name in names):
            puts = self.proxy.counters()["by_kind"].get("PutObject", 0)
            self.uploads_while_writing = max(self.uploads_while_writing, puts)

    def stop(self):
        self.done.set()
        self.join()


def backup_env(sandbox, proxy, **extra):
    settings = {"AWS_ENDPOINT_URL": proxy.endpoint_url, "AAM_VOLUME_SIZE": str(VOLUME_SIZE)}
    return sandbox.env(**dict(settings, **extra))


def keys(sandbox, marker):
    """The keys of one kind: 'piece' (volumes), 'yes' (indicators), 'catalogue'."""
    pattern = re.compile(rf"_{marker}\d*_")
    return sorted(o["Key"] for o in sandbox.objects() if pattern.search(o["Key"]))


def test_volumes_upload_while_7zip_writes_and_the_disk_holds_a_few(sandbox, proxy, tmp_path):
    source = make_source(sandbox, files=300, size=200_000)
    proxy.delay_requests(SLOW_PUT_SECONDS, kinds={"PutObject"})
    watcher = ArchiveDirWatcher(sandbox.temp, proxy)
    watcher.start()
    try:
        result = sandbox.backup({"destinations": "AWS", "mirror_root": ""}, env=backup_env(
            sandbox, proxy, AAM_VOLUME_SIZE=str(THROTTLED_VOLUME_SIZE)))
    finally:
        watcher.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    volumes = keys(sandbox, "piece")
    assert len(volumes) >= 14
    # Uploads started while 7-Zip was still writing (a .tmp volume existed).
    assert watcher.uploads_while_writing >= 3
    # 7-Zip was paused while WAITING_VOLUMES finished volumes waited: besides
    # them only the one 7-Zip is writing, and one more the pause may lag by.
    bound = aam.WAITING_VOLUMES + 2
    assert watcher.most_volumes <= bound, watcher.fullest
    assert watcher.most_bytes <= bound * THROTTLED_VOLUME_SIZE
    assert not os.listdir(sandbox.temp) or not glob.glob(os.path.join(sandbox.temp, "*", "*"))
    # The indicator lists exactly the uploaded volumes, in order, and they restore.
    (indicator,) = keys(sandbox, "yes")
    manifest = sandbox.indicator(indicator)
    assert [v["name"] for v in manifest["volumes"]] == volumes
    assert manifest["files"] == 300
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    local = [sandbox.fetch_volume(key, str(downloads)) for key in volumes]
    for path in local:
        os.rename(path, re.sub(r".*\.zip\.", str(downloads / "backup.zip."), path))
    restored = extract(str(downloads / "backup.zip.001"), str(tmp_path / "restored"))
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as a, \
                open(os.path.join(restored, name), "rb") as b:
            assert a.read() == b.read()


KILLING_7ZIP = """#!{python}
# Runs the real 7-Zip and stops it (SIGTERM) once the parent has uploaded and
# deleted the first volume: 7-Zip then deletes its volumes and exits 255.  The
# event is read from the directory as it stands, not from a sequence of looks: a
# later volume exists (so the first was finished) and the first is gone.  It is
# looked at again on each change of the directory (inotify, through libc) or when
# 7-Zip ends (a pidfd), never after a time.
import ctypes, os, select, signal, subprocess, sys
archive = next(a for a in sys.argv[1:] if a.endswith("backup.zip"))
directory = os.path.dirname(archive)
libc = ctypes.CDLL(None, use_errno=True)
changes = libc.inotify_init()
IN_CREATE, IN_DELETE, IN_MOVED_TO = 0x100, 0x200, 0x80
libc.inotify_add_watch(changes, directory.encode(), IN_CREATE | IN_DELETE | IN_MOVED_TO)
process = subprocess.Popen([{seven_zip!r}] + sys.argv[1:])
ended = os.pidfd_open(process.pid)

def first_volume_uploaded(names):
    later = any(n.startswith("backup.zip.") and n[11:14].isdigit() and int(n[11:14]) > 1
                for n in names)
    return later and "backup.zip.001" not in names

while process.poll() is None:
    if first_volume_uploaded(os.listdir(directory)):
        process.send_signal(signal.SIGTERM)
        open({marker!r}, "w").close()
        break
    ready, _, _ = select.select([changes, ended], [], [])
    if changes in ready:
        os.read(changes, 65536)          # the events themselves: the listing says it all
sys.exit(process.wait())
"""


def test_7zip_failing_midway_leaves_uploaded_volumes_without_indicator(sandbox, proxy,
                                                                        tmp_path):
    make_source(sandbox)
    marker = str(tmp_path / "7zip-was-stopped")
    wrapper = tmp_path / "7zz-then-stop"
    wrapper.write_text(KILLING_7ZIP.format(python=sys.executable, marker=marker,
                                           seven_zip=aam.PosixPlatform().find_seven_zip()))
    wrapper.chmod(0o755)
    proxy.delay_requests(SLOW_PUT_SECONDS, kinds={"PutObject"})
    result = sandbox.backup({"destinations": "AWS", "mirror_root": ""},
                            env=backup_env(sandbox, proxy, AAM_7ZIP=str(wrapper)))
    assert os.path.exists(marker), "7-Zip finished before it could be stopped"
    assert result.returncode == aam.EXIT_FAILURE, result.stdout + result.stderr
    assert keys(sandbox, "yes") == []
    uploaded = keys(sandbox, "piece")
    assert uploaded, "no volume was uploaded before the failure"
    (log,) = sandbox.log_files()
    with open(log, encoding="utf-8") as handle:
        text = handle.read()
    assert "7-Zip failed with exit code 255" in text
    assert "no completion indicator was written" in text
    # the failed piece's volumes are of no use: named with their bytes
    sizes = {o["Key"]: o["Size"] for o in sandbox.objects()}
    assert f"Unused volumes in S3: {len(uploaded)} volume(s), " \
        f"{sum(sizes[k] for k in uploaded):,} bytes" in text
    assert all(f"  {key} ({sizes[key]:,} bytes)" in text for key in uploaded)
    assert not glob.glob(os.path.join(sandbox.temp, "*", "*"))


def test_upload_failure_midway_discards_the_rest_and_writes_no_indicator(sandbox, proxy):
    make_source(sandbox, files=8)
    proxy.fail_after(3, services={"s3"})      # the LIST, then two volumes
    result = sandbox.backup({"destinations": "AWS", "mirror_root": "", "send_email": "False"},
                            env=backup_env(sandbox, proxy))
    proxy.clear_faults()
    assert result.returncode == aam.EXIT_FAILURE, result.stdout + result.stderr
    assert "no completion indicator was written" in result.stdout
    assert keys(sandbox, "yes") == []
    assert not glob.glob(os.path.join(sandbox.temp, "*", "*"))


class ListLog:
    """Just enough of RunLog for PieceUploader."""

    def __init__(self):
        self.lines = []

    def scrub(self, text):
        return text

    def line(self, text="", terminal=True):
        self.lines.append(text)

    def to_terminal(self, text):
        pass


class ListLedger:
    """What PieceUploader tells its ledger (the journal, in a backup), as a list."""

    def __init__(self):
        self.heard = []

    def started(self, number):
        self.heard.append(("started", number))

    def done(self, number, records, central, index, outcome):
        self.heard.append(("done", number, [r["name"] for r in records]))

    def failed(self, number, records, outcome):
        self.heard.append(("failed", number, [r["name"] for r in records]))


def zip_volumes(directory, files, volume_size=65536):
    """A real 7-Zip archive of files {name: bytes} split into volumes in directory."""
    source = directory.parent.parent / f"source-{directory.name}"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    subprocess.run(["7zz", "a", "-tzip", f"-v{volume_size}b", str(directory / "backup.zip")]
                   + list(files), cwd=source, check=True, capture_output=True)
    return sorted(os.listdir(directory))


def piece_done(archives, number, **outcome):
    (archives / f"{number}.done").write_text(json.dumps(dict(
        {"list": number, "succeeded": True, "code": 0, "volumes": None,
         "unreadable": None, "retried": False}, **outcome)))


def test_uploader_takes_final_volumes_in_order_piece_after_piece(aws, tmp_path):
    aws.create_bucket("pipeline-unit")
    s3 = aws.client("s3")
    archives = tmp_path / "archives"
    first, second = archives / "1", archives / "2"
    first.mkdir(parents=True)
    second.mkdir()
    names = zip_volumes(first, {"a.bin": random.Random(1).randbytes(100_000)})
    zip_volumes(second, {"b.bin": b"small"})
    assert names == ["backup.zip.001", "backup.zip.002"]
    ledger = ListLedger()
    uploads = aam.RunUploads(s3, "pipeline-unit", aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda piece, n: f"p{piece}.{n:03d}",
                                 ListLog(), ledger, 1, 65536)
    (first / "backup.zip.001").rename(first / "backup.zip.001.tmp")   # not final yet
    uploader.poll()
    assert ledger.heard == []
    (first / "backup.zip.001.tmp").rename(first / "backup.zip.001")
    uploader.drain()                # both volumes go up; piece 1 is not ended yet
    assert ledger.heard == [("started", 1)] and sorted(os.listdir(first)) == []
    piece_done(archives, 1, volumes=2)
    uploader.drain()                # piece 1 is done; piece 2's volume goes up too
    assert ledger.heard[1] == ("done", 1, ["p1.001", "p1.002"])
    assert ledger.heard[2:] == [("started", 2)]
    piece_done(archives, 2)
    pieces = uploader.finish()
    assert [p["number"] for p in pieces] == [1, 2]
    assert pieces[0]["central_directory_volume"] == 2
    stored = s3.head_object(Bucket="pipeline-unit", Key="p2.001")
    assert stored["StorageClass"] == "DEEP_ARCHIVE"
    assert os.listdir(archives) == []


def test_the_next_volume_goes_up_while_s3_has_yet_to_answer_the_one_before(aws, proxy,
                                                                          tmp_path):
    """The link does not idle through S3's answer: once a volume's last byte is sent, the
    next is begun, before S3 has answered; never more than UPLOADS_IN_FLIGHT at once, and
    the piece is done only once all its volumes are up."""
    volume_size = 4 * aam.PROGRESS_STEP      # s3transfer tells progress in these steps
    aws.create_bucket("pipeline-overlap")
    s3 = aam.new_objects_only(aws.client("s3", endpoint_url=proxy.endpoint_url))
    archives = tmp_path / "archives"
    (archives / "1").mkdir(parents=True)
    names = zip_volumes(archives / "1", {"a.bin": random.Random(3).randbytes(
        (aam.UPLOADS_IN_FLIGHT + 1) * volume_size - 4096)}, volume_size)
    assert len(names) == aam.UPLOADS_IN_FLIGHT + 1
    piece_done(archives, 1, volumes=len(names))
    ledger = ListLedger()
    uploads = aam.RunUploads(s3, "pipeline-overlap", aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda piece, n: f"p{piece}.{n:03d}",
                                 ListLog(), ledger, 1, volume_size)
    proxy.hold_answers(kinds={"PutObject"})   # S3 has the volumes, but does not answer
    uploader.poll()
    assert proxy.wait_for(lambda c: c["held"] >= 1, 120)
    # the first volume's bytes are all sent: the second goes up, though S3 has not
    # answered the first
    assert proxy.wait_for(lambda c: c["held"] >= aam.UPLOADS_IN_FLIGHT, 120), \
        "the next volume waited for S3's answer to the one before"
    assert [r["key"] for r in proxy.requests()] == ["p1.001", "p1.002"]
    uploader.poll()                 # the third is ready, but two are in flight
    assert proxy.counters()["by_kind"] == {"PutObject": aam.UPLOADS_IN_FLIGHT}
    assert ledger.heard == [("started", 1)] and "backup.zip.001" in os.listdir(archives / "1")
    proxy.release_answers()
    assert [p["number"] for p in uploader.finish()] == [1]
    uploads.close()
    assert ledger.heard == [("started", 1), ("done", 1, ["p1.001", "p1.002", "p1.003"])]
    assert [r["key"] for r in proxy.requests()] == ["p1.001", "p1.002", "p1.003"]
    assert os.listdir(archives) == []


def test_a_pieces_first_volume_waits_for_s3s_answer_to_the_piece_before(aws, proxy,
                                                                        tmp_path):
    """Across pieces the next volume waits for S3's answer: piece 1 is recorded as soon as
    its last volume is up, so a cut then loses no byte of piece 2 along with it."""
    volume_size = 4 * aam.PROGRESS_STEP
    aws.create_bucket("pipeline-pieces")
    s3 = aam.new_objects_only(aws.client("s3", endpoint_url=proxy.endpoint_url))
    archives = tmp_path / "archives"
    for number in (1, 2):
        (archives / str(number)).mkdir(parents=True)
        zip_volumes(archives / str(number),
                    {f"{number}.bin": random.Random(number).randbytes(volume_size // 2)},
                    volume_size)
        piece_done(archives, number, volumes=1)
    ledger = ListLedger()
    uploads = aam.RunUploads(s3, "pipeline-pieces", aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda piece, n: f"p{piece}.{n:03d}",
                                 ListLog(), ledger, 1, volume_size)
    proxy.hold_answers(kinds={"PutObject"})
    uploader.poll()
    assert proxy.wait_for(lambda c: c["held"] >= 1, 120)
    uploader.poll()                 # piece 2's volume is ready, not begun
    assert [(u.key, u.future is None) for u in uploader.queue] == [("p1.001", False),
                                                                    ("p2.001", True)]
    assert proxy.counters()["by_kind"] == {"PutObject": 1}
    proxy.release_answers()
    assert [p["number"] for p in uploader.finish()] == [1, 2]
    uploads.close()
    assert [r["key"] for r in proxy.requests()] == ["p1.001", "p2.001"]
    assert [h[:2] for h in ledger.heard] == [("started", 1), ("started", 2), ("done", 1),
                                             ("done", 2)]


def test_uploader_refuses_fewer_volumes_than_7zip_reported(aws, tmp_path):
    aws.create_bucket("pipeline-count")
    archives = tmp_path / "archives"
    (archives / "1").mkdir(parents=True)
    zip_volumes(archives / "1", {"a.bin": b"one"})
    piece_done(archives, 1, volumes=2)
    ledger = ListLedger()
    uploads = aam.RunUploads(aws.client("s3"), "pipeline-count", aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda piece, n: f"p{piece}.{n:03d}",
                                 ListLog(), ledger, 1, 65536)
    with pytest.raises(aam.VolumeCountMismatch):
        uploader.finish()
    assert ledger.heard == [("started", 1)]              # never done


def test_a_failed_piece_is_told_to_the_ledger_with_its_uploaded_volumes(aws, tmp_path):
    aws.create_bucket("pipeline-failed")
    archives = tmp_path / "archives"
    (archives / "3").mkdir(parents=True)
    zip_volumes(archives / "3", {"a.bin": random.Random(2).randbytes(100_000)})
    os.remove(archives / "3" / "backup.zip.002")        # 7-Zip failed: it removed the rest
    piece_done(archives, 3, succeeded=False, code=2)
    ledger = ListLedger()
    uploads = aam.RunUploads(aws.client("s3"), "pipeline-failed", aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda piece, n: f"p{piece}.{n:03d}",
                                 ListLog(), ledger, 3, 65536)
    assert uploader.finish() == []
    assert ledger.heard == [("started", 3), ("failed", 3, ["p3.001"])]


def test_unchanged_incremental_makes_one_list_and_two_puts(sandbox, proxy):
    make_source(sandbox, files=3, size=1000)
    env = backup_env(sandbox, proxy)
    aws_only = {"destinations": "AWS", "mirror_root": "", "send_email": "False"}
    first = sandbox.backup(aws_only, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    proxy.reset_counters()
    second = sandbox.backup(aws_only, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    # Two prefix queries (the key checks, the current month); no archive object, only
    # the catalogue (it records that nothing changed) and the indicator.
    assert proxy.counters()["by_kind"] == {"LIST": 2, "PutObject": 2}
    assert len(keys(sandbox, "piece")) == 1


def test_a_large_volume_goes_up_in_concurrent_parts(sandbox, proxy):
    config = aam.transfer_config()
    make_source(sandbox, files=1, size=config.multipart_threshold + 3 * 1024 * 1024)
    result = sandbox.backup({"destinations": "AWS", "mirror_root": "", "send_email": "False"},
                            env=backup_env(sandbox, proxy, AAM_VOLUME_SIZE="4000000000"))
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = proxy.counters()["by_kind"]
    assert kinds.get("CreateMultipartUpload") == 1
    assert kinds.get("UploadPart", 0) >= 2
    assert kinds.get("CompleteMultipartUpload") == 1
    assert config.max_concurrency >= 2
