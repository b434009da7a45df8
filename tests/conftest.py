"""Shared fixtures: a real moto server over HTTP, sandboxes, and the CLI as a subprocess."""

import dataclasses
import datetime as dt
import fcntl
import json
import os
import pty
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, REPO)

import aam_auto_backup as aab  # noqa: E402
from local_aws import FaultProxy, LocalAws, backup_policy, restore_policy  # noqa: E402
from sample_tree import build_sample, read_tree  # noqa: E402

PROGRAM = os.path.join(REPO, "aam_auto_backup.py")
KEY = "Correct horse battery staple 7!"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SENDER = "backup-report@example.com"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def pytest_collection_modifyitems(items):
    """The Wine tests first: they are the longest, and in a parallel run (tools/test)
    a long test started last would hold up the end."""
    items.sort(key=lambda item: "wine" not in item.fixturenames)


@pytest.fixture(scope="session")
def aws():
    with LocalAws() as local:
        yield local


@pytest.fixture(scope="session")
def wine(tmp_path_factory):
    """Windows Python and 7z.exe under Wine, one prefix for the session.

    In CI (CI=true) a missing Wine part fails the tests that need it; a local
    run without them skips those tests, naming what is missing.
    """
    from windows_under_wine import Wine, missing_parts
    missing = missing_parts()
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"the Wine tests cannot run: {missing}")
    if missing:
        pytest.skip(f"the Wine tests need Wine and the Windows parts: {missing}")
    prefix = Wine(str(tmp_path_factory.mktemp("wine")))
    try:
        yield prefix
    finally:
        prefix.close()


@pytest.fixture
def proxy(aws):
    with FaultProxy(aws.endpoint_url) as fault_proxy:
        yield fault_proxy


def argv(table, changes, **values):
    """An operation's argument list from texts by field name (the table's order)."""
    values.update(changes or {})
    return table.argv(**values)


