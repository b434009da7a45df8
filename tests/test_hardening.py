"""Least privilege, secret hygiene, hostile inputs."""

import os
import re
import stat
import subprocess
import sys
import threading
import unicodedata

import pytest

import aam_auto_backup as aab
from conftest import (ACCESS_KEY_ID, KEY, PROGRAM, SECRET, extract, file_times_pass, mirrored,
                      run_on_terminal, snapshot)
from local_aws import backup_policy
from sample_tree import read_tree


@pytest.fixture
def iam_enforced(aws):
    """Yield a function making IAM users; enforcement is on only inside the test."""
    def make_user(name, policy):
        return aws.create_user_with_policy(name, policy)
    try:
        yield make_user
    finally:
        aws.disable_iam_enforcement()


def test_backup_works_with_exactly_put_list_and_send(sandbox, iam_enforced, aws, tmp_path):
    tree = sandbox.sample(picture_size=200_000)
    key_id, secret = iam_enforced(f"backup-{sandbox.location}",
                                  backup_policy(sandbox.bucket, allow_abort=False))
    aws.enable_iam_enforcement()
    env = sandbox.env(AAM_VOLUME_SIZE="65536")
    keys = {"access_key_id": key_id, "secret_access_key": secret}
    first = sandbox.run(sandbox.backup_args(changes=keys), env=env)
    file_times_pass()
    with open(os.path.join(tree.first_mount, "Documents", "report.txt"), "ab") as handle:
        handle.write(b"changed\n")
    second = sandbox.run(sandbox.backup_args(changes=keys), env=env)
    aws.disable_iam_enforcement()
    assert first.returncode == 0, first.stdout + first.stderr
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Backup scope: incremental" in second.stdout     # it could list what it wrote
    keys = [item["Key"] for item in sandbox.objects()]
    assert sum("_yes_" in k for k in keys) == 4             # 2 sources x (full + incremental)
    assert len(sandbox.emails()) == 2


def scan_for_secrets(directories, secrets):
    hits = []
    for directory in directories:
        for folder, _dirs, files in os.walk(directory):
            for name in files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    continue
                data = open(path, "rb").read()
                hits += [(path, s) for s in secrets if s.encode() in data]
    return hits


def watch_command_lines(root_pid, stop, seen):
    """Collect the argv of root_pid and all its descendants until stop is set.

    Nothing announces a new process and its command line can be read only while
    it runs, so the watch looks again and again; between looks it waits 2 ms, short
    against 7-Zip's run, which the test checks was seen."""
    family = {root_pid}
    while not stop.wait(0.002):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                if ppid in family or int(entry) in family:
                    family.add(int(entry))
                    with open(f"/proc/{entry}/cmdline", "rb") as handle:
                        seen.add(handle.read())
            except (OSError, ValueError, IndexError):
                pass


def test_no_secret_in_any_file_output_or_process_list(sandbox, tmp_path):
    sandbox.sample(picture_size=2_000_000)
    env = sandbox.env(AAM_VOLUME_SIZE="1000000", AAM_KEY_VAR=KEY, AAM_SECRET_VAR=SECRET)
    process = subprocess.Popen(
        [sys.executable, PROGRAM] + sandbox.backup_args(
            changes={"key": "env:AAM_KEY_VAR", "secret_access_key": "env:AAM_SECRET_VAR"}),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=watch_command_lines, args=(process.pid, stop, seen))
    watcher.start()
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        stop.set()
        watcher.join()
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(b"7zz\x00a\x00" in argv for argv in seen)       # we did see 7-Zip running
    for secret in (KEY, SECRET):
        assert not [argv for argv in seen if secret.encode() in argv]
        assert secret not in result.stdout + result.stderr
    assert scan_for_secrets([sandbox.root], [KEY, SECRET, ACCESS_KEY_ID]) == []
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "16. archive encryption key: env:AAM_KEY_VAR" in log


def work_dir_modes(temp_root):
    """[(name, permission bits)] of the work directories and what they hold now."""
    seen_modes = []
    for name in os.listdir(temp_root) if os.path.isdir(temp_root) else []:
        path = os.path.join(temp_root, name)
        try:
            seen_modes.append((path, os.stat(path).st_mode & 0o777))
            for inner in os.listdir(path):
                mode = os.stat(os.path.join(path, inner)).st_mode & 0o777
                seen_modes.append((inner, mode))
        except OSError:
            pass                # removed meanwhile
    return seen_modes


