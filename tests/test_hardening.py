"""Issue 7: least privilege, secret hygiene, hostile inputs."""

import os
import subprocess
import sys
import threading
import time
import unicodedata

import pytest

from conftest import ACCESS_KEY_ID, KEY, PROGRAM, SECRET, extract
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
    first = sandbox.run(sandbox.backup_args(changes={19: key_id, 20: secret}), env=env)
    time.sleep(0.05)
    with open(os.path.join(tree.first_mount, "Documents", "report.txt"), "ab") as handle:
        handle.write(b"changed\n")
    second = sandbox.run(sandbox.backup_args(changes={19: key_id, 20: secret}), env=env)
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
    """Collect the argv of root_pid and all its descendants until stop is set."""
    family = {root_pid}
    while not stop.is_set():
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
        time.sleep(0.002)


def test_no_secret_in_any_file_output_or_process_list(sandbox, tmp_path):
    sandbox.sample(picture_size=2_000_000)
    env = sandbox.env(AAM_VOLUME_SIZE="1000000", AAM_KEY_VAR=KEY, AAM_SECRET_VAR=SECRET)
    process = subprocess.Popen(
        [sys.executable, PROGRAM] + sandbox.backup_args(
            changes={16: "env:AAM_KEY_VAR", 20: "env:AAM_SECRET_VAR"}),
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


def test_work_and_log_files_are_owner_only(sandbox):
    sandbox.sample()
    seen_modes = []
    process = subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(),
                               env=sandbox.env(), stdout=subprocess.DEVNULL)
    while process.poll() is None:
        if os.path.isdir(sandbox.temp):
            for name in os.listdir(sandbox.temp):
                path = os.path.join(sandbox.temp, name)
                try:
                    seen_modes.append((path, os.stat(path).st_mode & 0o777))
                    for inner in os.listdir(path):
                        mode = os.stat(os.path.join(path, inner)).st_mode & 0o777
                        seen_modes.append((inner, mode))
                except OSError:
                    pass
        time.sleep(0.002)
    assert process.returncode == 0
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

    result = sandbox.backup({7: "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_tree(os.path.join(sandbox.mirror, source.lstrip("/"))) == expected
    (volume,) = [i["Key"] for i in sandbox.objects() if "_no_" in i["Key"]]
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(tmp_path / "restored"))
    assert read_tree(str(tmp_path / "restored")) == expected

    time.sleep(0.05)      # the incremental must name every changed hostile file exactly
    for folder, _dirs, files in os.walk(source):
        for name in files:
            with open(os.path.join(folder, name), "ab") as handle:
                handle.write(b"changed\n")
    expected = read_tree(source)
    result = sandbox.backup({7: "False"})
    assert result.returncode == 0, result.stdout + result.stderr
    incremental = [i["Key"] for i in sandbox.objects()
                   if "_no_" in i["Key"] and "_0_0.0_" not in i["Key"]]
    (volume,) = incremental
    extract(sandbox.fetch_volume(volume, str(tmp_path)), str(tmp_path / "restored"))
    assert read_tree(str(tmp_path / "restored")) == expected