class Sandbox:
    """Directories of one test and the 22 backup arguments that use them."""

    def __init__(self, root, aws, second_root):
        self.root = root
        self.aws = aws
        self.second_root = second_root
        self.logs = os.path.join(root, "logs")
        self.mirror = os.path.join(root, "mirror")
        self.temp = os.path.join(root, "temp")
        self.lock = os.path.join(root, "lock", "aam.lock")
        self.state_dir = os.path.join(root, "state")
        self.instructions = os.path.join(root, "instructions.txt")
        self.bucket = f"aam-test-{uuid.uuid4().hex[:12]}"
        self.location = f"pc{uuid.uuid4().hex[:6]}"
        self.recipient = f"owner-{uuid.uuid4().hex[:8]}@example.com"
        self.endpoint_url = aws.endpoint_url
        aws.create_bucket(self.bucket)
        aws.verify_ses_identity(SENDER)
        self.tree = None

    def sample(self, **kwargs):
        self.tree = build_sample(os.path.join(self.root, "first"), self.second_root, **kwargs)
        self.write_instructions(self.tree.instruction_text)
        return self.tree

    def single_source(self, files):
        """One listed directory (its own mount) holding files {relative path: bytes}."""
        mount = os.path.join(self.root, "source", "data")
        for rel, data in files.items():
            write_file(os.path.join(mount, rel), data)
        self.write_instructions(mount + "/\n")
        return mount

    def write_instructions(self, text):
        with open(self.instructions, "w", encoding="utf-8") as handle:
            handle.write(text)

    def backup_args(self, operation=aab.REGULAR_BACKUP, changes=None):
        """The backup arguments of this sandbox; changes: {field name: text}."""
        return argv(aab.BACKUP_ARGS, changes, operation=operation, agent="user",
                    python=sys.executable, lock_poll="1", lock_wait="0", log_dir=self.logs,
                    send_email="True", sender_name="AAM Backup Report",
                    sender_address=SENDER, recipient=self.recipient,
                    instruction_file=self.instructions, drive_letter="q",
                    destinations="local|AWS", mirror_root=self.mirror, keep="False", key=KEY,
                    bucket=self.bucket, location=self.location, access_key_id=ACCESS_KEY_ID,
                    secret_access_key=SECRET, force_full="no", auto_force_full="yes")

    def restore_args(self, operation, destination, changes=None):
        """The restore arguments of this sandbox; changes: {field name: text}."""
        return argv(aab.RESTORE_ARGS, changes, operation=operation, log_dir=self.logs,
                    send_email="True", sender_name="AAM Restore Report",
                    sender_address=SENDER, recipient=self.recipient, days="2", key=KEY,
                    bucket=self.bucket, location=self.location, access_key_id=ACCESS_KEY_ID,
                    secret_access_key=SECRET, destination=str(destination))

    def child_args(self, changes=None):
        """A full-backup child pass of this sandbox; changes: {field name: text}."""
        return argv(aab.CHILD_ARGS, changes, operation=aab.REGULAR_BACKUP,
                    agent=aab.CHILD_AGENT, latest_full=" ", latest_incremental=" ",
                    start="20261121 170302.225333", mount=self.root, drive_letter="q",
                    destinations="local | AWS", mirror_root=self.mirror, keep="False",
                    key="env:" + aab.CHILD_KEY_VARIABLE, location=self.location,
                    work_dir=os.path.join(self.temp, "work"), force_full="no",
                    scope=aab.Scope.FULL.value)

    def env(self, **extra):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AAM_"))}
        env.update({
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": "us-east-1",
            "AAM_TEMP_ROOT": self.temp,
            "AAM_LOCK_FILE": self.lock,
            "AAM_STATE_DIR": self.state_dir,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra)
        return env

    def run(self, args, env=None, timeout=300, **popen):
        return subprocess.run([sys.executable, PROGRAM] + list(args), env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout, **popen)

    def backup(self, changes=None, operation="regular-backup", env=None):
        return self.run(self.backup_args(operation, changes), env=env)

    def user_keys(self):
        """(backup keys, restore keys): IAM users with docs/aws-setup.md's policies for this
        bucket, each (key id, secret); made before IAM enforcement is switched on."""
        return tuple(self.aws.create_user_with_policy(f"{role}-{self.location}",
                                                      policy(self.bucket))
                     for role, policy in (("backup", backup_policy),
                                          ("restore", restore_policy)))

    def restore_env(self, **extra):
        """The environment of a restore that checks the thaw status every second."""
        return self.env(AAM_RESTORE_POLL_SECONDS="1", **extra)

    def restore(self, operation, destination, changes=None, env=None):
        """A restore operation, checking the thaw status every second."""
        return self.run(self.restore_args(operation, destination, changes),
                        env=env or self.restore_env())

    def restore_chosen(self, operation, destination, point=None, selection=(), env=None):
        """A restore without an e-mail report, of a restore point and paths if given."""
        changes = {"send_email": "False"}
        if point is not None or selection:
            changes["restore_point"] = point or "latest"
        if selection:
            changes["selection"] = list(selection)
        return self.restore(operation, destination, changes, env=env)

    def backup_stamps(self):
        """The date-times of the complete backups, oldest first, as argument 14 takes them."""
        names = [aab.ObjectName.parse(o["Key"]) for o in self.objects()]
        return sorted({aab.format_arg_stamp(n.incremental or n.full)
                       for n in names if n and n.indicator})

    def object_names(self):
        """The objects of the backup sets (volumes, indicators, catalogues) by name; the
        key checks are not of a set (keychecks)."""
        names = [aab.ObjectName.parse(o["Key"]) for o in self.objects()]
        return [name for name in names if name is not None]

    def keychecks(self):
        """The key checks in the bucket (one per chain), oldest chain first."""
        checks = [aab.KeyCheck.parse(o["Key"]) for o in self.objects()]
        return sorted((c for c in checks if c is not None), key=lambda c: c.full)

    # -- looking at the results ----------------------------------------------
    def s3(self):
        return self.aws.client("s3")

    def objects(self):
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return [item for page in pages for item in page.get("Contents", [])]

    def indicator(self, key):
        return json.loads(self.s3().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def fetch_volume(self, key, directory):
        """Thaw (immediately, in moto) and download one Deep Archive volume."""
        s3 = self.s3()
        s3.restore_object(Bucket=self.bucket, Key=key,
                          RestoreRequest={"Days": 1, "GlacierJobParameters": {"Tier": "Bulk"}})
        path = os.path.join(directory, key)
        s3.download_file(self.bucket, key, path)
        return path

    def catalogue(self, key, key_text=KEY):
        """The text of a catalogue object, decrypted with plain 7-Zip as a user would."""
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "catalogue.zip")
            self.s3().download_file(self.bucket, key, path)
            extract(path, directory, key_text)
            with open(os.path.join(directory, "catalogue.tsv"), encoding="utf-8",
                      errors="surrogateescape") as handle:
                return handle.read()

    @staticmethod
    def encrypt_catalogue(text, work):
        """A catalogue object's bytes for text (tests that rewrite a stored backup)."""
        directory = tempfile.mkdtemp(dir=work)
        with open(os.path.join(directory, "catalogue.tsv"), "w", encoding="utf-8",
                  errors="surrogateescape", newline="\n") as handle:
            handle.write(text)
        subprocess.run(["7zz", "a", "-tzip", "-mem=AES256", f"-p{KEY}", "catalogue.zip",
                        "catalogue.tsv"], cwd=directory, check=True, capture_output=True)
        with open(os.path.join(directory, "catalogue.zip"), "rb") as handle:
            return handle.read()

    def as_made_by(self, version, work):
        """Rewrite every backup in the bucket, and the local states, as version 1.1.0 or
        1.0.0 made them (tests that these still restore): one archive per source and
        backup (its volumes named _no_), format 1 indicators and catalogues (locations
        <backup>:<first>-<last>), no key check, local states without an end line; 1.0.0
        had no catalogue and no local state.  Each backup must be of one piece per
        source (the default piece size)."""
        import hashlib
        s3 = self.s3()
        for check in self.keychecks():
            s3.delete_object(Bucket=self.bucket, Key=check.key)
        legacy_location = re.compile(r"(\d{8}_\d{6}\.\d{6}):\d+:(\d+-\d+)")
        names = {name.key: name for name in self.object_names() if name}
        renamed = {}
        for key, name in names.items():
            if name.volume is not None and name.piece != aab.LEGACY_PIECE:
                new = dataclasses.replace(name, piece=aab.LEGACY_PIECE).key
                s3.restore_object(Bucket=self.bucket, Key=key, RestoreRequest={"Days": 1})
                body = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                s3.put_object(Bucket=self.bucket, Key=new, Body=body,
                              StorageClass="DEEP_ARCHIVE")
                s3.delete_object(Bucket=self.bucket, Key=key)
                renamed[key] = new

        def legacy_catalogue(text):
            head, rest = text.split("\n", 1)
            fields = head.split("\t", 2)
            header = json.loads(fields[2])
            pieces = header.pop("pieces", None)
            assert not pieces or len(pieces) == 1, "a backup of one piece per source"
            header["archive"] = pieces and {k: pieces[0][k] for k in (
                "volumes", "volume_size", "central_directory_volume")}
            header["program_version"] = version
            return (f"{fields[0]}\t1\t{json.dumps(header, sort_keys=True)}\n"
                    + legacy_location.sub(r"\1:\2", rest))

        for key, name in names.items():
            if not name.indicator:
                continue
            manifest = self.indicator(key)
            assert len(manifest.pop("pieces")) <= 1, "a backup of one piece per source"
            for volume in manifest["volumes"]:
                volume["name"] = renamed[volume["name"]]
            manifest.update(format_version=1, program_version=version)
            catalogue = manifest.get("catalogue")
            if catalogue and version == "1.0.0":
                del manifest["catalogue"]
                s3.delete_object(Bucket=self.bucket, Key=catalogue["name"])
            elif catalogue:
                body = self.encrypt_catalogue(legacy_catalogue(self.catalogue(
                    catalogue["name"])), work)
                s3.put_object(Bucket=self.bucket, Key=catalogue["name"], Body=body)
                catalogue.update(size=len(body), sha256=hashlib.sha256(body).hexdigest())
            s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(manifest).encode())
        for state in os.listdir(self.state_dir) if os.path.isdir(self.state_dir) else []:
            path = os.path.join(self.state_dir, state)
            if version == "1.0.0" or not state.endswith(".tsv"):
                os.remove(path)
                continue
            with open(path, encoding="utf-8", errors="surrogateescape") as handle:
                text = handle.read()
            text = "".join(line for line in text.splitlines(True)
                           if not line.startswith(aab.STATE_END + "\t"))
            with open(path, "w", encoding="utf-8", errors="surrogateescape",
                      newline="\n") as handle:
                handle.write(legacy_catalogue(text))

    def emails(self):
        return [m for m in self.aws.sent_emails() if self.recipient in m["destinations"]]

    def log_files(self):
        if not os.path.isdir(self.logs):
            return []
        return sorted(os.path.join(self.logs, n) for n in os.listdir(self.logs))

    def processes(self):
        """The processes of this sandbox's runs (its temporary root is in their
        environment): the program, its child, the child's script and 7-Zip."""
        marker = f"AAM_TEMP_ROOT={self.temp}".encode()
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    if marker in handle.read().split(b"\0"):
                        found.append(int(entry))
            except (OSError, ValueError):
                pass            # not a process, gone meanwhile, or another user's
        return found

    def wait_until_no_process_runs(self, timeout=60):
        """Wait until the processes a killed run left behind have ended: its child
        notices that its parent is gone (it looks every second) and stops 7-Zip."""
        wait_for(lambda: not self.processes(), timeout,
                 lambda: "processes of a killed run still run: " + "; ".join(
                     describe_process(pid) for pid in self.processes()))


