"""regular-backup end to end: the CLI as a subprocess, moto over HTTP, real 7-Zip and rsync."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import ACCESS_KEY_ID, KEY, SECRET, extract_pieces, file_times_pass
from sample_tree import read_tree

import aam_auto_backup as aab

STAMP = r"\d{8}_\d{6}\.\d{6}"
VOLUME_RE = re.compile(rf"^(?P<loc>[^_]+)_(?P<full>{STAMP})_(?P<incr>0_0\.0|{STAMP})_"
                       r"piece(?P<piece>\d{4,})_(?P<source>.+)\.zip\.(?P<n>\d{3})$")
INDICATOR_RE = re.compile(rf"^(?P<loc>[^_]+)_(?P<full>{STAMP})_(?P<incr>0_0\.0|{STAMP})_yes_"
                          r"(?P<source>.+)$")
CATALOGUE_RE = re.compile(rf"^(?P<loc>[^_]+)_(?P<full>{STAMP})_(?P<incr>0_0\.0|{STAMP})"
                          r"_catalogue_(?P<source>.+)\.zip$")
KEYCHECK_RE = re.compile(rf"^(?P<loc>[^_]+)_keycheck_(?P<full>{STAMP})_[0-9a-f]{{32}}_"
                         r"[0-9a-f]{4}$")


def source_name(mount):
    return mount.replace("/", "-")


def volumes_by_source(sandbox, objects, full=None, incremental="0_0.0"):
    """{source name: [keys in piece and volume order]} of one backup."""
    found = {}
    for item in objects:
        match = VOLUME_RE.match(item["Key"])
        if match and match["incr"] == incremental and (full is None or match["full"] == full):
            found.setdefault(match["source"], []).append(item["Key"])
    return {source: sorted(keys) for source, keys in found.items()}


def restore_source(sandbox, keys, destination, tmp_path):
    """Download one source's volumes and extract each piece with plain 7-Zip."""
    download = tmp_path / f"download-{len(os.listdir(tmp_path))}"
    extract_pieces(sandbox, keys, destination, download)
    return read_tree(str(destination))


def test_full_backup_of_a_multi_directory_tree(sandbox, tmp_path):
    tree = sandbox.sample()
    result = sandbox.backup()
    assert result.returncode == 0, result.stdout + result.stderr

    objects = sandbox.objects()
    keys = [item["Key"] for item in objects]
    for key in keys:      # every object name matches its documented format
        assert VOLUME_RE.match(key) or INDICATOR_RE.match(key) or CATALOGUE_RE.match(key) \
            or KEYCHECK_RE.match(key), key
    assert len([k for k in keys if KEYCHECK_RE.match(k)]) == 1       # one per chain
    classes = {item["Key"]: item.get("StorageClass", "STANDARD") for item in objects}
    assert {classes[k] for k in keys if VOLUME_RE.match(k)} == {"DEEP_ARCHIVE"}
    assert {classes[k] for k in keys if INDICATOR_RE.match(k)} == {"STANDARD"}
    assert {classes[k] for k in keys if CATALOGUE_RE.match(k)} == {"STANDARD"}
    assert {classes[k] for k in keys if KEYCHECK_RE.match(k)} == {"STANDARD"}

    sources = {source_name(m): m for m in tree.mounts}
    indicators = [INDICATOR_RE.match(k) for k in keys if INDICATOR_RE.match(k)]
    assert sorted(m["source"] for m in indicators) == sorted(sources)
    assert {m["loc"] for m in indicators} == {sandbox.location}
    assert {m["incr"] for m in indicators} == {"0_0.0"}
    assert len({m["full"] for m in indicators}) == 1

    volumes = volumes_by_source(sandbox, objects)
    for name, mount in sources.items():
        restored = restore_source(sandbox, volumes[name], tmp_path / f"restored{name}", tmp_path)
        assert restored == tree.expected[mount]           # exactly the included files
        manifest = sandbox.indicator(next(k for k in keys if INDICATOR_RE.match(k)
                                          and INDICATOR_RE.match(k)["source"] == name))
        assert manifest["sources"] == sorted(sources)
        assert manifest["source_path"] == mount
        assert [v["name"] for v in manifest["volumes"]] == volumes[name]
        assert manifest["files"] == sum(1 for v in tree.expected[mount].values()
                                        if v is not None)
        catalogue = manifest["catalogue"]              # named in the indicator
        assert CATALOGUE_RE.match(catalogue["name"])["source"] == name
        assert catalogue["kind"] == "listing" and catalogue["name"] in keys
        # the mirror holds the same files under the full-path layout
        mirrored = read_tree(os.path.join(sandbox.mirror, mount.lstrip("/")))
        assert mirrored == tree.expected[mount]