def test_work_and_log_files_are_owner_only(sandbox):
    sandbox.sample()
    seen_modes = []
    process = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(),
                               env=sandbox.env(), stdout=subprocess.PIPE, text=True)
    for _line in process.stdout:        # at each step the backup reports
        seen_modes += work_dir_modes(sandbox.temp)
    assert process.wait() == 0
    assert seen_modes, "the work directory was never seen"
    assert {mode & 0o077 for _path, mode in seen_modes} == {0}
    for log in sandbox.log_files():
        assert os.stat(log).st_mode & 0o077 == 0


# -- hostile names ---------------------------------------------------------------

HOSTILE_NAMES = [
    "new\nline.txt", 'double"quote".txt', "single'quote.txt", "star*.txt", "question?.txt",
    "[bracket].txt", "br]acket.txt", "-leading-dash.txt", "@at.txt", " leading space.txt",
    "trailing space .txt", '"quoted"', "back\\slash.txt", "tab\tname.txt", "#hash.txt",
    unicodedata.normalize("NFC", "caf\u00e9.txt"), unicodedata.normalize("NFD", "caf\u00e9.txt"),
    "\u65e5\u672c\u8a9e.txt", "emoji-\U0001F600.txt",
]


def test_hostile_file_names_are_backed_up_mirrored_and_restored(sandbox, tmp_path):
    source = os.path.join(sandbox.root, "data", "docs")
    for number, name in enumerate(HOSTILE_NAMES):
        folder = os.path.join(source, f"dir {name}" if number % 3 == 0 else "plain")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(f"content {number}\n".encode())
    bad_bytes = os.path.join(source.encode(), b"not-utf8-\xff\xfe.txt")
    with open(bad_bytes, "wb") as handle:
        handle.write(b"raw bytes name\n")
    sandbox.write_instructions(f"{source}/\n")
    expected = read_tree(source)
    assert len(expected) == len(HOSTILE_NAMES) + 1

    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_tree(os.path.join(sandbox.mirror, source.lstrip("/"))) == expected
    (volume,) = [i["Key"] for i in sandbox.objects() if "_piece" in i["Key"]]
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(tmp_path / "restored"))
    assert read_tree(str(tmp_path / "restored")) == expected

    file_times_pass()     # the incremental must name every changed hostile file exactly
    for folder, _dirs, files in os.walk(source):
        for name in files:
            with open(os.path.join(folder, name), "ab") as handle:
                handle.write(b"changed\n")
    expected = read_tree(source)
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    incremental = [i["Key"] for i in sandbox.objects()
                   if "_piece" in i["Key"] and "_0_0.0_" not in i["Key"]]
    (volume,) = incremental
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(tmp_path / "restored"))
    assert read_tree(str(tmp_path / "restored")) == expected


# -- links, unreadable and changing files, odd destinations -----------------------