def describe_process(pid):
    """pid, state (R, S, T: stopped, Z), parent and command line, read from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/status", encoding="utf-8") as handle:
            signals = " ".join(line.split()[0] + line.split()[1] for line in handle
                               if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigCgt")))
        threads = ",".join(
            open(f"/proc/{pid}/task/{task}/wchan", encoding="utf-8").read() or "-"
            for task in sorted(os.listdir(f"/proc/{pid}/task")))
    except OSError:
        return f"{pid} (gone)"
    return (f"{pid} state {fields[0]} parent {fields[1]} ({signals}; threads waiting in "
            f"{threads}): {command[:160]}{native_stacks(pid)}")


def native_stacks(pid):
    """Where each thread of a hung process waits, as gdb sees it (when there is a gdb)."""
    if not shutil.which("gdb"):
        return ""
    found = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt 25"],
                           capture_output=True, text=True, errors="replace", check=False)
    return "\n" + "\n".join(line for line in found.stdout.splitlines()
                             if line.startswith(("#", "Thread")))


def write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def wait_for(condition, timeout, failure="the condition never came true", interval=0.05):
    """Look at condition() every interval seconds until it holds; fail after timeout
    seconds with failure (a text, or a function giving one)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure() if callable(failure) else failure)
        time.sleep(interval)