def test_indicator_hashes_match_the_uploaded_volumes(sandbox, tmp_path):
    import hashlib
    import json
    sandbox.sample()
    assert sandbox.backup().returncode == 0
    s3 = sandbox.s3()
    for item in sandbox.objects():
        if not INDICATOR_RE.match(item["Key"]):
            continue
        manifest = json.loads(s3.get_object(Bucket=sandbox.bucket, Key=item["Key"])["Body"].read())
        for volume in manifest["volumes"]:
            path = sandbox.fetch_volume(volume["name"], str(tmp_path))
            data = open(path, "rb").read()
            assert len(data) == volume["size"]
            assert hashlib.sha256(data).hexdigest() == volume["sha256"]


def test_second_run_in_the_month_is_an_incremental_of_new_and_changed_files(sandbox, tmp_path):
    tree = sandbox.sample()
    first = sandbox.backup()
    assert first.returncode == 0, first.stdout + first.stderr
    full_stamp = INDICATOR_RE.match(next(
        k["Key"] for k in sandbox.objects() if INDICATOR_RE.match(k["Key"])))["full"]
    file_times_pass()
    mount = tree.first_mount
    docs = os.path.join(mount, "Documents")
    with open(os.path.join(docs, "report.txt"), "ab") as handle:        # changed
        handle.write(b"one more line\n")
    with open(os.path.join(docs, "new file.txt"), "wb") as handle:      # new
        handle.write(b"new\n")
    # copied in with an old modification time: only the inode change time shows it
    shutil.copy2("/etc/hostname", os.path.join(docs, "copied-old.txt"))
    os.utime(os.path.join(docs, "copied-old.txt"), (978307200, 978307200))   # 2001-01-01
    with open(os.path.join(docs, "~WRL777.tmp"), "wb") as handle:       # new but excluded
        handle.write(b"temp\n")

    second = sandbox.backup()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "incremental" in second.stdout
    objects = sandbox.objects()
    increments = [INDICATOR_RE.match(k["Key"]) for k in objects if INDICATOR_RE.match(k["Key"])
                  and INDICATOR_RE.match(k["Key"])["incr"] != "0_0.0"]
    assert {m["full"] for m in increments} == {full_stamp}      # the full's stamp comes first
    assert sorted(m["source"] for m in increments) == sorted(source_name(m) for m in tree.mounts)
    incremental_stamp = increments[0]["incr"]
    volumes = volumes_by_source(sandbox, objects, full_stamp, incremental_stamp)
    # the second source did not change: an indicator but no volume
    assert list(volumes) == [source_name(mount)]
    restored = restore_source(sandbox, volumes[source_name(mount)], tmp_path / "incr", tmp_path)
    assert set(restored) == {"Documents/report.txt", "Documents/new file.txt",
                             "Documents/copied-old.txt"}
    assert restored["Documents/report.txt"] == open(os.path.join(docs, "report.txt"), "rb").read()
    # the mirror follows too
    mirrored = read_tree(os.path.join(sandbox.mirror, mount.lstrip("/")))
    assert mirrored["Documents/new file.txt"] == b"new\n"
    assert "Documents/~WRL777.tmp" not in mirrored