def read_links_tree(root):
    """Like read_tree, but a symbolic link is ('link', target) and is not followed."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                found[rel] = open(path, "rb").read()
    return found


def test_symbolic_links_are_stored_as_links_and_never_followed(sandbox, tmp_path):
    source = os.path.join(sandbox.root, "data", "docs")
    os.makedirs(os.path.join(source, "real-dir"))
    with open(os.path.join(source, "real-dir", "file.txt"), "w") as handle:
        handle.write("real\n")
    outside = os.path.join(sandbox.root, "outside-secret.txt")
    with open(outside, "w") as handle:
        handle.write("must not be pulled in\n")
    os.symlink("real-dir/file.txt", os.path.join(source, "link-to-file"))
    os.symlink("real-dir", os.path.join(source, "link-to-dir"))
    os.symlink(outside, os.path.join(source, "link-outside"))
    os.symlink("loop-b", os.path.join(source, "loop-a"))
    os.symlink("loop-a", os.path.join(source, "loop-b"))
    os.symlink("missing-target", os.path.join(source, "dangling"))
    sandbox.write_instructions(f"{source}/\n")
    expected = read_links_tree(source)

    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_links_tree(os.path.join(sandbox.mirror, source.lstrip("/"))) == expected
    (volume,) = [i["Key"] for i in sandbox.objects() if "_piece" in i["Key"]]
    path = sandbox.fetch_volume(volume, str(tmp_path))
    restored = tmp_path / "restored"
    subprocess.run(["7zz", "x", f"-p{KEY}", "-aoa", "-snld20", f"-o{restored}", path],
                   check=True, capture_output=True)
    # 7-Zip stores the link text exactly, but on extraction it puts an absolute
    # target under the output directory (a safety rule of 7-Zip's).
    expected["link-outside"] = ("link", str(restored) + outside)
    assert read_links_tree(str(restored)) == expected
    listing = subprocess.run(["7zz", "l", "-slt", path], capture_output=True, text=True).stdout
    assert "must not be pulled in" not in listing and "outside-secret" not in listing


def run_without_root_file_access(sandbox, args):
    """Run the CLI so that file permissions apply: as root, minus the capabilities
    that let root read any file; as another user, as it is."""
    prefix = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
              if os.geteuid() == 0 else [])
    return subprocess.run(prefix + [sys.executable, PROGRAM] + args, env=sandbox.env(),
                          capture_output=True, text=True, timeout=300)


def test_unreadable_file_and_directory_are_reported_and_the_rest_is_kept(sandbox, tmp_path):
    source = os.path.join(sandbox.root, "data", "docs")
    os.makedirs(os.path.join(source, "locked-dir"))
    for name, text in (("fine.txt", "fine\n"), ("locked.txt", "locked\n"),
                       ("locked-dir/inner.txt", "inner\n")):
        with open(os.path.join(source, name), "w") as handle:
            handle.write(text)
    os.chmod(os.path.join(source, "locked.txt"), 0)
    os.chmod(os.path.join(source, "locked-dir"), 0)
    sandbox.write_instructions(f"{source}/\n")
    try:
        result = run_without_root_file_access(sandbox, sandbox.backup_args())
    finally:
        os.chmod(os.path.join(source, "locked-dir"), 0o755)
        os.chmod(os.path.join(source, "locked.txt"), 0o644)
    assert result.returncode == 1, result.stdout + result.stderr
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "validation failure: cannot read directory" in log and "locked-dir" in log
    assert "locked.txt: not in the archive (7-Zip could not read it)" in log
    assert sandbox.emails()[0]["subject"].startswith("FAILURE, ")
    # the readable part is a complete backup, in the archive and in the mirror
    indicator = [i["Key"] for i in sandbox.objects() if "_yes_" in i["Key"]]
    assert len(indicator) == 1 and sandbox.indicator(indicator[0])["files"] == 1
    (volume,) = [i["Key"] for i in sandbox.objects() if "_piece" in i["Key"]]
    restored = tmp_path / "restored"
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(restored))
    assert read_tree(str(restored))["fine.txt"] == b"fine\n"
    assert "locked.txt" not in read_tree(str(restored))
    assert os.path.exists(os.path.join(sandbox.mirror, source.lstrip("/"), "fine.txt"))


def make_special_files(directory, device):
    """A FIFO, a socket and (device=True, as root) a character device like /dev/zero in
    directory: 7-Zip would wait on the FIFO for ever and read the device without end.
    Returns {name: what the log calls it}."""
    import socket
    os.makedirs(directory, exist_ok=True)
    os.mkfifo(os.path.join(directory, "a-fifo"))
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(os.path.join(directory, "a-socket"))
    made = {"a-fifo": "a FIFO (named pipe)", "a-socket": "a socket"}
    if device:
        zero = os.stat("/dev/zero").st_rdev
        os.mknod(os.path.join(directory, "zero-device"), 0o666 | stat.S_IFCHR, zero)
        made["zero-device"] = "a character device"
    return made


def check_special_files_run(sandbox, tmp_path, device):
    """A full backup (7-Zip recursing) and an incremental, each with special files in
    the source: both finish, name them, and restore exactly the rest."""
    mount = sandbox.single_source({"docs/a.txt": b"a\n", "b.txt": b"b\n"})
    specials = make_special_files(os.path.join(mount, "docs"), device)
    full = sandbox.run(sandbox.backup_args(), timeout=120)
    assert full.returncode == 0, full.stdout + full.stderr
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    for name, what in specials.items():
        assert f"Not backed up ({what}): {mount}/docs/{name}" in log
    mirror = os.path.join(sandbox.mirror, mount.lstrip("/"))
    assert mirrored(mirror) == mirrored(mount, specials=True)      # none in the mirror
    assert "validation failure" not in log

    file_times_pass()
    later = make_special_files(os.path.join(mount, "new"), device)
    with open(os.path.join(mount, "docs", "a.txt"), "ab") as handle:
        handle.write(b"changed\n")
    incremental = sandbox.run(sandbox.backup_args(), timeout=120)
    assert incremental.returncode == 0, incremental.stdout + incremental.stderr
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    for name, what in later.items():
        assert f"Not backed up ({what}): {mount}/new/{name}" in log
    expected = snapshot(mount, specials=True)
    destination = tmp_path / "restored"
    restored = sandbox.restore_chosen(aab.ONE_STEP_RESTORE, destination)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert snapshot(destination / "1") == expected


def test_fifos_and_sockets_in_a_source_are_named_and_never_block(sandbox, tmp_path):
    check_special_files_run(sandbox, tmp_path, device=False)


def test_a_device_in_a_source_is_named_and_never_read(sandbox, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a device file needs root (CI runs the suite as root)")
    check_special_files_run(sandbox, tmp_path, device=True)


def seven_zip_stand_in(tmp_path, action):
    """A wrapper that does `action` (shell) and then runs the real 7zz: it emulates a
    file changing or vanishing between the selection and 7-Zip reading it."""
    wrapper = tmp_path / "7zz-stand-in.sh"
    wrapper.write_text(f"#!/bin/sh\n# emulates: {action}\n{action}\nexec 7zz \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_file_that_vanishes_or_grows_before_7zip_reads_it(sandbox, tmp_path):
    tree = sandbox.sample()
    assert sandbox.backup({"send_email": "False"}).returncode == 0
    docs = os.path.join(tree.first_mount, "Documents")
    file_times_pass()
    for name in ("report.txt", "sub/deep/keep.txt"):
        with open(os.path.join(docs, name), "ab") as handle:
            handle.write(b"changed\n")
    action = (f"rm '{docs}/report.txt'; "
              f"printf 'grown\\n' >> '{docs}/sub/deep/keep.txt'")
    env = sandbox.env(AAM_7ZIP=seven_zip_stand_in(tmp_path, action))
    result = sandbox.run(sandbox.backup_args(changes={"send_email": "False"}), env=env)
    assert result.returncode == 0, result.stdout + result.stderr     # vanished is fine
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert "No such file or directory" in log                         # 7-Zip's warning
    increments = [i["Key"] for i in sandbox.objects()
                  if "_piece" in i["Key"] and "_0_0.0_" not in i["Key"]]
    (volume,) = increments
    restored = tmp_path / "restored"
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(restored))
    assert read_tree(str(restored)) == {
        "Documents/sub/deep/keep.txt": b"deep file\nchanged\ngrown\n"}   # as 7-Zip read it
    # the grown file changed after this backup started: the next one holds it again
    result = sandbox.backup({"send_email": "False"})
    assert "Documents/sub/deep/keep.txt" in open(sandbox.log_files()[-1]).read()


def test_a_mirror_inside_a_source_is_not_copied_into_itself(sandbox, tmp_path):
    source = os.path.join(sandbox.root, "data")
    os.makedirs(os.path.join(source, "docs"))
    with open(os.path.join(source, "docs", "a.txt"), "w") as handle:
        handle.write("a\n")
    mirror = os.path.join(source, "docs", "mirror")
    sandbox.write_instructions(f"{source}/docs/\n")
    for _run in range(2):
        result = sandbox.backup({"send_email": "False", "mirror_root": mirror})
        assert result.returncode == 0, result.stdout + result.stderr
    copied = read_tree(mirror)
    assert copied == {os.path.join(source.lstrip("/"), "docs", "a.txt"): b"a\n"}
    for item in sandbox.objects():
        if "_piece" in item["Key"]:
            path = sandbox.fetch_volume(item["Key"], str(tmp_path))
            listing = subprocess.run(["7zz", "l", "-ba", path], capture_output=True,
                                     text=True).stdout
            assert "mirror" not in listing


def test_instruction_file_with_bom_and_crlf(sandbox):
    tree = sandbox.sample()
    with open(sandbox.instructions, "wb") as handle:
        handle.write(b"\xef\xbb\xbf" + tree.instruction_text.replace("\n", "\r\n").encode())
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]


def test_a_path_longer_than_4096_bytes_is_reported_not_silently_skipped(sandbox):
    source = os.path.join(sandbox.root, "data")
    os.makedirs(source)
    with open(os.path.join(source, "normal.txt"), "w") as handle:
        handle.write("normal\n")
    descriptor = os.open(source, os.O_RDONLY)
    for level in range(20):                       # about 4,900 bytes of path in total
        name = f"{level:02d}" + "d" * 240
        os.mkdir(name, dir_fd=descriptor)
        inner = os.open(name, os.O_RDONLY, dir_fd=descriptor)
        os.close(descriptor)
        descriptor = inner
    with open(os.open("deep.txt", os.O_WRONLY | os.O_CREAT, dir_fd=descriptor), "w") as f:
        f.write("deep\n")
    os.close(descriptor)
    sandbox.write_instructions(f"{source}/\n")
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 1
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "File name too long" in log and "validation failure: cannot read" in log
    assert os.path.exists(os.path.join(sandbox.mirror, source.lstrip("/"), "normal.txt"))


def test_a_full_temp_root_is_a_clear_error_and_nothing_counts_as_complete(sandbox,
                                                                         tiny_tmpfs):
    sandbox.sample(picture_size=3_000_000)
    result = sandbox.run(sandbox.backup_args(), env=sandbox.env(AAM_TEMP_ROOT=tiny_tmpfs))
    assert result.returncode == 1
    assert re.search(r"the archive for AWS S3 failed \(7-Zip failed with exit code \d+; "
                     r"errno=28 : No space left on device\); no completion indicator",
                     result.stdout)
    assert not [i for i in sandbox.objects() if "_yes_" in i["Key"]]
    for mount in (sandbox.tree.first_mount, sandbox.tree.second_mount):   # still mirrored
        assert os.path.isdir(os.path.join(sandbox.mirror, mount.lstrip("/")))
    assert os.listdir(tiny_tmpfs) == []
    assert sandbox.emails()[0]["subject"].startswith("FAILURE, ")


# -- progress ----------------------------------------------------------------------

def big_source(sandbox, size=70 * 1024 * 1024):
    source = os.path.join(sandbox.root, "data", "video")
    os.makedirs(source)
    with open(os.path.join(source, "big.bin"), "wb") as handle:
        handle.write(os.urandom(size))
    sandbox.write_instructions(f"{source}/\n")


def test_progress_is_plain_lines_when_not_a_terminal(sandbox):
    big_source(sandbox)
    result = sandbox.backup({"send_email": "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    quarters = [line for line in result.stdout.splitlines()
                if line.startswith("Uploading volume 001 of piece 1: ")]
    assert [line.split(":")[1].split("%")[0].strip() for line in quarters] == ["25", "50", "75"]
    assert "\r" not in result.stdout and "\x1b[" not in result.stdout
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "Uploading volume 001 of piece 1: " not in log     # progress stays out of the log


def test_progress_is_rewritten_in_place_on_a_terminal(sandbox):
    """One file larger than a volume: its piece's volumes go up while 7-Zip writes it."""
    big_source(sandbox)
    status, text = run_on_terminal(sandbox.backup_args(
        changes={"send_email": "False", "destinations": "AWS", "mirror_root": ""}),
        sandbox.env(AAM_VOLUME_SIZE="8000000"))
    assert status == 0, text
    shown = re.findall(r"\rSource 1 of 1: 7-Zip (\d+)%.*?, upload (\d+)%", text)
    for column in (0, 1):
        percents = [int(numbers[column]) for numbers in shown]
        assert percents == sorted(percents) and percents[-1] == 100, percents
    assert len(set(shown)) > 3 and "\x1b[" not in text      # no escape sequence: blanks
    assert "Uploading volume" not in text     # the line replaces each volume's own
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "\x1b[" not in log and "\r" not in log