def file_times_pass(moment=None):
    """Wait until a file changed from now on gets a later time stamp than moment (a
    datetime, or nanoseconds since the epoch; default: now, e.g. the end of a backup).

    File systems stamp changes with a clock that moves in ticks of a few
    milliseconds, so a change made right after a backup may carry a time no later
    than one the backup recorded, and look unchanged to the next one."""
    if moment is None:
        moment_ns = time.time_ns()
    elif isinstance(moment, dt.datetime):
        moment_ns = (moment - EPOCH) // dt.timedelta(microseconds=1) * 1000
    else:
        moment_ns = moment
    with tempfile.NamedTemporaryFile(prefix="aam-clock-") as probe:
        wait_for(lambda: os.utime(probe.name) or os.stat(probe.name).st_mtime_ns > moment_ns,
                 5, "the file system clock did not move on", interval=0.001)


def read_until(process, pattern, timeout=120):
    """The output lines of process (a text pipe) up to the first that matches pattern
    (a regular expression), as one text; the process is killed after timeout seconds."""
    seen = []
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            seen.append(line)
            if re.search(pattern, line):
                return "".join(seen)
    finally:
        timer.cancel()
    raise AssertionError(f"{pattern!r} never came:\n" + "".join(seen))


def read_terminal_until(fd, text, timeout=60):
    """What a program wrote to its terminal (the pty master fd) up to text, which
    need not end a line (a prompt)."""
    seen, deadline = b"", time.monotonic() + timeout
    while text.encode() not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        try:
            chunk = os.read(fd, 1024)
        except OSError:         # the program closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