def test_small_volume_size_spans_three_volumes_and_restores_intact(sandbox, tmp_path):
    tree = sandbox.sample(picture_size=200_000)     # random bytes do not compress
    env = sandbox.env(AAM_VOLUME_SIZE="65536")
    result = sandbox.run(sandbox.backup_args(), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    volumes = volumes_by_source(sandbox, sandbox.objects())
    name = source_name(tree.first_mount)
    assert len(volumes[name]) >= 3
    restored = restore_source(sandbox, volumes[name], tmp_path / "multi", tmp_path)
    assert restored == tree.expected[tree.first_mount]


def test_small_pieces_each_open_on_their_own_and_together_hold_the_tree(sandbox, tmp_path):
    """A piece holds about AAM_PIECE_SIZE bytes of files (a larger file is one of its
    own), in catalogue order; each piece is a 7-Zip archive of its own, with its own
    volumes, that plain 7-Zip opens with the key alone."""
    tree = sandbox.sample(picture_size=200_000)
    for number in range(3):             # 100 KB each: two do not fit in one piece
        data = os.urandom(100_000)
        with open(os.path.join(tree.first_mount, "Documents", f"media{number}.bin"),
                  "wb") as handle:
            handle.write(data)
        tree.expected[tree.first_mount][f"Documents/media{number}.bin"] = data
    env = sandbox.env(AAM_VOLUME_SIZE="65536", AAM_PIECE_SIZE="150000")
    result = sandbox.run(sandbox.backup_args(), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    name = source_name(tree.first_mount)
    keys = volumes_by_source(sandbox, sandbox.objects())[name]
    pieces = {}
    for key in keys:
        pieces.setdefault(int(VOLUME_RE.match(key)["piece"]), []).append(key)
    assert len(pieces) >= 4
    seen = {}
    for number, volumes in sorted(pieces.items()):
        alone = restore_source(sandbox, volumes, tmp_path / f"piece{number}", tmp_path)
        files = {path: data for path, data in alone.items() if data is not None}
        assert files and not set(files) & set(seen)         # disjoint slices
        # a piece holds one file larger than the piece size, or files that fit in it
        assert len(files) == 1 or sum(len(data) for data in files.values()) <= 150_000
        seen.update(alone)
    expected = tree.expected[tree.first_mount]
    assert {p: d for p, d in seen.items() if d is not None} == {
        p: d for p, d in expected.items() if d is not None}
    indicator = next(o["Key"] for o in sandbox.objects()
                     if INDICATOR_RE.match(o["Key"]) and name in o["Key"])
    manifest = sandbox.indicator(indicator)
    assert [p["number"] for p in manifest["pieces"]] == sorted(pieces)
    assert [v["name"] for p in manifest["pieces"] for v in p["volumes"]] == \
        [v["name"] for v in manifest["volumes"]] == keys


def test_email_report_and_no_secret_anywhere(sandbox, tmp_path):
    tree = sandbox.sample()
    result = sandbox.backup()
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = sandbox.emails()
    assert re.fullmatch(r"SUCCESS, \d{8} \d\d:\d\d:\d\d\.\d{6} \S+ full backup!",
                        message["subject"]), message["subject"]
    assert "AAM Backup Report" in message["source"]
    body = message["body"]
    assert body.splitlines()[0] == "Backup destination types: local and AWS S3"
    assert f"For more info, refer to the local log: {sandbox.log_files()[-1]}" in body
    assert "7-Zip" not in body and "rsync" not in body and tree.first_mount not in body

    for secret in (KEY, SECRET, ACCESS_KEY_ID):
        assert secret not in result.stdout and secret not in result.stderr
        assert secret not in message["subject"] + body
        for directory in (sandbox.logs, sandbox.mirror, sandbox.temp):
            for folder, _dirs, files in os.walk(directory):
                for name in files:
                    data = open(os.path.join(folder, name), "rb").read()
                    assert secret.encode() not in data, os.path.join(folder, name)
    # no intermediate file is left in the temp root
    assert os.listdir(sandbox.temp) == []


def test_log_sections_follow_the_original_order(sandbox):
    sandbox.sample()
    assert sandbox.backup().returncode == 0
    (log,) = sandbox.log_files()
    assert re.search(r"\d{8}_\d{6}_regular-backup\.log$", log)
    headings = re.findall(r"^===== (.*) =====$", open(log, encoding="utf-8").read(), re.M)
    order = ["user-executed AAM Auto Backup command parameters.",
             "Backup execution starting time and date.",
             "the latest completed-upload AWS S3 full and incremental backup dates and times.",
             "the directories to backup, the directories to shadow mount, and folders and "
             "files to exclude.",
             "ShadowSpawn outputs."]
    positions = [headings.index(h) for h in order]
    assert positions == sorted(positions)
    assert "Summary." in headings


def test_local_only_backup_makes_no_s3_request(sandbox, proxy):
    tree = sandbox.sample()
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.backup({"destinations": "local", "send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert proxy.counters()["requests"] == 0
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]


def test_unreachable_s3_still_makes_the_mirror_and_fails(sandbox):
    tree = sandbox.sample()
    sandbox.endpoint_url = "http://127.0.0.1:9"        # nothing listens there
    result = sandbox.backup()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "AWS S3 cannot be queried" in result.stdout
    assert "the local mirror is still made" in result.stdout
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "FAILURE" in log and "e-mail report could not be sent" in log


def test_keep_true_keeps_and_keep_false_removes_deleted_files(sandbox):
    tree = sandbox.sample()
    assert sandbox.backup({"destinations": "local", "send_email": "False"}).returncode == 0
    gone = os.path.join(tree.first_mount, "Documents", "report.txt")
    mirrored = os.path.join(sandbox.mirror, gone.lstrip("/"))
    assert os.path.exists(mirrored)
    os.remove(gone)
    local_only = {"destinations": "local", "send_email": "False"}
    assert sandbox.backup(dict(local_only, keep="True")).returncode == 0
    assert os.path.exists(mirrored)
    assert sandbox.backup(dict(local_only, keep="False")).returncode == 0
    assert not os.path.exists(mirrored)


def test_the_archive_opens_only_with_the_key(sandbox, tmp_path):
    tree = sandbox.sample()
    assert sandbox.backup().returncode == 0
    volumes = volumes_by_source(sandbox, sandbox.objects())[source_name(tree.second_mount)]
    path = sandbox.fetch_volume(volumes[0], str(tmp_path))
    wrong = subprocess.run(["7zz", "x", "-pnot the key", f"-o{tmp_path / 'x'}", path],
                           capture_output=True, text=True)
    assert wrong.returncode != 0
    assert "Wrong password" in wrong.stdout + wrong.stderr


@pytest.mark.parametrize("argument, text", [
    ("send_email", "maybe"), ("lock_poll", "0"), ("lock_wait", "-1"),
    ("destinations", "local|S3"), ("keep", "keep"), ("bucket", "Bad_Bucket"),
    ("location", "my_pc"), ("force_full", "y"), ("auto_force_full", "true"),
    ("python", "/no/such/python"), ("agent", "admin"), ("key", "env:AAM_TEST_UNSET_VARIABLE"),
    ("sender_address", "not-an-address"),
])
def test_bad_arguments_touch_nothing(sandbox, proxy, argument, text):
    sandbox.sample()
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.backup({argument: text})
    assert result.returncode == 2
    assert f"argument {aab.BACKUP_ARGS.number(argument)} (" in result.stderr
    assert "usage: aam_auto_backup.py regular-backup" in result.stderr
    assert proxy.counters()["requests"] == 0
    for path in (sandbox.logs, sandbox.mirror, sandbox.temp, os.path.dirname(sandbox.lock)):
        assert not os.path.exists(path), path


def test_wrong_argument_count_prints_the_usage(sandbox):
    result = sandbox.run(sandbox.backup_args()[:21])
    assert result.returncode == 2
    assert "regular-backup takes 22 arguments, 21 were given" in result.stderr
    assert "22. automatic force full backup (yes/no)" in result.stderr


@pytest.mark.parametrize("text, fragment", [
    ("{root}/docs/\nrelative/dir/\n", "line 2: 'relative/dir/' is a relative path"),
    ("{root}/do*s/\n", "line 1: '{root}/do*s/' has a wildcard"),
    ("{root}/docs/\n\n{root}/docs/private\n", "line 3: excluded directory"),
])
def test_instruction_errors_name_the_line_and_make_no_s3_request(sandbox, proxy, text,
                                                                 fragment):
    root = sandbox.root
    os.makedirs(os.path.join(root, "docs", "private"))
    sandbox.write_instructions(text.format(root=root))
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{sandbox.instructions}, {fragment.format(root=root)}" in result.stdout
    assert proxy.counters()["requests"] == 0
    assert not os.path.exists(sandbox.mirror)


def test_missing_instruction_file_names_argument_11(sandbox, proxy):
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.backup({"send_email": "False",
                             "instruction_file": os.path.join(sandbox.root, "nope.txt")})
    assert result.returncode == 3
    assert "argument 11: the instruction file" in result.stdout
    assert proxy.counters()["requests"] == 0


def test_a_directory_moved_after_the_full_backup_is_in_the_incremental(sandbox, tmp_path):
    tree = sandbox.sample()
    assert sandbox.backup({"send_email": "False"}).returncode == 0
    file_times_pass()
    docs = os.path.join(tree.first_mount, "Documents")
    # moved and renamed: the files keep their old times, only the directory's
    # inode change time tells
    os.rename(os.path.join(docs, "sub", "deep"), os.path.join(docs, "under_score_dir", "moved"))
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    objects = sandbox.objects()
    full = next(k["Key"] for k in objects if INDICATOR_RE.match(k["Key"]))
    full_stamp = INDICATOR_RE.match(full)["full"]
    increments = [INDICATOR_RE.match(k["Key"]) for k in objects if INDICATOR_RE.match(k["Key"])
                  and INDICATOR_RE.match(k["Key"])["incr"] != "0_0.0"]
    volumes = volumes_by_source(sandbox, objects, full_stamp, increments[0]["incr"])
    restored = restore_source(sandbox, volumes[source_name(tree.first_mount)],
                              tmp_path / "incr", tmp_path)
    assert restored == {"Documents/under_score_dir/moved/keep.txt": b"deep file\n"}