def run_on_terminal(args, env, columns=80):
    """Run the program with standard output and error on a pseudo-terminal of that many
    columns, standard input empty; (its exit status, all it wrote there), read until
    it closed the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen([sys.executable, PROGRAM] + list(args), env=env,
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:         # EIO: the program has closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return process.wait(), seen.decode("utf-8", errors="replace")


def numbered_directories(destination, tree):
    """{mount: restored tree}, following the restore's restore-map.txt."""
    lines = open(os.path.join(destination, "restore-map.txt"), encoding="utf-8").read()
    mapping = dict(line.split("\t")[:2][::-1] for line in lines.splitlines()
                   if not line.startswith("#"))
    assert set(mapping) == set(tree.mounts)
    return {mount: read_tree(os.path.join(destination, mapping[mount]))
            for mount in tree.mounts}


@pytest.fixture
def sandbox(tmp_path, aws):
    # The second source must share nothing but '/' with the first, so that it
    # becomes a mount directory of its own.
    second_root = tempfile.mkdtemp(prefix="aam-test-", dir="/var/tmp")
    try:
        yield Sandbox(str(tmp_path), aws, second_root)
    finally:
        shutil.rmtree(second_root, ignore_errors=True)


def snapshot(root, specials=False):
    """Everything under root as a restore must give it back: {relative path: ('f', bytes,
    permissions, mtime in µs) | ('d', permissions, mtime in µs) | ('l', target)}.

    A FIFO, socket or device is never backed up: specials=True passes over them (a
    source), else one is an error (a restore never makes one)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns // 1000)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as handle:
                    found[rel] = ("f", handle.read(), stat.S_IMODE(st.st_mode),
                                  st.st_mtime_ns // 1000)
            else:
                assert specials, f"{path} is a special file"
    return found


def mirrored(root, specials=False):
    """snapshot() without the directories' times: what a mirror must hold.  rsync leaves
    a directory it creates with the time of its copy when the source's changed within
    the same second or so (measured with rsync 3.5.0), and the mirror check compares
    files, not directories."""
    return {path: entry[:2] if entry[0] == "d" else entry
            for path, entry in snapshot(root, specials).items()}


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MB filesystem, full after the first megabyte (a small USB drive, a full disk).

    Mounting needs root; CI runs as root, where a mount that fails is an error.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MB tmpfs needs root (CI runs the suite as root)")
    path = tmp_path / "tiny"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, mounted.stderr
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def pieces_of(keys):
    """{piece number: [its volume keys in order]} of volume keys (of one source)."""
    found = {}
    for key in keys:
        name = aab.ObjectName.parse(key)
        found.setdefault(name.piece, []).append(key)
    return {piece: sorted(found[piece]) for piece in sorted(found)}


def extract_pieces(sandbox, keys, destination, download):
    """Download the volumes of one source's backup and extract each piece in turn with
    plain 7-Zip and the key, as docs/restore.md tells a user without this program."""
    os.makedirs(download, exist_ok=True)
    for volumes in pieces_of(keys).values():
        paths = [sandbox.fetch_volume(key, str(download)) for key in volumes]
        extract(paths[0], str(destination))
    return destination


def extract(archive_first_volume, destination, key=KEY):
    """Open a backup with plain 7-Zip and the key, as a user would."""
    result = subprocess.run(["7zz", "x", f"-p{key}", "-aoa", "-snl", f"-o{destination}",
                             archive_first_volume], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return destination
