#!/usr/bin/env python3
"""AAM Auto Backup: daily mirror + encrypted Deep Archive backups, one-command restore.

Every day the program mirrors the directories listed in an instruction file to a
local or USB drive and sends encrypted, multi-volume ZIP archives of them to AWS S3
Glacier Deep Archive: a full backup each calendar month (UTC), incrementals in
between.  It e-mails a report through AWS SES and restores everything from Deep
Archive with one command.  See README.md for the command lines and docs/ for the details.

The module reads top to bottom in the order the data flows; one section for each
outside tool (AWS, 7-Zip, the mirror tools), as bottle.py has one adapter per server:

    settings and errors      -> tunables (environment variables), exit codes
    platform layer           -> the only place where Windows and POSIX differ
    names and time stamps    -> S3 object names (docs/reference.md, What is stored where)
    arguments (two sections) -> values and shared rows; the tables, named form, usage
    instruction file         -> parsing, mount directories, exclusions
    selection                -> which files of a mount are backed up (the walk)
    catalogue                -> each backup's record of its sources; the local state
    journal                  -> the backup in progress, so that the next run continues it
    log, report, terminal    -> the dated log file, the SES e-mail, the health block,
                                the progress line
    AWS                      -> client, errors, prices, the run's uploads, the listing
    7-Zip                    -> command lines, list files, the one extract command
    mirror tools             -> rsync and Robocopy command lines and their limits
    child run                -> the per-mount pass: mirror, 7-Zip, validation
    upload                   -> volumes as DEEP_ARCHIVE, the catalogue, the indicator
    backup (three sections)  -> the decision; each source's child and upload; the run
                                (regular-backup, incremental-only-backup) and its report
    preview                  -> what a regular-backup would do (preview-backup)
    restore (four sections)  -> choosing the set; its state, thaw and download;
                                extraction; the run (one-step and multi-step)
    browse, check, drill     -> browse-aws-backups, check-aws-backups, drill-aws-backups
    Aam_Auto_Backup          -> dispatch on the operation argument
"""

import collections
import contextlib
import dataclasses
import datetime as dt
import difflib
import email.utils
import enum
import errno
import gc
import hashlib
import heapq
import hmac
import io
import itertools
import json
import ntpath
import operator
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import typing

VERSION = "1.2.0"
PROGRAM_NAME = "AAM Auto Backup"


# ============================================================================
# Settings and errors
# ============================================================================

EXIT_OK = 0
EXIT_FAILURE = 1          # the run finished, but something asked for failed
EXIT_USAGE = 2            # wrong arguments: nothing was touched
EXIT_INSTRUCTIONS = 3     # the instruction file is missing or invalid
EXIT_LOCKED = 4           # another backup held the lock for the whole wait
EXIT_NO_BACKUP_SET = 5    # no complete backup set to build on or restore from
EXIT_REFUSED = 6          # incremental-only: a full backup is required first
EXIT_NOT_READY = 7        # restore step: thawed copies not all there yet
EXIT_NOTHING_SELECTED = 8  # restore: the selection matches nothing in the chosen backup
EXIT_WRONG_KEY = 9        # backup: the key differs from its chain's key check; S3 untouched
EXIT_REPORT_UNSENT = 10   # all else succeeded, but the e-mail report could not be sent
EXIT_INTERRUPTED = 130    # Ctrl-C or SIGTERM

DEFAULT_VOLUME_SIZE = 4_000_000_000
# A backup is made in pieces of about this much file content, each a self-contained 7-Zip
# archive: an interruption loses at most the piece in progress.  Measured (docs/
# performance.md, Piece size): a piece costs about 0.05 s of CPU, so smaller pieces cost
# little time but many more objects and requests; 60 MiB keeps a piece's archive, a few
# MB of headers over its files, under the 64 MiB above which a volume goes up in parts
# (transfer_config): one PutObject per piece, and 25 s of upload at risk at 20 Mbit/s.
DEFAULT_PIECE_SIZE = 60 * 1024 * 1024
# Measured (docs/performance.md, Compression level): -mx1 is ~3x faster than -mx5 on mixed data for
# +2.5% size (+0.4% on already-compressed data); -mx3 gives -mx1's output, slower.
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_REGION = "us-east-1"
MONTHS_SCANNED = 6          # the current UTC month and the previous five
DEEP_ARCHIVE = "DEEP_ARCHIVE"
GROUP_GRACE_SECONDS = 10    # a stopped script (7-Zip, rsync) ends within this, or is killed
HURRIED_TIMEOUT = 5         # seconds: an interrupted run's e-mail report, one attempt


class AamError(Exception):
    """An error the user can act on; the message says what and where."""

    exit_code = EXIT_FAILURE


class UsageError(AamError):
    """named: about a named-form command line (its usage is the short one)."""

    exit_code = EXIT_USAGE

    def __init__(self, message, operation=None, named=False):
        super().__init__(message)
        self.operation, self.named = operation, named


class InstructionError(AamError):
    exit_code = EXIT_INSTRUCTIONS


class LockTimeout(AamError):
    exit_code = EXIT_LOCKED


class NoBackupSet(AamError):
    exit_code = EXIT_NO_BACKUP_SET


class Refused(AamError):
    exit_code = EXIT_REFUSED


class SourceStopped(Exception):
    """An error that ends a backup's per-source loop; the run still cleans up, and
    reports.  causes: the failures to report (default: the message itself)."""

    def __init__(self, section, message, causes=()):
        super().__init__(message)
        self.section, self.causes = section, list(causes)


class Interrupted(BaseException):
    """SIGTERM; like KeyboardInterrupt it passes 'except Exception' on its way out,
    so that cleanup (aborting multipart uploads, deleting the work directory) runs."""

    exit_code = EXIT_INTERRUPTED


class HeldInterruptions:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt and Interrupted in the main thread
    between any two of its steps, except inside held(): there they take effect at its
    end.  A step that must be made whole holds them: a piece whose volumes are all up
    is recorded in the journal whole, or the next run sends it again."""

    def __init__(self):
        self.depth, self.pending = 0, None

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending

    def raise_or_hold(self, problem):
        """From a signal handler."""
        if self.depth:
            self.pending = self.pending or problem
            return
        raise problem


INTERRUPTIONS = HeldInterruptions()


_checkpoint_passes = {}


def checkpoint(name):
    """Crash tests: AAM_TEST_CRASH_AT=<name>[:<n>] kills this process (SIGKILL) the
    n-th time it passes checkpoint <name>, to prove that a crash there loses nothing;
    with AAM_TEST_CRASH_SIGNAL=SIGTERM it sends that instead (a scheduler's stop)."""
    spec = os.environ.get("AAM_TEST_CRASH_AT")
    if not spec or spec.partition(":")[0] != name:
        return
    _checkpoint_passes[name] = _checkpoint_passes.get(name, 0) + 1
    if _checkpoint_passes[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), getattr(signal, os.environ.get("AAM_TEST_CRASH_SIGNAL",
                                                             "SIGKILL")))


def backup_clock():
    """The time a backup run starts: now (UTC).  Tests of a backup begun in one month
    and continued in the next set AAM_TEST_NOW (tests only: 'YYYYMMDD HHMMSS.ffffff',
    UTC) for the first run instead of changing the computer's clock."""
    text = os.environ.get("AAM_TEST_NOW")
    return parse_arg_stamp(text) if text else utc_now()


def _env_int(name, default, minimum):
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}={text!r} is not an integer")
    if value < minimum:
        raise UsageError(f"environment variable {name}={value} must be at least {minimum}")
    return value


# An upload rate: k, M and G are powers of 1000, as an uplink's speed is quoted (20 Mbit/s
# is 2,500,000 bytes per second); Ki, Mi and Gi are powers of 1024; "bit" divides by 8.
RATE_PREFIXES = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3,
                 "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3}
RATE_FORMAT = re.compile(r"(\d+(?:\.\d+)?) ?(?:([kKmMgG]i?) ?)?(?:(B|[bB]it|)(?:/s)?|(bps))")
RATE_FORMS = ("bytes per second (2500000), with k, M, G (powers of 1000) or Ki, Mi, Gi "
              "(powers of 1024), and bit or bps for bits: 2.5M, 2.5MB/s, 20Mbit, "
              "20 Mbit/s, 20Mbps, 512KiB")
# Below 1 kB/s a backup would hardly move; such a value is taken for a slip (20 meant as
# 20 Mbit/s), not a wish.
MINIMUM_UPLOAD_LIMIT = 1000


def parse_byte_rate(text):
    """Bytes per second from a rate such as '2500000', '2.5M', '20Mbit/s' or '512KiB';
    ValueError saying what is accepted if it is not one."""
    match = RATE_FORMAT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a rate: use {RATE_FORMS}")
    number, prefix, unit, bps = match.groups()
    rate = float(number) * RATE_PREFIXES[(prefix or "").lower()]
    if bps or unit.lower() == "bit":
        rate /= 8
    if rate < MINIMUM_UPLOAD_LIMIT:
        raise ValueError(f"{text!r} is {rate:g} bytes per second; the least is "
                         f"{MINIMUM_UPLOAD_LIMIT} (1k)")
    return round(rate)


def _env_rate(name):
    """A rate in bytes per second from the environment (parse_byte_rate), or None."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        return parse_byte_rate(text)
    except ValueError as problem:
        raise UsageError(f"environment variable {name}: {problem}")


@dataclasses.dataclass
class Settings:
    """Tunables with fixed defaults; each can be overridden by an environment variable."""

    volume_size: int
    piece_size: int
    compression_level: int
    temp_root: str
    seven_zip: str
    lock_file: str
    region: str
    ses_region: str
    restore_tier: str
    restore_poll_seconds: int
    state_dir: str
    ses_region_origin: str = ""   # where ses_region came from (a report that is not sent)
    upload_limit: typing.Optional[int] = None      # bytes per second for a whole run

    @classmethod
    def from_environment(cls, platform):
        temp_root = os.environ.get("AAM_TEMP_ROOT") or platform.default_temp_root()
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or DEFAULT_REGION)
        tier = os.environ.get("AAM_RESTORE_TIER", "Bulk").strip().capitalize()
        if tier not in ("Bulk", "Standard"):
            raise UsageError(f"environment variable AAM_RESTORE_TIER={tier!r}: "
                             "use Bulk or Standard")
        level = _env_int("AAM_COMPRESSION_LEVEL", DEFAULT_COMPRESSION_LEVEL, 0)
        if level > 9:
            raise UsageError("environment variable AAM_COMPRESSION_LEVEL must be 0 to 9")
        return cls(
            volume_size=_env_int("AAM_VOLUME_SIZE", DEFAULT_VOLUME_SIZE, 65536),
            piece_size=_env_int("AAM_PIECE_SIZE", DEFAULT_PIECE_SIZE, 1),
            compression_level=level,
            temp_root=temp_root,
            seven_zip=os.environ.get("AAM_7ZIP") or platform.find_seven_zip(),
            lock_file=(os.environ.get("AAM_LOCK_FILE")
                       or os.path.join(temp_root, "aam_auto_backup.lock")),
            region=region,
            ses_region=os.environ.get("AAM_SES_REGION") or region,
            ses_region_origin=region_origin(),
            restore_tier=tier,
            restore_poll_seconds=_env_int("AAM_RESTORE_POLL_SECONDS", 1800, 1),
            state_dir=os.environ.get("AAM_STATE_DIR") or platform.default_state_dir(),
            upload_limit=_env_rate("AAM_UPLOAD_LIMIT"),
        )


def region_origin():
    """Which environment variable set the SES client's region, or that none did."""
    for name in ("AAM_SES_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return f"from {name}"
    return ("the default: none of AAM_SES_REGION, AWS_REGION and AWS_DEFAULT_REGION is "
            "set")


def open_private(path, mode="w", exclusive=False, encoding="utf-8",
                 errors="surrogateescape", newline="\n"):
    """Open a file for writing that only its owner may read (what this program writes
    may name private paths, or hold a key check): created so, never widened later.

    mode: 'w' or 'wb' (truncated), 'a' (appended to); exclusive: FileExistsError when
    the file exists.  A text file is UTF-8 with '\\n' line ends by default, names that
    are not valid UTF-8 kept as they are (surrogateescape).
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags | (os.O_EXCL if exclusive else 0), 0o600)
    if "b" in mode:
        return os.fdopen(fd, mode)
    return os.fdopen(fd, mode, encoding=encoding, errors=errors, newline=newline)


def _write_private_bytes(path, data):
    """Create a file readable only by its owner (it may name private paths)."""
    with open_private(path, "wb") as handle:
        handle.write(data)


def _write_private_text(path, text, encoding="utf-8", append=False):
    """Create a file readable only by its owner (it may name private paths), or
    append to it."""
    with open_private(path, "a" if append else "w", encoding=encoding) as handle:
        handle.write(text)


# ============================================================================
# Platform layer: every Windows/POSIX difference lives here
# ============================================================================

# Success markers printed by the child's generated script and checked by the
# parent, as the original Windows program did.  Lines are matched exactly.
MARK_PREFIX = "AAM Auto Backup: "
MARK_NOTHING_TO_ARCHIVE = MARK_PREFIX + "no files to back up incrementally."
MARK_VALIDATION_FAILURE = MARK_PREFIX + "validation failure: "
MARK_RESULT = MARK_PREFIX + "result: "


class HeldFlock:
    """A held flock: release() gives it up (closing the file would too)."""

    def __init__(self, fd):
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def drive_letter_of(path):
    """The drive letter a Windows path starts with ('C:\\Users' -> 'C'), else '': the one
    rule that tells a Windows path from a POSIX one."""
    return path[0] if re.match(r"[A-Za-z]:", path) else ""


class Platform:
    """An operating system as this program meets it: its paths and names, its processes,
    its script language, and the tool that mirrors a source.

    PosixPlatform and WindowsPlatform are siblings: each states its own facts (the
    class attributes below, and every method a subclass defines).  What is here holds
    on both.
    """

    name = ""               # recorded in indicators and catalogues: 'posix' or 'windows'
    sep = ""                # the separator of the paths it makes
    separators = ""         # what may separate names in a path typed by a user
    case_insensitive = False   # the file system ignores letter case in names
    list_charset_switch = ""   # 7-Zip's list-file character set switch
    invalid_name_chars = ""    # characters a name cannot hold
    refuses_names = False      # a restore must check each name with cannot_create
    script_name = ""           # the generated script's file name
    mirror_tool = ""           # the tool mirror_commands runs, as messages name it
    script_kind = ""           # how messages name the generated script
    child_runner = ""          # what runs the child pass, named by critical errors
    child_starts_early = False  # the child may start before S3 has answered
    drive_letter_default = ""   # the named form's drive letter (None: required)
    can_pause_group = False     # the upload throttle can stop the script's group
    mirror_error_re = None      # the mirror tool's error lines
    read_error_re = None        # 7-Zip's line when reading a file fails (a bad sector)
    absolute_links_rewritten = False   # 7-Zip extracts an absolute link inside its output

    # -- generated script --------------------------------------------------
    def marker(self, kind):
        """The line the generated script prints when 'script', 'mirror' or 'archive'
        succeeded; the parent checks for exactly these lines."""
        return f"{MARK_PREFIX}{self.tool_name(kind)} execution success."

    def tool_name(self, kind):
        return {"script": self.script_kind, "mirror": self.mirror_tool,
                "archive": "7-Zip"}[kind]

    def password_switch(self, key_variable):
        """7-Zip reads the key from its standard input (feed_secret)."""
        return "-p"

    # -- restore -------------------------------------------------------------
    def refusal(self, path, seen, key_of=None):
        """Why path ('/' between names) cannot be created here, or None.

        seen maps the names already created beside it, as comparable() gives them,
        to their spelling: where the file system ignores case, a name that differs
        from one of them only in letter case would overwrite it.  key_of: what of
        path is compared (the whole path by default).
        """
        reason = self.cannot_create(path)
        key = self.comparable(path if key_of is None else key_of)
        if reason is None and seen.setdefault(key, path) != path:
            reason = f"differs only in letter case from {seen[key]}"
        return reason


class PosixPlatform(Platform):
    """Linux and macOS: no shadow copy; the child reads the live directory."""

    name = "posix"
    sep = "/"
    separators = "/"             # what may separate names in a path typed by a user
    case_insensitive = False
    # List files hold file names as raw bytes (names need not be valid UTF-8).
    list_charset_switch = "-scsWIN"
    invalid_name_chars = ""
    # Whether a restore must check each name with cannot_create.
    refuses_names = False
    script_name = "backup_script.sh"
    mirror_tool = "rsync"
    script_kind = "backup script"
    child_runner = "The child pass (aam_auto_backup.py)"   # named by critical errors
    # The child is this program, started directly: it may start before S3 has
    # answered and wait at the gate (BackupRun.start_child_early).
    child_starts_early = True
    # No shadow copy, so the drive letter (argument 12) is not used: the named form
    # needs none.
    drive_letter_default = ""
    mirror_error_re = re.compile(r"rsync( error)?: ")        # rsync's own error lines
    # 7-Zip's error when reading a file fails (a bad sector): 'ERROR: errno=5 : ...'
    read_error_re = re.compile(r"\berrno=5 :")

    # -- paths ---------------------------------------------------------------
    def default_temp_root(self):
        return tempfile.gettempdir()

    def default_state_dir(self):
        """Where the latest catalogue of each source is kept (XDG state directory)."""
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return os.path.join(base, "aam-auto-backup")

    def find_seven_zip(self):
        for name in ("7zz", "7z", "7za"):
            found = shutil.which(name)
            if found:
                return found
        return "7zz"

    def is_absolute(self, path):
        return path.startswith("/")

    def normalize(self, path):
        """Absolute path without a trailing separator (the root stays '/')."""
        path = re.sub(r"/+", "/", path)
        return path.rstrip("/") or "/"

    def comparable(self, path):
        return path

    def split(self, path):
        """'/home/ann' -> ['', 'home', 'ann']; the first element is the root."""
        if path == "/":
            return [""]
        return path.split("/")

    def join(self, elements):
        return "/".join(elements) if len(elements) > 1 else "/"

    def source_name(self, mount):
        """The mount path with ':' and separators replaced by '-' (object names)."""
        return mount.replace(":", "-").replace("/", "-")

    def mirror_directory(self, mirror_root, mount):
        """<dest>/<absolute path without its leading />."""
        return os.path.join(mirror_root, mount.lstrip("/"))

    def long_path(self, path):
        return path

    def check_drive_letter(self, text):
        """Argument 12: no shadow copy here, so any text is accepted (and ignored)."""
        return text.rstrip(":").lower()

    def is_junction(self, st):
        return False

    def special_file_kind(self, st):
        """What a special file is that the file type does not tell (None: not one)."""
        return None

    def changed_time(self, st):
        # The inode change time catches a file copied in with an old mtime.
        return max(st.st_mtime, st.st_ctime)

    def moved_since(self, st, since_ts):
        """A directory moved or renamed (not just added to) since since_ts: a rename
        changes its inode change time but not its modification time."""
        return st.st_ctime >= since_ts and st.st_mtime < since_ts

    def decode_output(self, data):
        return data.decode("utf-8", errors="replace")

    # -- restoring ---------------------------------------------------------
    # 7-Zip extracts a link stored as '/etc/x' as '<output dir>/etc/x'.
    absolute_links_rewritten = True

    def make_link(self, target, path):
        os.symlink(target, path)

    def make_stand_in(self, path, size):
        """A file of size bytes that takes no disk space (sparse): a volume not thawed."""
        with open(path, "wb") as handle:
            handle.truncate(size)

    # -- processes ---------------------------------------------------------
    def try_lock(self, path, keep_file=True):
        """A kernel lock on path (flock), or None while another process holds it.

        The kernel releases it when the process ends, however it ends.  fcntl is
        called directly: filelock makes the same flock call but its imports
        (asyncio) cost 80 ms of every run.  The file always stays (keep_file is
        Windows'): removing a flock's file races with a process about to lock it.
        """
        import fcntl
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as problem:
            os.close(fd)
            if problem.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        return HeldFlock(fd)

    def process_alive(self, pid):
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True          # it exists, owned by someone else
        return True

    def group_popen_options(self):
        """Start a child in its own process group, so it can be stopped as a whole."""
        return {"start_new_session": True}

    def private_file_options(self):
        """Popen options under which a program creates owner-only files."""
        return {"umask": 0o077}

    def script_popen_options(self):
        """Start the generated script in a process group of its own inside this child's
        session.  Should the child die while the upload throttle holds that group
        stopped, the group is left with no parent in its session, and the kernel
        sends it SIGHUP and SIGCONT (POSIX: an orphaned process group with a stopped
        member): the shell and 7-Zip end.  SIGHUP's default action is restored for
        it, as a run started under nohup would pass the signal on ignored.  (The
        child has no other thread yet, which preexec_fn needs.)"""
        def own_group():
            os.setpgrp()
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
        return {"preexec_fn": own_group}

    def stop_group(self, process):
        # A stopped process (the upload throttle's) acts on SIGTERM once continued.
        for sent in (signal.SIGTERM, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sent)

    def wait_group_gone(self, process, grace=GROUP_GRACE_SECONDS):
        """Return once no process of the stopped group is left (SIGKILL after `grace`
        seconds; a second after that at the latest): 7-Zip acts on SIGTERM only when
        it next looks, and until then it may still write into the work directory."""
        self.kill_group_after(process.pid, grace, reap=process.poll)

    def kill_group_after(self, group, grace, reap=lambda: None):
        """Return once no process of the group is left: SIGKILL after `grace` seconds,
        a second after that at the latest (reap: collects the leader, if ours)."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline + 1:
            reap()
            if not self.group_running(group):
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            time.sleep(0.01)

    @classmethod
    def group_running(cls, group):
        """Whether a process of the group still runs.  An ended one whose exit status
        nobody has collected yet (a zombie: 7-Zip, once its shell is gone, is
        collected by init, in a container perhaps only seconds later) counts for
        kill() but writes nothing; /proc tells them apart where there is one."""
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return not os.path.isdir("/proc/self") or bool(cls.group_members(group))

    @staticmethod
    def proc_stat(pid):
        """/proc/<pid>/stat indexed as proc(5) numbers its fields: [3] the state,
        [5] the process group, [22] the start time (OSError: no such process)."""
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        head, tail = text.rsplit(")", 1)      # the name, in (), may hold anything
        pid_text, name = head.split(" (", 1)
        return [None, pid_text, name] + tail.split()

    @classmethod
    def group_members(cls, group):
        """[(pid, name, state)] of the group's processes that have not ended (/proc)."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = cls.proc_stat(pid)
            except (OSError, ValueError):
                continue                     # ended meanwhile
            if int(fields[5]) == group and fields[3] != "Z":
                found.append((int(pid), fields[2], fields[3]))
        return found

    def process_start(self, pid):
        """What tells a process from any later one given the same pid: this boot's id
        and the clock tick it started at (/proc/<pid>/stat field 22); None where the
        system does not say, or when it has ended."""
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
                boot = handle.read().strip()
            return f"{boot}/{self.proc_stat(pid)[22]}"
        except (OSError, ValueError, IndexError):
            return None

    def end_group(self, pid, start):
        """SIGKILL the process group pid leads, stopped or not, if its leader is still
        the process that started at `start` (process_start): a pid since reused by
        another process is left alone.  The processes ended, as 'name (pid N)'."""
        try:
            same = self.process_start(pid) == start and int(self.proc_stat(pid)[5]) == pid
        except (OSError, ValueError):
            return []
        if not same:
            return []
        members = self.group_members(pid)
        self.kill_group_after(pid, 0)
        return [f"{name} (pid {member}{', stopped' if state in 'Tt' else ''})"
                for member, name, state in members]

    def follow_parent(self, parent):
        """Tie this child pass to the user-mode pass that started it (pid `parent`):
        that pid, or None when that pass has ended already.

        Linux sends the child SIGTERM when the parent dies (PR_SET_PDEATHSIG; run_script
        stops the script group on SIGTERM).  That fires when the thread that started
        the child ends: the parent starts children from its main thread only.  A
        parent that died before this call has left the child to another (init)
        already: `parent` is the pid the parent wrote into the work directory, not
        os.getppid().  Elsewhere stop_when_orphaned looks each second while the
        script runs."""
        if sys.platform.startswith("linux"):
            with contextlib.suppress(ImportError, OSError, AttributeError):
                import ctypes            # a Python without it: stop_when_orphaned only
                pr_set_pdeathsig = 1
                ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        return parent if os.getppid() == parent else None

    can_pause_group = True

    def pause_group(self, process, paused):
        """SIGSTOP/SIGCONT the whole group (7-Zip waits while the upload catches up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    # -- the child (re-invocation) -----------------------------------------
    def child_view_root(self, mount, drive_letter):
        return mount

    def child_command(self, python, script, child_args, mount, drive_letter):
        """<python> -c "<import the program and run it>" <15 child args>: imported, the
        program's compiled form is cached (__pycache__), which a script run by its
        path never is; a nightly run then does not compile 6,000 lines twice."""
        directory, module = os.path.split(os.path.splitext(script)[0])
        code = (f"import sys; sys.path.insert(0, {directory!r}); import {module}; "
                f"sys.exit({module}.main(sys.argv[1:]))")
        return [python, "-c", code] + list(child_args)

    # -- generated script --------------------------------------------------
    def mirror_commands(self, view_root, target, plan, keep, work_dir, walk=None):
        """The mirror tool's lines of the generated script: rsync."""
        return rsync_commands(self, target, plan, keep, work_dir)

    def quote(self, text):
        return shlex.quote(text)

    def write_script(self, path, view_root, commands):
        lines = ["#!/bin/sh",
                 "# Generated by AAM Auto Backup for one source; deleted after the run.",
                 f"cd -- {self.quote(view_root)} || exit 1"]
        for command in commands:
            lines.extend(command)
        lines.append(f"echo {self.quote(self.marker('script'))}")
        _write_private_text(path, "\n".join(lines) + "\n")

    def script_argv(self, path):
        return ["/bin/sh", path]

    def command_line(self, argv):
        return " ".join(self.quote(a) for a in argv)

    def feed_secret(self, variable, command):
        """A script line running command with the variable's value on its standard
        input (printf is a shell builtin: the value is on no command line)."""
        return f'printf "%s\\n" "${variable}" | LC_ALL=C.UTF-8 {command}'

    def status_check(self, kind, done_codes):
        """Script lines printing the tool's success marker, or its exit code."""
        tests = " || ".join(f'[ "$status" -eq {code} ]' for code in done_codes)
        return ["status=$?", f"if {tests}; then", f"  echo {self.quote(self.marker(kind))}",
                "else",
                f'  echo "{MARK_PREFIX}{self.tool_name(kind)} failed with exit code $status."',
                "fi"]

    def check_command_length(self, command, what, advice):
        """POSIX shells take any command line length the script needs."""

    def missing_marker_messages(self):
        return {
            "script": "No backup script execution success message. Aborting backup.",
            "mirror": "No rsync execution success message. Aborting backup.",
            "archive": "No 7-Zip execution success message. Aborting backup.",
        }

    def list_file_line(self, relative_path, is_dir):
        return relative_path + ("/" if is_dir else "")

    # -- restore -------------------------------------------------------------
    def cannot_create(self, path):
        """Why a path a backup holds ('/' between names) cannot be created here
        (None: it can).

        Linux and macOS create any name the backups hold: they came from POSIX
        file systems or from Windows, whose names are a subset.
        """
        return None


class WindowsPlatform(Platform):
    """Windows, as the original program ran there: ShadowSpawn (VSS), Robocopy, 7z.exe.

    The command lines are the ones the original program's author tested by
    hand (tests/test_windows_commands.py pins them); every deviation from
    them is explained where it is made.  Windows command lines are built as
    strings, not lists: ShadowSpawn and cmd.exe parse their own command lines.
    """

    name = "windows"
    sep = "\\"
    # The child runs under ShadowSpawn, whose VSS snapshot is not made for a guess
    # that may be thrown away, and would outlive a parent that died at the gate.
    child_starts_early = False
    # ShadowSpawn needs a drive letter that is free on this computer: the user chooses it.
    drive_letter_default = None
    separators = "\\/"
    case_insensitive = True
    list_charset_switch = "-scsUTF-8"
    invalid_name_chars = '<>:"|'
    refuses_names = True
    script_name = "AAM_Auto_Backup_shadow_copy.bat"
    mirror_tool = "Robocopy"
    script_kind = "backup batch file"
    shadow_spawn_name = "ShadowSpawn.exe"
    child_runner = shadow_spawn_name
    mirror_error_re = re.compile(r".*\bERROR \d+ \(0x[0-9A-Fa-f]+\)")   # Robocopy's
    # 7z.exe's error when reading a file fails: Windows' text for ERROR_CRC (23, a bad
    # sector) or ERROR_IO_DEVICE (1117)
    read_error_re = re.compile(r"cyclic redundancy check|I/O device error", re.IGNORECASE)
    # A US English machine's console code page: the one used when none can be read.
    fallback_code_page = 437
    # MAX_PATH (260) minus the 12 characters CreateDirectory keeps for a file name.
    long_path_threshold = 248
    # cmd.exe's longest command line; a longer batch-file line does not run.
    cmd_line_limit = 8191
    # Device names Windows reserves in every directory, with any extension.
    reserved_names = frozenset(["CON", "PRN", "AUX", "NUL"] +
                               [f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)])

    def default_temp_root(self):
        return "c:\\temp"

    def default_state_dir(self):
        """Where the latest catalogue of each source is kept (the user's local app data)."""
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
        return ntpath.join(base, "AAM Auto Backup", "state")

    def find_seven_zip(self):
        here = os.path.dirname(os.path.abspath(__file__))
        local = os.path.join(here, "7z.exe")
        return local if os.path.exists(local) else (shutil.which("7z") or "7z.exe")

    def is_absolute(self, path):
        return bool(drive_letter_of(path)) and path[2:3] == "\\"

    def normalize(self, path):
        path = re.sub(r"\\+", "\\\\", path.replace("/", "\\"))
        path = path.rstrip("\\")
        return path + "\\" if len(path) == 2 and drive_letter_of(path) else path

    def comparable(self, path):
        return path.lower()

    def split(self, path):
        return path.rstrip("\\").split("\\")

    def join(self, elements):
        return "\\".join(elements) if len(elements) > 1 else elements[0] + "\\"

    def source_name(self, mount):
        return mount.lower().replace(":", "-").replace("\\", "-").rstrip("-")

    def mirror_directory(self, mirror_root, mount):
        """<dest>\\<drive letter>\\<rest of the path>, e.g. F:\\backup\\main\\c\\users."""
        drive, rest = drive_letter_of(mount), mount[2:].lstrip("\\")
        return ntpath.join(mirror_root, drive.lower(), rest) if rest else \
            ntpath.join(mirror_root, drive.lower())

    def check_drive_letter(self, text):
        """Argument 12: the free drive letter ShadowSpawn shows the shadow copy at."""
        letter = text.removesuffix(":")
        if len(letter) != 1 or not drive_letter_of(letter + ":"):
            raise ValueError("must be one drive letter, such as q")
        return letter.lower()

    def long_path(self, path):
        """The extended-length form (\\\\?\\C:\\...) of a path long enough to hit MAX_PATH.

        The original program met this: a 265-character path on the shadow drive could be
        neither checked nor listed until it carried the \\\\?\\ prefix.
        """
        if len(path) < self.long_path_threshold or path.startswith("\\\\?\\"):
            return path
        path = path.replace("/", "\\")
        if path.startswith("\\\\"):
            return "\\\\?\\UNC\\" + ntpath.normpath(path)[2:]
        if self.is_absolute(path):
            return "\\\\?\\" + ntpath.normpath(path)
        return path

    def try_lock(self, path, keep_file=True):
        """A kernel lock on path (filelock's LockFileEx, which copes with the ways
        Windows can refuse to open a file), or None while another process holds it."""
        import filelock
        lock = filelock.FileLock(path, fallback_to_soft=False, preserve_lock_file=keep_file)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            return None
        return lock

    def process_alive(self, pid):
        import ctypes
        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)   # QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.GetLastError() == 5                 # access denied: it exists
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259                          # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)

    def group_popen_options(self):
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}

    def private_file_options(self):
        # A new file inherits the directory's access list: the work directory is the user's.
        return {}

    # No SIGSTOP on Windows (can_pause_group stays False): finished volumes just wait
    # for the upload.

    def stop_group(self, process):
        # taskkill /T ends the whole tree (ShadowSpawn, python, robocopy, 7z.exe).
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_group_gone(self, process, grace=GROUP_GRACE_SECONDS):
        pass             # taskkill /F has ended the tree when it returns

    def script_popen_options(self):
        return self.group_popen_options()

    def process_start(self, pid):
        return None      # nothing recorded: taskkill /T ends the child's whole tree

    def end_group(self, pid, start):
        return []        # none recorded (process_start)

    def follow_parent(self, parent):
        return os.getppid()      # ShadowSpawn's, which stop_when_orphaned watches

    def is_junction(self, st):
        """A directory junction/mount point: not followed (Robocopy /xjd does the same;
        the profile's legacy junctions deny listing, and on the shadow drive a
        junction leads back to the live disk)."""
        # Only mount points: OneDrive's cloud folders are reparse points too, and are
        # real directories that must be backed up.
        return getattr(st, "st_reparse_tag", 0) == 0xA0000003   # IO_REPARSE_TAG_MOUNT_POINT

    def special_file_kind(self, st):
        """An AF_UNIX socket (Windows 10 1803 and later) is a reparse point that looks like
        a file and holds no data; NTFS has no FIFOs or device files."""
        if getattr(st, "st_reparse_tag", 0) == 0x80000023:       # IO_REPARSE_TAG_AF_UNIX
            return "a socket"
        return None

    def moved_since(self, st, since_ts):
        # Windows exposes no change time of a directory: a moved directory's files
        # come back at their old path until the next full backup (docs/limits.md).
        return False

    absolute_links_rewritten = False

    def make_link(self, target, path):
        """A symbolic link (Developer Mode or administrator rights); a directory link
        when the target is a directory."""
        where = ntpath.join(ntpath.dirname(path), target)
        os.symlink(target, path, target_is_directory=os.path.isdir(where))

    def make_stand_in(self, path, size):
        """Sparse on NTFS too (FSCTL_SET_SPARSE), so that a stand-in takes no disk
        space; where the file system refuses, a plain file of that size."""
        with open(path, "wb") as handle:
            try:
                import ctypes
                import msvcrt
                returned = ctypes.c_ulong()
                ctypes.windll.kernel32.DeviceIoControl(
                    msvcrt.get_osfhandle(handle.fileno()), 0x000900C4,    # FSCTL_SET_SPARSE
                    None, 0, None, 0, ctypes.byref(returned), None)
            except (ImportError, AttributeError, OSError):
                pass
            handle.truncate(size)

    def changed_time(self, st):
        # Windows: the creation time catches a file copied in with an old mtime.
        created = getattr(st, "st_birthtime", st.st_ctime)
        return max(st.st_mtime, created)

    def list_file_line(self, relative_path, is_dir):
        # 7-Zip list files name directories with a trailing '\' (as 7-Zip was tested).
        return relative_path + ("\\" if is_dir else "")

    def cannot_create(self, path):
        """Why Windows cannot create this path ('/' between names) from a backup made on
        Linux or macOS.

        Windows names cannot hold control characters or <>:"|?*\\, cannot end with
        a dot or a space, and cannot be a device name (CON, aux.txt, ...); 7-Zip
        would write such a name changed (a:b.txt as a_b.txt), over another file
        of that name.
        """
        for name in path.split("/"):
            bad = sorted({c for c in name if c in self.invalid_name_chars + "?*\\"
                          or ord(c) < 32})
            if bad:
                return f"a Windows name cannot hold {''.join(bad)!r}"
            if name[-1:] in (".", " "):
                return "a Windows name cannot end with a dot or a space"
            if name.split(".")[0].rstrip(" ").upper() in self.reserved_names:
                return f"{name.split('.')[0]} is a device name on Windows"
        return None

    def view_path(self, view_root, relative):
        """A path on the shadow drive: 'q:\\' + 'documents\\folder2'."""
        return view_root.rstrip("\\") + "\\" + relative if relative else view_root

    # -- the child's output file ---------------------------------------------
    def console_code_page(self):
        """The console's code page (what chcp shows): console programs write in it."""
        try:
            import ctypes
            kernel32 = ctypes.windll.kernel32
            number = kernel32.GetConsoleOutputCP() or kernel32.GetOEMCP()
        except (ImportError, AttributeError, OSError):
            number = 0
        return number or self.fallback_code_page

    def output_encoding(self):
        name = f"cp{self.console_code_page()}"
        try:
            "".encode(name)
        except LookupError:
            name = f"cp{self.fallback_code_page}"
        return name

    def decode_output(self, data):
        """One line of the ShadowSpawn output file, decoded without ever failing.

        The child writes UTF-8 (it runs with -X utf8), 7-Zip too (-sccUTF-8);
        any other line (ShadowSpawn's own) is in the console code page, cp437
        on a US English machine.  Bytes the code page lacks become U+FFFD.
        """
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode(self.output_encoding(), errors="replace")

    # -- the child (re-invocation through ShadowSpawn) -------------------------
    def child_view_root(self, mount, drive_letter):
        """ShadowSpawn shows the mount directory at the drive letter: q:\\."""
        return drive_letter.lower() + ":\\"

    def quote(self, text):
        """"text" for a Windows command line parsed by the MSVCRT rules.

        A trailing backslash is doubled, or '\\"' would be read as a literal
        quote (as the original author noted: "no \\ at the end of source and target Robocopy
        directories!").  Windows paths and names cannot hold '"'.
        """
        if '"' in text:
            raise AamError(f"{text!r}: a double quote cannot be passed on a Windows "
                           "command line")
        return '"' + re.sub(r"(\\+)$", r"\1\1", text) + '"'

    def child_command(self, python, script, child_args, mount, drive_letter):
        """ShadowSpawn.exe "<mount>" q: "<python>" "-X" "utf8" "<script>" <15 child args>.

        The original ran this through os.system with '> shadow_copy_command_output.txt';
        here the parent hands the output file to ShadowSpawn as its standard
        output handle (what cmd.exe's '>' does), so no cmd.exe parses paths.
        ShadowSpawn splits its command line itself (quotes kept, no backslash
        escapes) and takes any word starting with '-' for one of its own
        switches, so every word after the drive letter is quoted; python then
        parses the rest by the MSVCRT rules.  Deviations from the original: full
        paths for ShadowSpawn.exe and the script (the working directory is not
        always the program directory), and -X utf8 so that the child writes its
        output in UTF-8 (a code-page output file was misread otherwise).
        """
        shadow_spawn = ntpath.join(ntpath.dirname(script), self.shadow_spawn_name)
        operation, agent = child_args[:2]
        words = [self.quote(shadow_spawn), self.quote(mount),
                 f"{(drive_letter or UNUSED_DRIVE_LETTER).lower()}:", self.quote(python),
                 self.quote("-X"), self.quote("utf8"), self.quote(script), operation, agent]
        words += [self.quote(arg) for arg in child_args[2:]]
        return " ".join(words)

    # -- the generated batch file --------------------------------------------
    def mirror_commands(self, view_root, target, plan, keep, work_dir, walk=None):
        """The mirror tool's lines of the generated batch file: Robocopy."""
        return robocopy_commands(self, view_root, target, plan, keep, work_dir, walk)

    def bat_quote(self, text):
        """quote() for a batch-file line: '%' doubled so cmd.exe keeps it."""
        return self.quote(text).replace("%", "%%")

    def write_script(self, path, view_root, commands):
        """The original's batch file: cd /D to the shadow drive, robocopy, 7z.

        UTF-8 after 'chcp 65001' so that any path can be written (cmd.exe reads
        a batch file line by line in the console code page), which is set back
        at the end.  Programs are named by full path: the current directory is
        the shadow drive, which cmd.exe would search first.
        """
        code_page = self.console_code_page()
        chcp = '"%SystemRoot%\\System32\\chcp.com"'
        lines = ["@echo off",
                 "rem Generated by AAM Auto Backup for one source; deleted after the run."]
        if code_page != 65001:
            lines.append(f"{chcp} 65001 >nul")
        lines.append(f"cd /D {view_root.rstrip(self.sep)}\\ || goto end")
        for command in commands:
            lines.extend(command)
        lines += [f"echo {self.marker('script')}", ":end"]
        if code_page != 65001:
            lines.append(f"{chcp} {code_page} >nul")
        try:
            data = ("\r\n".join(lines) + "\r\n").encode("utf-8")
        except UnicodeEncodeError as problem:
            raise AamError(f"The batch file {path} cannot hold a name with an unpaired "
                           f"surrogate: {problem.object[problem.start:problem.end]!r}")
        _write_private_bytes(path, data)

    def script_argv(self, path):
        """cmd.exe running the batch file: no AutoRun (/d), extensions on, no '!' expansion."""
        comspec = os.environ.get("ComSpec") or "cmd.exe"
        return f'{self.quote(comspec)} /d /e:on /v:off /s /c "{self.quote(path)}"'

    def feed_secret(self, variable, command):
        """A batch line running command with the variable's value on its standard input.

        As on POSIX, the value is on no command line: a second cmd.exe with
        delayed expansion echoes the environment variable into the pipe ('!'
        expansion happens after parsing, so no character of the value is special;
        '&rem ' keeps a trailing blank out of the echo).  7-Zip reads stdin in
        text mode, so the CR of echo's CRLF is not part of the password.
        """
        if self.delayed_expansion_by_default():
            raise AamError(
                "cmd.exe expands '!' by default on this computer (registry value "
                "DelayedExpansion under Software\\Microsoft\\Command Processor), so the "
                "archive key would appear on a command line; set it to 0.")
        return f'"%ComSpec%" /d /v:on /c "echo(!{variable}!&rem "| {command}'

    def command_line(self, argv):
        """A batch-file command line: the program quoted, switches bare, @"<list>"."""
        return " ".join(self.script_word(index, arg) for index, arg in enumerate(argv))

    def check_command_length(self, command, what, advice):
        if len(command) > self.cmd_line_limit:
            raise AamError(f"{what} would be {len(command)} characters, over cmd.exe's "
                           f"limit of {self.cmd_line_limit}: {advice}")

    def delayed_expansion_by_default(self):
        """cmd.exe's registry default for '!' expansion (the user's value wins).

        When on, the cmd.exe that runs the left side of a pipe would expand the
        key itself and pass it on the next command line.
        """
        try:
            import winreg
        except ImportError:
            return False
        for hive in (winreg.HKEY_CURRENT_USER, winreg.HKEY_LOCAL_MACHINE):
            try:
                with winreg.OpenKey(hive, r"Software\Microsoft\Command Processor") as key:
                    return winreg.QueryValueEx(key, "DelayedExpansion")[0] == 1
            except OSError:
                continue
        return False

    def script_word(self, index, arg):
        """One argument in the original design's form: "<exe>", switches bare, @"<list>"."""
        list_switch = re.fullmatch(r"((?:-[ix]r?-?)?@)(.+)", arg)
        if index and list_switch:
            return list_switch[1] + self.bat_quote(list_switch[2])
        if index and re.fullmatch(r"[A-Za-z]|-[A-Za-z0-9=.+:-]+", arg):
            return arg
        return self.bat_quote(arg)

    def status_check(self, kind, done_codes):
        """A batch line printing the tool's success marker, or its exit code; the codes
        that mean done must be the lowest ones (errorlevel N means N or more)."""
        failure = max(done_codes) + 1
        assert tuple(done_codes) == tuple(range(failure)), done_codes
        return [f"if errorlevel {failure} (echo {MARK_PREFIX}{self.tool_name(kind)} failed "
                f"with exit code %ERRORLEVEL%.) else (echo {self.marker(kind)})"]

    def echo_line(self, text):
        """A batch line printing text as it is (cmd.exe's special characters escaped)."""
        escaped = re.sub(r"([\^&|<>()])", r"^\1", text).replace("%", "%%")
        return "echo(" + escaped

    def missing_marker_messages(self):
        return {
            "script": "No backup batch file execution success message. Aborting backup.",
            "mirror": "No Robocopy execution success message. Aborting backup.",
            "archive": "No 7z.exe execution success message. Aborting backup.",
        }


def current_platform():
    return WindowsPlatform() if os.name == "nt" else PosixPlatform()


def platform_named(name):
    """The platform a backup was made on (its indicator and catalogue name it)."""
    return WindowsPlatform() if name == WindowsPlatform.name else PosixPlatform()


def platform_of_path(path):
    """The platform an absolute path belongs to: a drive letter means Windows."""
    return WindowsPlatform() if drive_letter_of(path) else PosixPlatform()


# ============================================================================
# Names and time stamps (docs/reference.md, What is stored where)
# ============================================================================

STAMP_FORMAT = "%Y%m%d_%H%M%S.%f"        # in object names, UTC
ARG_STAMP_FORMAT = "%Y%m%d %H%M%S.%f"    # in child arguments, UTC
NO_STAMP_ARG = " "                        # "none" in child arguments 3-4

OBJECT_NAME_RE = re.compile(
    r"^(?P<location>[^_]+)_(?P<full>\d{8}_\d{6}\.\d{6})_"
    r"(?P<incr>0_0\.0|\d{8}_\d{6}\.\d{6})_"
    r"(?P<flag>no|yes|catalogue|piece(?P<piece>\d{4,}))_(?P<rest>.+)$")
VOLUME_SUFFIX_RE = re.compile(r"^(?P<source>.+)\.zip\.(?P<number>\d{3,})$")


def utc_now():
    return dt.datetime.now(dt.timezone.utc)


def format_stamp(moment):
    return moment.astimezone(dt.timezone.utc).strftime(STAMP_FORMAT)


def parse_stamp(text):
    return dt.datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=dt.timezone.utc)


def format_arg_stamp(moment):
    return NO_STAMP_ARG if moment is None else \
        moment.astimezone(dt.timezone.utc).strftime(ARG_STAMP_FORMAT)


def parse_arg_stamp(text):
    if not text.strip():
        return None
    return dt.datetime.strptime(text, ARG_STAMP_FORMAT).replace(tzinfo=dt.timezone.utc)


def describe_stamp(moment):
    """For people: the UTC stamp as in object names, or 'none'."""
    return "none" if moment is None else moment.strftime("%Y%m%d %H%M%S.%f UTC")


LEGACY_PIECE = 0      # the one archive of a source in a backup made before pieces (1.0.0, 1.1.0)


@dataclasses.dataclass(frozen=True)
class ObjectName:
    """One S3 object of a backup: a volume, a completion indicator or a catalogue.

    The catalogue's flag word is neither 'no' nor 'yes', so a reader that knows
    only volumes and indicators (version 1.0.0) passes over it; so is a piece's
    volume's ('piece0001'): versions before pieces pass over those too.  The
    volumes of a backup made before pieces ('no') are its LEGACY_PIECE.
    """

    location: str
    full: dt.datetime
    incremental: object          # datetime, or None for a full backup
    indicator: bool
    source: str
    volume: object = None        # int for volumes, None for indicators and catalogues
    catalogue: bool = False
    piece: int = LEGACY_PIECE    # the piece a volume belongs to

    @property
    def key(self):
        incr = "0_0.0" if self.incremental is None else format_stamp(self.incremental)
        flag = "catalogue" if self.catalogue else "yes" if self.indicator else \
            f"piece{self.piece:04d}" if self.piece != LEGACY_PIECE else "no"
        key = f"{self.location}_{format_stamp(self.full)}_{incr}_{flag}_{self.source}"
        if self.catalogue:
            return key + ".zip"
        if not self.indicator:
            key += f".zip.{self.volume:03d}"
        return key

    @classmethod
    def parse(cls, key):
        """The ObjectName for a key, or None if the key is not ours."""
        match = OBJECT_NAME_RE.match(key)
        if not match:
            return None
        full = parse_stamp(match["full"])
        incr = None if match["incr"] == "0_0.0" else parse_stamp(match["incr"])
        if match["flag"] == "yes":
            return cls(match["location"], full, incr, True, match["rest"])
        if match["flag"] == "catalogue":
            if not match["rest"].endswith(".zip"):
                return None
            return cls(match["location"], full, incr, False, match["rest"][:-4],
                       catalogue=True)
        volume = VOLUME_SUFFIX_RE.match(match["rest"])
        if not volume:
            return None
        piece = int(match["piece"]) if match["piece"] else LEGACY_PIECE
        if match["piece"] and piece == LEGACY_PIECE:
            return None                   # piece numbers start at 1
        return cls(match["location"], full, incr, False, volume["source"],
                   int(volume["number"]), piece=piece)


# -- the key check: which archive key a chain of backups was made with ----------------

KEYCHECK_FLAG = "keycheck"
KEYCHECK_RE = re.compile(
    r"^(?P<location>[^_]+)_keycheck_(?P<full>\d{8}_\d{6}\.\d{6})_(?P<salt>[0-9a-f]{32})_"
    r"(?P<verifier>[0-9a-f]{4})$")
ZIP_AES_SALT_BYTES = 16      # ZIP AES-256's salt
ZIP_AES_ROUNDS = 1000        # its PBKDF2-HMAC-SHA1 rounds


def key_verifier(key, salt):
    """ZIP AES-256's password verification value of key with salt, as 4 hex digits.

    Exactly what 7-Zip stores beside each file of a volume (the last 2 of the 66
    bytes PBKDF2-HMAC-SHA1 derives in 1,000 rounds), so a key check is no cheaper
    to attack than any volume: the same work per guess, and 16 bits that alone
    cannot confirm a guess.
    """
    derived = hashlib.pbkdf2_hmac("sha1", key.encode("utf-8"), salt, ZIP_AES_ROUNDS,
                                  2 * 32 + 2)
    return derived[-2:].hex()


@dataclasses.dataclass(frozen=True)
class KeyCheck:
    """The empty object naming the key of one chain (a full backup and its incrementals).

    The backup keys cannot read objects, only list their names: so the verifier is
    in the name.  The word in the place of a date keeps every reader of backup
    sets (OBJECT_NAME_RE, version 1.0.0's pattern too) from taking it for one.
    """

    location: str
    full: dt.datetime
    salt: bytes
    verifier: str

    @property
    def key(self):
        return (f"{self.location}_{KEYCHECK_FLAG}_{format_stamp(self.full)}_"
                f"{self.salt.hex()}_{self.verifier}")

    @classmethod
    def parse(cls, key):
        match = KEYCHECK_RE.match(key)
        if not match:
            return None
        return cls(match["location"], parse_stamp(match["full"]),
                   bytes.fromhex(match["salt"]), match["verifier"])

    @classmethod
    def for_key(cls, location, full, archive_key, like=None):
        """The key check of a new chain; like: an earlier one of the same key, whose salt
        and verifier are kept (a lister learns 16 bits of a key however many chains
        it made)."""
        if like is not None:
            return cls(location, full, like.salt, like.verifier)
        salt = os.urandom(ZIP_AES_SALT_BYTES)
        return cls(location, full, salt, key_verifier(archive_key, salt))

    def matches(self, archive_key):
        return hmac.compare_digest(key_verifier(archive_key, self.salt), self.verifier)


def keycheck_prefix(location):
    return f"{location}_{KEYCHECK_FLAG}_"


def month_prefixes(location, now, months=MONTHS_SCANNED):
    """Key prefixes of the current UTC month and the previous months, newest first."""
    year, month = now.year, now.month
    prefixes = []
    for _ in range(months):
        prefixes.append(f"{location}_{year:04d}{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return prefixes


def listed_month(location, key):
    """'YYYYMM' of the month prefix (month_prefixes) a key or prefix is listed under, or
    None (a key check's: it has a prefix of its own; object_month gives its month)."""
    match = re.match(re.escape(location) + r"_(\d{6})", key)
    return match.group(1) if match else None


# ============================================================================
# Arguments: operations, the values they take, the rows the tables share
# ============================================================================

REGULAR_BACKUP = "regular-backup"
INCREMENTAL_ONLY_BACKUP = "incremental-only-backup"
BACKUP_OPERATIONS = (REGULAR_BACKUP, INCREMENTAL_ONLY_BACKUP)
# What a regular-backup with the same arguments would do, told without doing it: it takes
# the backup's table, so that a scheduled command line or settings file is tried as it is.
PREVIEW_BACKUP = "preview-backup"
BACKUP_TABLE_OPERATIONS = BACKUP_OPERATIONS + (PREVIEW_BACKUP,)
ONE_STEP_RESTORE = "one-step-aws-data-restoration"
THAW_STEP = "restore-to-aws-s3-from-aws-s3-glacier-deep-archive"
STATUS_STEP = "check-aws-s3-restoration-status"
DOWNLOAD_STEP = "download-to-local-computer-from-aws-s3"
EXTRACT_STEP = "decompress-all-downloaded-backup-files"
RESTORE_OPERATIONS = (ONE_STEP_RESTORE, THAW_STEP, STATUS_STEP, DOWNLOAD_STEP, EXTRACT_STEP)
BROWSE_OPERATION = "browse-aws-backups"
CHECK_OPERATION = "check-aws-backups"
DRILL_OPERATION = "drill-aws-backups"
USER_AGENT = "user"
CHILD_AGENT = "ShadowSpawn"
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
LOCATION_RE = re.compile(r"^[^\W_][\w.-]*$")
KEY_RE = re.compile(r"^[\x20-\x7e]{1,99}$")
# ZIP AES derives its key with only 1,000 rounds of PBKDF2-SHA1: a shorter key falls to
# offline guessing by anyone who obtains a volume (a warning, not an error).
STRONG_KEY_LENGTH = 20
KEY_RULE = ("must be 1 to 99 printable ASCII characters (7-Zip's limit for ZIP AES "
            "passwords)")


class Scope(enum.Enum):
    """What one backup holds; the value is the child's argument 15."""

    FULL = "full-backup"
    INCREMENTAL = "incremental-backup"

    @property
    def word(self):
        """'full' or 'incremental': log lines, e-mail titles, indicators."""
        return self.value.removesuffix("-backup")


class Secret(str):
    """A string that prints as a mask, so a secret cannot leak by formatting."""

    def __repr__(self):
        return "Secret('********')"


# -- checks: text -> value, or ValueError saying what is wrong ---------------------

def _choice(*values, case_sensitive=True):
    def check(text):
        for value in values:
            if text == value or (not case_sensitive and text.lower() == value.lower()):
                return value
        raise ValueError("must be " + " or ".join(repr(v) for v in values))
    return check


def _flag(true_text, false_text):
    """A two-valued argument ('True'/'False', 'yes'/'no') as a bool; any letter case."""
    choose = _choice(true_text, false_text, case_sensitive=False)

    def check(text):
        return choose(text) == true_text
    check.text = lambda value: true_text if value else false_text
    return check


def _integer(minimum, maximum=None):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be a whole number")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum else f"at least {minimum}"
            raise ValueError(f"must be {bound}")
        return value
    return check


def _text(text):
    return text


def _path(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return os.path.abspath(os.path.expanduser(text))


def _optional_path(text):
    return _path(text) if text.strip() else ""


def _executable(text):
    """An existing program file; a bare name is looked up on PATH."""
    found = text if os.sep in text or "/" in text else shutil.which(text)
    path = _path(found or text)
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not an existing file")
    return path


def _destination_types(text):
    result = []
    for flag in (part.strip() for part in text.split("|")):
        if flag.lower() not in ("local", "aws"):
            raise ValueError("must be 'local', 'AWS' or 'local|AWS'")
        result.append("local" if flag.lower() == "local" else "AWS")
    if len(set(result)) != len(result):
        raise ValueError("names a destination type twice")
    return frozenset(result)


def _drive_letter(text):
    # Only Windows uses it (the shadow copy's drive); elsewhere any text is accepted.
    return current_platform().check_drive_letter(text)


def _location(text):
    if not LOCATION_RE.match(text) or "_" in text:
        raise ValueError("must be letters, digits, '.' and '-' (no '_': it separates the "
                         "fields of object names)")
    return text


def _bucket(text):
    if not BUCKET_RE.match(text) or ".." in text:
        raise ValueError("is not a valid S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    return text


def _key(text):
    if not KEY_RE.match(text):
        raise ValueError(KEY_RULE)
    return text


def _stamp_or_none(text):
    try:
        return parse_arg_stamp(text)
    except ValueError:
        raise ValueError("must be 'YYYYMMDD HHMMSS.ffffff' or a single space")


def _stamp(text):
    value = _stamp_or_none(text)
    if value is None:
        raise ValueError("must be 'YYYYMMDD HHMMSS.ffffff'")
    return value


def _scope(text):
    try:
        return Scope(text)
    except ValueError:
        raise ValueError("must be " + " or ".join(repr(s.value) for s in Scope))


LATEST = "latest"
# Every form docs/reference.md lists: the program's own (browse prints it), the object
# names', and ISO 8601's with ' ' or 'T', seconds and fractions optional.
_POINT_FORMATS = ("%Y%m%d %H%M%S.%f", "%Y%m%d %H%M%S", "%Y%m%d_%H%M%S.%f", "%Y%m%d_%H%M%S",
                  "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M",
                  "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M")
_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d")


def _restore_point(text):
    """None for the latest backup, else the UTC date-time to restore as of."""
    clean = re.sub(r"\s*(UTC|Z|[+-]00:?00)$", "", text.strip(), flags=re.IGNORECASE)
    if clean.lower() in ("", LATEST):
        return None
    for pattern in _POINT_FORMATS:
        with contextlib.suppress(ValueError):
            return dt.datetime.strptime(clean, pattern).replace(tzinfo=dt.timezone.utc)
    for pattern in _DATE_FORMATS:
        with contextlib.suppress(ValueError):
            day = dt.datetime.strptime(clean, pattern).replace(tzinfo=dt.timezone.utc)
            return day + dt.timedelta(days=1, microseconds=-1)    # as of that day's end
    raise ValueError("must be 'latest' (or \"\"), a UTC date-time such as "
                     "'20261115 143000', '2026-11-15 14:30' or '2026-11-15T14:30:00.5', "
                     "or a date such as '2026-11-15' (as of the end of that day)")


def _selection_item(text):
    """A path as it was backed up, or a name pattern (wildcards * and ?)."""
    item = text.strip()
    if not item:
        raise ValueError("must not be empty: give an absolute path or a name")
    absolute = item.startswith("/") or (drive_letter_of(item) and item[2:3] in ("\\", "/"))
    if not absolute and "/" in item.rstrip("/\\"):
        raise ValueError("is a relative path; give the path as it was backed up (absolute) "
                         "or a file or directory name")
    return item


_BOOL = _flag("True", "False")
_YES_NO = _flag("yes", "no")


# -- the tables: one row per argument; a row that several operations share is defined once

NAMED_PREFIX = "--"
NOT_GIVEN = "(not given)"
SETTINGS_OPTION = "settings"
HELP_WORDS = ("--help", "-h")


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of an operation.

    field names it: the attribute of the checked Arguments and, written with '-' for '_',
    the setting's name in the named form (--log-dir VALUE, or log-dir = VALUE in a settings
    file).  label: the short description that messages put after the argument's number.
    check turns the text into the value (or raises ValueError saying what is wrong); its
    optional .text attribute turns a value back into its text (the child's command line).
    A secret also accepts env:NAME (the named form only that) and is masked in the log.
    An optional argument may be left out of the positional form (then it is default); a
    repeated one, the last, takes all the arguments left (a list).  meaning and example
    are what --help says of it.  named_default: the named form's text when the setting
    is not given (a text; a function of the given texts returning one, described by
    default_note; or None: the setting is required).
    """

    field: str
    label: str
    check: object = _text
    secret: bool = False
    optional: bool = False
    default: str = ""
    repeated: bool = False
    meaning: str = ""
    example: str = ""
    named_default: object = None
    default_note: str = ""

    @property
    def name(self):
        return self.field.replace("_", "-")

    def text(self, value):
        to_text = getattr(self.check, "text", str)
        return [to_text(v) for v in value] if self.repeated else to_text(value)

    def named_default_text(self, given):
        """The named form's text when the setting is not given; None: it is required."""
        if self.repeated:
            return []
        if self.optional:
            return self.default
        if callable(self.named_default):
            return self.named_default(given)
        return self.named_default

    def default_text(self):
        """The named form's default, for --help ('' when the setting is required)."""
        if self.repeated:
            return "none"
        if self.default_note:
            return self.default_note
        default = self.default if self.optional else self.named_default
        if default is None:
            return ""
        return default if default else '"" (empty)'


def _email_on_with_recipient(given):
    # Naming a recipient asks for the report; without one there is nobody to send it to.
    return "True" if given.get("recipient") else "False"


def _running_python(_given):
    return sys.executable


# The child pass takes a drive letter positionally (its 1.0.0 command line); where the
# user gave none (Linux, macOS: no shadow copy) it gets this one, which nothing reads.
UNUSED_DRIVE_LETTER = "q"


def _platform_drive_letter(_given):
    return current_platform().drive_letter_default


OPERATION_ROW = Arg("operation", "operation", meaning="the operation: the command's first word")
LOG_DIR = Arg("log_dir", "log directory", _path, meaning="the log directory (made if missing)",
              example="/var/log/aam")
SEND_EMAIL = Arg("send_email", "send e-mail report (True/False)", _BOOL,
                 meaning="send an e-mail report through SES: True or False",
                 named_default=_email_on_with_recipient,
                 default_note="True when recipient is given, else False", example="True")
SENDER_NAME = Arg("sender_name", "e-mail sender name", meaning="the report's sender name",
                  named_default="AAM Auto Backup", example="AAM Backup Report")
SENDER_ADDRESS = Arg("sender_address", "e-mail sender address",
                     meaning="the report's sender address, verified in SES (needed when "
                             "send-email is True)",
                     named_default="", example="backup@example.com")
RECIPIENT = Arg("recipient", "e-mail recipient address",
                meaning="the report's recipient address (needed when send-email is True)",
                named_default="", example="me@example.com")
DRIVE_LETTER = Arg("drive_letter", "shadow-copy drive letter", _drive_letter,
                   meaning="a free drive letter where ShadowSpawn shows the shadow copy "
                           "(Windows only; ignored on Linux and macOS)",
                   named_default=_platform_drive_letter,
                   default_note="none needed on Linux and macOS; required on Windows",
                   example="q")
DESTINATIONS = Arg("destinations", "destination types (local, AWS, local|AWS)",
                   _destination_types,
                   meaning="where the backup goes: local (the mirror), AWS (Deep Archive), "
                           "or local|AWS", example="local|AWS")
MIRROR_ROOT = Arg("mirror_root", "local mirror directory", _optional_path,
                  meaning="the local mirror directory (needed when destinations includes "
                          "local; ignored otherwise)",
                  named_default="", example="/media/usb/backup")
KEEP = Arg("keep", "keep files gone from the source (True/False)", _BOOL,
           meaning="True: keep files in the mirror that are gone from the source; False: "
                   "delete them from the mirror, as the source did",
           named_default="False", example="False")
ENCRYPTION_KEY = Arg("key", "archive encryption key", secret=True,
                     meaning="the archive encryption key (AES-256 password, 1 to 99 printable "
                             "ASCII characters; 20 or more, see docs/security.md); needed "
                             "when destinations includes AWS",
                     named_default="", example="env:AAM_ENCRYPTION_KEY")
DECRYPTION_KEY = Arg("key", "archive decryption key", _key, secret=True,
                     meaning="the archive key the backups were made with",
                     example="env:AAM_ENCRYPTION_KEY")
BUCKET = Arg("bucket", "S3 bucket", _bucket, meaning="the S3 bucket",
             example="aam-data-backup")
LOCATION = Arg("location", "location name", _location,
               meaning="the computer's name in the bucket: letters, digits, '.' and '-'",
               example="main-work-computer")
ACCESS_KEY_ID = Arg("access_key_id", "AWS access key ID", secret=True,
                    meaning="the AWS access key ID; empty, with secret-access-key empty: "
                            "boto3's default credentials",
                    named_default="", example="env:AAM_BACKUP_ACCESS_KEY_ID")
SECRET_ACCESS_KEY = Arg("secret_access_key", "AWS secret access key", secret=True,
                        meaning="the AWS secret access key that goes with access-key-id",
                        named_default="", example="env:AAM_BACKUP_SECRET_ACCESS_KEY")
FORCE_FULL = Arg("force_full", "force full backup (yes/no)", _YES_NO,
                 meaning="yes: make a full backup now (regular-backup only; "
                         "incremental-only-backup refuses yes); no",
                 named_default="no", example="no")
RESTORE_KEYS = {"access_key_id": "env:AAM_RESTORE_ACCESS_KEY_ID",
                "secret_access_key": "env:AAM_RESTORE_SECRET_ACCESS_KEY"}


def _restore_user(row):
    """A credential row as a restore or browse takes it: the restore user's keys."""
    return dataclasses.replace(row, meaning=row.meaning.replace("the AWS", "the restore "
                                                                "user's AWS", 1),
                               example=RESTORE_KEYS[row.field])


# ============================================================================
# Arguments: the tables, the named form, the usage (docs/reference.md, Arguments)
# ============================================================================

# A settings file refuses a relative path for these (see NamedForm).
_path.takes_path = _optional_path.takes_path = _executable.takes_path = True


_destination_types.text = lambda value: "|".join(sorted(value))


_stamp_or_none.text = lambda value: format_arg_stamp(value)


_stamp.text = _stamp_or_none.text


_scope.text = lambda value: value.value


_restore_point.text = lambda value: LATEST if value is None else format_arg_stamp(value)


class ArgTable:
    """The arguments of one kind of operation, argument 1 first.

    A command line gives them in the positional form (argument 2 onwards, in the
    table's order) or, when argument 2 starts with '--', in the named form
    (NamedForm): a settings file and --NAME VALUE options.  named=False: the
    positional form only (the child pass).
    """

    def __init__(self, title, *args, named=True):
        self.title = title
        self.args = args
        self.named = named
        self.numbers = {arg.field: number for number, arg in enumerate(args, 1)}
        self.required = sum(1 for arg in args if not (arg.optional or arg.repeated))
        self.repeated = bool(args) and args[-1].repeated

    def __iter__(self):
        return iter(self.args)

    def __len__(self):
        return len(self.args)

    def number(self, field):
        return self.numbers[field]

    def arg(self, field):
        return self.args[self.numbers[field] - 1]

    def label(self, field):
        return self.arg(field).label

    def ref(self, field):
        """How a message names one argument by its number: 'argument 13'."""
        return f"argument {self.number(field)}"

    def credentials_ref(self):
        """How a message names the AWS keys a request was made with: 'arguments 19 and 20'."""
        return (f"arguments {self.number('access_key_id')} and "
                f"{self.number('secret_access_key')}")

    def field_of(self, name):
        """The field a setting's name (log-dir or log_dir) stands for, or None."""
        field = name.replace("-", "_")
        return field if field in self.numbers and field != OPERATION_ROW.field else None

    def count_text(self):
        if self.repeated:
            return f"{self.required} or more arguments"
        if self.required < len(self.args):
            return f"{self.required} to {len(self.args)} arguments"
        return f"{len(self.args)} arguments"

    def arg_at(self, number):
        """The Arg of position number (1-based; the repeated one for all beyond)."""
        return self.args[min(number, len(self.args)) - 1]

    def is_named_form(self, argv):
        """Argument 2 starts with '--'.  Where argument 2 is a secret (browse's key,
        which may itself start so), only a setting's name or --help makes it the
        named form."""
        if not self.named or len(argv) < 2 or not argv[1].startswith(NAMED_PREFIX):
            return False
        name = argv[1][len(NAMED_PREFIX):].partition("=")[0]
        return (not self.args[1].secret or argv[1] in HELP_WORDS
                or name == SETTINGS_OPTION or self.field_of(name) is not None)

    def parse(self, argv, operation):
        """The checked values of argv, by field name, or a UsageError."""
        if self.is_named_form(argv):
            return NamedForm(self, operation).parse(argv[1:])
        if len(argv) < self.required or (len(argv) > len(self.args) and not self.repeated):
            hint = ""
            if self.named and len(argv) > 1 and argv[1].startswith(NAMED_PREFIX):
                hint = (" (argument 2 starts with '--' but is none of its settings, "
                        f"{', '.join(arg.name for arg in self.args[1:])}; so it was read as "
                        "the positional form)")
            raise UsageError(f"{operation} takes {self.count_text()}, {len(argv)} were "
                             f"given{hint}", operation)
        values = {arg.field: [] if arg.repeated else arg.check(arg.default)
                  for arg in self.args[len(argv):]}
        for number, text in enumerate(argv, 1):
            arg = self.arg_at(number)
            value = self.check_text(arg, text, positional_origin(number, arg), operation)
            if arg.repeated:
                values.setdefault(arg.field, []).append(value)
            else:
                values[arg.field] = value
        return Arguments(self, list(argv), values)

    @staticmethod
    def check_text(arg, text, origin, operation, named=False):
        """The value of one argument's text; origin names it in a message."""
        try:
            if arg.secret:
                text = resolve_secret(text)
            value = arg.check(text)
        except ValueError as problem:
            shown = "" if arg.secret else f": {text!r}"
            raise UsageError(f"{origin} {problem}{shown}", operation, named)
        return Secret(value) if arg.secret else value

    def to_argv(self, values):
        """The argument texts for values by field name (the child's command line)."""
        texts = []
        for arg in self.args:
            text = arg.text(values[arg.field])
            texts += text if arg.repeated else [text]
        return texts

    def argv(self, **texts):
        """A command line's arguments from their texts by field name (tools, tests)."""
        unknown = set(texts) - set(self.numbers)
        missing = {a.field for a in self.args
                   if not (a.optional or a.repeated)} - set(texts)
        if unknown or missing:
            raise KeyError(f"arguments unknown {sorted(unknown)}, missing {sorted(missing)}")
        result = []
        for arg in self.args:
            if arg.field not in texts:
                break                      # optional ones are left out from here
            value = texts[arg.field]
            result += list(value) if arg.repeated else [value]
        return result

    # -- what the user reads: the usage after a wrong command line, and --help ---------
    def usage(self, operation):
        lines = [f"usage: aam_auto_backup.py {operation or self.title} ({self.count_text()}, "
                 "positional; write empty values as \"\"):"]
        for number, arg in enumerate(self.args, 1):
            note = "  (accepts env:NAME)" if arg.secret else ""
            if arg.optional:
                note += f"  (optional; left out: {arg.default})"
            if arg.repeated:
                note += "  (optional; any number of them, one per argument)"
            name = f"  [--{arg.name}]" if self.named and number > 1 else ""
            lines.append(f"  {number:2d}{'...' if arg.repeated else '.'} {arg.label}{note}"
                         f"{name}")
        if self.named:
            lines.append(f"or, named: aam_auto_backup.py {operation or self.title} "
                         "--settings FILE [--NAME VALUE ...]; "
                         f"'aam_auto_backup.py {operation or self.title} --help' says "
                         "what each is")
        return "\n".join(lines)

    def help(self, operation):
        """--help of one operation: both forms, then each setting's number, name, meaning,
        named-form default and example, then an example of each form."""
        out = [f"aam_auto_backup.py {operation}: {OPERATION_SUMMARIES[operation]}", "",
               f"usage: aam_auto_backup.py {operation} --settings FILE [--NAME VALUE ...]",
               f"       aam_auto_backup.py {operation} --NAME VALUE ...",
               f"       aam_auto_backup.py {operation} ARGUMENT ... (positional: "
               f"{self.count_text()}, in the order below)", ""]
        out += textwrap.wrap(
            "Named form: a setting is --NAME VALUE (or --NAME=VALUE) on the command line, or "
            "a line NAME = VALUE in the settings file (lines starting with # are comments; "
            "paths are absolute; \"\" is an empty value); an option overrides the file. A "
            "secret is written env:NAME there: it is read from environment variable NAME. "
            "Positional form: every argument, by number, \"\" for an empty one.", 90)
        out += ["", " #  name                 meaning"]
        for number, arg in enumerate(self.args[1:], 2):
            out += setting_help(number, arg)
        out += ["", "Example settings file:"]
        out += ["  " + line for line in self.example_settings()]
        out += ["", "Example, positional:",
                "  aam_auto_backup.py " + " ".join(
                    quote_for_posix_shell(text) for text in self.example_argv(operation))]
        out += ["", "docs/reference.md has the details; aam_auto_backup.py --help lists "
                "the operations."]
        return "\n".join(out)

    def example_settings(self):
        """The settings a user writes: the required ones and those needed by a rule (a
        default of empty); the rest have their defaults."""
        return [f"{arg.name} = {arg.example}" for arg in self.args[1:]
                if arg.example and not (arg.optional or arg.repeated)
                and (arg.named_default_text({}) is None or arg.named_default == "")]

    def example_argv(self, operation):
        texts = [operation]
        for arg in self.args[1:]:
            if arg.optional:
                break
            texts.append(arg.example or arg.named_default_text({}) or "")
        return texts


def setting_help(number, arg):
    """--help's lines for one setting: number, name, then its meaning, named-form default
    and example, wrapped under the meaning column."""
    text = arg.meaning or arg.label
    if arg.secret:
        text += ". Accepts env:NAME (the named form: only that)"
    if arg.optional or arg.repeated:
        text += ". Optional"
    if arg.repeated:
        text += f"; repeat --{arg.name} (or the line) for each, positionally one argument each"
    default = arg.default_text()
    text += f". Named form: default {default}" if default else ". Named form: required"
    if arg.example:
        text += f". Example: {arg.example}"
    first, *rest = textwrap.wrap(text + ".", 68, break_on_hyphens=False)
    return ([f"{number:2d}{'+' if arg.repeated else ' '} {arg.name:20s} {first}"]
            + [" " * 25 + line for line in rest])


def positional_origin(number, arg):
    return f"argument {number} ({arg.label})"


def quote_for_posix_shell(text):
    return shlex.quote(text) if text else '""'


class HelpRequested(Exception):
    """--help after an operation: its help is printed, nothing else is done."""

    def __init__(self, operation):
        super().__init__(operation)
        self.operation = operation


class NamedForm:
    """The named form of one command line: a settings file (--settings FILE) and
    --NAME VALUE options, an option overriding the file.

    The file is plain text, one NAME = VALUE a line, '#' starting a comment line,
    "..." around a value that must keep its outer spaces or be empty; a line of the
    repeated setting adds one item.  A line that is not a setting, an unknown name, a
    setting given twice, a relative path and a secret written out are refused, naming
    the file and line.  (configparser would need a [section] line and reports no
    line numbers.)  A setting that is not given takes the named default; one without
    a default is required.
    """

    def __init__(self, table, operation):
        self.table, self.operation = table, operation
        self.texts, self.origins = {}, {}     # field -> text (a list for the repeated)
        self.settings_file = None

    def parse(self, words):
        options, origins = self.read_options(words)
        if self.settings_file:
            self.read_file(self.settings_file)
        for field, text in options.items():
            self.texts[field], self.origins[field] = text, origins[field]
        given = dict(self.texts)
        missing = []
        for arg in self.table.args[1:]:
            if arg.field not in self.texts:
                default = arg.named_default_text(given)
                if default is None:
                    missing.append(arg.name)
                self.texts[arg.field] = default
                self.origins[arg.field] = f"the setting {arg.name} {NOT_GIVEN}"
        if missing:
            raise self.refuse(f"{self.operation}: missing setting(s) {', '.join(missing)} "
                              f"(aam_auto_backup.py {self.operation} --help says what each "
                              "is)")
        return self.checked()

    def refuse(self, text):
        return UsageError(text, self.operation, named=True)

    def read_options(self, words):
        options, origins, index = {}, {}, 0
        while index < len(words):
            word = words[index]
            if word in HELP_WORDS:
                raise HelpRequested(self.operation)
            if not word.startswith(NAMED_PREFIX):
                raise self.refuse(
                    f"argument {index + 2} is not a setting: the named form takes --NAME "
                    "VALUE (or --NAME=VALUE) only; "
                    f"aam_auto_backup.py {self.operation} --help lists the names")
            name, has_value, text = word[len(NAMED_PREFIX):].partition("=")
            if not has_value:
                if index + 1 == len(words):
                    raise self.refuse(f"--{name} needs a value (\"\" for an empty one)")
                index += 1
                text = words[index]
            index += 1
            if name == SETTINGS_OPTION:
                if self.settings_file is not None:
                    raise self.refuse("--settings is given twice")
                self.settings_file = os.path.abspath(os.path.expanduser(text))
                continue
            arg = self.setting(name, f"--{name}")
            origin = f"--{arg.name}"
            self.refuse_written_secret(arg, text, origin, "on the command line, where other "
                                       "users of this computer can read it")
            if arg.repeated:
                options.setdefault(arg.field, []).append(text)
                origins.setdefault(arg.field, []).append(origin)
            elif arg.field in options:
                raise self.refuse(f"--{arg.name} is given twice")
            else:
                options[arg.field], origins[arg.field] = text, origin
        return options, origins

    def setting(self, name, where):
        field = self.table.field_of(name)
        if field is None:
            names = [arg.name for arg in self.table.args[1:]]
            close = difflib.get_close_matches(name.replace("_", "-"), names, 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise self.refuse(f"{where}: {self.operation} has no setting {name!r}{hint}; "
                              f"its settings: {', '.join(names)}")
        return self.table.arg(field)

    def read_file(self, path):
        try:
            with open(path, encoding="utf-8-sig") as handle:
                lines = handle.read().splitlines()
        except OSError as problem:
            raise self.refuse(f"--settings: the settings file {path} cannot be read: "
                              f"{problem.strerror}")
        except UnicodeDecodeError:
            raise self.refuse(f"--settings: the settings file {path} is not UTF-8 text")
        first_line = {}
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            where = f"{path}, line {number}"
            name, is_setting, value = text.partition("=")
            name, value = name.strip(), unquote_setting(value.strip())
            if not is_setting or not name:
                raise self.refuse(f"{where}: not a setting; write NAME = VALUE (a comment "
                                  "line starts with #)")
            arg = self.setting(name, where)
            origin = f"{where}: {arg.name}"
            self.refuse_written_secret(arg, value, origin, "in a settings file")
            self.refuse_relative_path(arg, value, origin)
            if arg.repeated:
                self.texts.setdefault(arg.field, []).append(value)
                self.origins.setdefault(arg.field, []).append(origin)
            elif arg.field in first_line:
                raise self.refuse(f"{where}: {arg.name} is set again (first on line "
                                  f"{first_line[arg.field]})")
            else:
                first_line[arg.field] = number
                self.texts[arg.field], self.origins[arg.field] = value, origin

    def refuse_written_secret(self, arg, text, origin, where):
        if arg.secret and text and not text.startswith("env:"):
            raise self.refuse(f"{origin} must be env:NAME (the name of an environment "
                              f"variable that holds it) or empty: a secret is never written "
                              f"{where}")

    def refuse_relative_path(self, arg, text, origin):
        if not getattr(arg.check, "takes_path", False) or not text:
            return
        if arg.check is _executable and not any(sep in text for sep in "/\\"):
            return                          # a bare program name is looked up on PATH
        if not os.path.isabs(os.path.expanduser(text)):
            raise self.refuse(f"{origin} must be an absolute path in a settings file (a "
                              f"scheduled job does not start in your directory): {text!r}")

    def checked(self):
        values, raw = {}, [self.operation]
        for arg in self.table.args:
            if arg is self.table.args[0]:
                values[arg.field] = ArgTable.check_text(arg, self.operation, "argument 1",
                                                        self.operation, named=True)
                continue
            text, origin = self.texts[arg.field], self.origins[arg.field]
            if arg.repeated:
                origins = origin if isinstance(origin, list) else [origin] * len(text)
                values[arg.field] = [ArgTable.check_text(arg, item, where, self.operation,
                                                         named=True)
                                     for item, where in zip(text, origins)]
                raw += text
            else:
                values[arg.field] = ArgTable.check_text(arg, text, origin, self.operation,
                                                        named=True)
                raw.append(text)
        return Arguments(self.table, raw, values, self.origins, self.settings_file or "")


def unquote_setting(text):
    """A settings-file value: "..." around it keeps outer spaces, or makes it empty."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


class Arguments:
    """The checked arguments of one command line, as attributes named by the table.

    raw: the command's texts in the positional order (the named form's too), for the
    log.  origins: where the named form's values came from (None: positional);
    settings_file: the named form's settings file, if any."""

    def __init__(self, table, raw, values, origins=None, settings_file=None):
        self.table, self.raw = table, raw
        self.origins, self.settings_file = origins, settings_file
        self.__dict__.update(values)

    @property
    def named(self):
        return self.origins is not None

    @property
    def secrets(self):
        return [getattr(self, arg.field) for arg in self.table if arg.secret]

    def to_argv(self):
        return self.table.to_argv(vars(self))

    def given(self, field):
        """The user gave it (a positional command line gives every argument)."""
        origin = self.origins[field] if self.named else None
        return not isinstance(origin, str) or not origin.endswith(NOT_GIVEN)

    def where(self, field):
        """How a message names one argument: its number, or the setting's place."""
        if not self.named:
            return positional_origin(self.table.number(field), self.table.arg(field))
        return self.origins[field]

    def ref(self, field):
        """How a rule names another argument: 'argument 13', or 'destinations'."""
        return self.table.arg(field).name if self.named else self.table.ref(field)

    def error(self, field, problem, text=None):
        """A UsageError about one argument, named as the command line gave it."""
        shown = "" if text is None else f": {text!r}"
        return UsageError(f"{self.where(field)} {problem}{shown}", self.operation, self.named)

    def masked(self):
        """The command arguments, one per line, with every secret masked (for the log)."""
        lines = []
        if self.named:
            lines.append("named form" + (f", settings file {self.settings_file}"
                                         if self.settings_file else ""))
        return lines + [f"{number:2d}. {self.table.arg_at(number).label}: "
                        f"{mask_argument(text, self.table.arg_at(number).secret)}"
                        for number, text in enumerate(self.raw, 1)]


BACKUP_ARGS = ArgTable(
    "|".join(BACKUP_TABLE_OPERATIONS),
    dataclasses.replace(OPERATION_ROW, check=_choice(*BACKUP_TABLE_OPERATIONS),
                        meaning="regular-backup (daily, scheduled), "
                                "incremental-only-backup (by hand), or preview-backup "
                                "(what regular-backup would do, doing nothing)"),
    Arg("agent", "execution agent", _choice(USER_AGENT),
        meaning="the execution agent: user (the child pass is started with another)",
        named_default=USER_AGENT),
    Arg("python", "python executable", _executable,
        meaning="the Python the child pass is started with: a path, or a name found on PATH",
        named_default=_running_python, default_note="the Python running this program",
        example="/usr/bin/python3"),
    # Polled once a minute, a freed lock is taken within a minute; two hours cover a
    # night's incremental, and a full backup still running then is left to finish.
    Arg("lock_poll", "lock polling period (seconds)", _integer(1),
        meaning="while another backup holds the lock: seconds between tries to take it",
        named_default="60", example="600"),
    Arg("lock_wait", "lock total wait (seconds)", _integer(0),
        meaning="seconds to wait for the lock in all before giving up (exit 4)",
        named_default="7200", example="7200"),
    LOG_DIR, SEND_EMAIL, SENDER_NAME, SENDER_ADDRESS, RECIPIENT,
    Arg("instruction_file", "instruction file", _path,
        meaning="the instruction file: what to back up (docs/instructions.md)",
        example="/home/ann/backup-instructions.txt"),
    DRIVE_LETTER, DESTINATIONS, MIRROR_ROOT, KEEP,
    ENCRYPTION_KEY,
    # A backup without AWS uses no bucket: it is checked when destinations includes AWS.
    dataclasses.replace(BUCKET, check=_text, named_default="",
                        meaning="the S3 bucket (needed when destinations includes AWS)"),
    LOCATION, ACCESS_KEY_ID, SECRET_ACCESS_KEY, FORCE_FULL,
    Arg("auto_force_full", "automatic force full backup (yes/no)", _YES_NO,
        meaning="yes: a full backup when the instruction file changed after the latest "
                "complete full one (incremental-only-backup refuses instead, exit 6); no",
        named_default="yes", example="yes"),
)

# The child pass (started by the user-mode pass, never typed); the key travels
# as an env:NAME reference, never as text on the command line.
CHILD_ARGS = ArgTable(
    "<operation> ShadowSpawn ... (the child pass; never typed)",
    dataclasses.replace(OPERATION_ROW, check=_choice(*BACKUP_OPERATIONS)),
    Arg("agent", "execution agent", _choice(CHILD_AGENT)),
    Arg("latest_full", "latest complete full backup (UTC)", _stamp_or_none),
    Arg("latest_incremental", "latest complete incremental backup (UTC)", _stamp_or_none),
    Arg("start", "backup start (UTC)", _stamp),
    Arg("mount", "backup source (mount) directory", _path),
    DRIVE_LETTER, DESTINATIONS, MIRROR_ROOT, KEEP, ENCRYPTION_KEY, LOCATION,
    Arg("work_dir", "archive work directory", _path),
    FORCE_FULL,
    Arg("scope", "backup scope", _scope),
    named=False,
)

RESTORE_ARGS = ArgTable(
    "|".join(RESTORE_OPERATIONS),
    dataclasses.replace(OPERATION_ROW, check=_choice(*RESTORE_OPERATIONS)),
    LOG_DIR,
    dataclasses.replace(SEND_EMAIL, meaning=SEND_EMAIL.meaning + " (one-step only: the "
                        "four steps send none)"),
    SENDER_NAME, SENDER_ADDRESS, RECIPIENT,
    Arg("days", "restoration period (days)", _integer(1, 36500),
        meaning="days the thawed copies stay readable in S3 (billed meanwhile)", example="7"),
    DECRYPTION_KEY, BUCKET, LOCATION,
    _restore_user(ACCESS_KEY_ID), _restore_user(SECRET_ACCESS_KEY),
    Arg("destination", "restoration destination directory", _path,
        meaning="the directory the sources are restored into, as 1, 2, ... "
                "(restore-map.txt says which is which)",
        example="/media/usb/restored"),
    Arg("restore_point", "restore point: latest, or a UTC date-time", _restore_point,
        optional=True, default=LATEST,
        meaning="latest (or \"\"), a UTC date-time (20261115 143000, 2026-11-15 14:30, "
                "2026-11-15T14:30:00.5; seconds and fractions optional) or a date "
                "(2026-11-15: the end of that UTC day): the latest complete backup at or "
                "before it is restored", example="2026-11-15"),
    Arg("selection", "what to restore: a path as backed up, or a name pattern",
        _selection_item, repeated=True,
        meaning="what to restore: an absolute path as it was backed up, or a name (*.xlsx, "
                "Photos/) matched at any depth; none: everything",
        example="/home/ann/Documents/taxes/"),
)

BROWSE_ARGS = ArgTable(
    BROWSE_OPERATION,
    dataclasses.replace(OPERATION_ROW, check=_choice(BROWSE_OPERATION)),
    # Without a key the backups are listed, but no catalogue can be searched.
    dataclasses.replace(DECRYPTION_KEY, label="archive decryption key (\"\" to list the "
                        "backups only)", check=_text, named_default="",
                        meaning=DECRYPTION_KEY.meaning + "; empty: list the backups only"),
    BUCKET, LOCATION,
    _restore_user(ACCESS_KEY_ID), _restore_user(SECRET_ACCESS_KEY),
    Arg("selection", "what to find: a path as backed up, or a name pattern",
        _selection_item, repeated=True,
        meaning="what to find: a path or name, as in a restore's selection",
        example="/home/ann/Documents/report.docx"),
)

# Browse's arguments 2 to 6, in its order: a browse's command line becomes a check's
# by its first word (and without what to find).
CHECK_ARGS = ArgTable(
    CHECK_OPERATION,
    dataclasses.replace(OPERATION_ROW, check=_choice(CHECK_OPERATION)),
    dataclasses.replace(DECRYPTION_KEY, meaning=DECRYPTION_KEY.meaning + ": it opens "
                        "every catalogue, and is compared with each chain's key check"),
    BUCKET, LOCATION,
    _restore_user(ACCESS_KEY_ID), _restore_user(SECRET_ACCESS_KEY),
)

# The restore drill: the browse's arguments, without a selection (the drill chooses
# what to test), and how long the thawed copies stay.
DRILL_ARGS = ArgTable(
    DRILL_OPERATION,
    dataclasses.replace(OPERATION_ROW, check=_choice(DRILL_OPERATION)),
    DECRYPTION_KEY, BUCKET, LOCATION,
    _restore_user(ACCESS_KEY_ID), _restore_user(SECRET_ACCESS_KEY),
    # A Bulk thaw is done within 48 hours; three days of thawed copies let the run after
    # it (the scheduled one three days later, docs/scheduling.md) find them, for a few
    # cents' worth of storage at most.
    Arg("days", "restoration period (days)", _integer(1, 36500), optional=True,
        default="3",
        meaning="days the thawed copies stay readable in S3: the run that finishes the "
                "drill must come within them once the thaw is done", example="3"),
)

OPERATION_TABLES = {CHILD_AGENT: CHILD_ARGS, BROWSE_OPERATION: BROWSE_ARGS,
                    CHECK_OPERATION: CHECK_ARGS, DRILL_OPERATION: DRILL_ARGS,
                    **{op: BACKUP_ARGS for op in BACKUP_TABLE_OPERATIONS},
                    **{op: RESTORE_ARGS for op in RESTORE_OPERATIONS}}


OPERATION_SUMMARIES = {
    REGULAR_BACKUP: "the daily backup: the mirror, and a full or incremental backup to "
                    "S3 Glacier Deep Archive",
    INCREMENTAL_ONLY_BACKUP: "a quick incremental backup by hand (never a full one)",
    PREVIEW_BACKUP: "what regular-backup would do with the same settings, doing "
                    "nothing (it only lists S3)",
    ONE_STEP_RESTORE: "restore from Deep Archive in one command (thaw, wait, download, "
                      "extract)",
    THAW_STEP: "restore, step 1: plan and request the thaw",
    STATUS_STEP: "restore, step 2: look at the thaw once",
    DOWNLOAD_STEP: "restore, step 3: download what is thawed",
    EXTRACT_STEP: "restore, step 4: decrypt and extract",
    BROWSE_OPERATION: "list the backups, and the versions of chosen files (no thaw)",
    CHECK_OPERATION: "check every backup set of the location without a thaw (volumes, "
                     "catalogues, the key), with the storage per month and its cost",
    DRILL_OPERATION: "restore drill: thaw, download and test a few volumes of the latest "
                     "full backup (run again to finish it once thawed)",
}


def usage_text(operation):
    """A short usage text for one operation (or for all of them)."""
    table = OPERATION_TABLES.get(operation)
    if table is not None:
        return table.usage(None if operation == CHILD_AGENT else operation)
    lines = ["usage: aam_auto_backup.py <operation> --settings FILE [--NAME VALUE ...]",
             "   or: aam_auto_backup.py <operation> <arguments...> (positional; write empty "
             "values as \"\")",
             "operations:"]
    lines += [f"  {op}  ({OPERATION_TABLES[op].count_text()})"
              for op in BACKUP_TABLE_OPERATIONS + RESTORE_OPERATIONS
              + (BROWSE_OPERATION, CHECK_OPERATION, DRILL_OPERATION)]
    lines.append("Run 'aam_auto_backup.py <operation> --help' to see its settings; "
                 "docs/reference.md has the details.")
    return "\n".join(lines)


def named_usage_text(operation):
    return (f"usage: aam_auto_backup.py {operation} --settings FILE [--NAME VALUE ...]\n"
            f"'aam_auto_backup.py {operation} --help' says what each setting is.")


def overview_text():
    """What --help prints: what the program does, its operations, and where to read on."""
    lines = [f"{PROGRAM_NAME} {VERSION}: mirrors chosen directories to a local or USB "
             "drive and keeps",
             "encrypted, multi-volume ZIP archives of them in AWS S3 Glacier Deep Archive "
             "(a full",
             "backup each month, incrementals between), reports by e-mail, and restores "
             "exactly.", "",
             "usage: aam_auto_backup.py <operation> --settings FILE [--NAME VALUE ...]",
             "   or: aam_auto_backup.py <operation> <arguments...> (positional)", "",
             "operations:"]
    for operation, summary in OPERATION_SUMMARIES.items():
        lines += [f"  {operation} ({OPERATION_TABLES[operation].count_text()})",
                  f"      {summary}"]
    lines += ["", "Run 'aam_auto_backup.py <operation> --help' for its settings; "
              "docs/reference.md has the details.",
              "aam_auto_backup.py --version prints the version."]
    return "\n".join(lines)


def resolve_secret(text):
    """'env:NAME' reads the secret from environment variable NAME."""
    if text.startswith("env:"):
        name = text[4:]
        if name not in os.environ:
            raise ValueError(f"names environment variable {name}, which is not set")
        return os.environ[name]
    return text


def mask_argument(text, is_secret):
    if not is_secret:
        return text
    if text.startswith("env:"):
        return text                      # a reference, not the secret itself
    return "(empty)" if not text else "********"


def parse_backup_args(argv):
    operation = argv[0] if argv else ""
    args = BACKUP_ARGS.parse(argv, operation)
    if args.operation == INCREMENTAL_ONLY_BACKUP and args.force_full:
        raise args.error("force_full", "must be no for incremental-only-backup, which never "
                         "makes a full backup (run regular-backup for one)", "yes")
    if args.send_email:
        check_email_addresses(args, ("sender_address", "recipient"))
    if "local" in args.destinations and not args.mirror_root:
        raise args.error("mirror_root", f"is required when {args.ref('destinations')} "
                         "includes local")
    if "AWS" in args.destinations:
        aws_rule = f"when {args.ref('destinations')} includes AWS"
        for field, check in (("bucket", _bucket), ("key", _key)):
            if not args.given(field):
                raise args.error(field, f"is required {aws_rule}")
            try:
                check(getattr(args, field))
            except ValueError as problem:
                shown = None if field == "key" else getattr(args, field)
                raise args.error(field, f"{problem} {aws_rule}", shown)
    check_key_pair(args)
    return args


def parse_child_args(argv):
    return CHILD_ARGS.parse(argv, CHILD_AGENT)


def parse_restore_args(argv):
    operation = argv[0] if argv else ""
    args = RESTORE_ARGS.parse(argv, operation)
    if args.send_email and operation == ONE_STEP_RESTORE:
        check_email_addresses(args, ("sender_address", "recipient"))
    check_key_pair(args)
    return args


def parse_browse_args(argv):
    args = BROWSE_ARGS.parse(argv, BROWSE_OPERATION)
    if args.selection or args.key:
        try:
            _key(args.key)
        except ValueError as problem:
            raise args.error("key", f"{problem} (it decrypts the catalogues that are "
                             "searched)")
    check_key_pair(args)
    return args


def parse_check_args(argv):
    args = CHECK_ARGS.parse(argv, CHECK_OPERATION)
    check_key_pair(args)
    return args


def parse_drill_args(argv):
    args = DRILL_ARGS.parse(argv, DRILL_OPERATION)
    check_key_pair(args)
    return args


def check_email_addresses(args, fields):
    for field in fields:
        if "@" not in getattr(args, field):
            raise args.error(field, f"must be an e-mail address when {args.ref('send_email')} "
                             "is True", getattr(args, field))


def check_key_pair(args):
    if bool(args.access_key_id) != bool(args.secret_access_key):
        if args.named:
            raise UsageError("access-key-id and secret-access-key must both be given, or "
                             "both be empty to use the default AWS credential chain",
                             args.operation, named=True)
        raise UsageError(f"{args.table.credentials_ref()} must both be given, or both "
                         "be \"\" to use the default AWS credential chain", args.operation)


def child_arguments(**values):
    """The child's arguments from values by field name (the parent's side)."""
    return Arguments(CHILD_ARGS, [], values)


# ============================================================================
# Instruction file (docs/instructions.md)
# ============================================================================

WILDCARD_CHARS = "*?"


@dataclasses.dataclass
class Exclusion:
    text: str          # as written, without the trailing separator
    line: int
    is_path: bool      # an absolute path (else a name, wildcards allowed)


@dataclasses.dataclass
class Instructions:
    backup_dirs: list          # (path, line), normalized absolute paths
    excluded_dirs: list        # Exclusion
    excluded_files: list       # Exclusion


def read_instruction_file(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise InstructionError(f"{BACKUP_ARGS.ref('instruction_file')}: the instruction "
                               f"file {path} does not exist")
    except OSError as problem:
        raise InstructionError(f"{BACKUP_ARGS.ref('instruction_file')}: the instruction "
                               f"file {path} cannot be read: "
                               f"{problem.strerror}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise InstructionError(f"{path}, line {line}: the file is not UTF-8 text")


def _is_comment(line):
    # '# ...' is a comment; '#*#' (a name pattern) is not.
    return line.startswith("#") and (len(line) == 1 or line[1] in " \t")


def _split_blocks(text, path):
    """Split the text into its three blocks: [(line number, entry), ...] each.

    One empty line separates blocks; an empty exclusion block is one more empty
    line, so three empty lines in a row skip the excluded-directories block.
    """
    groups, gaps = _line_groups(text)
    if not groups:
        raise InstructionError(f"{path}: no directory to back up is listed "
                               "(block 1 is empty)")
    blocks, position = [groups[0], [], []], 1
    for group, (run, start) in zip(groups[1:], gaps):
        if run == 1:
            position += 1
        elif run == 3 and position == 1:
            position += 2
        else:
            raise InstructionError(
                f"{path}, line {start}: {run} empty lines in a row; separate the blocks "
                "with one empty line (an empty excluded-directories block is one more "
                "empty line, so three in a row)")
        if position > 3:
            raise InstructionError(f"{path}, line {group[0][0]}: a fourth block; the "
                                   "instruction file has three blocks")
        blocks[position - 1] = group
    return blocks


def _line_groups(text):
    """The runs of non-empty lines ([(line number, entry)] each), and before each run
    after the first, (how many empty lines, the first of them)."""
    groups, gaps, run, run_start = [], [], 0, None
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.rstrip()
        if _is_comment(line.lstrip()):
            continue
        if not line.strip():
            if groups:                      # blank lines before block 1 are ignored
                run += 1
                run_start = run_start or number
            continue
        if groups and run == 0:
            groups[-1].append((number, line))
        else:
            if groups:
                gaps.append((run, run_start))
            groups.append([(number, line)])
        run, run_start = 0, None
    return groups, gaps


def parse_instructions(text, path, platform):
    """Parse and check the instruction file; errors name the line."""
    listed, excluded_dirs, excluded_files = _split_blocks(text, path)
    backup_dirs = []
    for number, entry in listed:
        where = f"{path}, line {number}"
        if not platform.is_absolute(entry):
            raise InstructionError(f"{where}: {entry!r} is a relative path; directories "
                                   "to back up must be absolute paths")
        if any(c in entry for c in WILDCARD_CHARS):
            raise InstructionError(f"{where}: {entry!r} has a wildcard; directories to "
                                   "back up must be full paths without wildcards")
        backup_dirs.append((platform.normalize(entry), number))
    dirs = [_parse_exclusion(n, e, path, platform, True) for n, e in excluded_dirs]
    files = [_parse_exclusion(n, e, path, platform, False) for n, e in excluded_files]
    return Instructions(backup_dirs, dirs, files)


def _parse_exclusion(number, entry, path, platform, is_dir):
    where = f"{path}, line {number}"
    sep = platform.sep
    kind = "directory" if is_dir else "file"
    if is_dir:
        if not entry.endswith(sep):
            raise InstructionError(f"{where}: excluded directory {entry!r} must end with "
                                   f"{sep!r}")
        entry = entry.rstrip(sep)
        if not entry:
            raise InstructionError(f"{where}: an excluded directory cannot be the root")
    elif entry.endswith(sep):
        raise InstructionError(f"{where}: excluded file {entry!r} must not end with {sep!r} "
                               "(directories go in block 2)")
    is_path = platform.is_absolute(entry + (sep if is_dir else ""))
    has_wildcard = any(c in entry for c in WILDCARD_CHARS)
    bad = sorted({c for c in (entry[2:] if is_path else entry)
                  if c in platform.invalid_name_chars})
    if bad:
        raise InstructionError(f"{where}: {entry!r} has {''.join(bad)!r}, which a "
                               f"{kind} name cannot contain")
    if is_path:
        if has_wildcard:
            raise InstructionError(f"{where}: {entry!r} has a wildcard in a full path; "
                                   f"wildcards are allowed only in {kind} names")
        return Exclusion(platform.normalize(entry), number, True)
    if any(c in entry for c in platform.separators):
        raise InstructionError(f"{where}: {entry!r} is a relative path; give a {kind} "
                               "name or an absolute path")
    return Exclusion(entry, number, False)


def compute_mounts(directories, platform):
    """Shortest shared parent directories other than the root.

    One pass over the sorted element lists, comparing each with the last mount.
    """
    mounts = []
    for elements in sorted(platform.split(platform.comparable(d)) for d in directories):
        if not mounts:
            mounts.append(elements)
            continue
        last = mounts[-1]
        shared = 0
        while shared < min(len(last), len(elements)) and last[shared] == elements[shared]:
            shared += 1
        if shared == len(last):
            continue                       # already inside the last mount
        if shared >= 2:
            mounts[-1] = last[:shared]     # share more than the root: shorten
        else:
            mounts.append(elements)
    return [platform.join(m) for m in mounts]


@dataclasses.dataclass
class SourcePlan:
    """One mount directory and what is backed up inside it (paths relative to it)."""

    mount: str
    listed: list                  # relative directories; "" = the whole mount
    excluded_dir_paths: list      # relative
    excluded_file_paths: list     # relative
    dir_patterns: list
    file_patterns: list


@dataclasses.dataclass
class BackupPlan:
    sources: list                 # SourcePlan, in mount order
    notes: list                   # lines for the log (ignored, covered, excluded)
    listed: list                  # the existing directories to back up
    instructions: object = None   # the Instructions it was made from (their line numbers)


def _relative(path, mount, platform):
    """path relative to mount ('' if equal), or None if it is not inside."""
    sep = platform.sep
    p, m = platform.comparable(path), platform.comparable(mount)
    if p == m:
        return ""
    prefix = m if m.endswith(sep) else m + sep
    if p.startswith(prefix):
        return path[len(prefix):]
    return None


def wildcard_regex(pattern, case_insensitive):
    """A compiled regex for a '*'/'?' name pattern; every other character is literal."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


def plan_backup(instructions, platform, extra_excluded=()):
    """Existing listed directories -> mounts with their relative selections.

    extra_excluded: absolute paths the program excludes itself (the mirror
    destination and the work directory when they lie inside a source).
    """
    notes = []
    existing = existing_listed(instructions, platform, notes)
    dir_paths = [e.text for e in instructions.excluded_dirs if e.is_path]
    file_paths = [e.text for e in instructions.excluded_files if e.is_path]
    dir_patterns = [e.text for e in instructions.excluded_dirs if not e.is_path]
    file_patterns = [e.text for e in instructions.excluded_files if not e.is_path]
    for entry in instructions.excluded_dirs + instructions.excluded_files:
        if entry.is_path and not os.path.lexists(platform.long_path(entry.text)):
            notes.append(f"line {entry.line}: ignored, {entry.text} does not exist")
    kept = not_excluded(existing, dir_paths, dir_patterns, platform, notes)
    covered = outermost(kept, platform, notes)

    def relative_to(mount, paths):
        return [r for r in (_relative(p, mount, platform) for p in paths) if r]

    sources = [SourcePlan(
        mount=_original_case(mount, covered, platform),
        listed=sorted(r for r in (_relative(p, mount, platform) for p in covered)
                      if r is not None),
        excluded_dir_paths=relative_to(mount, dir_paths) + relative_to(mount, extra_excluded),
        excluded_file_paths=relative_to(mount, file_paths),
        dir_patterns=dir_patterns, file_patterns=file_patterns)
        for mount in compute_mounts(covered, platform)]
    return BackupPlan(sources, notes, covered, instructions)


def existing_listed(instructions, platform, notes):
    """The listed directories that exist, each once: [(path, line)]."""
    existing, seen = [], set()
    for path, number in instructions.backup_dirs:
        key = platform.comparable(path)
        if key in seen:
            notes.append(f"line {number}: {path} is listed twice; it is backed up once")
            continue
        seen.add(key)
        if not os.path.isdir(platform.long_path(path)):
            notes.append(f"line {number}: ignored, the directory {path} does not exist")
            continue
        existing.append((path, number))
    return existing


def not_excluded(existing, dir_paths, dir_patterns, platform, notes):
    """A listed directory that is also excluded is not backed up: exclusion wins."""
    dir_regexes = [wildcard_regex(p, platform.case_insensitive) for p in dir_patterns]
    kept = []
    for path, number in existing:
        basename = platform.split(path)[-1]
        excluded_by = next((d for d in dir_paths
                            if _relative(path, d, platform) is not None), None)
        if excluded_by is None and any(r.fullmatch(basename) for r in dir_regexes):
            excluded_by = "a directory-name exclusion"
        if excluded_by:
            notes.append(f"line {number}: {path} is listed and excluded "
                         f"({excluded_by}); exclusion wins, it is not backed up")
            continue
        kept.append(path)
    return kept


def outermost(paths, platform, notes):
    """A directory inside another listed directory is covered by its parent."""
    covered = []
    for path in paths:
        parent = next((o for o in paths if o != path
                       and _relative(path, o, platform) is not None), None)
        if parent:
            notes.append(f"{path} is inside {parent} and is backed up with it")
        else:
            covered.append(path)
    return covered


def colliding_sources(plan, platform):
    """An InstructionError naming two mounts that share one S3 source name, or None.

    Object names hold a mount only as its source name ('/' and ':' become '-'),
    which cannot tell /data-x/b-c from /data-x-b/c: both sets would share one name
    and a restore would give one directory's files as the other's.
    """
    seen = {}
    for source in plan.sources:
        name = platform.source_name(source.mount)
        if name in seen:
            return InstructionError(
                f"The directories {seen[name]} and {source.mount} would share the S3 name "
                f"{name}, so a restore could not tell their backups apart; nothing was "
                "backed up. List one of them through its parent directory instead "
                "(excluding what else it holds), so that it gets a name of its own.")
        seen[name] = source.mount
    return None


def _original_case(mount, paths, platform):
    """The mount as the user wrote it (mounts are computed on comparable paths)."""
    for path in paths:
        if platform.comparable(path[:len(mount)]) == mount and (
                len(path) == len(mount) or path[len(mount)] == platform.sep
                or mount.endswith(platform.sep)):
            return path[:len(mount)]
    return mount


def write_source_plan(path, plan, view_root, platform):
    """The per-mount instruction copy handed to the child (shadow_copy_instruction.txt).

    Same three-block format as the instruction file, with the paths on the
    child's view of the mount (the shadow drive on Windows).
    """
    sep = platform.sep

    def absolute(rel):
        return view_root.rstrip(sep) + sep + rel if rel else view_root

    block1 = [absolute(r) for r in plan.listed]
    block2 = [absolute(r) + sep for r in plan.excluded_dir_paths] + \
        [p + sep for p in plan.dir_patterns]
    block3 = [absolute(r) for r in plan.excluded_file_paths] + list(plan.file_patterns)
    text = "\n".join(block1) + "\n\n" + ("\n".join(block2) if block2 else "") + \
        "\n\n" + "\n".join(block3) + "\n"
    _write_private_text(path, text)


def read_source_plan(path, view_root, platform):
    """The child's side of write_source_plan: back to a SourcePlan relative to view_root."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    instructions = parse_instructions(text, path, platform)

    def rel(p):
        return _relative(p, platform.normalize(view_root), platform)

    return SourcePlan(
        mount=view_root,
        listed=[rel(p) for p, _n in instructions.backup_dirs],
        excluded_dir_paths=[rel(e.text) for e in instructions.excluded_dirs if e.is_path],
        excluded_file_paths=[rel(e.text) for e in instructions.excluded_files if e.is_path],
        dir_patterns=[e.text for e in instructions.excluded_dirs if not e.is_path],
        file_patterns=[e.text for e in instructions.excluded_files if not e.is_path])


# ============================================================================
# Selection: which files of a mount the backup holds
# ============================================================================

BY_NAME = operator.attrgetter("name")      # directory entries in catalogue order


class Selector:
    """The single definition of 'excluded' for the walk, validation and tests."""

    def __init__(self, plan, platform):
        comparable, ci = platform.comparable, platform.case_insensitive
        self.comparable = comparable
        self.dir_paths = {comparable(p) for p in plan.excluded_dir_paths}
        self.file_paths = {comparable(p) for p in plan.excluded_file_paths}
        # one regex per kind: the walk asks once per entry
        self.dir_names = any_of(plan.dir_patterns, ci)
        self.file_names = any_of(plan.file_patterns, ci)

    def dir_excluded(self, relative, name):
        return bool((self.dir_paths and self.comparable(relative) in self.dir_paths)
                    or (self.dir_names and self.dir_names.fullmatch(name)))

    def file_excluded(self, relative, name):
        return bool((self.file_paths and self.comparable(relative) in self.file_paths)
                    or (self.file_names and self.file_names.fullmatch(name)))


def any_of(patterns, case_insensitive):
    """One regex matching what any of the name patterns matches (None: no pattern)."""
    if not patterns:
        return None
    regexes = [wildcard_regex(p, case_insensitive).pattern for p in patterns]
    return re.compile("|".join(f"(?:{r})" for r in regexes),
                      re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


@dataclasses.dataclass
class WalkedEntry:
    """One selected directory, file or symbolic link met by a TreeWalk."""

    __slots__ = ("path", "st", "recent", "empty")
    path: str          # relative to the mount, platform separators
    st: os.stat_result
    recent: bool       # changed at or after the walk's 'since' (always, without one)
    empty: bool        # a directory with no entries at all


JUNCTION = "a junction"      # a special directory (Windows): not followed, not backed up


def special_kind(mode):
    """What a directory entry that is neither a file, a directory nor a link is (None
    for those three): never backed up, named in the log."""
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode):
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file, directory or link"


class TreeWalk:
    """A walk of a mount's listed directories, in catalogue order, skipping exclusions.

    Iterating yields a WalkedEntry for every selected directory (the listed ones
    included), file and symbolic link; links are never followed.  Entries come
    depth first with the names of each directory sorted, which is the order of
    catalogue_key, so that a walk can be merged with the previous catalogue
    line by line, and memory holds one directory listing per level, never the
    whole tree.  Unreadable directories, sockets and the like and excluded entries
    are gathered as the walk goes.

    since: 'recent' means changed at or after it (platform.changed_time), and
    everything under a directory moved or renamed since then is recent too
    (its files keep their old times, but their path is new).
    """

    def __init__(self, root, plan, platform, since=None):
        self.root, self.plan, self.platform = root, plan, platform
        self.selector = Selector(plan, platform)
        self.since_ts = None if since is None else since.timestamp()
        self.problems = []        # unreadable directories and entries
        self.unreadable = []      # their relative paths: what is under them is unknown
        self.specials = []        # (path, what): sockets, FIFOs, devices, junctions
        self.excluded = []        # (relative path, is_dir)

    def absolute(self, relative):
        sep = self.platform.sep
        return self.root.rstrip(sep) + sep + relative if relative else self.root

    def __iter__(self):
        sep = self.platform.sep
        for top in sorted(self.plan.listed, key=lambda r: catalogue_key(r, sep)):
            try:
                st = os.lstat(self.platform.long_path(self.absolute(top)))
            except OSError as problem:
                self.note_unreadable(top, problem, "directory ")
                continue
            entries = self.listing(top)
            if top:
                yield WalkedEntry(top, st, self.is_recent(st, self.since_ts), not entries)
            yield from self.descend(top, entries, self.since_ts)

    def descend(self, top, entries, cutoff):
        """Depth first below top; the stack holds one sorted listing per level."""
        stack = [(top, iter(entries), cutoff)]
        while stack:
            parent, remaining, cutoff = stack[-1]
            entry = next(remaining, None)
            if entry is None:
                stack.pop()
                continue
            walked = self.visit(parent, entry, cutoff)
            if walked is None:
                continue
            if stat.S_ISDIR(walked.st.st_mode):
                below = None if (cutoff is not None and walked.recent
                                 and self.platform.moved_since(walked.st, cutoff)) else cutoff
                entries = self.listing(walked.path)
                walked.empty = not entries
                yield walked
                stack.append((walked.path, iter(entries), below))
            else:
                yield walked

    def visit(self, parent, entry, cutoff):
        """The WalkedEntry for one directory entry, or None (excluded, special, unreadable)."""
        rel = parent + self.platform.sep + entry.name if parent else entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as problem:
            self.note_unreadable(rel, problem)
            return None
        if stat.S_ISDIR(st.st_mode):
            if self.platform.is_junction(st):
                self.specials.append((rel, JUNCTION))
                return None
            if self.selector.dir_excluded(rel, entry.name):
                self.excluded.append((rel, True))
                return None
            moved = cutoff is not None and self.platform.moved_since(st, cutoff)
            return WalkedEntry(rel, st, moved or self.is_recent(st, cutoff), False)
        special = self.platform.special_file_kind(st) or special_kind(st.st_mode)
        if special:
            self.specials.append((rel, special))
            return None
        if self.selector.file_excluded(rel, entry.name):
            self.excluded.append((rel, False))
            return None
        return WalkedEntry(rel, st, self.is_recent(st, cutoff), False)

    def is_recent(self, st, cutoff):
        return cutoff is None or self.platform.changed_time(st) >= cutoff

    def listing(self, relative):
        """The entries of one directory, sorted by name ([] when it cannot be read)."""
        try:
            with os.scandir(self.platform.long_path(self.absolute(relative))) as iterator:
                return sorted(iterator, key=BY_NAME)
        except OSError as problem:
            self.note_unreadable(relative, problem, "directory ")
            return []

    def note_unreadable(self, relative, problem, kind=""):
        self.problems.append(f"cannot read {kind}{self.absolute(relative)}: "
                             f"{problem.strerror or problem}")
        self.unreadable.append(relative)

    def files(self):
        """Walk to the end; the selected files and links (tests, the mirror check)."""
        return [w for w in self if not stat.S_ISDIR(w.st.st_mode)]


# ============================================================================
# Catalogue: the state of each source at each backup
# ============================================================================

# Every backup of a source gets a catalogue: a text file, one line per selected
# directory, file and symbolic link, with where its content is.  A full backup's
# catalogue lists everything ("listing"); an incremental's lists only what was
# added, changed or deleted since the backup before it ("delta"), so it grows
# with the changes, not with the tree.  The latest state is kept locally too,
# because the backup keys cannot read S3.  Lines are sorted by catalogue_key.
CATALOGUE_FORMAT = "aam-auto-backup-catalogue"
# 2: a backup's archive is made of pieces: the header's "pieces" replaces "archive", and
# a location names its piece (<backup>:<piece>:<first>-<last>).  Version 1's locations
# (<backup>:<first>-<last>) stay valid: they name the legacy piece of an earlier backup.
CATALOGUE_VERSION = 2
CATALOGUE_COLUMNS = ("type", "path", "size", "mtime_ns", "mode", "location", "target")
LISTING, DELTA = "listing", "delta"
FILE, DIRECTORY, LINK, DELETED = "f", "d", "l", "-"
NO_CONTENT = "-"          # location of a directory: nothing in any archive
ARCHIVED_NOW = "+"        # content in this run's archive; its volumes come at the end
UNKNOWN = "?"             # in an earlier backup of the chain; found by path at restore
MISSING = "!"             # not in any archive: it could not be read when backed up
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE_RE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})")


def catalogue_key(path, sep="/"):
    """The sort key of catalogue lines: a directory's entries right after it."""
    return path.replace(sep, "\0")


def escape_field(text):
    """A path or link target on one line: \\\\ \\t \\n \\r, \\xNN for bytes that are not
    UTF-8 (POSIX names are bytes) and other control characters."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xdc00:02x}")
        elif "\ud800" <= char <= "\udfff":
            out.append(f"\\u{ord(char):04x}")
        elif ord(char) < 0x20 or ord(char) == 0x7f:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def unescape_field(text):
    if "\\" not in text:
        return text

    def one(match):
        code = match[1]
        if code[0] == "x":
            byte = int(code[1:], 16)
            return chr(byte) if byte < 0x80 else chr(0xdc00 + byte)
        if code[0] == "u":
            return chr(int(code[1:], 16))
        return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[code]
    return _UNESCAPE_RE.sub(one, text)


class Entry(typing.NamedTuple):
    """One catalogue line.  path: relative to the source, '/' between names."""

    kind: str
    path: str
    size: int = 0
    mtime: int = 0         # nanoseconds since the epoch
    mode: int = 0          # permission bits
    location: str = NO_CONTENT
    target: str = ""

    @property
    def key(self):
        return catalogue_key(self.path)

    def line(self):
        return (f"{self.kind}\t{escape_field(self.path)}\t{self.size}\t{self.mtime}\t"
                f"{self.mode:o}\t{self.location}\t{escape_field(self.target)}\n")

    @classmethod
    def parse(cls, line):
        kind, path, size, mtime, mode, location, target = line.rstrip("\n").split("\t")
        return cls(kind, unescape_field(path), int(size), int(mtime), int(mode, 8),
                   location, unescape_field(target))

    def same_state(self, other):
        """Same type, size, time, permissions and link target (content not compared)."""
        return other is not None and self[:5] == other[:5] and self.target == other.target


def entry_from_stat(path, st, target=""):
    if stat.S_ISDIR(st.st_mode):
        return Entry(DIRECTORY, path, 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    kind = LINK if stat.S_ISLNK(st.st_mode) else FILE
    return Entry(kind, path, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                 ARCHIVED_NOW, target)


def located(stamp, piece, first, last):
    """The location of content in volumes first to last of a piece of the backup stamp."""
    return f"{stamp}:{piece}:{first}-{last}"


def parse_location(location):
    """(backup stamp, piece, first volume, last volume) of a location, or None (a
    directory's, a missing file's).  A version 1 location names the legacy piece."""
    parts = location.split(":")
    if len(parts) == 2:
        parts.insert(1, LEGACY_PIECE)
    if len(parts) != 3:
        return None
    first, _, last = parts[2].partition("-")
    return parts[0], int(parts[1]), int(first), int(last)


def catalogue_header(header):
    """The first line: the format, its version, and what the catalogue describes."""
    return (f"#{CATALOGUE_FORMAT}\t{CATALOGUE_VERSION}\t"
            f"{json.dumps(header, sort_keys=True)}\n"
            "#" + "\t".join(CATALOGUE_COLUMNS) + "\n")


class CatalogueFile:
    """A catalogue on disk: its header, then its entries in order, read lazily."""

    def __init__(self, path):
        self.path = path
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            first = handle.readline()
        parts = first.rstrip("\n").split("\t", 2)
        if len(parts) != 3 or parts[0] != "#" + CATALOGUE_FORMAT:
            raise ValueError(f"{path} is not an AAM Auto Backup catalogue")
        if int(parts[1]) > CATALOGUE_VERSION:
            raise ValueError(f"{path} was written by a newer version of AAM Auto Backup")
        self.version = int(parts[1])
        self.header = json.loads(parts[2])

    def __iter__(self):
        with open(self.path, encoding="utf-8", errors="surrogateescape") as handle:
            for line in handle:
                if not line.startswith("#"):
                    yield Entry.parse(line)


class CatalogueWriter:
    """Writes catalogue lines (owner-only file: the names are private)."""

    def __init__(self, path, header):
        self.handle = open_private(path)
        self.handle.write(catalogue_header(header))
        self.count = 0

    def write(self, entry):
        self.write_line(entry.line())

    def write_line(self, line):
        self.handle.write(line)
        self.count += 1

    def close(self):
        self.handle.close()


# -- the local state: the latest catalogue of each source ------------------------------

STATE_KEEP = 2     # states kept per source: the latest and the one before (see below)


def state_file_prefix(state_dir, bucket, location, source_name):
    """Where a source's local states live; the name is a digest (any source path fits)."""
    digest = hashlib.sha256(f"{bucket}\0{location}\0{source_name}".encode(
        "utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(state_dir, f"{location}-{digest}")


def find_local_state(prefix, full, backup):
    """The local state of exactly that backup, or None.

    The state of the backup before the latest is kept too: when a run fails
    for one source, the next run builds on the backup before it, for all.
    """
    path = f"{prefix}.{format_stamp(backup)}.tsv"
    try:
        header = CatalogueFile(path).header
    except (OSError, ValueError):
        return None
    if (header.get("full_backup"), header.get("backup"), header.get("kind")) != (
            format_stamp(full), format_stamp(backup), LISTING):
        return None
    return path


def local_state_paths(prefix):
    """A source's local states, oldest first (the names sort by backup time)."""
    directory, base = os.path.split(prefix)
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.startswith(base + ".") and n.endswith(".tsv")]


def newest_local_state(prefix):
    """The header of a source's newest local state, or None."""
    try:
        paths = local_state_paths(prefix)
    except OSError:
        return None
    for path in reversed(paths):
        with contextlib.suppress(OSError, ValueError):
            return CatalogueFile(path).header
    return None


# A local state ends in a line '#end<TAB><entries><TAB><digest>': the digest is an
# HMAC-SHA256 of every byte before that line, keyed from the archive key, the bucket,
# the location and the source, so that a state cut short (a full disk, a crash),
# damaged, or of another source, location, bucket or key is found by its content,
# never taken for this source's by luck.  Readers of catalogues skip '#' lines.
STATE_END = "#end"
# PBKDF2 rounds of the digest's key: the states, like the volumes, must not be a
# cheaper test of key guesses (ZIP AES: 1,000 rounds of SHA-1); 10 ms once a run.
STATE_KEY_ROUNDS = 10_000


def local_state_key(archive_key, bucket, location):
    """The key of the local states' digests for one bucket and location."""
    salt = f"aam-auto-backup local state\0{bucket}\0{location}".encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", archive_key.encode("utf-8"), salt,
                               STATE_KEY_ROUNDS)


def state_digest(state_key, source_name, path, length):
    """(HMAC of the first length bytes of path for this source, their line count)."""
    mac = hmac.new(state_key, source_name.encode("utf-8", "surrogateescape") + b"\0",
                   hashlib.sha256)
    lines = 0
    with open(path, "rb") as handle:
        while length > 0:
            block = handle.read(min(length, MIB))
            if not block:
                break
            mac.update(block)
            lines += block.count(b"\n")
            length -= len(block)
    return mac.hexdigest(), lines


def seal_local_state(path, state_key, source_name):
    """Append the end line (entry count and digest) to a state just written."""
    digest, lines = state_digest(state_key, source_name, path, os.path.getsize(path))
    with open(path, "a", encoding="ascii", newline="\n") as handle:
        handle.write(f"{STATE_END}\t{lines - 2}\t{digest}\n")     # 2 header lines


def local_state_problem(path, state_key, source_name):
    """Why the local state at path cannot be trusted, or None: its end line's entry
    count and digest must match what it holds (one read; the lines are not parsed)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 256))
            tail = handle.read()
    except OSError as problem:
        return f"it cannot be read ({problem.strerror or problem})"
    end = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
    fields = end.rstrip(b"\n").split(b"\t")
    if not end.endswith(b"\n") or fields[0] != STATE_END.encode() or len(fields) != 3 \
            or not fields[1].isdigit():
        return ("it has no end line: it was cut short (a full disk, a crash), or written "
                "by version 1.1.0 or earlier")
    try:
        digest, lines = state_digest(state_key, source_name, path, size - len(end))
    except OSError as problem:
        return f"it cannot be read ({problem.strerror or problem})"
    if lines - 2 != int(fields[1]):
        return f"it holds {max(lines - 2, 0):,} entries, its end line says {int(fields[1]):,}"
    if not hmac.compare_digest(digest.encode(), fields[2]):
        return ("its digest does not match: it was changed or damaged, or belongs to "
                "another source, location or bucket, or was written with another archive "
                "key")
    return None


def save_local_state(prefix, work_path, backup):
    """Move a finished state into the state directory; keep the STATE_KEEP newest."""
    os.makedirs(os.path.dirname(prefix), mode=0o700, exist_ok=True)
    os.replace(work_path, f"{prefix}.{format_stamp(backup)}.tsv")
    for path in local_state_paths(prefix)[:-STATE_KEEP]:
        with contextlib.suppress(OSError):
            os.remove(path)


# -- the child's side: what changed since the previous catalogue -----------------------

# The child writes one work file: the new state, each line flagged CHANGED when
# it also belongs in a delta (new, changed or archived), and DELETED lines for
# what is gone.  The parent turns it into the catalogue uploaded to S3 and the
# next local state once it knows where each archived file's bytes lie.
UNCHANGED, CHANGED = "=", "*"


class ChangeRecorder:
    """Merges a walk with the previous state (both in catalogue order).

    previous: the path of the local state of the backup this one builds on, or
    None when there is none to trust (a full backup, or a missing or foreign
    state: then only the time rule decides, and every line is written with
    UNKNOWN).  An unchanged entry's line is the previous one, copied as it is:
    most of a nightly backup's entries are, and it is what keeps it fast.

    done: for a continued backup, the entries its done pieces already hold
    (DoneEntries, a third stream in the same order); an entry this backup would
    archive that one of them holds is not archived again: its line is taken.
    list_file(walked) puts an entry to archive into a piece and returns the
    piece's list number, which its work-file line carries (+<n>).
    """

    def __init__(self, walk, previous, platform, archive_all, done=None):
        self.walk, self.platform, self.archive_all = walk, platform, archive_all
        self.known = previous is not None
        self.previous = previous_lines(previous) if self.known else iter(())
        self.pending = next(self.previous, None)     # (key, fields, line)
        self.done = done
        self.to_archive_count = 0

    def run(self, work_file, list_file):
        """Write the work file; list_file(walked) for each entry 7-Zip must archive."""
        sep = self.platform.sep
        for walked in self.walk:
            path = walked.path if sep == "/" else walked.path.replace(sep, "/")
            key = path.replace("/", "\0")
            for flag, line in self.passed(key):
                work_file.write_line(flag, line)
            previous = self.take(key)
            fields = state_fields(walked.st)
            target = self.link_target(walked) if fields[0] == LINK else ""
            same = previous is not None and previous[1][0] == fields[0] and \
                previous[1][2:5] == fields[1:] and (target == "" or unescape_field(
                    previous[1][6]) == target)
            archive = self.to_archive(fields[0], same, previous, walked)
            held = self.done.held(key, fields[0], archive) if self.done else None
            if held is not None and fields[0] != DIRECTORY:
                work_file.write_line(CHANGED, held)     # as that piece holds it
                continue
            location = NO_CONTENT if fields[0] == DIRECTORY else \
                previous[1][5] if previous else UNKNOWN
            if archive and held is None:
                location = f"{ARCHIVED_NOW}{list_file(walked)}"
                self.to_archive_count += fields[0] != DIRECTORY
            elif same and not archive:
                work_file.write_line(UNCHANGED, previous[2])
                continue
            work_file.write(CHANGED, Entry(fields[0], path, int(fields[1]), int(fields[2]),
                                           int(fields[3], 8), location, target))
        for flag, line in self.passed(None):
            work_file.write_line(flag, line)
        if self.done:
            self.done.finish()

    def link_target(self, walked):
        with contextlib.suppress(OSError):
            return os.readlink(self.platform.long_path(self.walk.absolute(walked.path)))
        return ""

    def to_archive(self, kind, same, previous, walked):
        """Full: every file and link.  Incremental: the time rule, and with a previous
        state also every new path and every file whose size, time or type changed."""
        if kind == DIRECTORY:
            # An empty directory goes into the archive too (a full backup's every one,
            # an incremental's new ones), so that a reader of the archives alone (plain
            # 7-Zip) sees it; the others come with the files in them.
            return walked.empty and (self.archive_all or walked.recent or (
                self.known and previous is None))
        if self.archive_all or walked.recent:
            return True
        return self.known and (not same or previous[1][5] == MISSING)

    def passed(self, key):
        """Previous lines before key (all, for None): gone, unless unreadable now."""
        while self.pending is not None and (key is None or self.pending[0] < key):
            (gone_key, fields, line), self.pending = self.pending, next(self.previous, None)
            if self.under_unreadable(gone_key):
                yield UNCHANGED, line        # not seen, so not known to be gone
            else:
                yield CHANGED, f"{DELETED}\t{fields[1]}\t0\t0\t0\t{NO_CONTENT}\t\n"

    def take(self, key):
        if self.pending is not None and self.pending[0] == key:
            found, self.pending = self.pending, next(self.previous, None)
            return found
        return None

    def under_unreadable(self, key):
        sep = self.platform.sep
        prefixes = [catalogue_key(u.replace(sep, "/")) for u in self.walk.unreadable]
        return any(key == p or key.startswith(p + "\0") for p in prefixes)


def state_fields(st):
    """(type, size, mtime_ns, mode) of a catalogue line, as its text."""
    mode = st.st_mode
    kind = DIRECTORY if stat.S_ISDIR(mode) else LINK if stat.S_ISLNK(mode) else FILE
    return [kind, "0" if kind == DIRECTORY else str(st.st_size), str(st.st_mtime_ns),
            f"{stat.S_IMODE(mode):o}"]


def previous_lines(path):
    """(key, fields, line) for each line of a catalogue, read lazily."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            if not line.startswith("#"):
                fields = line[:-1].split("\t")
                yield catalogue_key(unescape_field(fields[1])), fields, line


class CatalogueWorkFile:
    """The child's catalogue work file: a flag, a tab, then a catalogue line."""

    def __init__(self, path, header):
        self.writer = CatalogueWriter(path, header)

    def write(self, flag, entry):
        self.write_line(flag, entry.line())

    def write_line(self, flag, line):
        self.writer.handle.write(flag + "\t" + line)

    def close(self):
        self.writer.close()


# ============================================================================
# Journal: the backup in progress, and what survives a kill
# ============================================================================

# A backup in progress has a journal in the state directory (never in the temp root:
# a reboot may wipe it): one SQLite file per bucket and location.  Each SQLite
# transaction is atomic and durable (rollback journal, synchronous FULL), so after a
# kill, a power cut, Ctrl-C, 7-Zip failing or an upload that failed for good, the next
# run knows which pieces are whole in S3 and what each holds, and continues that
# backup instead of starting it again.  Order of writes for a piece: "started"
# before its first volume goes up; after its last one, one transaction: "done" with
# its volumes and the catalogue line of every entry it holds.  A kill in between
# loses that piece alone.  Per source, the catalogue's description is written before
# its PUT (the catalogue and the finished local state are kept beside the journal),
# then the indicator's body; once every indicator is up, the journal goes.
JOURNAL_FORMAT = 1
# a piece's states; a dropped one was done, but S3 no longer holds all its volumes
PIECE_STARTED, PIECE_DONE, PIECE_FAILED, PIECE_DROPPED = "started", "done", "failed", "dropped"
JOURNAL_SCHEMA = """
CREATE TABLE backup (one INTEGER PRIMARY KEY CHECK (one = 1), format INTEGER NOT NULL,
    program_version TEXT, operation TEXT, scope TEXT NOT NULL, stamp TEXT NOT NULL,
    full TEXT NOT NULL, since TEXT, sources TEXT NOT NULL, piece_size INTEGER,
    volume_size INTEGER, attempts INTEGER NOT NULL);
CREATE TABLE piece (number INTEGER PRIMARY KEY, source TEXT NOT NULL, state TEXT NOT NULL,
    volume_size INTEGER, volumes TEXT, central_directory_volume INTEGER);
CREATE TABLE entry (source TEXT NOT NULL, key BLOB NOT NULL, piece INTEGER NOT NULL,
    line TEXT NOT NULL);
CREATE UNIQUE INDEX entry_key ON entry (source, key);
CREATE TABLE source (name TEXT PRIMARY KEY, catalogue TEXT, catalogue_file TEXT,
    state_file TEXT, indicator BLOB);
CREATE TABLE orphan (name TEXT PRIMARY KEY, size INTEGER NOT NULL);
"""


class JournalDamaged(AamError):
    """The journal cannot be read: the backup it records cannot be continued."""


def journal_path(state_dir, bucket, location):
    """The journal of a bucket and location (a digest, as the local states' names)."""
    return os.path.join(state_dir,
                        f"{location}-{location_digest(bucket, location)}.pending.sqlite")


def journal_key(key):
    """A catalogue key as the journal stores it: its UTF-8 bytes (the lone surrogates
    of POSIX names not in UTF-8 passed through), which sort as the keys do."""
    return key.encode("utf-8", "surrogatepass")


def location_digest(bucket, location):
    """The digest in the names of a bucket and location's local files (local states,
    journal, health record): two buckets backing up one location keep apart."""
    return hashlib.sha256(f"{bucket}\0{location}".encode(
        "utf-8", "surrogateescape")).hexdigest()[:24]


class HealthRecord:
    """What this computer knows of a location's backups between runs: the last check,
    the last drill (and a pending one), and the bytes stored per UTC month.  One
    owner-only JSON file in the state directory, written whole through a temporary
    file and os.replace, so that a crash leaves the old record or the new one.  Its
    content is advisory (it fills the report's health block and lets a drill continue):
    a damaged record is read as empty, never trusted for a backup decision."""

    def __init__(self, state_dir, bucket, location):
        self.path = os.path.join(
            state_dir, f"{location}-{location_digest(bucket, location)}.health.json")
        self.data = self._read()

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, section):
        return self.data.get(section)

    def update(self, section, value):
        """Set one section (None removes it) and write the record; the file is read
        again first so that another operation's section written meanwhile stays."""
        self.data = self._read()
        if value is None:
            self.data.pop(section, None)
        else:
            self.data[section] = value
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = self.path + ".tmp"
        _write_private_text(temporary, json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(temporary, self.path)


class Journal:
    """The journal of the pending backup (see above)."""

    def __init__(self, path, db):
        self.path, self.db = path, db
        row = db.execute("SELECT format, program_version, operation, scope, stamp, full, "
                         "since, sources, piece_size, volume_size, attempts "
                         "FROM backup").fetchone()
        if row is None:
            raise JournalDamaged(f"the journal {path} records no backup")
        if row[0] != JOURNAL_FORMAT:
            raise JournalDamaged(f"the journal {path} is of format {row[0]}")
        fields = ("format", "program_version", "operation", "scope", "stamp", "full",
                  "since", "sources", "piece_size", "volume_size", "attempts")
        self.backup = dict(zip(fields, row))
        self.backup["sources"] = [tuple(pair) for pair in json.loads(self.backup["sources"])]

    @classmethod
    def create(cls, path, backup):
        """A new journal (a stale file in its place is replaced)."""
        import sqlite3
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        remove_journal_files(path)
        open_private(path, "wb", exclusive=True).close()
        db = sqlite3.connect(path)
        with db:                           # one transaction, one sync
            db.execute("BEGIN")
            for statement in filter(str.strip, JOURNAL_SCHEMA.split(";")):
                db.execute(statement)
            db.execute("INSERT INTO backup VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)", (
                JOURNAL_FORMAT, VERSION, backup["operation"], backup["scope"],
                backup["stamp"], backup["full"], backup["since"],
                json.dumps(backup["sources"]), backup["piece_size"], backup["volume_size"]))
        return cls(path, db)

    @classmethod
    def open(cls, path):
        """The journal at path, or None when there is none (JournalDamaged: unreadable)."""
        import sqlite3
        if not os.path.exists(path):
            return None
        try:
            return cls(path, cls.connect(path))
        except (sqlite3.Error, ValueError, TypeError) as problem:
            raise JournalDamaged(f"the journal {path} cannot be read ({problem})")

    @staticmethod
    def connect(path):
        import sqlite3
        return sqlite3.connect(path)

    def new_attempt(self):
        with self.db:
            self.db.execute("UPDATE backup SET attempts = attempts + 1")
        self.backup["attempts"] += 1

    # -- pieces ------------------------------------------------------------------
    def next_piece(self):
        """The first piece number not used yet (numbers are never used twice)."""
        return self.db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM piece").fetchone()[0]

    def piece_started(self, number, source, volume_size):
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO piece (number, source, state, volume_size) "
                            "VALUES (?, ?, ?, ?)", (number, source, PIECE_STARTED, volume_size))

    def piece_failed(self, number, source, entries=()):
        """A piece whose 7-Zip failed; entries: (key, line) of what its list held, when
        nothing of it is archived in another piece (a list of one unreadable file)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO piece (number, source, state) "
                            "VALUES (?, ?, ?)", (number, source, PIECE_FAILED))
            self.add_entries(number, source, entries)

    def piece_done(self, number, source, volumes, central_directory_volume, entries):
        """One transaction: the piece is done, with its volumes and the final catalogue
        line of each entry it holds ((key, line) in order)."""
        with self.db:
            self.db.execute("UPDATE piece SET state = ?, volumes = ?, "
                            "central_directory_volume = ? WHERE number = ?",
                            (PIECE_DONE, json.dumps(volumes), central_directory_volume,
                             number))
            self.add_entries(number, source, entries)

    def add_entries(self, number, source, entries):
        """Rows are added in the order the pieces are made, each piece's in its order:
        the table's own (rowid) order is the catalogue's, for lines_from."""
        self.db.executemany("INSERT OR REPLACE INTO entry VALUES (?, ?, ?, ?)",
                            ((source, journal_key(key), number, line)
                             for key, line in entries))

    def drop_piece(self, number, source):
        """Forget what a piece holds (its volumes are not all in S3): its files are
        archived again, in new pieces (its number stays taken: a volume of it may be in
        the bucket)."""
        with self.db:
            self.db.execute("DELETE FROM entry WHERE source = ? AND piece = ?",
                            (source, number))
            self.db.execute("UPDATE piece SET state = ? WHERE number = ?",
                            (PIECE_DROPPED, number))

    def pieces(self, source=None, state=None):
        """[{number, source, state, volume_size, volumes, central_directory_volume}] in
        number order, of one source and one state when given."""
        rows = self.db.execute("SELECT number, source, state, volume_size, volumes, "
                               "central_directory_volume FROM piece ORDER BY number")
        found = []
        for number, name, piece_state, volume_size, volumes, central in rows:
            if source in (None, name) and state in (None, piece_state):
                found.append({"number": number, "source": name, "state": piece_state,
                              "volume_size": volume_size,
                              "volumes": json.loads(volumes) if volumes else [],
                              "central_directory_volume": central})
        return found

    def has_entries(self, source):
        return self.db.execute("SELECT 1 FROM entry WHERE source = ? LIMIT 1",
                               (source,)).fetchone() is not None

    def lines_from(self, source, first_piece):
        """The catalogue lines of the entries of pieces first_piece and later, in the
        order the pieces were made (the order of their work-file lines): one pass over
        the table in its own order, no sort and no index look-up per line."""
        return (row[0] for row in self.db.execute(
            "SELECT line FROM entry WHERE source = ? AND piece >= ? ORDER BY rowid",
            (source, first_piece)))

    # -- sources -----------------------------------------------------------------
    def source(self, name):
        """{catalogue, catalogue_file, state_file, indicator} or None."""
        row = self.db.execute("SELECT catalogue, catalogue_file, state_file, indicator "
                              "FROM source WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return {"catalogue": json.loads(row[0]) if row[0] else None,
                "catalogue_file": row[1], "state_file": row[2], "indicator": row[3]}

    def record_source(self, name, described, catalogue_file, state_file, indicator):
        """Before the catalogue's PUT: what it is, where its file and the finished local
        state are kept, and the body of the indicator that follows it."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO source VALUES (?, ?, ?, ?, ?)",
                            (name, json.dumps(described), catalogue_file, state_file,
                             indicator))

    def forget_catalogue(self, name):
        """The source's catalogue is made again (a piece it names is gone)."""
        with self.db:
            self.db.execute("DELETE FROM source WHERE name = ?", (name,))

    # -- orphans -----------------------------------------------------------------
    def new_orphans(self, orphans):
        """The (name, size) of orphans not named before; they are recorded as named."""
        fresh = [(name, size) for name, size in orphans if self.db.execute(
            "SELECT 1 FROM orphan WHERE name = ?", (name,)).fetchone() is None]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO orphan VALUES (?, ?)", fresh)
        return fresh

    def delete(self):
        """The backup is complete (or abandoned): the journal and its kept files go."""
        kept = [path for row in self.db.execute(
            "SELECT catalogue_file, state_file FROM source") for path in row if path]
        self.db.close()
        for path in kept:
            with contextlib.suppress(OSError):
                os.remove(path)
        remove_journal_files(self.path)

    def close(self):
        self.db.close()


class JournalView(Journal):
    """The pending backup's journal opened read-only, for a preview: the backup's own
    decision code (continue_pending, abandon, keep_done_pieces) runs on it unchanged, and
    what it would write is kept here instead: the pieces it would drop, whether it would
    give the backup up.  SQLite refuses any write on the connection (mode=ro), so a
    preview cannot change the journal even by mistake."""

    def __init__(self, path, db):
        super().__init__(path, db)
        self.dropped = set()          # numbers of the done pieces a backup would drop
        self.given_up = False
        self.copy_dir = None          # the rolled-back copy's temporary directory, if any

    @staticmethod
    def connect(path):
        return read_only_connection(path)

    @classmethod
    def open(cls, path):
        """As Journal.open.  A journal whose last transaction was cut off (a kill or a power
        cut while SQLite wrote: its rollback journal is beside it) cannot be read
        read-only, since reading it means rolling it back, as the backup's first read
        does: that is done on a copy in a temporary directory, removed on close."""
        try:
            return super().open(path)
        except JournalDamaged as problem:
            if not os.path.exists(path + "-journal"):
                raise
            return cls.rolled_back_copy(path, problem)

    @classmethod
    def rolled_back_copy(cls, path, problem):
        import sqlite3
        directory = tempfile.mkdtemp(prefix="aam-preview-")      # owner-only
        copy = os.path.join(directory, os.path.basename(path))
        try:
            for suffix in ("", "-journal"):
                shutil.copyfile(path + suffix, copy + suffix)
            view = cls(copy, sqlite3.connect(copy))
        except (OSError, sqlite3.Error, ValueError, TypeError):
            shutil.rmtree(directory, ignore_errors=True)
            raise problem from None
        view.copy_dir = directory
        return view

    def drop_piece(self, number, source):
        self.dropped.add(number)

    def forget_catalogue(self, name):
        pass                          # a backup makes the source's catalogue again

    def new_orphans(self, orphans):
        """The (name, size) of orphans a backup would name now (not named before)."""
        return [(name, size) for name, size in orphans if self.db.execute(
            "SELECT 1 FROM orphan WHERE name = ?", (name,)).fetchone() is None]

    def delete(self):
        self.given_up = True
        self.close()

    def close(self):
        super().close()
        if self.copy_dir:
            shutil.rmtree(self.copy_dir, ignore_errors=True)


def read_only_connection(path):
    """An SQLite connection that cannot write the file (nor make a -journal beside it)."""
    import pathlib
    import sqlite3
    uri = pathlib.Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True)


def journal_errors():
    """The exceptions of SQLite (the journal's file is damaged, the disk is full)."""
    import sqlite3
    return (sqlite3.Error,)


def remove_journal_files(path):
    for name in (path, path + "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


class DoneEntries:
    """The entries that the done pieces of a continued backup hold for one source, met
    in catalogue order beside the walk (the child's side of the journal).

    held() gives the line of an entry the walk would archive when a done piece
    holds it as the walk found it (same type; a file or link whose content was
    archived, or an empty directory): it is not archived again.  A piece holding
    an entry that is not used so (gone since, changed type, no longer archived)
    is superseded: a restore must not extract it whole (docs/restore.md).
    """

    def __init__(self, journal_file, source, dropped=()):
        self.db = read_only_connection(journal_file)
        self.rows = self.db.execute("SELECT key, piece, line FROM entry WHERE source = ? "
                                    "ORDER BY key", (source,))
        self.dropped = set(dropped)   # a preview's: pieces a backup would drop (JournalView)
        self.pending = self.next_row()
        self.superseded = set()

    def next_row(self):
        row = self.rows.fetchone()
        while row is not None and row[1] in self.dropped:
            row = self.rows.fetchone()
        return None if row is None else (row[0].decode("utf-8", "surrogatepass"),
                                         row[1], row[2])

    def held(self, key, kind, archive):
        while self.pending is not None and self.pending[0] < key:
            self.unused(self.pending)
            self.pending = self.next_row()
        if self.pending is None or self.pending[0] != key:
            return None
        found, self.pending = self.pending, self.next_row()
        line = found[2]
        content = line[0] == DIRECTORY or (line[0] in (FILE, LINK) and
                                           parse_location(line.rsplit("\t", 2)[1]))
        if archive and content and line[0] == kind:
            return line
        self.unused(found)
        return None

    def unused(self, row):
        line = row[2]
        if line[0] == DIRECTORY or (line[0] in (FILE, LINK) and
                                    parse_location(line.rsplit("\t", 2)[1])):
            self.superseded.add(row[1])

    def finish(self):
        while self.pending is not None:
            self.unused(self.pending)
            self.pending = self.next_row()
        self.db.close()


# ============================================================================
# Log, report and the terminal
# ============================================================================

# The log's section headings, in the original program's order (docs/reference.md, What is
# stored where: Log).
SECTION_ARGUMENTS = "user-executed AAM Auto Backup command parameters."
SECTION_LOCK_FAILURE = "(if applicable) file lock acquisition failure."
SECTION_START = "Backup execution starting time and date."
SECTION_LATEST = ("the latest completed-upload AWS S3 full and incremental backup dates "
                  "and times.")
SECTION_DIRECTORIES = ("the directories to backup, the directories to shadow mount, and "
                       "folders and files to exclude.")
SECTION_IGNORED = ("(if applicable) the ignored the directories and non-wildcard files "
                   "that do not exist.")
SECTION_INSTRUCTION_ERROR = ("(if applicable) AAM Auto Backup instruction plain text file "
                             "reading error.")
SECTION_WORK_DIR_ERROR = "(if applicable) AWS S3 backup files directory creation error."
SECTION_TEMP_FILE_ERROR = "(if applicable) a temporary plain text file creation error."
SECTION_CHILD_ERROR = "(if applicable) ShadowSpawn execution error."
SECTION_OUTPUT_READ_ERROR = "(if applicable) a temporary plain text file reading error."
SECTION_CHILD_OUTPUT = "ShadowSpawn outputs."
SECTION_UPLOAD = "AWS upload."
SECTION_UPLOAD_ERROR = "(if applicable) AWS upload error."
SECTION_WORK_DIR_DELETE_ERROR = ("(if applicable) AWS S3 backup files directory deletion "
                                 "error.")
SECTION_EMAIL_ERROR = "(if applicable) email report sending error."
SECTION_SUMMARY = "Summary."
SECTION_HEALTH = "the health of this computer's AWS S3 backups."


class RunLog:
    """The dated log file of one run; every line is scrubbed of secrets.

    Lines also go to the terminal unless terminal=False (tool output goes to
    the log only).  The log is written as the run goes, so a crash keeps it.
    """

    def __init__(self, directory, operation, secrets, platform, started=None):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len,
                              reverse=True)
        self.platform = platform
        os.makedirs(directory, exist_ok=True)
        stamp = (started or dt.datetime.now()).strftime("%Y%m%d_%H%M%S")
        base = os.path.join(directory, f"{stamp}_{operation}")
        counter = 1
        while True:
            self.path = base + (".log" if counter == 1 else f"_{counter}.log")
            try:
                self.handle = open_private(self.path, exclusive=True, errors="strict")
                break
            except FileExistsError:
                counter += 1
        self.progress = None        # BackupProgress: its line is cleared before each line

    def scrub(self, text):
        for secret in self.secrets:
            text = text.replace(secret, "********")
        return text

    def section(self, heading):
        self.handle.write(f"\n===== {heading} =====\n")
        self.handle.flush()

    def line(self, text="", terminal=True):
        text = self.scrub(str(text))
        self.handle.write(text + "\n")
        self.handle.flush()
        if terminal:
            self.to_terminal(text)

    def to_terminal(self, text):
        """Print a line (scrubbed) on the terminal only, after clearing the progress line."""
        with self.progress.lock if self.progress else contextlib.nullcontext():
            if self.progress:
                self.progress.clear()
            print(self.scrub(text), flush=True)

    def append_output(self, path):
        """Copy a child's output file into the log, decoded without ever failing."""
        with open(path, "rb") as handle:
            for raw in handle:
                self.handle.write(self.scrub(self.platform.decode_output(raw).rstrip("\r\n"))
                                  + "\n")
        self.handle.flush()

    def close(self):
        if not self.handle.closed:
            self.handle.close()


class TerminalOutput:
    """The multi-step operations write no log (the original design's choice), nor do browse
    and the preview: terminal only.

    Same interface as RunLog; tool output (terminal=False) is not shown.
    """

    path = None

    def __init__(self, secrets):
        self.secrets = sorted({s for s in secrets if s and len(s) >= 3}, key=len,
                              reverse=True)

    scrub = RunLog.scrub

    def section(self, heading):
        pass

    def line(self, text="", terminal=True):
        if terminal:
            print(self.scrub(str(text)), flush=True)

    def close(self):
        pass


def format_bytes(count):
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    return ""


class Progress:
    """Progress of one long piece of work, for the terminal only (never the log).

    On a terminal one line is rewritten in place, at most five times a second;
    when output goes to a file or a pipe (a scheduler, a log), a plain line is
    printed at each quarter of a large transfer instead, and nothing for small ones.
    """

    PLAIN_MINIMUM = 64 * 1024 * 1024      # bytes; smaller transfers print no lines

    def __init__(self, label, total=None, stream=None):
        import threading
        self.label, self.total = label, total
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.done, self.started, self.shown, self.quarter = 0, time.monotonic(), 0.0, 1
        self.lock = threading.Lock()

    def add(self, amount):
        """Called with each chunk (boto3's transfer Callback, from worker threads)."""
        with self.lock:
            self.set(self.done + amount)

    def set(self, done):
        self.done = done
        if self.terminal:
            now = time.monotonic()
            if now - self.shown >= 0.2:
                self.shown = now
                self.stream.write("\r" + self.text() + "\x1b[K")
                self.stream.flush()
        elif self.total and self.total >= self.PLAIN_MINIMUM:
            while self.quarter < 4 and done >= self.total * self.quarter / 4:
                print(self.text(), file=self.stream, flush=True)
                self.quarter += 1

    def text(self):
        rate = self.done / max(time.monotonic() - self.started, 1e-3)
        if self.total:
            return (f"{self.label}: {100 * self.done / self.total:3.0f}% of "
                    f"{format_bytes(self.total)}, {format_bytes(rate)}/s")
        return f"{self.label}: {format_bytes(self.done)}, {format_bytes(rate)}/s"

    def close(self):
        """Clear the in-place line, so that the next log line starts clean."""
        if self.terminal and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def format_duration(seconds):
    """'m:ss', or 'h:mm:ss' from an hour on."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class RateWindow:
    """Bytes per second over the last WINDOW seconds: an ETA from it moves smoothly,
    not with each volume or pause of 7-Zip."""

    WINDOW = 20.0
    MINIMUM_SPAN = 1.0       # seconds of samples before a rate is given

    def __init__(self):
        self.samples = collections.deque()

    def add(self, now, done):
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.popleft()

    def seconds_left(self, remaining):
        """remaining / the rate, or None while the rate is not known (or nothing moves)."""
        (first, before), (last, done) = self.samples[0], self.samples[-1]
        if last - first < self.MINIMUM_SPAN or done <= before:
            return None
        return remaining * (last - first) / (done - before)


@dataclasses.dataclass
class SourceProgress:
    """One source's numbers for the progress line (bytes); selected is None until the
    child has walked the source."""

    selected: typing.Optional[int] = None    # file content the child selected
    archived: int = 0          # of it, what 7-Zip has read (measured as below)
    ended: int = -1            # the child's 'ended' the last time it changed
    ended_at: int = 0          # written, then
    uploaded: int = 0          # volume bytes sent (s3transfer's callbacks)
    upload_total: int = 0      # the volumes' bytes: the written ones, and an estimate
    finished: bool = False     # every volume is up

    def counts(self, what):
        """(done, total, finished) of 'archive' or 'upload'."""
        if what == "archive":
            return self.archived, self.selected or 0, self.archived >= (self.selected or 0)
        return self.uploaded, self.upload_total, self.finished


class BackupProgress:
    """The progress line of a backup run on a terminal: percent of the bytes and an
    ETA for 7-Zip and for the upload, of the source in hand and of the run.

    Only when standard error is a terminal: one line, rewritten in place with '\\r' at
    most UPDATES_PER_SECOND times a second, on standard error, so that the lines the
    run prints (standard output: what the log holds) stay as they are; each of those
    first clears it (RunLog.to_terminal).  Elsewhere (a scheduler, a pipe, a file)
    nothing is shown and nothing is measured.  No escape sequence: padding with
    blanks clears a line on every terminal, the Windows console included.

    The basis (docs/backup.md, Progress):
    - 7-Zip: the bytes of file content the child selected (the walk, before 7-Zip
      starts) against those in the pieces 7-Zip has finished, plus, for the piece it
      is on, the bytes it has written for it, at most that piece's content (ZIP
      output is rarely larger than its input; compressible content is counted low
      until its piece ends, never high).
    - upload: the volume bytes sent against the bytes 7-Zip has written plus the
      content not yet archived (content stands in for its archive: the worst case,
      so the percent rather jumps forward than back).
    - the run: the sums over its sources, shown once every source has been walked;
      an ETA is the bytes left over the rate of the last RateWindow.WINDOW seconds.
    Every percent shown is the highest so far (never backwards); 100 means done.
    """

    UPDATES_PER_SECOND = 4

    def __init__(self, stream=None):
        import threading
        self.stream = stream or sys.stderr
        self.terminal = self.stream is not None and self.stream.isatty()   # None: pythonw
        self.lock = threading.RLock()     # s3transfer's threads report bytes too
        self.sources, self.index = [], None
        self.highest, self.rates = {}, {}
        self.shown_at, self.shown_width = 0.0, 0
        self.archive = None       # while 7-Zip runs: (work directory, bytes written())

    @property
    def current(self):
        return None if self.index is None else self.sources[self.index - 1]

    def start_source(self, index, count):
        """Source index (from 1) of count is in hand from now on."""
        with self.lock:
            while len(self.sources) < count:
                self.sources.append(SourceProgress())
            self.index = index

    def watch_archive(self, work_dir, written):
        """The child of the source in hand runs 7-Zip: the line reads its progress
        (ARCHIVE_PROGRESS in work_dir) each time it is shown; written() gives the
        bytes 7-Zip has written for this source so far (uploaded or on disk)."""
        with self.lock:
            self.archive = (work_dir, written)

    def archive_ended(self):
        """The child has ended: a last look at what its 7-Zip did."""
        with self.lock:
            if self.archive:
                self.look_at_archive()
                self.archive = None

    def look_at_archive(self):
        """The 7-Zip numbers of the source in hand, from the child's ARCHIVE_PROGRESS
        and the bytes 7-Zip has written since the list it is on began."""
        work_dir, written = self.archive
        report, written = read_archive_progress(work_dir), written()
        if report is None:
            return          # the child has not listed its pieces yet
        source = self.current
        if report["ended"] != source.ended:
            source.ended, source.ended_at = report["ended"], written
        in_piece = min(max(0, written - source.ended_at), report["current"])
        source.selected = report["selected"]
        source.archived = max(source.archived, report["ended"] + in_piece)
        source.upload_total = written + source.selected - source.archived

    def volume_bytes(self, amount):
        """s3transfer's callback: amount more bytes of a volume sent (less on a retry)."""
        with self.lock:
            self.current.uploaded += amount
            self.show()

    def source_done(self):
        """Every volume of the source in hand is up; also for a source with nothing to
        archive or none archived by this run (its 7-Zip and upload are complete)."""
        with self.lock:
            source = self.current
            source.selected = source.archived = source.selected or 0
            source.upload_total, source.finished = source.uploaded, True
            self.show(force=True)

    def show(self, force=False):
        """Rewrite the line, unless it was shown less than an update's time ago."""
        now = time.monotonic()
        if not self.terminal or (not force and
                                 now - self.shown_at < 1 / self.UPDATES_PER_SECOND):
            return
        with self.lock:
            if self.archive:
                self.look_at_archive()
            if self.current is None or self.current.selected is None:
                return
            self.shown_at = now
            text = self.text(now)
            width = self.terminal_width() - 1         # the last column would wrap the line
            self.write("\r" + text[:width].ljust(min(self.shown_width, width)))
            self.shown_width = min(len(text), width)

    def text(self, now):
        parts = [f"Source {self.index} of {len(self.sources)}: "
                 + self.measures(self.index, [self.current], now)]
        if len(self.sources) > 1:
            walked = [s for s in self.sources if s.selected is not None]
            parts.append("run: " + (self.measures(0, self.sources, now)
                                    if len(walked) == len(self.sources) else
                                    f"{len(walked)} of {len(self.sources)} sources walked"))
        return " | ".join(parts)

    def measures(self, key, sources, now):
        """'7-Zip 45% ETA 0:12, upload 30% ETA 0:40' of these sources together."""
        shown = []
        for what, label in (("archive", "7-Zip"), ("upload", "upload")):
            counts = [s.counts(what) for s in sources]
            done, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
            finished = all(c[2] for c in counts)
            percent = 100 if finished else min(99, 100 * done // total if total else 0)
            percent = self.highest[key, what] = max(self.highest.get((key, what), 0),
                                                    percent)
            rate = self.rates.setdefault((key, what), RateWindow())
            rate.add(now, done)
            left = None if finished else rate.seconds_left(max(0, total - done))
            shown.append(f"{label} {percent}%"
                         + (f" ETA {format_duration(left)}" if left is not None else ""))
        return ", ".join(shown)

    def terminal_width(self):
        """Its columns; 80 when it does not say (0: a terminal not yet sized)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            return 80

    def clear(self):
        """Blank the line, so that a line printed next starts clean."""
        with self.lock:
            if self.shown_width:
                self.write("\r" + " " * self.shown_width + "\r")
                self.shown_width = 0

    def write(self, text):
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()


def local_time_text(moment):
    """'YYYYMMDD HH:MM:SS.ffffff ZONE' in the computer's local time (e-mail titles)."""
    local = moment.astimezone()
    return f"{local:%Y%m%d %H:%M:%S.%f} {local.tzname() or local.strftime('%z')}"


def open_run_log(args, platform):
    """The dated log of a run, opened with its first section: the command's arguments,
    every secret masked.  None (said on stderr) when it cannot be created."""
    try:
        log = RunLog(args.log_dir, args.operation, args.secrets, platform)
    except OSError as problem:
        print(f"The log file cannot be created in {args.log_dir}: {problem.strerror}",
              file=sys.stderr)
        return None
    log.section(SECTION_ARGUMENTS)
    log.line(f"{PROGRAM_NAME} {VERSION}, {args.operation}", terminal=False)
    for line in args.masked():
        log.line(line, terminal=False)
    return log


def send_report(args, settings, session, log, failed, started, what, body, hurried=False):
    """The SES report: '<SUCCESS|FAILURE>, <local date-time> <what>!' and a short body
    ending with the log file's path: no tool output, no secrets.  True when it was
    sent; a failure is logged with the sender and the region (SES refuses a sender
    verified in another region), and gives the run its own exit code
    (EXIT_REPORT_UNSENT).  hurried: the run is being stopped (a scheduler's stop
    time), so SES gets one short attempt (aws_client) rather than minutes of retries."""
    title = f"{'FAILURE' if failed else 'SUCCESS'}, {local_time_text(started)} {what}!"
    text = "\n".join(body + [f"For more info, refer to the local log: {log.path}"]) + "\n"
    try:
        session = session or aws_session(args.access_key_id, args.secret_access_key)
        ses = aws_client(session, "ses", settings.ses_region, hurried=hurried)
        ses.send_email(
            Source=email.utils.formataddr((args.sender_name, args.sender_address)),
            Destination={"ToAddresses": [args.recipient]},
            Message={"Subject": {"Data": title, "Charset": "UTF-8"},
                     "Body": {"Text": {"Data": text, "Charset": "UTF-8"}}})
        log.line(f"E-mail report sent to {args.recipient}: {title}")
        return True
    except Exception as problem:    # noqa: BLE001 - any failure is reported, not raised
        log.section(SECTION_EMAIL_ERROR)
        advice = ("; SES sends only from an address (or domain) verified in that region: "
                  "set AWS_REGION, or AAM_SES_REGION for SES alone, to the region where it "
                  "is verified (docs/aws-setup.md)"
                  if aws_error_code(problem) == "MessageRejected" else "")
        origin = f" ({settings.ses_region_origin})" if settings.ses_region_origin else ""
        log.line(f"ERROR: The e-mail report could not be sent from {args.sender_address} "
                 f"through SES in region {settings.ses_region}{origin}: "
                 f"{describe_aws_error(problem)}{advice}.")
        return False


# -- the health block: what the report says of the location's backups -------------

HEALTH_DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"      # the health record's dates (UTC)
DRILL_DUE_DAYS = 90       # a report warns when no restore drill has passed for longer


def format_health_date(moment):
    return moment.astimezone(dt.timezone.utc).strftime(HEALTH_DATE_FORMAT)


def parse_health_date(text):
    """A health record's date, or None when it is not one (the record is advisory)."""
    try:
        return dt.datetime.strptime(str(text), HEALTH_DATE_FORMAT).replace(
            tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def parse_stamp_or_none(text):
    """A backup stamp kept in the health record, or None when it is not one."""
    try:
        return parse_stamp(str(text))
    except ValueError:
        return None


def describe_check(check):
    """The last check-aws-backups result in the health record, for the report."""
    if not isinstance(check, dict):
        return "Last check: never on this computer (check-aws-backups)."
    text = f"Last check: {check.get('date')}, {check.get('result')}"
    details = []
    if "sets" in check:
        details.append(f"{check['sets']} set(s) checked")
    if "problems" in check:
        details.append(f"{check['problems']} problem(s)")
    if check.get("not_checked"):
        details.append(f"{len(check['not_checked'])} thing(s) it could not check")
    return text + (f" ({', '.join(details)})." if details else ".")


def describe_drill(drill, pending):
    """The last finished restore drill (and a pending one) in the health record."""
    lines = []
    if not isinstance(drill, dict):
        lines.append("Last drill: never on this computer (drill-aws-backups).")
    else:
        tested = drill.get("files_tested", len(drill.get("files") or []))
        text = (f"Last drill: {drill.get('date')}, {drill.get('result')} (backup "
                f"{drill.get('backup')}, {tested} file(s) tested)")
        lines.append(text + (f": {drill['problem']}." if drill.get("problem") else "."))
    if isinstance(pending, dict):
        lines.append(f"A drill is pending: the thaw of {len(pending.get('volumes') or [])} "
                     f"volume(s) was requested {pending.get('requested')}; the next "
                     "drill-aws-backups finishes it.")
    return lines


def drill_overdue(drill, now):
    """True when no restore drill is known to have passed in DRILL_DUE_DAYS."""
    if not isinstance(drill, dict) or drill.get("result") != "passed":
        return True
    date = parse_health_date(drill.get("date"))
    return date is None or now - date > dt.timedelta(days=DRILL_DUE_DAYS)


def describe_storage(location, storage):
    """The bytes stored for the location, from the health record's months, and the
    estimated monthly cost; None when no month is recorded."""
    months = {month: figures for month, figures in (
        storage.items() if isinstance(storage, dict) else ())
        if isinstance(figures, dict) and isinstance(figures.get("bytes"), int)
        and isinstance(figures.get("objects"), int)}         # a damaged month is passed over
    if not months:
        return None
    size = sum(figures["bytes"] for figures in months.values())
    objects = sum(figures["objects"] for figures in months.values())
    listed = sorted(str(figures.get("listed")) for figures in months.values())
    cost = storage_cost(size, objects)      # every object as a volume: an upper bound
    cost_text = f"about ${cost:,.2f}" if cost >= 0.01 else "under $0.01"
    when = (f"listed {listed[0][:10]}" if listed[0][:10] == listed[-1][:10]
            else f"listed from {listed[0][:10]} to {listed[-1][:10]}")
    return (f"Stored for {location}: {format_bytes(size)} ({size:,} bytes) in {objects:,} "
            f"object(s) of {len(months)} month(s) ({min(months)} to {max(months)}; "
            f"{when}); {cost_text} a month at Deep Archive prices "
            f"(${STORAGE_PRICES[DEEP_ARCHIVE]} per GB-month and 40 KB an object, us-east-1, "
            f"{PRICES_TAKEN}).")


# ============================================================================
# AWS: the client, its errors, prices, uploads and the bucket listing
# ============================================================================

def aws_session(access_key_id, secret_access_key):
    import boto3
    if access_key_id:
        return boto3.session.Session(aws_access_key_id=str(access_key_id),
                                     aws_secret_access_key=str(secret_access_key))
    return boto3.session.Session()


def aws_client(session, service, region, hurried=False):
    """Every client gets an explicit region; the endpoint comes from AWS_ENDPOINT_URL.

    An S3 client never replaces an object (new_objects_only).  hurried: one attempt
    of a few seconds (HURRIED_TIMEOUT), for a run being stopped: a scheduler kills it
    some time after its stop signal (systemd's TimeoutStopSec, timeout's --kill-after),
    and a shutdown waits for it."""
    from botocore.config import Config
    # An upload's body is not hashed once more to sign it: its CRC32 checksum header
    # (botocore's default) and the manifest's SHA-256 protect it, as AWS over HTTPS
    # does anyway; on a plain-HTTP endpoint the extra pass only costs CPU.
    retries = {"total_max_attempts": 1} if hurried else {"max_attempts": 4}
    config = Config(retries={"mode": "standard", **retries},
                    connect_timeout=HURRIED_TIMEOUT if hurried else 15,
                    read_timeout=HURRIED_TIMEOUT if hurried else 120,
                    s3={"payload_signing_enabled": False})
    client = session.client(service, region_name=region, config=config)
    return new_objects_only(client) if service == "s3" else client


def new_objects_only(s3):
    """Make every PutObject and CompleteMultipartUpload of this client conditional.

    With If-None-Match: * S3 writes only a name that does not exist yet (412
    otherwise), so a backup can never destroy one.  The header is added as each
    request is built: boto3's upload_file accepts no IfNoneMatch in ExtraArgs
    (s3transfer 0.17) and would not pass one on to CompleteMultipartUpload.
    """
    def conditional(params, **_ignored):
        params["IfNoneMatch"] = "*"
    for operation in ("PutObject", "CompleteMultipartUpload"):
        s3.meta.events.register(f"before-parameter-build.s3.{operation}", conditional)
    return s3


class WriteRefused(AamError):
    """S3 refused to write an object: its name exists, or a policy denies the write."""


class UploadFailed(AamError):
    """An object could not be written after botocore's retries; the message names it."""


@contextlib.contextmanager
def upload_named(bucket, key, kind):
    """Turn a write that fails for good into an error naming the object and its kind
    (volume, catalogue, completion indicator, key check): S3's refusal (412, 403) is
    a WriteRefused, any other AWS error an UploadFailed.

    The standard retry mode retries neither status, so a refusal is final at once.
    """
    try:
        yield
    except aws_errors() as problem:
        # boto3's upload_file wraps the ClientError in S3UploadFailedError (raised while
        # handling it); s3transfer's TransferManager raises the ClientError itself
        cause = problem if hasattr(problem, "response") else problem.__context__
        response = getattr(cause, "response", None) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        where = f"the {kind} s3://{bucket}/{key}"
        if status == 412:
            raise WriteRefused(f"{where} already exists; this program never replaces an "
                               "object, so it was not written (HTTP 412)") from problem
        if status == 403:
            raise WriteRefused(f"S3 refused to write {where} (HTTP 403 "
                               f"{response.get('Error', {}).get('Code', '')}): the keys "
                               "may not write it, or the bucket policy denies it") from problem
        raise UploadFailed(f"{where} could not be uploaded: "
                           f"{describe_aws_error(cause or problem)}") from problem


def aws_errors():
    """The exceptions that mean 'AWS could not be reached or refused' (not our bugs)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from boto3.exceptions import Boto3Error
    return (BotoCoreError, ClientError, Boto3Error)


# The permission each AWS call needs (for a refused call's message).
AWS_PERMISSIONS = {
    "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "RestoreObject": "s3:RestoreObject", "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "SendEmail": "ses:SendEmail",
}
DENIED_CODES = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")


def aws_error_code(problem):
    response = getattr(problem, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def describe_aws_error(problem, where="", credentials=""):
    """One line: the AWS call that failed and why; when access was denied, the
    permission the keys (of the arguments named by credentials) lack."""
    if isinstance(problem, AamError):
        return str(problem)
    response = getattr(problem, "response", None)
    if not (isinstance(response, dict) and "Error" in response):
        return f"{type(problem).__name__}: {problem}"
    operation = getattr(problem, "operation_name", "")
    on = f" on {where}" if where else ""
    if aws_error_code(problem) in DENIED_CODES:
        keys = f"the credentials of {credentials}" if credentials else "the credentials"
        permission = AWS_PERMISSIONS.get(operation, "it needs")
        return (f"AWS refused {operation or 'the request'}{on} (access denied): {keys} "
                f"lack the permission {permission}")
    error = response["Error"]
    text = f"{error.get('Code', 'Error')}: {error.get('Message', '')}".strip()
    return f"{operation} failed{on}, {text}" if operation else text


def is_transient(problem):
    """A network failure or an S3 server error (5xx): worth trying again later."""
    import botocore.exceptions as errors
    if isinstance(problem, (errors.ConnectionError, errors.HTTPClientError,
                            errors.IncompleteReadError)):
        return True
    response = getattr(problem, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500


def restore_aws_error(problem, bucket, key=None, table=None, kind="object"):
    """An AamError for a failed S3 call of a restore or browse (table: its arguments,
    RESTORE_ARGS when None), naming the object (by its kind) and a missing permission."""
    table = table or RESTORE_ARGS
    where = (f"the {kind} s3://{bucket}/{key}" if key
             else f"the bucket {bucket} ({table.ref('bucket')})")
    if aws_error_code(problem) in DENIED_CODES:
        return AamError(
            f"{describe_aws_error(problem, where, table.credentials_ref())}. A restore needs "
            "s3:ListBucket, s3:GetObject and s3:RestoreObject on the bucket: use the "
            "restore user's keys (docs/aws-setup.md); the backup user is write-only by "
            "design.")
    if aws_error_code(problem) in ("404", "NoSuchKey"):
        return AamError(f"The {kind} s3://{bucket}/{key} does not exist (any more); the "
                        "backup set is damaged.")
    if aws_error_code(problem) == "NoSuchBucket":
        return AamError(f"The bucket {bucket} ({table.ref('bucket')}) does not exist.")
    return AamError(f"AWS S3 request on {where} failed: {describe_aws_error(problem)}")


@contextlib.contextmanager
def s3_call(bucket, key=None, table=None, kind="object"):
    """Turn a refused or failed S3 call on the bucket, or on one object of that kind
    (volume, catalogue, completion indicator), into a clear AamError naming it;
    transient ones pass on."""
    try:
        yield
    except AamError:
        raise
    except Exception as problem:     # noqa: BLE001 - boto3 raises many kinds
        if is_transient(problem):
            raise
        raise restore_aws_error(problem, bucket, key, table, kind) from None

# Deep Archive retrieval prices for us-east-1 as they were recorded
# from aws.amazon.com/s3/pricing on 2020-10-05 (docs/restore.md lists them): dollars per
# GB retrieved and per 1,000 restore requests.  Only used for the estimate.
PRICES_TAKEN = "2020-10-05"
RETRIEVAL_PRICES = {"Bulk": (0.0025, 0.025), "Standard": (0.02, 0.10)}
TRANSFER_OUT_PER_GB = 0.09
EXPECTED_WAIT = {"Bulk": "within 48 hours", "Standard": "within 12 hours"}
GB = 1024 ** 3                    # AWS bills a GB as 2^30 bytes
# Storage and upload prices recorded the same way and day (docs/backup.md lists them):
# dollars per GB-month (the first 50 TB a month), and per 1,000 PUT requests (each part of
# a multipart upload is one).  Volumes are DEEP_ARCHIVE; catalogues, completion
# indicators and key checks STANDARD.  Deep Archive bills 40 KB more for each object it
# holds: 32 KB at its own price and 8 KB at STANDARD's.
STORAGE_PRICES = {DEEP_ARCHIVE: 0.00099, "STANDARD": 0.023}
PUT_PRICES = {DEEP_ARCHIVE: 0.05, "STANDARD": 0.005}
ARCHIVED_OBJECT_EXTRA = {DEEP_ARCHIVE: 32 * 1024, "STANDARD": 8 * 1024}


def storage_cost(archived_bytes, archived_objects, standard_bytes=0):
    """Dollars a month for Deep Archive objects and STANDARD bytes (prices above)."""
    archived = archived_bytes + archived_objects * ARCHIVED_OBJECT_EXTRA[DEEP_ARCHIVE]
    standard = standard_bytes + archived_objects * ARCHIVED_OBJECT_EXTRA["STANDARD"]
    return (archived * STORAGE_PRICES[DEEP_ARCHIVE] + standard * STORAGE_PRICES["STANDARD"]) / GB


def upload_requests(size):
    """The PUT requests an upload of size bytes takes (RunUploads' multipart rule)."""
    config = transfer_config()
    if size < config.multipart_threshold:
        return 1
    return -(-size // config.multipart_chunksize) + 2      # the parts, begin and end


def volume_sizes(archive_bytes, volume_size):
    """The sizes of the volumes an archive of archive_bytes is split into."""
    whole, rest = divmod(archive_bytes, volume_size)
    return [volume_size] * whole + ([rest] if rest else [])


@dataclasses.dataclass
class StoredBytes:
    """The backup objects of a listing: volumes (DEEP_ARCHIVE) and the rest (STANDARD)."""

    volumes: int
    volume_bytes: int
    others: int
    other_bytes: int

    @classmethod
    def of(cls, listing):
        volumes = [v for stored in listing.volumes.values() for v in stored]
        others = list(listing.catalogues.values()) + [
            o for by_source in listing.indicators.values() for o in by_source.values()]
        return cls(len(volumes), sum(v.size for v in volumes), len(others),
                   sum(o.size for o in others))

    def cost(self):
        return storage_cost(self.volume_bytes, self.volumes, self.other_bytes)


def format_dollars(amount):
    return "less than $0.01" if 0 < amount < 0.005 else f"${amount:,.2f}"


def retrieval_cost(tier, size, requests):
    per_gb, per_thousand = RETRIEVAL_PRICES[tier]
    return size / GB * per_gb + requests / 1000 * per_thousand

MIB = 1024 * 1024
UPLOAD_POLL_SECONDS = 0.1   # how often the parent looks for finished volumes
PROGRESS_STEP = 256 * 1024  # s3transfer's AggregatedProgressCallback threshold


def transfer_config(upload_limit=None):
    """Multipart uploads with a few parallel parts; memory stays small.  upload_limit:
    bytes per second for all uploads of the manager together (s3transfer's bandwidth
    limiter, a leaky bucket the bodies of PutObject and UploadPart are read through)."""
    from boto3.s3.transfer import TransferConfig
    return TransferConfig(multipart_threshold=64 * MIB, multipart_chunksize=16 * MIB,
                          max_concurrency=4, use_threads=True, max_bandwidth=upload_limit)


class RunUploads:
    """Every upload of one backup run (volumes, catalogues, indicators) goes through this
    one s3transfer TransferManager, so that its one bandwidth limiter caps their sum at
    AAM_UPLOAD_LIMIT: boto3's upload_file makes a manager, and so a limiter, per call.
    The manager is s3transfer's own (boto3 may pick its CRT client instead, which ignores
    the limit).  Nothing is written over an existing object (new_objects_only)."""

    def __init__(self, s3, bucket, config):
        import threading
        from s3transfer.manager import TransferManager
        self.bucket, self.config = bucket, config
        self.manager = TransferManager(s3, config)       # config: transfer_config(...)
        # submit() may be called from s3transfer's threads (PieceUploader): once close()
        # has begun, nothing new starts, so that a cancel ends every upload there is.
        self.lock, self.closing = threading.Lock(), False
        self.futures = []          # of the uploads begun, those not known to have ended
        self.stored = []             # (key, bytes) of each object written (the report)

    def submit(self, source, key, subscribers=(), **extra_args):
        """Start uploading a file (a path or a binary file object) as key, multipart
        above the threshold; its s3transfer future.  subscribers: s3transfer
        subscribers (on_progress with each number of bytes read into the request, on_done)."""
        with self.lock:
            if self.closing:
                raise RuntimeError(f"the uploads of this run have ended; {key} was not begun")
            future = self.manager.upload(source, self.bucket, key, extra_args,
                                         list(subscribers) or None)
            self.futures = [f for f in self.futures if not f.done()] + [future]
            return future

    def unreported_bytes(self, size):
        """At most how many of an upload's bytes its subscribers have not heard of, all
        the others sent: s3transfer tells a request body's progress in steps of
        PROGRESS_STEP, the rest only once S3 has answered; one body below the multipart
        threshold, up to max_concurrency parts at once above it."""
        bodies = 1 if size < self.config.multipart_threshold else self.config.max_concurrency
        return PROGRESS_STEP * bodies

    def result(self, future, key, kind="object"):
        """Wait for an upload begun by submit; kind (volume, catalogue, completion
        indicator, key check) names it in a failure."""
        with upload_named(self.bucket, key, kind):
            try:
                answer = future.result()
            except BaseException:
                # Ctrl-C or SIGTERM too: end the transfer, and wait while s3transfer
                # aborts its multipart upload (parts left behind would be billed).
                future.cancel()
                with contextlib.suppress(Exception):
                    future.result()
                raise
            self.stored.append((key, future.meta.size))
            return answer

    def upload(self, source, key, progress=None, kind="object", **extra_args):
        """Upload a file (a path or a binary file object) as key, and wait for it;
        progress is called with each number of bytes sent."""
        from boto3.s3.transfer import ProgressCallbackInvoker
        subscribers = [ProgressCallbackInvoker(progress)] if progress else []
        with upload_named(self.bucket, key, kind):
            future = self.submit(source, key, subscribers, **extra_args)
        return self.result(future, key, kind)

    def close(self, cancel=False):
        """Wait for the uploads still running, or with cancel (the run is interrupted)
        end them (s3transfer aborts their multipart uploads)."""
        with self.lock:
            self.closing = True
        if cancel:
            # each future itself: TransferManager.shutdown(cancel=True) passes its
            # arguments on in the wrong order (s3transfer 0.17) and fails
            for future in self.futures:
                future.cancel()
        self.manager.shutdown()


@dataclasses.dataclass
class StoredObject:
    name: ObjectName
    size: int


class BucketListing:
    """The backup objects of one location in the bucket listing, grouped by backup set."""

    def __init__(self):
        self.indicators = {}     # (full, incremental) -> {source: StoredObject}
        self.volumes = {}        # (full, incremental, source) -> [StoredObject]
        self.catalogues = {}     # (full, incremental, source) -> StoredObject
        self.keychecks = {}      # full -> [KeyCheck]
        self.prefixes = {}       # prefix listed -> [objects, bytes] (the health record)

    @classmethod
    def load(cls, s3, bucket, prefixes):
        listing = cls()
        for prefix in prefixes:
            listing.load_prefix(s3, bucket, prefix)
        return listing

    def load_prefix(self, s3, bucket, prefix, each_item=None):
        """Add the objects under prefix (one LIST a 1,000); each_item, when given, is
        called with each listed item as S3 gives it (its storage class, say)."""
        totals = self.prefixes.setdefault(prefix, [0, 0])
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if each_item is not None:
                    each_item(item)
                self.add(item["Key"], item.get("Size", 0))
                totals[0] += 1
                totals[1] += item.get("Size", 0)

    def add(self, key, size):
        name = ObjectName.parse(key)
        if name is None:
            check = KeyCheck.parse(key)
            if check is not None:
                self.keychecks.setdefault(check.full, []).append(check)
            return
        stored = StoredObject(name, size)
        if name.catalogue:
            self.catalogues[(name.full, name.incremental, name.source)] = stored
        elif name.indicator:
            self.indicators.setdefault((name.full, name.incremental), {})[name.source] = stored
        else:
            self.volumes.setdefault((name.full, name.incremental, name.source),
                                    []).append(stored)

    def fulls(self):
        return sorted({full for full, incr in self.indicators if incr is None}, reverse=True)

    def is_complete(self, full, incremental, sources):
        present = self.indicators.get((full, incremental), {})
        return all(source in present for source in sources)

    def latest_complete_full(self, sources, month=None):
        for full in self.fulls():
            if month and (full.year, full.month) != month:
                continue
            if self.is_complete(full, None, sources):
                return full
        return None

    def complete_incrementals(self, full, sources):
        found = [incr for (f, incr) in self.indicators
                 if f == full and incr is not None and self.is_complete(f, incr, sources)]
        return sorted(found)

    def newest_keychecks(self, before):
        """The key checks of the newest chain begun before that time that has any ([] when
        none has; one dated later cannot be of an earlier chain)."""
        fulls = [full for full in self.keychecks if full < before]
        return self.keychecks[max(fulls)] if fulls else []


# ============================================================================
# 7-Zip: command lines, list files, limits, the one extract command, the ZIP index
# ============================================================================

SEVEN_ZIP_ERROR_RE = re.compile(r"ERROR: .|errno=\d+ : ")   # 7-Zip's own error lines


def seven_zip_add_argv(settings, archive_path, list_file, password_switch, platform):
    """7-Zip 'add' with the original design's switches: ZIP, AES-256, UTF-8 names, volumes.

    The list file names every file, symbolic link and empty directory of one piece
    (the original design gave a full backup the listed directories with exclusion
    lists and let 7-Zip recurse; a piece, a slice of the selection, cannot be
    written that way).  A non-empty directory is never named: 7-Zip would recurse.
    """
    return [settings.seven_zip, "a", "-tzip", f"-mx={settings.compression_level}",
            "-mem=AES256", "-mcu=on", password_switch, f"-v{settings.volume_size}b",
            "-bb1", "-bd", "-snl", platform.list_charset_switch, "-sccUTF-8", "-y",
            archive_path, "@" + list_file]


def list_file_entry(relative, is_dir, platform):
    """One line of a 7-Zip list file naming exactly this path.

    7-Zip trims blanks at both ends of a line, drops enclosing double quotes
    and cannot hold a line break; each such character becomes the wildcard '?'
    (which also matches it), so the file is still archived.
    """
    line = re.sub(r"[\r\n]", "?", relative)
    if line[:1].isspace() or line[:1] == '"':
        line = "?" + line[1:]
    if not is_dir and (line[-1:].isspace() or line[-1:] == '"'):
        line = line[:-1] + "?"
    return platform.list_file_line(line, is_dir)


def archive_commands(platform, seven_zip_argv, key_variable):
    """7-Zip with the key on its standard input, so that it is on no command line."""
    command = platform.feed_secret(key_variable, platform.command_line(seven_zip_argv))
    return [command] + platform.status_check("archive", SEVEN_ZIP_DONE)


# -- 7-Zip ---------------------------------------------------------------------------

def check_seven_zip(settings):
    """Before any thaw: finding 7-Zip missing after a two-day wait would hurt."""
    program = settings.seven_zip
    found = program if os.path.isfile(program) else shutil.which(program)
    if not found:
        raise AamError(f"7-Zip ({program}) is not installed or not on PATH; install it (or "
                       "set AAM_7ZIP) before restoring.")


def run_seven_zip(settings, platform, argv, key, cwd=None, private=False):
    """7-Zip with the key on stdin: no -p, so the key is on no command line.

    private: what it writes is readable by its owner only (the catalogue).
    """
    env = dict(os.environ, LC_ALL="C.UTF-8")
    options = platform.private_file_options() if private else {}
    try:
        result = subprocess.run([settings.seven_zip] + argv,
                                input=(key + "\n").encode("utf-8"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, **options)
    except OSError as problem:
        raise AamError(f"7-Zip ({settings.seven_zip}) cannot be started: {problem}")
    return result.returncode, platform.decode_output(result.stdout)


class WrongKey(AamError):
    """7-Zip cannot open an archive or a catalogue with the key given."""


def seven_zip_failure(code, output, archive_name, table=None):
    """None when 7-Zip succeeded, else an AamError saying what went wrong."""
    if code == 0:
        return None
    errors = [line.strip() for line in output.splitlines()
              if line.startswith("ERROR") or "Unexpected end" in line]
    if any(line.startswith("ERROR: Wrong password") for line in errors):
        key = (table or RESTORE_ARGS).ref("key")
        return WrongKey(f"The decryption key ({key}) is wrong: 7-Zip cannot open"
                        f" {archive_name}. Nothing was extracted; what was "
                        "downloaded is kept, so a re-run with the right key does not "
                        "download it again.")
    shown = "; ".join(errors[:5]) or f"exit code {code}"
    return AamError(f"7-Zip failed on {archive_name} (exit code {code}): {shown}")


def list_file_can_hold(name):
    """7-Zip trims blanks at the ends of list-file lines and drops enclosing quotes
    (measured), so such names go on its command line instead."""
    return not (name != name.strip() or name[:1] == '"' or name[-1:] == '"'
                or "\n" in name or "\r" in name)


def seven_zip_extract_argv(first_volume, into, platform=None, list_path=None, names=()):
    """The one 7-Zip extract command line: everything of the archive whose first volume
    is given into the directory, overwriting (-aoa: an incremental's version replaces
    the one before), links as links (-snld20: also those pointing outside the tree, as
    the source had them); or, with list_path, exactly the names (written there)."""
    argv = ["x", first_volume, f"-o{os.path.abspath(into)}", "-aoa", "-y", "-snld20",
            "-bd", "-sccUTF-8"]
    if list_path is None:
        return argv
    return argv + exact_names_switches(list_path, names, platform)


def exact_names_switches(list_path, names, platform):
    """7-Zip's switches for exactly these names (written to the list file list_path)."""
    unlisted = write_name_list(list_path, names, platform.sep)
    # -spd: no wildcards; -ssc: letter case counts (Windows 7-Zip ignores it)
    return ["-spd", "-ssc", platform.list_charset_switch, "@" + list_path, "--"] + unlisted


def write_name_list(path, names, sep):
    """A 7-Zip list file of exact names (with -spd); the names a list file cannot hold
    are returned, for 7-Zip's command line."""
    unlisted = []
    with open_private(path) as handle:
        for name in names:
            if list_file_can_hold(name):
                handle.write(name.replace("/", sep) + "\n")
            else:
                unlisted.append(name.replace("/", sep))
    return unlisted


class ZipIndexError(AamError):
    """7-Zip's archive is not laid out as the index expects: nothing is trusted."""


class ZipIndex:
    """Where each entry of one ZIP archive lies in its volumes, read while uploading.

    7-Zip's volumes are a plain byte split of one ZIP file, and it writes every
    local header with the entry's sizes (no data descriptors, measured), so the
    headers can be followed from the first byte to the central directory as
    the volumes go by, without keeping them.  The names are the stored bytes:
    what the catalogue holds, with '/' between names.  Kept in an SQLite file
    (memory stays flat however many files the archive holds).
    """

    LOCAL = b"PK\x03\x04"
    CENTRAL = (b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06")

    def __init__(self, path, volume_size, on_entry=None):
        import sqlite3
        self.volume_size = volume_size
        self.on_entry = on_entry        # instead of the table: called with every name
        self.db = None
        if on_entry is None:
            open_private(path, "wb", exclusive=True).close()
            self.db = sqlite3.connect(path)
            self.db.execute("CREATE TABLE entry (name BLOB PRIMARY KEY, first INTEGER, "
                            "last INTEGER, size INTEGER) WITHOUT ROWID")
        self.rows = []                # entries read from the last block, not yet stored
        self.buffer, self.buffer_start = b"", 0
        self.next_header = 0          # offset of the next local header
        self.central_directory = None
        self.files = 0

    def volume(self, offset):
        return offset // self.volume_size + 1

    def feed(self, data, offset):
        """The bytes at offset of the whole archive (consecutive calls, in order)."""
        end = offset + len(data)
        if self.central_directory is not None or end <= self.next_header:
            return                          # the data of an entry: nothing to read
        if not self.buffer:
            skip = max(0, self.next_header - offset)
            self.buffer, self.buffer_start = data[skip:], offset + skip
        else:
            self.buffer += data
        while self.read_header():
            pass
        if self.rows:       # one statement per block, not per entry: less CPU beside 7-Zip
            self.db.executemany("INSERT OR REPLACE INTO entry VALUES (?, ?, ?, ?)",
                                self.rows)
            self.rows = []
        drop = self.next_header - self.buffer_start
        if drop >= len(self.buffer):
            self.buffer, self.buffer_start = b"", self.next_header
        elif drop > 0:
            self.buffer, self.buffer_start = self.buffer[drop:], self.next_header

    def read_header(self):
        """Read one local header from the buffer; False when more bytes are needed."""
        at = self.next_header - self.buffer_start
        if at < 0 or self.central_directory is not None or len(self.buffer) < at + 4:
            return False
        signature = self.buffer[at:at + 4]
        if signature in self.CENTRAL:
            self.central_directory = self.next_header
            return False
        if signature != self.LOCAL:
            raise ZipIndexError(f"no ZIP header at byte {self.next_header:,}")
        if len(self.buffer) < at + 30:
            return False
        (flags, compressed, size, name_length, extra_length) = struct.unpack(
            "<6xH10xIIHH", self.buffer[at:at + 30])
        header_end = at + 30 + name_length + extra_length
        if len(self.buffer) < header_end:
            return False
        if flags & 0x08:
            raise ZipIndexError("an entry's sizes are not in its local header")
        name = self.buffer[at + 30:at + 30 + name_length]
        if 0xFFFFFFFF in (compressed, size):
            size, compressed = self.zip64_sizes(self.buffer[at + 30 + name_length:header_end])
        end = self.next_header + 30 + name_length + extra_length + compressed
        if self.on_entry is not None:
            self.on_entry(name)
        elif not name.endswith(b"/"):
            self.rows.append((name, self.volume(self.next_header), self.volume(end - 1),
                              size))
            self.files += 1
        self.next_header = end
        return True

    @staticmethod
    def zip64_sizes(extra):
        """(uncompressed, compressed) sizes from a ZIP64 extra field (tag 1)."""
        at = 0
        while at + 4 <= len(extra):
            tag, size = struct.unpack("<HH", extra[at:at + 4])
            if tag == 1 and size >= 16:
                return struct.unpack("<QQ", extra[at + 4:at + 20])
            at += 4 + size
        raise ZipIndexError("an entry over 4 GB has no ZIP64 sizes")

    def finish(self, total_size):
        """After the last volume: the archive must have ended in its central directory."""
        self.db.commit()
        if self.central_directory is None:
            raise ZipIndexError(f"the central directory was not found in {total_size:,} "
                                "bytes")
        return self.volume(self.central_directory)

    def locate(self, lines):
        """(line, (first volume, last volume, size as archived) or None) for each work-file
        line in turn.

        One join in SQLite rather than a query per path: at a million files that
        is seconds less.  The lines are kept in this owner-only file (not in a
        temporary one of SQLite's own)."""
        self.db.execute("CREATE TABLE wanted (seq INTEGER PRIMARY KEY, name BLOB, line TEXT)")
        self.db.executemany("INSERT INTO wanted (name, line) VALUES (?, ?)",
                            ((work_line_path(line).encode("utf-8", "surrogateescape"), line)
                             for line in lines))
        for line, first, last, size in self.db.execute(
                "SELECT wanted.line, entry.first, entry.last, entry.size FROM wanted "
                "LEFT JOIN entry ON entry.name = wanted.name ORDER BY wanted.seq"):
            yield line, None if first is None else (first, last, size)

    def close(self):
        self.db.close()


# ============================================================================
# Mirror tools: rsync and Robocopy
# ============================================================================

class PatternLimits(typing.NamedTuple):
    """When a tool would apply a name pattern differently from the selection:
    (pattern, its regex, names of the directories leading to the listed ones, the
    walk) -> True means 'use the exact paths the walk excluded instead'."""

    directory: object
    file: object


def _matches_an_ancestor(_pattern, regex, ancestors, _walk):
    return any(regex.fullmatch(name) for name in ancestors)
# rsync's patterns are anchored below each listed directory: none is misapplied.
RSYNC_LIMITS = PatternLimits(lambda *_args: False, lambda *_args: False)


# Robocopy drops a listed directory below a directory the pattern matches, and
# takes a word starting with '-' for one of its switches.
ROBOCOPY_LIMITS = PatternLimits(
    lambda p, regex, ancestors, walk: p.startswith("-") or _matches_an_ancestor(
        p, regex, ancestors, walk),
    lambda p, regex, ancestors, walk: p.startswith("-"))


def rsync_pattern(parts):
    """Join literal and wildcard parts into one rsync pattern.

    rsync treats '\\' as an escape only when the pattern has wildcards, so
    literal parts are escaped exactly when the result is a wildcard pattern.
    """
    wild = any(not literal or any(c in text for c in "*?[")
               for text, literal in parts)
    out = []
    for text, literal in parts:
        if literal and wild:
            text = re.sub(r"([\\*?\[])", r"\\\1", text)
        out.append(text)
    return "".join(out)


def _literal(text):
    return (text, True)


def _wildcards(pattern):
    # our wildcards are only '*' and '?'; any other rsync-special character is literal
    return ("".join("\\" + c if c in "[\\" else c for c in pattern), False)


def rsync_rules(plan, platform=None):
    """rsync filter rules giving the same result as the selection (first match wins)."""
    exclusions = compile_exclusions(plan, platform or current_platform(), RSYNC_LIMITS)
    rules = ["- " + rsync_pattern([_literal("/" + rel + ("/" if is_dir else ""))])
             for rel, is_dir in exclusions.paths]
    for listed in plan.listed:
        rules += rsync_pattern_rules(listed, exclusions)
    return rules + rsync_listed_rules(plan.listed)


def rsync_pattern_rules(listed, exclusions):
    """The name patterns, below one listed directory, at any depth."""
    base = _literal("/" + listed + "/" if listed else "/")
    rules = []
    for pattern in exclusions.dir_patterns:
        for middle in ("", "**/"):
            rules.append("- " + rsync_pattern([base, (middle, False), _wildcards(pattern),
                                               _literal("/")]))
    for pattern in exclusions.file_patterns:
        # a directory that merely looks like an excluded file name is kept
        for sign, end in (("+ ", [_literal("/")]), ("- ", [])):
            for middle in ("", "**/"):
                rules.append(sign + rsync_pattern([base, (middle, False),
                                                   _wildcards(pattern)] + end))
    return rules


def rsync_listed_rules(listed_dirs):
    """Only the listed directories and the directories leading to them."""
    ancestors, rules = set(), []
    for listed in listed_dirs:
        if not listed:
            continue
        parts = listed.split("/")
        ancestors.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        rules.append("+ " + rsync_pattern([_literal("/" + listed + "/")]))
    rules += ["+ " + rsync_pattern([_literal("/" + a + "/")]) for a in sorted(ancestors)]
    if "" not in listed_dirs:
        for ancestor in [""] + sorted(ancestors):
            base = "/" + ancestor + "/" if ancestor else "/"
            rules.append("- " + rsync_pattern([_literal(base), ("*", False)]))
    return rules


# -- the generated script's commands: the mirror and 7-Zip ----------------------------

# Exit codes that still mean the tool did its work: the checks that follow report
# each file that is missing.
RSYNC_DONE = (0, 23, 24)        # 23: some files could not be copied; 24: some vanished
ROBOCOPY_DONE = tuple(range(8))  # below 8: files copied, extras, mismatches
# Robocopy's default retries (1,000,000, 30 s apart) would hold the lock for months on
# one unwritable destination file.
ROBOCOPY_RETRIES = ("/r:2", "/w:5")
ROBOCOPY_LOG = "robocopy_log.txt"


def rsync_commands(platform, target, plan, keep, work_dir):
    """rsync with the same inclusion/exclusion result as the selection."""
    rules_file = os.path.join(work_dir, MIRROR_RULES)
    # NUL-separated (--from0) so that any file name, even with a newline, fits.
    _write_private_bytes(rules_file, b"".join(
        rule.encode("utf-8", "surrogateescape") + b"\0"
        for rule in rsync_rules(plan, platform)))
    # -a includes -D: FIFOs, sockets and devices would be made in the mirror (and a
    # device read by a tool that later follows it); they are not backed up.
    argv = ["rsync", "-a", "--no-specials", "--no-devices", "--from0",
            f"--filter=merge {rules_file}"]
    if not keep:
        argv.append("--delete")
    argv += ["--", "./", target.rstrip("/") + "/"]
    return [platform.command_line(argv)] + platform.status_check("mirror", RSYNC_DONE)


def robocopy_commands(platform, view_root, target, plan, keep, work_dir, walk=None):
    """robocopy "q:" "<target>" /e [/purge] /unilog:"..." /xd ... /xf ... (the original
    design's command).

    Robocopy can only exclude, so /xd names every directory of the mount that
    is neither listed nor on the way to a listed one and /xf every file lying
    outside the listed directories, both as absolute paths on the shadow drive;
    then the user's exclusions.  Added to the original command: /xjd (a junction
    on the shadow drive leads back to the live disk, and the profile's legacy
    junctions deny listing), bounded retries, /np and /tee (the report also goes
    to the log, without progress counters).
    """
    dirs, files, problems = robocopy_exclusions(platform, view_root, plan, walk)
    quote = platform.bat_quote
    words = [r'"%SystemRoot%\System32\robocopy.exe"', quote(view_root.rstrip(platform.sep)),
             quote(target), "/e"] + ([] if keep else ["/purge"])
    words.append("/unilog:" + quote(ntpath.join(work_dir, ROBOCOPY_LOG)))
    for switch, paths in (("/xd", dirs), ("/xf", files)):
        if paths:
            words += [switch] + [quote(p) for p in paths]
    command = " ".join(words + ["/xjd", *ROBOCOPY_RETRIES, "/np", "/tee"])
    platform.check_command_length(command, f"The Robocopy command for {view_root}",
                                  "too many directories and files lie beside the listed "
                                  "directories. List their parent directory instead, or "
                                  "move the loose files into a directory.")
    lines = [platform.echo_line(MARK_VALIDATION_FAILURE + p) for p in problems]
    return lines + [command] + platform.status_check("mirror", ROBOCOPY_DONE)


def robocopy_exclusions(platform, view_root, plan, walk=None):
    """(/xd entries, /xf entries, problems) for one mount on the shadow drive.

    Name patterns stay names (Robocopy matches them at any depth), except those
    it would misapply (ROBOCOPY_LIMITS): they become the exact paths the
    selection excludes.
    """
    outside_dirs, outside_files, problems = scan_outside_listed(platform, view_root, plan)
    exclusions = compile_exclusions(plan, platform, ROBOCOPY_LIMITS, walk, view_root)

    def on_drive(paths, is_dir):
        return [platform.view_path(view_root, rel) for rel, d in paths if d == is_dir]

    dirs = [platform.view_path(view_root, rel) for rel in outside_dirs] + \
        on_drive(exclusions.paths, True) + exclusions.dir_patterns + \
        on_drive(exclusions.walked, True)
    # A special file the walk found (an AF_UNIX socket) is not copied either; junctions
    # are /xjd's.
    specials = [(rel, False) for rel, what in (walk.specials if walk else ())
                if what != JUNCTION]
    files = [platform.view_path(view_root, rel) for rel in outside_files] + \
        on_drive(exclusions.paths, False) + exclusions.file_patterns + \
        on_drive(exclusions.walked, False) + on_drive(specials, False)
    return unique_paths(dirs, platform), unique_paths(files, platform), problems


# ============================================================================
# Child run: the per-mount pass (mirror, 7-Zip, validation)
# ============================================================================

PLAN_FILE = "shadow_copy_instruction.txt"
OUTPUT_FILE = "shadow_copy_command_output.txt"
PIECES_DIR = "pieces"            # pieces/<n>.lst: the 7-Zip list of the files of piece n
MIRROR_RULES = "mirror_filter_rules.txt"
# parent -> child: the state to compare with, the first free piece number, the piece
# size, and for a continued backup the journal whose done pieces it reuses
CATALOGUE_BASE = "catalogue_base.json"
GATE_FILE = "child_gate.txt"   # parent -> a child started early: "wait", then "go"
GATE_WAIT, GATE_GO = "wait", "go"
GATE_POLL_SECONDS = 0.005
CATALOGUE_WORK = "catalogue_work.tsv"        # child -> parent: the walk's catalogue lines
# child -> parent: the earlier pieces that hold an entry this backup no longer uses
SUPERSEDED_FILE = "superseded_pieces.json"
ARCHIVE_DIR = "archives"       # archives/<n>/backup.zip.NNN, then archives/<n>.done
DONE_SUFFIX = ".done"          # written by the child once a piece's 7-Zip has ended
# child -> parent, for the progress line: bytes of file content selected, in the lists
# whose 7-Zip has ended, and in the list it is on
ARCHIVE_PROGRESS = "archive_progress.json"
FINAL_VOLUME = re.compile(r"backup\.zip\.(\d{3,})")   # closed for good: see final_volumes
ANY_VOLUME = re.compile(r"backup\.zip\.(\d{3,})((?:\.[0-9A-Fa-f]+)?\.tmp)?")
# Finished volumes on disk awaiting upload before 7-Zip is paused.  Two: the one going up
# and the next, read for its SHA-256 and index and ready to follow its last byte.  The
# parent begins that next one while S3 has yet to answer the one before
# (UPLOADS_IN_FLIGHT), so for that moment both on disk are in flight and 7-Zip stays
# paused until the earlier one is deleted; it then has the whole upload of a volume to
# write the next before the link could idle.  A third would only matter when 7-Zip is
# barely faster than the link, and would add a volume to the temporary disk, which stays
# bounded by two finished volumes besides those 7-Zip is writing.
WAITING_VOLUMES = 2
# Volume uploads in flight: one sending, and the one before it (of the same piece) awaiting
# S3's answer (a round trip the link would otherwise idle through, after every volume).
# Never two sending: an interruption then loses what it did with one at a time, the piece
# in progress.
UPLOADS_IN_FLIGHT = 2
WORK_MARKER = ".aam_auto_backup_work"
# parent and child -> a later run: "<pid> <start>" of each process group they start
PROCESS_GROUPS = "process_groups.txt"
CHILD_KEY_VARIABLE = "AAM_CHILD_ENCRYPTION_KEY"
MTIME_TOLERANCE = 2.0     # seconds: FAT/exFAT USB drives store times to 2 s
MESSAGES_QUOTED = 3       # a failed tool's own messages quoted in the summary (all in the log)
REPORTED_ORPHANS = 20     # unused volumes named in the e-mail (all in the log)


def child_say(text):
    # Not flushed line by line (7-Zip prints one per file): run_child flushes at its
    # end, and the parent reads the output only once the child has ended.
    print(text)


# -- one exclusion compiler, printed for rsync, Robocopy and 7-Zip -------------------

class Exclusions(typing.NamedTuple):
    """The plan's exclusions in the form one tool can apply exactly (paths relative to
    the mount, platform separators; (path, is_dir) pairs)."""

    paths: list            # the instruction file's full paths
    dir_patterns: list     # name patterns the tool applies as the selection does
    file_patterns: list
    walked: list           # paths the walk excluded by a pattern the tool would misapply


def compile_exclusions(plan, platform, limits, walk=None, root=None):
    """The plan's exclusions for a tool with these limits.

    walk: a finished TreeWalk of the mount (the child's own); when there is none
    and one is needed, root is walked.
    """
    def walked():
        nonlocal walk
        if walk is None:
            walk = TreeWalk(root, plan, platform)
            walk.files()
        return walk

    ancestors = {part for listed in plan.listed if listed
                 for part in listed.split(platform.sep)[:-1]}
    patterns, exact = ([], []), ([], [])
    for index, kind in enumerate((plan.dir_patterns, plan.file_patterns)):
        unsafe = limits[index]
        for pattern in kind:
            regex = wildcard_regex(pattern, platform.case_insensitive)
            if unsafe(pattern, regex, ancestors, walked):
                exact[index].append(regex)
            else:
                patterns[index].append(pattern)
    paths = [(rel, True) for rel in plan.excluded_dir_paths] + \
        [(rel, False) for rel in plan.excluded_file_paths]
    return Exclusions(paths, patterns[0], patterns[1],
                      walked_exclusions(walked, exact, platform) if any(exact) else [])


def walked_exclusions(walked, exact, platform):
    """The paths the walk excluded whose name one of the exact patterns matches."""
    found = []
    for rel, is_dir in walked().excluded:
        name = rel.rsplit(platform.sep, 1)[-1]
        if any(regex.fullmatch(name) for regex in exact[0 if is_dir else 1]):
            found.append((rel, is_dir))
    return found
SEVEN_ZIP_DONE = (0, 1)          # 1: warnings (a file could not be read, or vanished)


def unique_paths(paths, platform):
    """paths without repeats, compared as the file system does, first spelling kept."""
    seen, kept = set(), []
    for path in paths:
        if platform.comparable(path) not in seen:
            seen.add(platform.comparable(path))
            kept.append(path)
    return kept


def scan_outside_listed(platform, view_root, plan):
    """What lies in the mount outside the listed directories (Robocopy's /xd, /xf).

    Breadth first from the shadow drive's root: a directory equal to a listed
    one is kept whole, one leading to a listed one is descended into, any
    other is returned (for /xd); every file met on the way lies outside the
    listed directories (for /xf).  A name is joined to its parent, and 'leads
    to' means a prefix up to a separator ('test' does not lead to 'test2\\x').
    """
    listed = {platform.comparable(rel) for rel in plan.listed}
    dirs, files, problems = [], [], []
    level = [] if "" in listed else [""]
    while level:
        next_level = []
        for parent in level:
            where = platform.view_path(view_root, parent)
            try:
                with os.scandir(platform.long_path(where)) as iterator:
                    entries = sorted(iterator, key=lambda e: (e.name.lower(), e.name))
            except OSError as problem:
                problems.append(f"cannot read directory {where}: "
                                f"{problem.strerror or problem}")
                continue
            for entry in entries:
                rel = parent + platform.sep + entry.name if parent else entry.name
                key = platform.comparable(rel)
                if not entry.is_dir(follow_symlinks=False):
                    files.append(rel)
                elif any(item.startswith(key + platform.sep) for item in listed):
                    next_level.append(rel)
                elif key not in listed:
                    dirs.append(rel)
        level = next_level
    return dirs, files, problems


def validate_mirror(view_root, target, plan, platform, start, keep):
    """Compare the mirror with the source after the copy (a rule the original learnt).

    A missing file or a differing modification time is a failure only for a
    file that was last changed before the backup started; sizes are compared
    only then.  Then the other way round: what is in the mirror but should not
    be (mirror_extras).
    """
    failures = []
    start_ts = start.timestamp()
    for walked in TreeWalk(view_root, plan, platform):
        st = walked.st
        if stat.S_ISDIR(st.st_mode):
            continue
        destination = os.path.join(target, walked.path)
        try:
            copied = os.lstat(platform.long_path(destination))
        except OSError:
            if platform.changed_time(st) < start_ts:
                failures.append(f"{walked.path}: missing in the mirror {target}")
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if abs(copied.st_mtime - st.st_mtime) > MTIME_TOLERANCE:
            if st.st_mtime < start_ts:
                failures.append(
                    f"{walked.path}: mismatching modification time (source "
                    f"{_iso(st.st_mtime)}, mirror {_iso(copied.st_mtime)})")
        elif st.st_mtime <= start_ts and copied.st_size != st.st_size:
            failures.append(f"{walked.path}: mismatching size (source {st.st_size}, "
                            f"mirror {copied.st_size})")
    return failures + mirror_extras(view_root, target, plan, platform, keep, start_ts)


def mirror_extras(view_root, target, plan, platform, keep, start_ts):
    """Files and directories in the mirror that should not be there.

    Whatever argument 15 says, nothing the instructions exclude may be in the
    mirror while the source has it (an rsync that ignores a filter rule, a
    Robocopy /xd that misses).  When the mirror drops what the source lost (keep
    False), anything the selection does not hold is an extra too, unless it was
    copied during this run (the source lost it meanwhile: the leniency shown to
    files missing from the mirror, the other way round).  A directory that should
    not be there is reported once, not file by file.
    """
    selected, sep, extras = mirror_selection(plan, platform), platform.sep, []
    pending = [("", "" in {platform.comparable(rel) for rel in plan.listed})]
    while pending:
        rel_dir, inside = pending.pop()
        for entry in _sorted_entries(target.rstrip(sep) + sep + rel_dir, platform):
            rel = rel_dir + sep + entry.name if rel_dir else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            wanted, listed = selected(rel, entry.name, is_dir, inside)
            in_source = os.path.lexists(platform.long_path(view_root.rstrip(sep) + sep + rel))
            shown = rel + (sep if is_dir else "")
            if not wanted and in_source:
                extras.append(f"{shown}: excluded by the instruction file, yet in the mirror "
                              f"{target}; delete it there")
            elif not keep and not in_source and platform.changed_time(
                    entry.stat(follow_symlinks=False)) < start_ts:
                extras.append(f"{shown}: in the mirror {target} but not in the source "
                              f"({BACKUP_ARGS.ref('keep')} is False); delete it "
                              "there")
            elif is_dir and wanted:
                pending.append((rel, inside or listed))
    return extras


def mirror_selection(plan, platform):
    """(relative path, name, is_dir, inside a listed directory) -> (selected, listed)."""
    selector, sep = Selector(plan, platform), platform.sep
    listed = {platform.comparable(rel) for rel in plan.listed}
    on_the_way = {platform.comparable(sep.join(rel.split(sep)[:depth]))
                  for rel in plan.listed for depth in range(1, rel.count(sep) + 1)}

    def selected(rel, name, is_dir, inside):
        key = platform.comparable(rel)
        if is_dir and inside:
            return not selector.dir_excluded(rel, name), False
        if is_dir:
            return key in listed or key in on_the_way, key in listed
        return inside and not selector.file_excluded(rel, name), False
    return selected


def _sorted_entries(path, platform):
    """The entries of a mirror directory by name (none if it cannot be read: the
    comparison with the source has reported what is missing)."""
    try:
        with os.scandir(platform.long_path(path)) as iterator:
            return sorted(iterator, key=BY_NAME)
    except OSError:
        return []


def _iso(timestamp):
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S.%f UTC")


class VolumeThrottle:
    """Pauses 7-Zip while WAITING_VOLUMES finished volumes wait for the parent's upload.

    The parent uploads and deletes each finished volume; when the upload is
    slower than 7-Zip, stopping the script's process group (SIGSTOP) until
    the parent catches up bounds the temporary disk to a few volumes.  The
    volumes of every piece count: the next piece's 7-Zip runs while the last
    volumes of the one before go up (the link never idles).  POSIX only:
    without SIGSTOP (Windows) the volumes just wait.
    """

    # seconds: small against the time 7-Zip takes to write a volume of a useful size (it
    # writes a few MB at once, so several volumes of the smallest size can finish
    # between two looks)
    INTERVAL = 0.02

    def __init__(self, process, archive_dir, platform):
        self.process, self.archive_dir, self.platform = process, archive_dir, platform
        self.paused = False
        self.halted = False     # the group is being stopped: never paused again

    def halt(self):
        """From a signal handler or another thread: a plain flag, no lock."""
        self.halted = True

    def run(self, done):
        if not self.platform.can_pause_group:
            return
        while not done.wait(self.INTERVAL):
            pause = not self.halted and self.should_pause()
            if pause != self.paused:
                self.set_paused(pause)
        self.release()

    def should_pause(self):
        volumes = volumes_on_disk(self.archive_dir)
        # Pause only while the parent can go on: the lowest volume (of the lowest
        # piece) is finished (7-Zip may still rewrite an earlier .tmp one; it must
        # run to close it).
        return sum(volumes.values()) >= WAITING_VOLUMES and volumes[min(volumes)]

    def release(self):
        if self.paused:
            self.set_paused(False)

    def set_paused(self, paused):
        self.platform.pause_group(self.process, paused)
        self.paused = paused


def run_script(argv, env, on_line, platform, work_dir, parent, archive_dir=None):
    """Run the generated script, passing each output line to on_line.

    The script runs in its own process group so that it can be stopped as a
    whole; if our parent (pid `parent`) dies, stop it too.  The group is recorded
    in work_dir, so that it can be ended should this child die.  With
    archive_dir, 7-Zip is paused while its finished volumes wait for upload.
    """
    import threading
    process = throttle = None
    output_ended = stopping = False
    done = threading.Event()      # set by this thread's own steps only (see on_sigterm)

    def end_group():
        if throttle:
            throttle.halt()
        platform.stop_group(process)
        if not output_ended:
            # A refused early child's 7-Zip must be gone before the next child starts.
            platform.wait_group_gone(process)

    def on_sigterm(*_ignored):
        # A handler runs in this thread between two of its steps, perhaps inside
        # done.set() or done.wait(), whose lock is not reentrant: it takes no lock (a
        # SIGTERM there once hung the child and its threads for good).
        nonlocal stopping
        if stopping:
            return
        stopping = True
        if process is not None:
            end_group()
            sys.exit(EXIT_INTERRUPTED)
        # else the script is being started: it is stopped as soon as it is (below)

    # The handler is in place before the script starts: a SIGTERM at any moment
    # after that stops it (a child started early may be ended as it starts 7-Zip).
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        started = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env,
                                   **platform.script_popen_options())
        record_group(work_dir, started.pid, platform)
        throttle = VolumeThrottle(started, archive_dir, platform) if archive_dir else None
        process = started
        if stopping:
            end_group()
            sys.exit(EXIT_INTERRUPTED)
        if throttle:
            threading.Thread(target=throttle.run, args=(done,), daemon=True).start()
        threading.Thread(target=stop_when_orphaned, args=(parent, done, end_group),
                         daemon=True).start()
        for raw in process.stdout:
            on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        output_ended = True      # the group has closed its output: nothing to wait for
        return process.wait()
    finally:
        done.set()
        signal.signal(signal.SIGTERM, previous)


def stop_when_orphaned(parent, done, stop):
    """Call stop when the process that started this one is gone (checked each second)."""
    while not done.wait(1.0):
        if os.getppid() != parent:
            stop()
            return


def record_group(work_dir, pid, platform):
    """Note a process group this run has started (the child pass, its script), so
    that whoever finds it left over ends exactly it (end_recorded_groups)."""
    start = platform.process_start(pid)
    if start is not None:
        with contextlib.suppress(OSError):    # unrecorded, it can still end on its own
            _write_private_text(os.path.join(work_dir, PROCESS_GROUPS), f"{pid} {start}\n",
                                append=True)


def _read_pid(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def end_recorded_groups(work_dir, platform):
    """End what is left of the process groups recorded in work_dir, the latest
    first (the script before the child that started it); the processes ended."""
    try:
        with open(os.path.join(work_dir, PROCESS_GROUPS), encoding="utf-8") as handle:
            records = [line.partition(" ") for line in handle.read().splitlines()]
    except OSError:
        return []
    return [ended for pid, _, start in reversed(records) if pid.isdigit()
            for ended in platform.end_group(int(pid), start)]


def exit_codes(lines, status):
    """The exit codes the child's output names ('rsync failed with exit code 11'), else
    the child's own: a child that ran to its end exits 0 even when a tool failed."""
    named = [line[len(MARK_PREFIX):].rstrip(".") for line in lines
             if line.startswith(MARK_PREFIX) and " with exit code " in line]
    return "; ".join(named) or f"exit code {status}"


def run_child(child, platform, settings):
    """The child pass (ShadowSpawn runs it on Windows) for one mount directory.

    Everything is printed: the parent appends this output to the log and
    checks the success markers.  Exit status 0 means the pass ran to its end.
    """
    parent = platform.follow_parent(
        _read_pid(os.path.join(child.work_dir, WORK_MARKER)) or os.getppid())
    if parent is None:
        child_say("AAM Auto Backup: the user-mode pass that started this child pass has "
                  "ended.")
        return EXIT_INTERRUPTED
    view_root = platform.child_view_root(child.mount, child.drive_letter)
    plan = read_source_plan(os.path.join(child.work_dir, PLAN_FILE), view_root, platform)
    full = child.scope is Scope.FULL
    since = None if full else (child.latest_incremental or child.latest_full)
    if not full and since is None:
        child_say("AAM Auto Backup: an incremental backup needs the latest complete "
                  f"backup time ({CHILD_ARGS.ref('latest_full')} or "
                  f"{CHILD_ARGS.number('latest_incremental')}).")
        return EXIT_FAILURE
    child_say(f"Source {child.mount}: {child.scope.word} backup"
              + ("" if full else f" of files changed since {describe_stamp(since)}"))
    walk, selected, pieces = record_selection(child, view_root, plan, platform, since)
    # A child started early waits for the parent's go before anything that leaves
    # the work directory: the mirror changes the user's drive.  7-Zip's volumes stay
    # in the work directory, and the parent uploads them only once it has confirmed
    # this child (it ends a refused one and removes its volumes unsent), so without
    # a mirror 7-Zip need not wait: the child waits after it instead.
    if "local" in child.destinations and not wait_at_gate(child.work_dir, parent):
        return EXIT_INTERRUPTED
    for problem in walk.problems:
        child_say(MARK_VALIDATION_FAILURE + problem)
    for special, what in walk.specials:
        child_say(f"Not backed up ({what}): {walk.absolute(special)}")
    target, mirror = child_mirror(child, platform, view_root, plan, walk)
    run_generated_script(child, platform, view_root, mirror, parent)
    archive_failed = False
    if "AWS" in child.destinations:
        if not pieces:
            child_say(MARK_NOTHING_TO_ARCHIVE)
        archive_failed = not archive_pieces(child, platform, settings, view_root, pieces,
                                            parent)
    if not wait_at_gate(child.work_dir, parent):
        return EXIT_INTERRUPTED
    failures = list(walk.problems)
    if target is not None:
        failures += validate_mirror(view_root, target, plan, platform, child.start,
                                    child.keep)
    for failure in failures[len(walk.problems):]:
        child_say(MARK_VALIDATION_FAILURE + failure)
    child_say(MARK_RESULT + json.dumps({
        "files": selected if "AWS" in child.destinations else 0,
        "failures": len(failures), "archive_failed": archive_failed}))
    sys.stdout.flush()
    return EXIT_OK


def wait_at_gate(work_dir, parent):
    """A child started before S3 answered waits here (before its mirror, or without
    one before it ends) until the parent has checked the guess it was started on
    ("go"); on a wrong guess the parent ends it.  True at once for a child not
    started early; False when the parent (pid `parent`) is gone."""
    path = os.path.join(work_dir, GATE_FILE)
    while True:
        try:
            with open(path, encoding="utf-8") as handle:
                word = handle.read().strip()
        except FileNotFoundError:
            return True
        if word == GATE_GO:
            return True
        if os.getppid() != parent:
            return False
        time.sleep(GATE_POLL_SECONDS)


def child_mirror(child, platform, view_root, plan, walk):
    """(the mirror directory, the script's mirror commands); (None, []) without one."""
    if "local" not in child.destinations:
        return None, []
    target = platform.mirror_directory(child.mirror_root, child.mount)
    try:
        os.makedirs(platform.long_path(target), exist_ok=True)
        return target, [platform.mirror_commands(view_root, target, plan, child.keep,
                                                 child.work_dir, walk)]
    except OSError as problem:      # a missing or read-only drive: the archive goes on
        child_say(f"{MARK_PREFIX}{platform.mirror_tool} failed: the mirror directory "
                  f"{target} cannot be created ({problem.strerror or problem}).")
        return None, []


class PieceWriter:
    """Puts the entries to archive into pieces as the walk lists them, in catalogue
    order: pieces/<n>.lst, one 7-Zip list per piece, each of about piece_size bytes
    of file content at most (a larger file is a piece of its own).  Lists are
    numbered from first (the parent's first free piece number); sizes: {number:
    bytes of file content}, in list order."""

    def __init__(self, directory, first, piece_size, platform):
        self.directory, self.piece_size, self.platform = directory, piece_size, platform
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.number, self.bytes, self.handle = first, 0, None
        self.sizes = {}

    def add(self, walked):
        """List one entry; the number of the list it went into."""
        size = content_size(walked.st)
        if self.handle is not None and starts_a_piece(self.bytes, size, self.piece_size):
            self.handle.close()
            self.handle, self.number, self.bytes = None, self.number + 1, 0
        if self.handle is None:
            self.handle = open_private(piece_list(self.directory, self.number))
            self.sizes[self.number] = 0
        is_dir = stat.S_ISDIR(walked.st.st_mode)
        self.handle.write(list_file_entry(walked.path, is_dir, self.platform) + "\n")
        self.bytes += size
        self.sizes[self.number] += size
        return self.number

    def close(self):
        if self.handle is not None:
            self.handle.close()


def content_size(st):
    """The bytes of file content an entry puts into a piece (a directory: none)."""
    return 0 if stat.S_ISDIR(st.st_mode) else st.st_size


def starts_a_piece(piece_bytes, size, piece_size):
    """Whether an entry of size bytes begins a new piece after the open one, which holds
    piece_bytes: a piece holds about piece_size bytes of file content at most (a larger
    file is a piece of its own)."""
    return piece_bytes + size > piece_size


def piece_list(directory, number):
    return os.path.join(directory, f"{number}.lst")


def archive_pieces(child, platform, settings, view_root, lists, parent):
    """Run 7-Zip on each list in turn, piece n into archives/<n>/, and write
    archives/<n>.done once its 7-Zip has ended.  Pieces are numbered from the first
    list's number on, one per 7-Zip run: a piece whose 7-Zip cannot read a file
    (a bad sector, EIO) is made again without it as the next piece, so that one
    unreadable file costs only itself.  False when 7-Zip failed otherwise (no
    further piece is made).  lists: {list number: bytes of file content}."""
    number = next(iter(lists), 0)
    selected, ended = sum(lists.values()), 0
    for list_number, content in lists.items():
        write_archive_progress(child.work_dir, selected, ended, content)
        list_path = piece_list(os.path.join(child.work_dir, PIECES_DIR), list_number)
        while True:
            outcome = run_piece(child, platform, settings, view_root, number, list_path,
                                parent)
            left = None      # entries left in the list without the file 7-Zip could not read
            if outcome.unreadable is not None and not outcome.succeeded:
                left = drop_from_list(list_path, outcome.unreadable, view_root, platform)
            write_piece_done(child.work_dir, number, dict(
                list=list_number, succeeded=outcome.succeeded, code=outcome.code,
                volumes=outcome.volumes, unreadable=outcome.unreadable,
                retried=bool(left), nothing_left=left == 0))
            number += 1
            if outcome.succeeded:
                break
            if left is None:
                return False
            child_say(f"{MARK_PREFIX}7-Zip could not read {outcome.unreadable} "
                      f"({outcome.error}): piece {number - 1} "
                      + (f"is made again without it, as piece {number}." if left else
                         "held nothing else."))
            if not left:
                break
        ended += content
    write_archive_progress(child.work_dir, selected, ended, 0)
    return True


class PieceOutcome:
    """What one piece's 7-Zip said, read from the script's output as it comes (one
    line at a time: 7-Zip prints a line per file)."""

    def __init__(self, platform):
        self.platform = platform
        self.succeeded, self.code, self.volumes = False, None, None
        self.unreadable = self.error = None
        self.name_follows = False
        failed = re.escape(f"{MARK_PREFIX}{platform.tool_name('archive')} failed with "
                           "exit code ")
        self.failed_re = re.compile(failed + r"(-?\d+)\.")

    def line(self, text):
        child_say(text)
        if text[:2] == "+ ":
            return                  # a file added (7-Zip's line per file): nothing to read
        if self.name_follows and text.strip():
            # 7-Zip names the file it could not read on the line after its error (the
            # last '+ ' line may be another file: it compresses several at once)
            self.unreadable, self.name_follows = text, False
        elif text.startswith("ERROR: ") and self.platform.read_error_re.search(text):
            self.error, self.name_follows = text[len("ERROR: "):].strip(), True
        elif text == self.platform.marker("archive"):
            self.succeeded = True
        elif self.failed_re.match(text):
            self.code = int(self.failed_re.match(text)[1])
        elif text.startswith("Volumes: "):
            self.volumes = int(text.split()[1])


def run_piece(child, platform, settings, view_root, number, list_path, parent):
    """7-Zip on one piece's list, in a generated script of its own."""
    archive_root = os.path.join(child.work_dir, ARCHIVE_DIR)
    directory = os.path.join(archive_root, str(number))
    for owner_only in (archive_root, directory):      # (makedirs gives parents 0o755)
        with contextlib.suppress(FileExistsError):
            os.mkdir(owner_only, 0o700)
    argv = seven_zip_add_argv(settings, os.path.join(directory, "backup.zip"), list_path,
                              platform.password_switch(CHILD_KEY_VARIABLE), platform)
    outcome = PieceOutcome(platform)
    run_generated_script(child, platform, view_root,
                         [archive_commands(platform, argv, CHILD_KEY_VARIABLE)], parent,
                         archive_root, outcome.line)
    return outcome


def drop_from_list(list_path, name, view_root, platform):
    """Take the file 7-Zip named out of a piece's list: the number of lines left, or None
    if no line names it (then the piece cannot be made without it, and the archive
    fails).  7-Zip names it as listed, relative to the mount; a full path is taken
    relative to it too."""
    root = view_root.rstrip(platform.sep) + platform.sep
    if platform.comparable(name).startswith(platform.comparable(root)):
        name = name[len(root):]
    unwanted = list_file_entry(name, False, platform)
    with open(list_path, encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
        lines = handle.read().splitlines()
    kept = [line for line in lines if line != unwanted]
    if len(kept) == len(lines):
        return None
    _write_private_text(list_path, "\n".join(kept) + "\n")
    return len(kept)


def write_piece_done(work_dir, number, outcome):
    """archives/<n>.done (the parent may read it at any time)."""
    _write_whole(os.path.join(work_dir, ARCHIVE_DIR, f"{number}{DONE_SUFFIX}"),
                 json.dumps(outcome))


def write_archive_progress(work_dir, selected, ended, current):
    """ARCHIVE_PROGRESS, for the parent's progress line: the bytes of file content in the
    lists (selected), in those whose 7-Zip has ended, and in the one 7-Zip is on (0:
    none).  Written as each list starts, once per piece.  Not 7-Zip's own percent
    (-bsp1, which costs it no CPU worth measuring): it goes to the script's output,
    which reaches the parent only once the child has ended, so each update would need
    a channel of its own; the parent measures the bytes 7-Zip writes anyway
    (BackupProgress.look_at_archive)."""
    _write_whole(os.path.join(work_dir, ARCHIVE_PROGRESS), json.dumps(
        {"selected": selected, "ended": ended, "current": current}))


def read_archive_progress(work_dir):
    """What the child last wrote of ARCHIVE_PROGRESS, or None (not yet)."""
    return _read_whole_json(os.path.join(work_dir, ARCHIVE_PROGRESS))


# Windows refuses, for a moment, to open a file that the other process is renaming
# into place (its handle holds DELETE access, which Python's open does not share), and
# to replace a file the other process has open: a sharing violation, PermissionError.
# Both sides of these files retry for up to about a second; elsewhere a PermissionError
# is real and is raised after the same wait.
SHARED_FILE_RETRIES = 50
SHARED_FILE_RETRY_SECONDS = 0.02


def _retry_shared(action):
    for attempt in range(SHARED_FILE_RETRIES):
        try:
            return action()
        except PermissionError:
            if attempt == SHARED_FILE_RETRIES - 1:
                raise
            time.sleep(SHARED_FILE_RETRY_SECONDS)


def _write_whole(path, text):
    """Write a private file whole or not at all: the other process may read it any time."""
    _write_private_text(path + ".tmp", text)
    _retry_shared(lambda: os.replace(path + ".tmp", path))


def _read_whole_json(path):
    """What the other process wrote whole to path (_write_whole), or None (not yet)."""
    def read():
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    try:
        return _retry_shared(read)
    except FileNotFoundError:
        return None


def read_piece_done(archive_root, number):
    """What the child wrote of piece number once its 7-Zip ended, or None (not yet)."""
    return _read_whole_json(os.path.join(archive_root, f"{number}{DONE_SUFFIX}"))


def run_generated_script(child, platform, view_root, commands, parent, archive_root=None,
                         on_line=child_say):
    """Write a script (the mirror, or one piece's 7-Zip) and run it, its output printed;
    with archive_root, 7-Zip is paused while finished volumes wait for the upload."""
    script = os.path.join(child.work_dir, platform.script_name)
    platform.write_script(script, view_root, commands)
    env = dict(os.environ, **{CHILD_KEY_VARIABLE: child.key})
    status = run_script(platform.script_argv(script), env, on_line, platform,
                        child.work_dir, parent, archive_root)
    if status != 0:
        child_say(f"AAM Auto Backup: the backup script ended with exit code {status}.")


def record_selection(child, view_root, plan, platform, since):
    """Walk the mount once: the catalogue work file and, with AWS as a destination,
    the pieces' 7-Zip lists.  Returns the walk, the number of files to archive and
    {list number: bytes of file content}.

    The parent names the local state to compare with (CATALOGUE_BASE); without
    one, an incremental selects by the time rule alone.  For a continued backup it
    names the journal too: what its done pieces hold is not archived again.
    """
    work_dir = child.work_dir
    base = read_catalogue_base(work_dir)
    previous = base.get("state") or None
    full = child.scope is Scope.FULL
    walk = TreeWalk(view_root, plan, platform, since)
    done = DoneEntries(base["journal"], base["source"]) if base.get("journal") else None
    recorder = ChangeRecorder(walk, None if full else previous, platform, full, done)
    work = CatalogueWorkFile(os.path.join(work_dir, CATALOGUE_WORK), {"source_path": child.mount})
    pieces = PieceWriter(os.path.join(work_dir, PIECES_DIR), base.get("first_piece", 1),
                         base.get("piece_size", DEFAULT_PIECE_SIZE), platform)
    try:
        recorder.run(work, pieces.add if "AWS" in child.destinations else lambda _w: 0)
    finally:
        work.close()
        pieces.close()
    if done:
        _write_private_text(os.path.join(work_dir, SUPERSEDED_FILE),
                            json.dumps(sorted(done.superseded)))
    return walk, recorder.to_archive_count, pieces.sizes


def read_catalogue_base(work_dir):
    """The parent's word (CATALOGUE_BASE): {"state": path or None, "first_piece",
    "piece_size", and for a continued backup "journal" and "source"}."""
    try:
        with open(os.path.join(work_dir, CATALOGUE_BASE), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return {}


# ============================================================================
# Upload: volumes as DEEP_ARCHIVE, then the catalogue and the indicator
# ============================================================================

INDICATOR_FORMAT = "aam-auto-backup-indicator"
# 2: the archive is in pieces ("pieces"); readers accept 1 and 2
INDICATOR_VERSION = 2


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def final_volumes(archive_dir):
    """{number: path} of the volumes 7-Zip has finished.

    7-Zip writes a volume as backup.zip.NNN[.xxxxxxxx].tmp and may seek back
    into earlier .tmp volumes; it renames one to backup.zip.NNN only after
    closing it for good, so the final name is the one sound sign of a
    finished volume.
    """
    found = {}
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(archive_dir):
            match = FINAL_VOLUME.fullmatch(name)
            if match:
                found[int(match[1])] = os.path.join(archive_dir, name)
    return found


def volumes_on_disk(archive_root):
    """{(piece, volume number): finished?} of the volumes 7-Zip has begun in every
    piece's directory (see final_volumes)."""
    volumes = {}
    with contextlib.suppress(FileNotFoundError):
        for piece in os.listdir(archive_root):
            if not piece.isdigit():
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(os.path.join(archive_root, piece)):
                    match = ANY_VOLUME.fullmatch(name)
                    if match:
                        volumes[(int(piece), int(match[1]))] = not match[2]
    return volumes


def directory_size(path):
    """Bytes in the files of a directory and of its directories (7-Zip's volumes of
    every piece, finished or not)."""
    total = 0
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_dir(follow_symlinks=False):
                        total += directory_size(entry.path)
                    else:
                        total += entry.stat().st_size
    return total


class VolumeCountMismatch(AamError):
    """The volumes uploaded are not exactly the ones 7-Zip reported."""


class VolumeUpload:
    """One volume on its way up (PieceUploader): read once for its SHA-256 and the
    piece's index, then handed to the link; an s3transfer subscriber of its own upload
    (the bytes read into the request so far, its end)."""

    def __init__(self, piece, number, path, key, size, digest, unreported, on_change,
                 on_bytes=None):
        import threading
        self.piece, self.number, self.path, self.key = piece, number, path, key
        self.size, self.digest, self.on_change = size, digest, on_change
        self.unreported = unreported    # RunUploads.unreported_bytes(size)
        # on_bytes: the run's progress line (a terminal); else a line of this volume's own
        self.progress = None if on_bytes else Progress(
            f"Uploading volume {number:03d} of piece {piece}", size)
        self.on_bytes = on_bytes or self.progress.add
        self.future = self.failure = None
        self.sent, self.ended = 0, False
        self.lock = threading.Lock()

    def all_sent(self):
        """Every byte read into the request (but those s3transfer tells only later)."""
        return self.sent >= self.size - self.unreported

    def on_queued(self, **_kwargs):
        pass

    def on_progress(self, bytes_transferred, **_kwargs):
        # from s3transfer's threads (the parts of a multipart upload, each its own); a
        # retry's negative amount lowers the sum
        with self.lock:
            self.sent += bytes_transferred
        self.on_bytes(bytes_transferred)
        if self.all_sent() and not self.ended:
            self.on_change()

    def on_done(self, **_kwargs):
        self.ended = True
        self.on_change()

    def record(self):
        return {"name": self.key, "size": self.size, "sha256": self.digest}


class PieceUploader:
    """Uploads 7-Zip's volumes while 7-Zip writes the next ones (pipelined upload),
    piece after piece.

    The child writes piece n's volumes into archives/<n>/ and, once its 7-Zip has
    ended, archives/<n>.done.  poll() is called every UPLOAD_POLL_SECONDS while the
    child runs; it never waits for the network.  Each final volume, in order (the
    pieces in number order, a piece's volumes in number order), is read once for its
    SHA-256 and the piece's index while the volume before it goes up, and then waits
    ready: it is begun as soon as the one before has sent its last byte, by the
    s3transfer thread that sent it, so that the link does not idle while S3 answers
    the one before, nor while a volume is hashed.  So at most UPLOADS_IN_FLIGHT are in
    flight, and only one of them sending: an interruption loses no more than with one
    at a time (the piece in progress), and the bandwidth limit of RunUploads caps them
    together.  A piece's first volume waits until the piece before is recorded in the
    journal (begin_ready; end_pieces, once S3 has answered its last volume): the link
    idles for that answer and the record, once a piece.  Each volume is deleted once
    uploaded, so the disk holds a few volumes, not the whole archive (the child pauses
    7-Zip while WAITING_VOLUMES finished ones wait).  The ledger hears of each piece:
    started (before its first volume goes up), done (once its last is up, with its
    archive index; pieces end in number order) or failed.  The next piece may be
    started before the one before is done.  After an upload error the remaining
    volumes are deleted unread, so 7-Zip is never left paused; the error is raised
    by finish(), and no indicator is written.
    """

    def __init__(self, uploads, work_dir, key_for, log, ledger, first_piece, volume_size,
                 before_upload=None):
        import threading
        self.uploads, self.work_dir = uploads, work_dir     # uploads: RunUploads
        self.archive_dir = os.path.join(work_dir, ARCHIVE_DIR)
        self.before_upload = before_upload   # called before each upload (the key check)
        self.key_for = key_for          # (piece, volume number) -> S3 key
        self.log, self.ledger, self.volume_size = log, ledger, volume_size
        self.piece = first_piece        # the first piece not ended yet
        self.cursor = (first_piece, 1)  # the next volume to read and hand to the link
        self.outcomes = {}              # piece -> what the child wrote once its 7-Zip ended
        self.indexes, self.offsets = {}, {}  # piece -> its ZipIndex, the bytes fed to it
        self.uploaded_records = {}      # piece -> the records of its volumes uploaded
        self.queue = []                 # VolumeUploads handed to the link, not taken back
        self.ready = None               # the one of them not begun yet
        self.lock = threading.RLock()   # queue and ready: s3transfer's threads begin uploads
        self.changed = threading.Event()  # an upload sent its last byte, or ended
        self.pieces = []                # the pieces done: {number, volumes, central...}
        self.uploaded = 0               # bytes uploaded by this run, every piece
        self.error = None
        self.held_lines = []            # announced while the child ran; logged later
        self.live = False
        self.on_bytes = None            # on a terminal: BackupProgress.volume_bytes
        self.stopping = False           # interrupted: no upload is begun any more

    @property
    def records(self):
        """The volumes uploaded of the pieces begun and not ended (lost if the run ends)."""
        return [r for piece in sorted(self.uploaded_records)
                for r in self.uploaded_records[piece]]

    def uploaded_bytes(self):
        return self.uploaded

    def poll(self):
        """Take back the uploads that ended, hand the next final volume to the link (or,
        after an error, discard it) and end each piece whose 7-Zip has ended and whose
        volumes are all up."""
        self.take_ended()
        self.hand_over_next()
        self.take_ended()
        if self.error is not None:
            self.discard_ready()

    def discard_ready(self):
        """After an error nothing more is begun: the volume waiting ready is deleted."""
        with self.lock:
            upload, self.ready = self.ready, None
            if upload is not None:
                self.queue.remove(upload)
        if upload is not None:
            if upload.progress:
                upload.progress.close()
            with contextlib.suppress(OSError):
                os.remove(upload.path)
            self.end_pieces()

    def wait_for_change(self, timeout):
        """Wait until an upload has sent its last byte or ended, or timeout seconds."""
        self.changed.wait(timeout)
        self.changed.clear()

    def drain(self):
        """poll until every final volume there is has gone up (or failed)."""
        while True:
            self.poll()
            with self.lock:
                if not self.queue:
                    return
            self.wait_for_change(UPLOAD_POLL_SECONDS)

    # -- the link: one volume sending, the one before awaiting S3's answer -----------
    def link_changed(self):
        """From s3transfer's threads: an upload sent its last byte, or ended."""
        self.changed.set()
        self.begin_ready()

    def begin_ready(self):
        """Begin the ready volume's upload if the link is free: no upload is sending,
        fewer than UPLOADS_IN_FLIGHT await S3's answer, and every piece before the
        volume's is recorded."""
        with self.lock:
            upload = self.ready
            if upload is None or self.error is not None or self.stopping:
                return
            running = [u for u in self.queue if u.future is not None and not u.ended]
            if len(running) >= UPLOADS_IN_FLIGHT or not all(u.all_sent() for u in running):
                return
            if upload.piece != self.piece:
                # A piece's first volume waits until the piece before is recorded in the
                # journal (S3 has answered its last volume, and end_pieces begins this
                # one once it is): sent before the record, its bytes and the whole
                # piece before would be lost, should the run be cut off in between.
                return
            self.ready = None
            try:
                upload.future = self.uploads.submit(upload.path, upload.key, [upload],
                                                    StorageClass=DEEP_ARCHIVE)
            except Exception as problem:     # noqa: BLE001 - taken back by take_ended
                upload.failure, upload.ended = problem, True
                self.changed.set()

    # -- volumes in order --------------------------------------------------------------
    def hand_over_next(self):
        """Read the final volumes next in order until one waits ready for the link
        (after an error: delete them), moving on to the next piece once a piece's 7-Zip
        has ended and its volumes are all handed over."""
        while self.ready is None:
            piece, number = self.cursor
            directory = os.path.join(self.archive_dir, str(piece))
            path = final_volumes(directory).get(number)
            if path is None:
                if piece not in self.outcomes:
                    done = read_piece_done(self.archive_dir, piece)
                    if done is None:
                        return
                    self.outcomes[piece] = done
                    continue            # 7-Zip has ended: what is left is final
                self.cursor = (piece + 1, 1)
                self.end_pieces()
                continue
            self.cursor = (piece, number + 1)
            self.hand_over(piece, number, path)

    def hand_over(self, piece, number, path):
        if self.error is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
            return
        size = None
        with self.volume_errors():
            if number == 1:
                self.ledger.started(piece)
                self.indexes[piece] = ZipIndex(self.index_path(piece), self.volume_size)
                self.offsets[piece] = 0
            said = self.before_upload() if self.before_upload else None
            if said:
                self.announce(said)
            digest = self.digest_and_index(piece, path)
            size = os.path.getsize(path)
        if size is None:
            with contextlib.suppress(OSError):
                os.remove(path)
            return
        key = self.key_for(piece, number)
        self.announce(f"Uploading {key} ({size:,} bytes, DEEP_ARCHIVE)")
        upload = VolumeUpload(piece, number, path, key, size, digest,
                              self.uploads.unreported_bytes(size), self.link_changed,
                              self.on_bytes)
        with self.lock:
            self.queue.append(upload)
            self.ready = upload
        self.begin_ready()

    def digest_and_index(self, piece, path):
        """The volume's SHA-256, read once; its bytes also go to the piece's index."""
        digest = hashlib.sha256()
        index, offset = self.indexes[piece], self.offsets[piece]
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(MIB), b""):
                digest.update(block)
                index.feed(block, offset)
                offset += len(block)
        self.offsets[piece] = offset
        return digest.hexdigest()

    def take_ended(self):
        """The uploads that ended, in order: recorded (or the error kept), deleted."""
        while True:
            with self.lock:
                if not self.queue or not self.queue[0].ended:
                    break
                upload = self.queue.pop(0)
            self.take(upload)
        self.end_pieces()

    def take(self, upload):
        """An upload that ended: its volume recorded (or the error kept), and deleted."""
        if upload.progress:
            upload.progress.close()
        uploaded = False
        with self.volume_errors():
            if upload.failure is not None:
                raise upload.failure
            self.uploads.result(upload.future, upload.key, "volume")
            self.uploaded_records.setdefault(upload.piece, []).append(upload.record())
            self.uploaded += upload.size
            uploaded = True
        with contextlib.suppress(OSError):
            os.remove(upload.path)
        if uploaded:
            checkpoint("volume-uploaded")

    @contextlib.contextmanager
    def volume_errors(self):
        """An error while reading or uploading a volume is kept for finish() (Ctrl-C and
        SIGTERM pass); a volume 7-Zip removed is none: it failed, and the piece's .done
        says so."""
        try:
            yield
        except FileNotFoundError:
            pass
        except Exception as problem:     # noqa: BLE001 - reported by finish()
            self.error = self.error or problem

    def end_pieces(self):
        """End, in order, each piece whose 7-Zip has ended and whose volumes are up."""
        while self.cursor[0] > self.piece:
            with self.lock:
                if any(upload.piece == self.piece for upload in self.queue):
                    return
            with INTERRUPTIONS.held():
                self.end_piece(self.piece, self.outcomes.pop(self.piece))
                self.piece += 1
            self.begin_ready()        # the next piece's first volume, if it waits ready

    def index_path(self, piece):
        return os.path.join(self.work_dir, f"archive_index_{piece}.sqlite")

    def end_piece(self, piece, done):
        """The piece's 7-Zip has ended and its volumes are up: done or failed."""
        directory = os.path.join(self.archive_dir, str(piece))
        records = self.uploaded_records.pop(piece, [])
        index = self.indexes.pop(piece, None)
        self.offsets.pop(piece, None)
        checkpoint("piece-ending")
        try:
            if self.error is None and done["succeeded"]:
                self.check_volumes(piece, directory, done["volumes"], records)
                central = index.finish(sum(r["size"] for r in records))
                self.ledger.done(piece, records, central, index, done)
                self.pieces.append({"number": piece, "volumes": records,
                                    "volume_size": self.volume_size,
                                    "central_directory_volume": central})
                checkpoint("piece-done")
            elif not done["succeeded"]:
                self.ledger.failed(piece, records, done)
        except Interrupted:
            raise
        except Exception as problem:     # noqa: BLE001 - reported by finish()
            self.error = self.error or problem
        if index is not None:
            index.close()
        for leftover in (self.index_path(piece), os.path.join(
                self.archive_dir, f"{piece}{DONE_SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        shutil.rmtree(directory, ignore_errors=True)

    def check_volumes(self, piece, directory, reported_count, records):
        """The volumes uploaded are exactly 7-Zip's, each of the volume size but the last."""
        uploaded = len(records)
        leftovers = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        expected = uploaded if reported_count is None else reported_count
        if leftovers or uploaded != expected or not uploaded:
            raise VolumeCountMismatch(
                f"7-Zip reported {reported_count} volume(s) of piece {piece}, "
                f"{uploaded} were uploaded"
                + (f", and {', '.join(leftovers)} remained" if leftovers else ""))
        if any(r["size"] != self.volume_size for r in records[:-1]):
            raise ZipIndexError("7-Zip's volumes are not all of the volume size")

    def announce(self, text):
        """Live on the terminal; in the log under the upload section (its order)."""
        if self.live:
            self.log.line(text)
        else:
            self.log.to_terminal(text)
            self.held_lines.append(text)

    def start_log_section(self):
        self.live = True
        for text in self.held_lines:
            self.log.line(text, terminal=False)
        self.held_lines = []

    def keep_what_is_up(self):
        """The run is interrupted (Ctrl-C, SIGTERM) and its child ended: the pieces whose
        volumes S3 has all answered are recorded in the journal, as they would have
        been a moment later, so that the next run does not send them again; nothing
        more is begun."""
        with self.lock:
            self.stopping = True
        self.take_ended()

    def close_indexes(self):
        """The indexes of the pieces not ended (after a failure): closed, so that the
        work directory can be deleted (Windows keeps an open file)."""
        for index in self.indexes.values():
            with contextlib.suppress(Exception):
                index.close()
        self.indexes = {}

    def finish(self):
        """Upload what is left; the pieces done (an upload error is raised here)."""
        self.drain()
        if self.error is not None:
            raise self.error
        leftovers = sorted(os.listdir(self.archive_dir)) if os.path.isdir(
            self.archive_dir) else []
        if leftovers:
            raise VolumeCountMismatch(f"{', '.join(leftovers)} remained in "
                                      f"{self.archive_dir} after the last piece")
        return self.pieces


def indicator_body(run_sources, source_name, source_path, files, pieces, full, backup,
                   since, platform, catalogue=None):
    """The indicator's JSON manifest: what a restore needs to trust this source.

    Format 2: the archive is in pieces, each a self-contained 7-Zip archive of
    its own volumes; "volumes" still lists every volume (of every piece, in
    order), so that a reader summing sizes need not know pieces.  Version 1.1.0
    refuses format 2 with a clear message (use the newer version to restore).
    catalogue: the catalogue object of this source in this backup (name, size,
    SHA-256, kind); a set is complete only with it.
    """
    extra = {"catalogue": catalogue} if catalogue else {}
    return json.dumps({
        "format": INDICATOR_FORMAT,
        "format_version": INDICATOR_VERSION,
        "program_version": VERSION,
        "platform": platform.name,
        "scope": "full" if backup == full else "incremental",
        "full_backup": format_stamp(full),
        "backup": format_stamp(backup),
        "changed_since": format_stamp(since) if since else None,
        "sources": sorted(run_sources),
        "source": source_name,
        "source_path": source_path,
        "files": files,
        "volumes": [volume for piece in pieces for volume in piece["volumes"]],
        "pieces": [{"number": piece["number"], "volumes": piece["volumes"],
                    "central_directory_volume": piece["central_directory_volume"]}
                   for piece in pieces],
        **extra,
    }, indent=1).encode("utf-8")


# -- the catalogue of one source in one run ----------------------------------------

CATALOGUE_FILE = "catalogue.tsv"             # its name inside the encrypted ZIP
CATALOGUE_ZIP = "catalogue.zip"
KEPT_SUFFIX = ".pending"    # the catalogue and the state kept beside the journal


def finalize_catalogue(work_path, lines, header, catalogue_path, state_path):
    """The catalogue for S3 and the next local state, from the child's work file.

    Each line the child labelled for a piece (+<n>) is replaced by the one the
    journal holds for it (lines: in the work file's order, as the pieces were
    made): with the piece and volumes its bytes lie in, MISSING (7-Zip could not
    read it), or gone (it vanished before 7-Zip came to it).  Every other line is
    copied as it is.  Returns (files archived in this backup, missing paths,
    lines in the catalogue).
    """
    stamp, delta = header["backup"], header["kind"] == DELTA
    ours = stamp + ":"
    catalogue = CatalogueWriter(catalogue_path, header)
    state = CatalogueWriter(state_path, dict(header, kind=LISTING, base=None))
    archived, missing = 0, []
    try:
        for flag, line in work_lines(work_path):
            # Only the location field changes: a line is copied, not parsed and
            # written again (a million lines wait for this after 7-Zip has ended).
            location = line.rsplit("\t", 2)[1]
            if location[:1] == ARCHIVED_NOW:
                final = next(lines, None)
                if final is None or final.split("\t", 2)[1] != line.split("\t", 2)[1]:
                    raise ZipIndexError(f"the journal holds no line for "
                                        f"{work_line_path(line)} of this run's pieces")
                line, location = final, final.rsplit("\t", 2)[1]
                if line[0] == DELETED:
                    flag = CHANGED
                elif location == MISSING:
                    missing.append(work_line_path(line))
            kind = line[0]
            archived += location.startswith(ours)
            if kind != DELETED:
                state.write_line(line)
            if (flag == CHANGED) if delta else (kind != DELETED):
                catalogue.write_line(line)
    finally:
        catalogue.close()
        state.close()
    return archived, missing, catalogue.count


def work_lines(work_path):
    """(flag, catalogue line) of each entry of the child's work file, in order."""
    with open(work_path, encoding="utf-8", errors="surrogateescape") as work:
        for raw in work:
            if not raw.startswith("#"):
                yield raw[0], raw[2:]


def work_line_path(line):
    return unescape_field(line.split("\t", 2)[1])


class PieceLines:
    """The work-file lines of each piece's list in turn (a forward cursor: the lists
    were made in catalogue order, so each one's lines follow the one before's)."""

    def __init__(self, work_path):
        self.lines = work_lines(work_path)
        self.pending = None

    def of_list(self, number):
        label = f"{ARCHIVED_NOW}{number}"
        while True:
            if self.pending is None:
                self.pending = next(self.lines, None)
                if self.pending is None:
                    return
            line = self.pending[1]
            location = line.rsplit("\t", 2)[1]
            if location[:1] == ARCHIVED_NOW and int(location[1:]) > number:
                return
            self.pending = None
            if location == label:
                yield line

    def close(self):
        self.lines.close()


class SourceCatalogue:
    """This run's catalogue of one source: from the child's work file to S3, then
    kept as the local state the next incremental compares with."""

    def __init__(self, run, source, name):
        self.run, self.source, self.name = run, source, name
        self.prefix = self.state_prefix(run, name)
        self.base = None          # the local state compared with, if any
        self.base_note = None     # what the log says of it
        self.work_dir = run.work_dir
        self.first_piece = 1      # the first piece this run makes of the source
        self.kind = None

    @staticmethod
    def state_prefix(run, name):
        """Where this source's local states live (state_file_prefix)."""
        return state_file_prefix(run.settings.state_dir, run.args.bucket, run.args.location,
                                 name)

    def path(self, name):
        return os.path.join(self.work_dir, name)

    def kept_path(self, what):
        """Beside the journal: this backup's catalogue ('catalogue.zip') or finished
        local state ('tsv') until the indicator is up."""
        return f"{self.prefix}.{format_stamp(self.run.stamp)}.{what}{KEPT_SUFFIX}"

    def choose_base(self, verify=True):
        """Tell the child which local state to compare with (none for a full backup),
        the first free piece number and, continuing a backup whose done pieces hold
        entries of this source, the journal; base_note says which state, for the log.
        verify=False: the early child's guess, not read through yet (check_early_child
        does before it may go on)."""
        self.find_base(verify)
        run = self.run
        journal = run.journal
        self.first_piece = journal.next_piece() if journal else 1
        reuse = journal is not None and journal.has_entries(self.name)
        _write_private_text(self.path(CATALOGUE_BASE), json.dumps({
            "state": self.base, "first_piece": self.first_piece,
            "piece_size": run.settings.piece_size,
            "journal": journal.path if reuse else None, "source": self.name}))

    def find_base(self, verify=True):
        """Find the local state to compare with, and say which (base, base_note); only
        reads (a preview uses it too)."""
        run = self.run
        if run.scope is Scope.INCREMENTAL:
            self.base, problem = run.local_state_to_compare(self, verify)
            if self.base:
                self.base_note = (f"Change detection: compared with the local catalogue of "
                                  f"the backup {describe_stamp(run.since)} ({self.base}).")
            else:
                why = problem or (f"there is none in {run.settings.state_dir} (missing, or "
                                  "of another backup)")
                self.base_note = (
                    f"Change detection for {self.source.mount}: the local catalogue of the "
                    f"latest complete backup {describe_stamp(run.since)} cannot be used: "
                    f"{why}. Files are selected by their times alone, and this backup's "
                    "catalogue lists the whole tree.")

    def header(self, pieces):
        run = self.run
        full, _incremental = run.backup_times()
        return {"kind": DELTA if self.base else LISTING, "source": self.name,
                "source_path": self.source.mount, "platform": run.platform.name,
                "full_backup": format_stamp(full), "backup": format_stamp(run.stamp),
                "base": format_stamp(run.since) if self.base else None,
                "pieces": pieces, "program_version": VERSION}

    def finalize(self, pieces):
        """Write the catalogue and the finished state (kept beside the journal);
        returns (archived, missing paths, entries)."""
        self.kind = DELTA if self.base else LISTING
        superseded = set(self.superseded())
        described = [{"number": p["number"], "volumes": len(p["volumes"]),
                      "volume_size": p["volume_size"],
                      "central_directory_volume": p["central_directory_volume"],
                      **({"superseded": True} if p["number"] in superseded else {})}
                     for p in pieces]
        lines = self.run.journal.lines_from(self.name, self.first_piece)
        result = finalize_catalogue(self.path(CATALOGUE_WORK), lines, self.header(described),
                                    self.path(CATALOGUE_FILE), self.kept_path("tsv"))
        seal_local_state(self.kept_path("tsv"), self.run.state_key(), self.name)
        return result

    def superseded(self):
        """The earlier pieces the child found holding an entry this backup does not use."""
        try:
            with open(self.path(SUPERSEDED_FILE), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return []

    def make_zip(self):
        """Encrypt the catalogue with the archive key, into its kept file (owner-only);
        returns its description for the journal and the indicator."""
        run = self.run
        zip_path = self.kept_path("catalogue.zip")
        with contextlib.suppress(FileNotFoundError):
            os.remove(zip_path)            # 7-Zip would add to an earlier attempt's
        code, output = run_seven_zip(
            run.settings, run.platform,
            # -mx=1: the catalogue waits in the run's tail; -mx=5 took 1.3 s instead of
            # 0.3 s for 200,000 files, for a catalogue 8% smaller.
            ["a", "-tzip", "-mx=1", "-mem=AES256", run.platform.password_switch(""),
             "-bd", "-sccUTF-8", "-y", zip_path, CATALOGUE_FILE], run.args.key,
            cwd=self.work_dir, private=True)
        if code != 0:
            last = output.strip().splitlines()[-1] if output.strip() else ""
            raise AamError(f"7-Zip could not write the catalogue {self.object_key()} "
                           f"(exit code {code}): {last}")
        return zip_path

    def object_key(self):
        full, incremental = self.run.backup_times()
        return ObjectName(self.run.args.location, full, incremental, False, self.name,
                          catalogue=True).key

    def describe(self, zip_path, entries):
        run = self.run
        return {"name": self.object_key(), "size": os.path.getsize(zip_path),
                "sha256": sha256_of(zip_path), "kind": self.kind,
                "base": format_stamp(run.since) if self.base else None, "entries": entries}

    def keep_state(self, state_file):
        """Once the indicator is up: this backup's state is what the next one compares with."""
        if not state_file or not os.path.exists(state_file):
            return
        try:
            save_local_state(self.prefix, state_file, self.run.stamp)
        except OSError as problem:
            self.run.log.line(f"Warning: the local catalogue cannot be kept in "
                              f"{self.run.settings.state_dir} ({problem}); the next "
                              "incremental selects files by their times alone.")


class PieceLedger:
    """What the journal records of one source's pieces as the upload finishes them
    (PieceUploader's ledger): a piece's entries, each with the piece and volumes its
    bytes lie in, from the child's work-file lines of this run."""

    def __init__(self, run, catalogue):
        self.run, self.catalogue, self.journal = run, catalogue, run.journal
        self.stamp = format_stamp(run.stamp)
        self.lines = None             # PieceLines, from the first piece done on
        self.announce = run.log.line

    def started(self, number):
        self.journal.piece_started(number, self.catalogue.name, self.run.settings.volume_size)

    def list_lines(self, number):
        """The work-file lines of the entries the child put into list number."""
        if self.lines is None:        # the child's walk, and so its work file, has ended
            self.lines = PieceLines(self.catalogue.path(CATALOGUE_WORK))
        return self.lines.of_list(number)

    def done(self, number, records, central, index, outcome):
        located = index.locate(self.list_lines(outcome["list"]))
        self.journal.piece_done(number, self.catalogue.name, records, central,
                                self.final_lines(number, located))

    def final_lines(self, number, placed):
        """(key, catalogue line) of each entry of the piece, as the catalogue will have it."""
        for line, place in placed:
            head, _location, target = line.rsplit("\t", 2)
            path = work_line_path(line)
            if line[0] == DIRECTORY:
                final = f"{head}\t{NO_CONTENT}\t{target}"
            elif place:
                first, last, size = place
                kind, name, walked, rest = head.split("\t", 3)
                if kind == FILE and size != int(walked):
                    # 7-Zip read it while it changed: the archive holds what it read
                    self.announce(f"Changed while it was read: {self.live(path)} ({int(walked):,} "
                                  f"bytes when listed, {size:,} archived); the catalogue "
                                  "has the archived size, and the next backup takes it "
                                  "again.")
                    head = "\t".join((kind, name, str(size), rest))
                final = f"{head}\t{located(self.stamp, number, first, last)}\t{target}"
            elif os.path.lexists(self.run.platform.long_path(self.live(path))):
                final = f"{head}\t{MISSING}\t{target}"       # 7-Zip could not read it
            else:
                final = Entry(DELETED, path).line()             # gone before 7-Zip came
            yield catalogue_key(path), final

    def live(self, path):
        sep = self.run.platform.sep
        return self.catalogue.source.mount.rstrip(sep) + sep + path.replace("/", sep)

    def failed(self, number, records, outcome):
        """A piece whose 7-Zip failed: its volumes already up are of no use.  When it
        failed on the one file its list held (unreadable), that list is finished: its
        entry is recorded, held by no archive."""
        entries = ()
        if outcome.get("nothing_left"):
            entries = self.final_lines(number, ((line, None) for line in self.list_lines(
                outcome["list"])))
        self.journal.piece_failed(number, self.catalogue.name, entries)
        orphans = [(record["name"], record["size"]) for record in records]
        if orphans:
            self.announce(f"Piece {number} failed (7-Zip exit code {outcome['code']}); the "
                          f"{len(orphans)} volume(s) of it uploaded before stay unused:")
            self.run.name_orphans(self.journal.new_orphans(orphans), log=self.announce)

    def close(self):
        if self.lines is not None:
            self.lines.close()


# ============================================================================
# Backup: what S3 holds, and what the run does (full, incremental, continued; the key check)
# ============================================================================

class BackupDecision:
    """Part of BackupRun: what S3 holds and what this run does with it -- the
    full/incremental decision, the pending backup continued or given up (the journal),
    and the key check.  (BackupRun's parts share its attributes; each part is one
    step of the data's way, in the order the run takes them.)"""

    # -- S3 query and the full/incremental decision ----------------------
    def query_s3(self, plan, pending=None):
        """List the months that matter, then decide: continue the pending backup (its
        journal), or a full or an incremental backup as the rules say."""
        self.log.section(SECTION_LATEST)
        sources = [self.platform.source_name(s.mount) for s in plan.sources]
        try:
            self.session = aws_session(self.args.access_key_id, self.args.secret_access_key)
            self.s3 = aws_client(self.session, "s3", self.settings.region)
            self.listing = self.list_bucket(sources, pending)
        except aws_errors() as problem:
            cause = describe_aws_error(problem, credentials=BACKUP_ARGS.credentials_ref())
            self.skip_aws(f"AWS S3 cannot be queried ({cause})")
            if pending:
                pending.close()
            return
        listing = self.listing
        month = (self.start.year, self.start.month)
        full = listing.latest_complete_full(sources, month if self.regular else None)
        incrementals = listing.complete_incrementals(full, sources) if full else []
        self.latest_full, self.incrementals_since = full, len(incrementals)
        self.latest_incremental = incrementals[-1] if incrementals else None
        where = (f"in {self.start:%Y-%m} (UTC)" if self.regular
                 else f"in the last {MONTHS_SCANNED} months")
        self.log.line(f"Latest complete full backup {where}: {describe_stamp(full)}")
        self.log.line(f"Latest complete incremental backup of it: "
                      f"{describe_stamp(self.latest_incremental)}")
        if pending is None or not self.continue_pending(pending, sources):
            self.decide_scope(full, sources, where)
            if pending is None:
                self.name_lost_volumes()
        self.check_key(listing)

    def list_bucket(self, sources, pending=None):
        """The key checks, and the months a full backup to build on may lie in: the
        current UTC month for a regular backup; for incremental-only the newest months
        back to the first holding a complete full (the latest one), six at most; and
        the month of the pending backup's full backup, if it is another."""
        location, bucket = self.args.location, self.args.bucket
        listing = BucketListing()
        listing.load_prefix(self.s3, bucket, keycheck_prefix(location))
        loaded = []
        for prefix in month_prefixes(location, self.start, 1 if self.regular
                                     else MONTHS_SCANNED):
            listing.load_prefix(self.s3, bucket, prefix)
            loaded.append(prefix)
            if listing.latest_complete_full(sources):
                break
        own = pending and month_prefixes(location, parse_stamp(pending.backup["full"]), 1)[0]
        if own and own not in loaded and len(loaded) < MONTHS_SCANNED:
            listing.load_prefix(self.s3, bucket, own)
        return listing

    def skip_aws(self, reason):
        """S3 cannot take this run's backup: say why; the local mirror is still made."""
        message = (f"{reason}; the AWS part of this backup is skipped"
                   + (", the local mirror is still made." if self.local else "."))
        self.log.line(f"ERROR: {message}")
        self.failures.append(message)
        self.aws = False

    # -- the pending backup: continue it, or abandon it ---------------------
    def journal_path(self):
        return journal_path(self.settings.state_dir, self.args.bucket, self.args.location)

    def pending_journal(self):
        """The journal of a backup an earlier run did not finish, or None."""
        path = self.journal_path()
        try:
            return self.journal_kind.open(path)
        except JournalDamaged as problem:
            self.drop_damaged_journal(path, problem)
            return None

    def drop_damaged_journal(self, path, problem):
        self.log.line(f"Warning: {problem}: the backup it records cannot be continued; "
                      "the journal is removed, and the volumes that backup left in S3 "
                      "are named below as unused.")
        remove_journal_files(path)

    def continue_pending(self, journal, sources):
        """Continue the pending backup when the rules allow (True), else abandon it."""
        backup = journal.backup
        reason = self.abandon_reason(backup, sources)
        if reason:
            self.abandon(journal, reason)
            return False
        self.journal = journal
        self.scope = Scope.FULL if backup["scope"] == Scope.FULL.word else Scope.INCREMENTAL
        self.stamp = parse_stamp(backup["stamp"])
        self.base_full = parse_stamp(backup["full"])
        self.since = parse_stamp(backup["since"]) if backup["since"] else None
        full, incremental = self.backup_times()
        present = self.listing.indicators.get((full, incremental), {})
        self.done_sources = {name for name in sources if name in present}
        pieces, size = self.keep_done_pieces(journal, sources)
        self.continued = {"pieces": pieces, "bytes": size}
        what = f"the {self.scope.word} backup {describe_stamp(self.stamp)}"
        self.log.line(f"Backup scope: continuing {what}, begun "
                      f"{local_time_text(self.stamp)} and interrupted "
                      f"{backup['attempts']} time(s): {pieces} piece(s) ({format_bytes(size)}) "
                      "already in S3" + (f"; complete for {', '.join(sorted(self.done_sources))}"
                                         if self.done_sources else "") + ".")
        if self.since:
            self.log.line(f"It is an incremental of the full backup "
                          f"{describe_stamp(self.base_full)}: files changed since "
                          f"{describe_stamp(self.since)}.")
        return True

    def abandon_reason(self, backup, sources):
        """Why the pending backup cannot be continued, or None."""
        if sorted(name for name, _path in backup["sources"]) != sorted(sources):
            return "the instruction file's sources have changed since it began"
        stamp, start = parse_stamp(backup["stamp"]), self.start
        previous = start.replace(day=1) - dt.timedelta(days=1)
        if (stamp.year, stamp.month) not in {(start.year, start.month),
                                             (previous.year, previous.month)}:
            return f"it began in {stamp:%Y-%m}, before the previous month"
        full = parse_stamp(backup["full"])
        checks = self.listing.keychecks.get(full, [])
        if (self.regular and self.args.force_full and checks
                and not any(check.matches(self.args.key) for check in checks)):
            return (f"{BACKUP_ARGS.ref('force_full')} asks for a full backup, "
                    "with an archive key other than this backup's (its key check "
                    f"{checks[0].key}): a new chain")
        if backup["scope"] == Scope.FULL.word:
            return None
        if self.regular and self.args.force_full:
            return (f"{BACKUP_ARGS.ref('force_full')} asks for a full backup, "
                    "and it is an incremental")
        if self.args.auto_force_full and self.instruction_file_changed() > full:
            return (f"the instruction file changed after its full backup "
                    f"({BACKUP_ARGS.ref('auto_force_full')}), and it is an incremental")
        since = parse_stamp(backup["since"])
        for base in (None, since) if since != full else (None,):
            if not self.listing.is_complete(full, base, sources):
                return (f"the {describe_backup(full, base)} it builds on is not a complete "
                        "set in the bucket (or not in the months looked at)")
        return None

    def abandon(self, journal, reason):
        """Name what the pending backup left in S3 as unused, and drop its journal."""
        backup = journal.backup
        full = parse_stamp(backup["full"])
        incremental = None if backup["scope"] == Scope.FULL.word else parse_stamp(
            backup["stamp"])
        listed = [(stored.name.key, stored.size)
                  for (f, i, _source), volumes in self.listing.volumes.items()
                  if (f, i) == (full, incremental) for stored in volumes]
        fresh = journal.new_orphans(listed)
        begun = describe_stamp(parse_stamp(backup["stamp"]))
        self.log.line(f"The pending {backup['scope']} backup {begun} is not continued: "
                      f"{reason}. It is given up; a new backup is decided below.")
        self.name_orphans(fresh, len(listed) - len(fresh))
        journal.delete()

    def keep_done_pieces(self, journal, sources):
        """Keep the done pieces whose volumes are all in the bucket at their sizes (a
        piece that is not is forgotten: its files are archived again); name every
        other volume of this backup in S3 as unused.  (pieces kept, their bytes)"""
        full, incremental = self.backup_times()
        listed = {stored.name.key: stored.size
                  for (f, i, _source), volumes in self.listing.volumes.items()
                  if (f, i) == (full, incremental) for stored in volumes}
        kept, size, used = 0, 0, set()
        for piece in journal.pieces(state=PIECE_DONE):
            wrong = [v for v in piece["volumes"] if listed.get(v["name"]) != v["size"]]
            if wrong and piece["source"] not in self.done_sources:
                found = listed.get(wrong[0]["name"])
                self.log.line(f"Piece {piece['number']} of {piece['source']} is not kept: "
                              f"{wrong[0]['name']} is "
                              + ("missing from the bucket" if found is None else
                                 f"{found:,} bytes in the bucket, {wrong[0]['size']:,} "
                                 "in the journal") + "; its files are archived again.")
                journal.drop_piece(piece["number"], piece["source"])
                journal.forget_catalogue(piece["source"])
                continue
            kept += 1
            size += sum(v["size"] for v in piece["volumes"])
            used.update(v["name"] for v in piece["volumes"])
        unused = sorted((name, listed[name]) for name in listed if name not in used)
        fresh = journal.new_orphans(unused)
        self.name_orphans(fresh, len(unused) - len(fresh))
        return kept, size

    def name_lost_volumes(self):
        """Without a journal: volumes of a backup this month (or the months looked at)
        that never got its indicator, made after the latest complete backup (a run
        killed before this version, or a journal lost), are named as unused."""
        latest = self.latest_incremental or self.latest_full
        lost = []
        for (full, incremental, source), volumes in self.listing.volumes.items():
            made = incremental or full
            if (latest and made <= latest) or source in self.listing.indicators.get(
                    (full, incremental), {}):
                continue
            lost += [(stored.name.key, stored.size) for stored in volumes]
        self.name_orphans(lost)

    def name_orphans(self, orphans, named_before=0, log=None):
        """Log volumes no backup uses, with their bytes (the report names them too)."""
        log = log or self.log.line
        if named_before:
            log(f"({named_before} more unused volume(s) of this backup were named by an "
                "earlier run.)")
        if not orphans:
            return
        self.orphans += orphans
        log(f"Unused volumes in S3: {len(orphans)} volume(s), "
            f"{sum(size for _n, size in orphans):,} bytes, of a piece that was lost "
            "(interrupted or failed before it was whole); no backup or restore reads them. "
            "Deep Archive bills each for 180 days; the backup user cannot delete them "
            "(docs/backup.md):")
        for name, size in orphans:
            log(f"  {name} ({size:,} bytes)")

    def open_journal_for(self, plan):
        """The journal of this backup: the pending one continued, or a new one."""
        if self.journal is not None:
            self.journal.new_attempt()
            return
        backup = {"operation": self.args.operation, "scope": self.scope.word,
                  "stamp": format_stamp(self.stamp), "full": format_stamp(self.base_full),
                  "since": format_stamp(self.since) if self.since else None,
                  "sources": [(self.platform.source_name(s.mount), s.mount)
                              for s in plan.sources],
                  "piece_size": self.settings.piece_size,
                  "volume_size": self.settings.volume_size}
        path = self.journal_path()
        try:
            self.journal = Journal.create(path, backup)
        except (OSError, AamError) + journal_errors() as problem:
            message = (f"The journal {path} cannot be written ({problem}); the AWS part of "
                       "this backup is skipped" + (", the local mirror is still made."
                                                   if self.local else "."))
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)
            self.aws = False
            self.stop_early_child()

    def decide_scope(self, full, sources, where):
        self.stamp = self.start
        changed = self.instruction_file_changed()
        if self.regular:
            if self.args.force_full:
                reason = f"forced by {BACKUP_ARGS.ref('force_full')}"
            elif full is None:
                reason = f"no complete full backup of the {len(sources)} current sources {where}"
            elif self.args.auto_force_full and changed > full:
                reason = (f"the instruction file changed ({describe_stamp(changed)}) after "
                          "the latest complete full backup "
                          f"({BACKUP_ARGS.ref('auto_force_full')})")
            else:
                reason = None
            if reason:
                self.scope, self.base_full = Scope.FULL, self.start
                self.log.line(f"Backup scope: full ({reason}).")
                return
        else:
            if full is None:
                raise NoBackupSet(f"No complete full backup of the current sources {where}; "
                                  "an incremental-only backup needs one. Run a regular "
                                  "backup first.")
            if self.args.auto_force_full and changed > full:
                raise Refused(f"The instruction file changed ({describe_stamp(changed)}) "
                              "after the latest complete full backup, so a full backup is "
                              f"required ({BACKUP_ARGS.ref('auto_force_full')}); run a "
                              "regular backup instead.")
        self.scope, self.base_full = Scope.INCREMENTAL, full
        self.since = self.latest_incremental or full
        self.log.line(f"Backup scope: incremental, based on the full backup "
                      f"{describe_stamp(full)}; files changed since "
                      f"{describe_stamp(self.since)}.")

    # -- the key check: a wrong key is refused before anything is uploaded --
    def check_key(self, listing):
        """Refuse an archive key that is not the key of the chain this backup continues,
        before anything is written to S3 (the backup keys cannot read a catalogue to
        try the key on; they can list the key checks).

        An incremental must match its full backup's key check; a new full backup the
        newest chain's, unless argument 21 forces it: then a different key starts a
        new chain, said loudly.  A chain without one (made by version 1.0.0 or 1.1.0,
        or the first backup) gets one for the key in use.  A full backup continued
        must match the key check its first run wrote, if it wrote one.
        """
        key, incremental = self.args.key, self.scope is Scope.INCREMENTAL
        own = [] if incremental else listing.keychecks.get(self.stamp, [])
        checks = (listing.keychecks.get(self.base_full, []) if incremental
                  else own or listing.newest_keychecks(self.stamp))
        matching = next((check for check in checks if check.matches(key)), None)
        if matching is not None:
            self.log.line(f"Key check: the archive key ({BACKUP_ARGS.ref('key')}) "
                          f"matches {matching.key}.", terminal=False)
            if not (incremental or own):
                self.keycheck_to_write = (KeyCheck.for_key(self.args.location, self.stamp,
                                                           key, like=matching),
                                          "this full backup's, for the same key")
            return
        new = KeyCheck.for_key(self.args.location, self.base_full, key)
        if not checks:
            self.keycheck_to_write = (new, (
                f"its chain (the full backup {describe_stamp(self.base_full)}) has none: "
                "made by version 1.0.0 or 1.1.0" if incremental else
                f"the bucket holds none for location {self.args.location} yet: a first "
                "backup, or the backups were made by version 1.0.0 or 1.1.0") +
                "; written for the archive key in use")
        elif not (incremental or own) and self.regular and self.args.force_full:
            self.start_new_key_chain(checks[0], new)
        else:
            self.refuse_key(checks[0], incremental)

    def write_keycheck(self):
        """Put the chain's new key check, if it needs one, right before the run's first
        upload (a volume, or a catalogue when there is none): never before the child
        has something to send, so a run that uploads nothing writes nothing.  A failure
        is the upload's (UploadFailed, WriteRefused: named as a key check).  Returns the
        line for the log (None: nothing to write)."""
        if self.keycheck_to_write is None:
            return None
        check, why = self.keycheck_to_write
        self.uploads.upload(io.BytesIO(b""), check.key, kind="key check")
        self.keycheck_to_write = None
        return f"Key check: uploaded {check.key} ({why})."

    def start_new_key_chain(self, newest, new):
        """Argument 21 forces a full backup with another key: the key is changed on purpose."""
        self.log.line(f"WARNING: the archive key ({BACKUP_ARGS.ref('key')}) is "
                      f"not the key of the latest chain (key check {newest.key}). This full "
                      f"backup is forced ({BACKUP_ARGS.ref('force_full')}), so it "
                      "starts a new chain with the new key. Restoring a backup made before it "
                      "needs the old key (docs/security.md).")
        self.report_notes.append(
            "WARNING: the archive key changed: this forced full backup starts a new chain "
            "with the new key; restoring an earlier backup needs the old key.")
        self.keycheck_to_write = (new, "a new chain with a new key")

    def refuse_key(self, check, incremental):
        """A key that differs from the chain's: nothing goes to S3 (exit EXIT_WRONG_KEY)."""
        chain = (f"the full backup {describe_stamp(check.full)} this incremental builds on"
                 if incremental else f"the latest chain (full backup "
                 f"{describe_stamp(check.full)})")
        self.key_refused = True
        self.skip_aws(
            f"The archive key ({BACKUP_ARGS.ref('key')}) is not the key of "
            f"{chain}: it does not match the key check s3://{self.args.bucket}/{check.key}, "
            "so nothing was written to S3. If the key was mistyped, correct it; to change "
            "the key on purpose, run regular-backup with "
            f"{BACKUP_ARGS.ref('force_full')} (force full backup) yes, which starts a new "
            "chain (docs/security.md)")
        self.report_notes.append(
            "The archive key is not the key of the backups this one would continue (their "
            "key check in S3): nothing was written to S3. See the log.")

    def instruction_file_changed(self):
        st = os.stat(self.args.instruction_file)
        return dt.datetime.fromtimestamp(self.platform.changed_time(st), dt.timezone.utc)


# ============================================================================
# Backup: each source's child pass and upload
# ============================================================================

class BackupChildPass:
    """Part of BackupRun: each source's child pass (mirror, 7-Zip, validation) in its
    work directory, the first one started early, and its output checked."""

    # -- work directory --------------------------------------------------
    def create_work_dir(self):
        if self.work_dir_made:
            return
        try:
            os.makedirs(self.settings.temp_root, exist_ok=True)
            os.mkdir(self.work_dir, 0o700)
            _write_private_text(os.path.join(self.work_dir, WORK_MARKER), f"{os.getpid()}\n")
            self.work_dir_made = True
        except OSError as problem:
            raise SourceStopped(SECTION_WORK_DIR_ERROR, f"The work directory {self.work_dir} "
                                f"cannot be created: {problem}")

    def remove_work_dir(self):
        if not self.work_dir or not os.path.exists(self.work_dir):
            return
        for uploader in self.uploaders:
            uploader.close_indexes()
        try:
            shutil.rmtree(self.work_dir)
        except OSError as problem:
            self.log.section(SECTION_WORK_DIR_DELETE_ERROR)
            message = f"The work directory {self.work_dir} cannot be deleted: {problem}"
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)

    def remove_leftovers(self):
        """Delete work directories of earlier runs that were killed (we hold the lock)."""
        root = self.settings.temp_root
        pattern = re.compile(re.escape(self.args.location) + r"\d{8}_\d{6}\.\d{6}")
        try:
            names = os.listdir(root)
        except OSError:
            return
        for name in names:
            path = os.path.join(root, name)
            marker = os.path.join(path, WORK_MARKER)
            if not pattern.fullmatch(name) or not os.path.isfile(marker):
                continue
            pid = _read_pid(marker)
            if pid != os.getpid() and self.platform.process_alive(pid):
                continue
            ended = end_recorded_groups(path, self.platform)
            if ended:
                self.log.line("Ended what an interrupted run had left running: "
                              f"{', '.join(ended)}.", terminal=False)
            try:
                shutil.rmtree(path)
                self.log.line(f"Removed the work directory of an interrupted run: {path}",
                              terminal=False)
            except OSError as problem:
                self.log.line(f"Cannot remove the leftover work directory {path}: {problem}")

    # -- one source: child run, markers, upload ---------------------------
    def back_up_source(self, index, source, plan, run_sources):
        """Run the child for one mount and upload its archive (SourceStopped: no more)."""
        name = self.platform.source_name(source.mount)
        self.progress.start_source(index, len(plan.sources))
        self.log.section(SECTION_CHILD_OUTPUT)
        self.log.line(f"Source {index} of {len(plan.sources)}: {source.mount}")
        if self.early and self.early.source is not source:
            self.stop_early_child()
        early, self.early = self.early, None
        recorded = self.journal.source(name) if self.aws else None
        if recorded and recorded["catalogue"] and not self.catalogue_at_hand(name, recorded):
            self.log.line(f"The catalogue of {source.mount} that the journal records is "
                          "neither in the bucket nor kept beside the journal: it is made "
                          "again from the pieces in S3.")
            self.journal.forget_catalogue(name)
            recorded = None
        if self.aws and (name in self.done_sources or (recorded and recorded["catalogue"])):
            self.finish_source_in_s3(source, name, recorded, run_sources)
            return
        catalogue = early.catalogue if early else self.prepare_child(source, name)
        if catalogue and catalogue.base_note:
            self.log.line(catalogue.base_note, terminal=catalogue.base is None)
        # Pipelined upload: volumes go up while the child's 7-Zip writes the next.
        uploader = self.piece_uploader(catalogue) if self.aws else None
        try:
            lines, status = self.run_child(source, uploader, early)
            result = self.check_child_output(lines, status, self.aws)
        except SourceStopped:
            self.note_unfinished(uploader)
            raise
        checkpoint("child-done")
        if result["failures"]:
            self.failures.append(f"{source.mount}: {result['failures']} validation or "
                                 "read failure(s); see the lines marked 'validation "
                                 "failure' in this log")
        self.report_failed_parts(source, result["failed"], lines, uploader)
        if self.aws:
            self.upload_source(source, name, catalogue, run_sources, uploader)

    def finish_source_in_s3(self, source, name, recorded, run_sources):
        """A source of the continued backup whose pieces are all in S3 already: its
        mirror is made as every run makes it, then its catalogue and indicator go up
        unless they are there."""
        self.progress.source_done()
        if self.local:
            self.prepare_child(source, name, archive=False)
            lines, status = self.run_child(source, None, archive=False)
            result = self.check_child_output(lines, status, False)
            if result["failures"]:
                self.failures.append(f"{source.mount}: {result['failures']} validation "
                                     "failure(s); see the lines marked 'validation "
                                     "failure' in this log")
            self.report_failed_parts(source, result["failed"], lines, None)
        catalogue = SourceCatalogue(self, source, name)
        self.log.section(SECTION_UPLOAD)
        if name in self.done_sources:
            self.log.line(f"{source.mount}: this backup is complete in S3 (its completion "
                          "indicator is there).")
            catalogue.keep_state(recorded and recorded["state_file"])
            self.completed_sources += 1
            return
        try:
            self.put_catalogue_and_indicator(catalogue, recorded)
        except aws_errors() + (OSError, AamError) + journal_errors() as problem:
            self.upload_failed(source, problem)

    def catalogue_at_hand(self, name, recorded):
        full, incremental = self.backup_times()
        return ((full, incremental, name) in self.listing.catalogues
                or os.path.exists(recorded["catalogue_file"]))

    def prepare_child(self, source, name, archive=True, verify=True):
        """The files the child reads: its part of the plan, and the state to compare
        with (the catalogue of this source, when the child archives for AWS; verify: see
        SourceCatalogue.choose_base)."""
        view_root = self.platform.child_view_root(source.mount, self.args.drive_letter)
        catalogue = SourceCatalogue(self, source, name) if self.aws and archive else None
        try:
            write_source_plan(os.path.join(self.work_dir, PLAN_FILE), source, view_root,
                              self.platform)
            for leftover in (OUTPUT_FILE, GATE_FILE, CATALOGUE_BASE, SUPERSEDED_FILE,
                             ARCHIVE_PROGRESS):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.work_dir, leftover))
            # what a refused early child's 7-Zip wrote (never uploaded), or the source
            # before's lists
            for leftover in (ARCHIVE_DIR, PIECES_DIR):
                shutil.rmtree(os.path.join(self.work_dir, leftover), ignore_errors=True)
            if catalogue:
                catalogue.choose_base(verify)
        except OSError as problem:
            raise SourceStopped(SECTION_TEMP_FILE_ERROR,
                                f"A temporary file cannot be written: {problem}")
        return catalogue

    def child_argv(self, source, archive=True):
        """The child's command line (through ShadowSpawn on Windows)."""
        args, incremental = self.args, self.scope is Scope.INCREMENTAL
        destinations = frozenset(({"local"} if self.local else set())
                                 | ({"AWS"} if self.aws and archive else set()))
        child = child_arguments(
            operation=args.operation, agent=CHILD_AGENT, latest_full=self.latest_full,
            latest_incremental=self.since if incremental else None,
            start=self.start, mount=source.mount,
            drive_letter=args.drive_letter or UNUSED_DRIVE_LETTER,
            destinations=destinations, mirror_root=args.mirror_root,
            keep=args.keep, key="env:" + CHILD_KEY_VARIABLE, location=args.location,
            work_dir=self.work_dir, force_full=not incremental,
            scope=Scope.INCREMENTAL if incremental else Scope.FULL)
        return self.platform.child_command(args.python, self.program_path, child.to_argv(),
                                           source.mount, args.drive_letter)

    def run_child(self, source, uploader, early=None, archive=True):
        """Run the child (or let the one started early go on) to its end; (its output
        lines but 7-Zip's '+ <file>' ones, which are only logged, and its exit status)."""
        runner, output = self.platform.child_runner, os.path.join(self.work_dir, OUTPUT_FILE)
        try:
            watch = self.while_child_runs(uploader)
            if early:
                _write_private_text(os.path.join(self.work_dir, GATE_FILE), GATE_GO)
                status = self.wait_child_process(early.process, watch)
            else:
                status = self.run_child_process(self.child_argv(source, archive), output,
                                                watch)
            if watch:
                watch.close()
        except OSError as problem:
            raise SourceStopped(SECTION_CHILD_ERROR, f"Critical error. {runner} execution "
                                f"failure Aborting {self.args.operation} operation. "
                                f"({problem})")
        try:
            self.log.append_output(output)
            with open(output, "rb") as handle:
                return [self.platform.decode_output(raw).rstrip("\r\n") for raw in handle
                        if not raw.startswith(b"+ ")], status
        except OSError:
            raise SourceStopped(SECTION_OUTPUT_READ_ERROR, f"File I/O error. {runner} "
                                "command output file reading error.")

    def while_child_runs(self, uploader):
        """Upload finished volumes; on a terminal, show the progress line.  close: a last
        look at 7-Zip's progress, once the child has ended."""
        if uploader is None:
            return None
        if self.progress.terminal:
            self.progress.watch_archive(self.work_dir, lambda: uploader.uploaded_bytes()
                                        + directory_size(uploader.archive_dir))

        def step():
            uploader.poll()
            self.progress.show()
        step.close, step.wait = self.progress.archive_ended, uploader.wait_for_change
        return step

    def run_child_process(self, argv, output, while_running=None):
        """Run the child to its end, calling while_running every UPLOAD_POLL_SECONDS."""
        return self.wait_child_process(self.start_child_process(argv, output), while_running)

    def start_child_process(self, argv, output):
        env = dict(os.environ, **{CHILD_KEY_VARIABLE: self.args.key})
        with open_private(output, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env,
                                       **self.platform.group_popen_options())
        record_group(self.work_dir, process.pid, self.platform)
        return process

    def wait_child_process(self, process, while_running=None):
        try:
            while True:
                if while_running is None:
                    status = process.wait()
                    break
                status = process.poll()
                if status is not None:
                    break
                # at once when an upload ends: its volume is deleted (7-Zip may go on) and
                # a piece whose last volume it was is recorded without delay
                while_running.wait(UPLOAD_POLL_SECONDS)
                while_running()
        except BaseException:
            if while_running:
                while_running.close()
            self.end_child(process)
            raise
        self.end_what_the_child_left()
        return status

    def end_child(self, process):
        self.platform.stop_group(process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        self.end_what_the_child_left()

    def end_what_the_child_left(self):
        """A child that died (killed, out of memory) leaves its script running, or
        stopped by the upload throttle: end it (and a child that did not end)."""
        ended = end_recorded_groups(self.work_dir, self.platform)
        if ended:
            self.log.line(f"Ended what the child pass had left running: {', '.join(ended)}.")

    # -- the first child, started before S3 answers -------------------------
    def start_child_early(self, source):
        """Start the first source's child on a guess of what S3 will answer, made
        from the newest local state (the month's first run: a full backup; every
        other night: an incremental of that state's backup): its walk and change
        detection, and without a mirror its 7-Zip too, then run while boto3 starts
        and the LIST runs (0.3-0.5 s of every run).  It waits at the gate (see
        wait_at_gate); check_early_child lets it go on only if S3's answer gives it
        exactly the same command line, else it is ended (its volumes removed
        unsent) and started again.  None when there is nothing to guess from."""
        if not self.platform.child_starts_early:
            return None
        name = self.platform.source_name(source.mount)
        guess = self.guess_from_local_state(name)
        if guess is None:
            return None
        self.scope, self.latest_full, self.since = guess
        self.base_full = self.start if self.scope is Scope.FULL else self.latest_full
        try:
            self.create_work_dir()
            catalogue = self.prepare_child(source, name, verify=False)
            _write_private_text(os.path.join(self.work_dir, GATE_FILE), GATE_WAIT)
            argv = self.child_argv(source)
            process = self.start_child_process(argv, os.path.join(self.work_dir, OUTPUT_FILE))
        except (OSError, SourceStopped):
            return None                  # the usual path meets and reports the problem
        finally:
            self.scope = self.base_full = self.since = self.latest_full = None
        return EarlyChild(source, argv, catalogue, process)

    def guess_from_local_state(self, name):
        """(scope, latest complete full, latest complete backup) that S3 may well
        answer, from the newest local state; None for an incremental-only backup
        without one."""
        header = newest_local_state(SourceCatalogue.state_prefix(self, name))
        try:
            full, backup = parse_stamp(header["full_backup"]), parse_stamp(header["backup"])
        except (TypeError, KeyError, ValueError):
            full = backup = None
        this_month = full is not None and (full.year, full.month) == (
            self.start.year, self.start.month)
        if self.regular and (self.args.force_full or not this_month):
            # a full backup; its command line names this month's full, if any
            return Scope.FULL, full if this_month else None, None
        if full is None:
            return None
        return Scope.INCREMENTAL, full, backup

    def check_early_child(self):
        """After S3 has answered: keep the early child only if it is the child this
        answer calls for (same command line, same local state to compare with)."""
        early = self.early
        if early is None:
            return
        source = early.source
        said = (f"The child pass for {source.mount} was started before S3 answered, on a "
                "guess from the local catalogues; ")
        if not (self.aws and early.argv == self.child_argv(source)):
            said += "S3 did not"
        elif early.catalogue.base != self.local_state_to_compare(early.catalogue)[0]:
            said += "S3 confirmed it, but the local catalogue it compares with cannot be used"
        else:
            self.log.line(said + "S3 confirmed it.", terminal=False)
            return
        self.stop_early_child()
        begun = len(volumes_on_disk(os.path.join(self.work_dir, ARCHIVE_DIR)))
        again = "it is started again" if self.local or self.aws else "it is ended"
        self.log.line(f"{said}: {again}" + (
            f" (the {begun} volume(s) its 7-Zip had begun are removed unsent)."
            if begun else "."), terminal=False)

    def local_state_to_compare(self, catalogue, verify=True):
        """(The local state S3's answer calls for, or None: none for a full backup, or
        none that can be used; why the one found cannot be, or None).  Each state is
        read through once a run (local_state_problem); verify=False only finds it."""
        if self.scope is not Scope.INCREMENTAL:
            return None, None
        path = find_local_state(catalogue.prefix, self.base_full, self.since)
        if path is None or not verify:
            return path, None
        if path not in self.state_verdicts:
            self.state_verdicts[path] = local_state_problem(path, self.state_key(),
                                                            catalogue.name)
        problem = self.state_verdicts[path]
        return (None, f"{path}: {problem}") if problem else (path, None)

    def state_key(self):
        """The key of this run's local state digests (derived once a run)."""
        if self.digest_key is None:
            self.digest_key = local_state_key(self.args.key, self.args.bucket,
                                              self.args.location)
        return self.digest_key

    def stop_early_child(self):
        if self.early is not None:
            self.end_child(self.early.process)
            self.early = None

    def check_child_output(self, lines, status, archive_expected):
        """The marker checks, in the original design's order: script, mirror, archive.

        A child that did not run to its end stops the run (SourceStopped).
        Otherwise the child's result, with "failed": the destinations whose tool
        failed, which report_failed_parts reports while the other one completes.
        """
        messages = self.platform.missing_marker_messages()
        present = set(lines)
        required = ["script"] + (["mirror"] if self.local else [])
        if archive_expected and MARK_NOTHING_TO_ARCHIVE not in present:
            required.append("archive")
        missing = [k for k in required if self.platform.marker(k) not in present]
        results = [line[len(MARK_RESULT):] for line in lines if line.startswith(MARK_RESULT)]
        if "script" in missing or status != 0 or not results:
            self.log.section(SECTION_CHILD_ERROR)
            for kind in missing:
                self.log.line(f"ERROR: {messages[kind]}")
            raise SourceStopped(SECTION_CHILD_ERROR, f"Critical error. "
                                f"{self.platform.child_runner} execution failure Aborting "
                                f"{self.args.operation} operation. "
                                f"({exit_codes(lines, status)})",
                                [messages[k] for k in missing])
        result = json.loads(results[-1])
        if result.get("archive_failed") and "archive" not in missing:
            missing.append("archive")
        return dict(result, failed=missing)

    def report_failed_parts(self, source, failed, lines, uploader):
        """A failed mirror or archive is a FAILURE with the tool's own messages; the
        other destination goes on.  After a failed archive nothing more goes to S3 in
        this run (no indicator, so the set is not used), as after a failed upload."""
        if failed:
            self.log.section(SECTION_CHILD_ERROR)
        for kind in failed:
            tool = self.platform.tool_name(kind)
            own = self.platform.mirror_error_re if kind == "mirror" else SEVEN_ZIP_ERROR_RE
            # the last: a piece made again without a file it could not read failed first
            details = [line[len(MARK_PREFIX):].rstrip(".") for line in lines
                       if line.startswith(f"{MARK_PREFIX}{tool} failed")][-1:]
            details += [line for line in lines if own.match(line)][-MESSAGES_QUOTED:]
            reason = "; ".join(details) or f"no {tool} execution success message"
            part = "local mirror" if kind == "mirror" else "archive for AWS S3"
            message = f"{source.mount}: the {part} failed ({reason})"
            if kind == "archive":
                if uploader:
                    with contextlib.suppress(Exception):
                        uploader.finish()         # the pieces done before it are kept
                message += ("; no completion indicator was written and nothing more is "
                            "uploaded in this run")
                self.note_unfinished(uploader)
                self.aws = False
                shutil.rmtree(os.path.join(self.work_dir, ARCHIVE_DIR), ignore_errors=True)
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)


class BackupSourceUpload:
    """Part of BackupRun: a source's volumes, catalogue and completion indicator put in
    S3, and what stays for the next run when it fails."""

    def backup_times(self):
        """(full, incremental) date-times of this backup's S3 object names."""
        if self.scope is Scope.FULL:
            return self.stamp, None
        return self.base_full, self.stamp

    def piece_uploader(self, catalogue):
        full, incremental = self.backup_times()
        ledger = PieceLedger(self, catalogue)
        uploader = PieceUploader(
            self.uploads, self.work_dir,
            lambda piece, number: ObjectName(self.args.location, full, incremental, False,
                                             catalogue.name, number, piece=piece).key,
            self.log, ledger, catalogue.first_piece, self.settings.volume_size,
            self.write_keycheck)
        ledger.announce = uploader.announce
        if self.progress.terminal:
            uploader.on_bytes = self.progress.volume_bytes
        self.uploaders.append(uploader)
        return uploader

    def note_unfinished(self, uploader):
        """After a failure: what of this source stays in S3 for the next run."""
        if uploader is None:
            return
        uploader.start_log_section()
        if not (uploader.pieces or uploader.records):
            return
        done = uploader.pieces
        self.log.line(
            f"The {len(done)} piece(s) of this source finished before the failure "
            f"({format_bytes(sum(v['size'] for p in done for v in p['volumes']))}) are "
            "recorded in the journal: the next run continues this backup from there"
            + (f"; the {len(uploader.records)} volume(s) of piece(s) "
               f"{', '.join(map(str, sorted(uploader.uploaded_records)))} it had begun are "
               "named then, as unused." if uploader.records else "."))

    def upload_source(self, source, name, catalogue, run_sources, uploader):
        """Volumes first (most went up while 7-Zip ran), then the catalogue, and the
        indicator strictly after both."""
        self.log.section(SECTION_UPLOAD)
        uploader.start_log_section()
        try:
            uploader.finish()
            self.progress.source_done()
            recorded = self.write_catalogue(catalogue, run_sources)
            self.put_catalogue_and_indicator(catalogue, recorded)
        except aws_errors() + (OSError, AamError) + journal_errors() as problem:
            self.note_unfinished(uploader)
            self.upload_failed(source, problem)

    def upload_failed(self, source, problem):
        self.log.section(SECTION_UPLOAD_ERROR)
        cause = describe_aws_error(problem, credentials=BACKUP_ARGS.credentials_ref())
        message = (f"Upload to s3://{self.args.bucket} failed for {source.mount} "
                   f"({cause}); no completion indicator was written, so this backup is "
                   "not complete; no further uploads in this run (the next run continues "
                   "it).")
        self.log.line(f"ERROR: {message}")
        self.failures.append(message)
        self.aws = False     # the local mirror of the next sources is still made
        shutil.rmtree(os.path.join(self.work_dir, ARCHIVE_DIR), ignore_errors=True)

    def write_catalogue(self, catalogue, run_sources):
        """Where each archived file lies, checked against the selection: the catalogue
        and the finished state, kept beside the journal with the indicator's body
        (before the catalogue's PUT).  Returns what the journal records."""
        name, source = catalogue.name, catalogue.source
        pieces = self.journal.pieces(name, PIECE_DONE)
        archived, missing, entries = catalogue.finalize(pieces)
        for path in missing:
            self.log.line(f"{MARK_VALIDATION_FAILURE}{path}: not in the archive (7-Zip could "
                          "not read it)", terminal=False)
        if missing:
            more = ", ..." if len(missing) > MESSAGES_QUOTED else ""
            shown = ", ".join(missing[:MESSAGES_QUOTED]) + more
            self.failures.append(f"{source.mount}: {len(missing)} file(s) not in the "
                                 f"archive (7-Zip could not read them: {shown}); each is "
                                 "marked 'validation failure' in this log, and the next "
                                 "backup tries it again")
        zip_path = catalogue.make_zip()
        described = catalogue.describe(zip_path, entries)
        full, _incremental = self.backup_times()
        body = indicator_body(run_sources, name, source.mount, archived, pieces, full,
                              self.stamp, self.since, self.platform, described)
        self.journal.record_source(name, described, zip_path, catalogue.kept_path("tsv"), body)
        return self.journal.source(name)

    def put_catalogue_and_indicator(self, catalogue, recorded):
        """The catalogue (unless S3 has it, as the journal describes it), then the
        indicator; then this backup's state is the one the next compares with."""
        name, described = catalogue.name, recorded["catalogue"]
        full, incremental = self.backup_times()
        listed = self.listing.catalogues.get((full, incremental, name))
        if listed is not None and listed.size != described["size"]:
            raise AamError(f"The catalogue {described['name']} is in the bucket with "
                           f"{listed.size:,} bytes, not the {described['size']:,} the "
                           "journal records; this backup cannot be completed (see "
                           "docs/backup.md, Interrupted backups).")
        if listed is None:
            said = self.write_keycheck()         # when no volume went up before
            if said:
                self.log.line(said, terminal=False)
            self.uploads.upload(recorded["catalogue_file"], described["name"], kind="catalogue",
                                ContentType="application/zip")
            self.log.line(f"Uploaded the catalogue {described['name']} ({described['kind']}, "
                          f"{described['entries']} entries, {described['size']:,} bytes, "
                          "STANDARD)")
        else:
            self.log.line(f"The catalogue {described['name']} is in the bucket already.")
        indicator = ObjectName(self.args.location, full, incremental, True, name)
        checkpoint("before-indicator")
        self.uploads.upload(io.BytesIO(recorded["indicator"]), indicator.key,
                            kind="completion indicator", ContentType="application/json")
        manifest = json.loads(recorded["indicator"])
        self.manifests.append(manifest)
        self.log.line(f"Uploaded the completion indicator {indicator.key} "
                      f"({manifest['files']} files in {len(manifest['pieces'])} piece(s), "
                      f"{len(manifest['volumes'])} volume(s))")
        self.completed_sources += 1
        catalogue.keep_state(recorded["state_file"])

    # -- summary and report ----------------------------------------------
    def progress_lines(self, names_shown=None):
        """What this run added to a backup made in several runs, what is left for the
        next, and the unused volumes named (all, or the first names_shown)."""
        lines = []
        uploaded = sum(uploader.uploaded_bytes() for uploader in self.uploaders)
        if self.continued:
            lines.append(f"Continued the {self.scope.word} backup {describe_stamp(self.stamp)} "
                         f"begun {local_time_text(self.stamp)}: {self.continued['pieces']} "
                         f"piece(s) ({format_bytes(self.continued['bytes'])}) were already "
                         f"in S3; this run uploaded {format_bytes(uploaded)}.")
        if self.journal is not None and self.aws_asked:
            done = self.journal.pieces(state=PIECE_DONE)
            lines.append(f"The {self.scope.word} backup {describe_stamp(self.stamp)} is not "
                         f"complete: the next run continues it ({len(done)} piece(s), "
                         f"{format_bytes(sum(v['size'] for p in done for v in p['volumes']))} "
                         "in S3 so far).")
        if self.orphans:
            lines.append(f"Unused volumes in S3 (of a lost piece; no backup uses them): "
                         f"{len(self.orphans)} volume(s), "
                         f"{sum(size for _n, size in self.orphans):,} bytes:")
            shown = self.orphans[:names_shown] if names_shown else self.orphans
            lines += [f"  {name} ({size:,} bytes)" for name, size in shown]
            if len(shown) < len(self.orphans):
                lines.append(f"  and {len(self.orphans) - len(shown)} more (the log names "
                             "them all)")
        return lines


# ============================================================================
# Backup: the run, its summary and report (regular-backup, incremental-only-backup)
# ============================================================================

class BackupReport:
    """Part of BackupRun: the summary, the health block and the e-mail report."""

    # -- the health block (docs/backup.md, The health block) -----------------
    def log_health(self):
        """End the log with the health block (the e-mail ends with it too)."""
        try:
            self.health = self.health_lines()
        except Exception as problem:     # noqa: BLE001 - advisory: never fails a backup
            self.health = [f"Health of the backups of {self.args.location}: the health "
                           f"record cannot be used ({type(problem).__name__}: {problem})."]
        self.log.section(SECTION_HEALTH)
        for line in self.health:
            self.log.line(line)

    def health_lines(self):
        now = self.start or utc_now()
        lines = [f"Health of the backups of {self.args.location} (this computer's "
                 "location):", self.run_line()]
        if not self.aws_asked:
            return lines
        record = HealthRecord(self.settings.state_dir, self.args.bucket, self.args.location)
        self.refresh_health_record(record)
        latest = record.get("backups") if self.latest_full is None else {
            "full": format_stamp(self.latest_full), "incrementals": self.incrementals_since}
        full = parse_stamp_or_none(latest.get("full")) if isinstance(latest, dict) else None
        if full is None:
            lines.append("Latest complete full backup: none known on this computer.")
        else:
            lines.append(f"Latest complete full backup: {describe_stamp(full)}, "
                         f"{(now - full).days} day(s) old; {latest.get('incrementals', 0)} "
                         "complete incremental(s) since"
                         + (f" (as last seen {latest['noted']})" if "noted" in latest
                            else "") + ".")
        stored = describe_storage(self.args.location, record.get("storage"))
        lines.append(stored or f"Stored for {self.args.location}: not known yet.")
        lines.append(describe_check(record.get("check")))
        lines += describe_drill(record.get("drill"), record.get("drill_pending"))
        if full is None or (full.year, full.month) != (now.year, now.month):
            lines.append(f"WARNING: no complete full backup of this month ({now:%Y-%m}, UTC) "
                         "is known" + ("" if full is None else ": the latest is older")
                         + "; the next regular-backup makes one.")
        if drill_overdue(record.get("drill"), now):
            lines.append(f"WARNING: no restore drill has passed in the last {DRILL_DUE_DAYS} "
                         "days: run drill-aws-backups (README, Is my backup good?).")
        return lines

    def run_line(self):
        """What this run did: sources, files, bytes, volumes, pieces, duration."""
        took = format_duration(time.monotonic() - self.began if self.began else 0)
        sources = (f"{len(self.run_sources)} source(s) ({', '.join(self.run_sources)})"
                   if self.run_sources else "no source")
        if not (self.aws_asked and self.scope and self.stamp):
            return f"This run: {sources}; {took}."
        volumes = [v for manifest in self.manifests for v in manifest["volumes"]]
        size = sum(v["size"] for v in volumes)
        uploaded = sum(size or 0 for _key, size in (self.uploads.stored if self.uploads
                                                     else []))
        completed = (f"completed {len(self.manifests)} source(s): "
                     f"{sum(m['files'] for m in self.manifests):,} file(s), "
                     f"{format_bytes(size)} ({size:,} bytes) in {len(volumes)} volume(s) of "
                     f"{sum(len(m['pieces']) for m in self.manifests)} piece(s)"
                     if self.manifests else "completed no source")
        return (f"This run: {self.scope.word} backup {describe_stamp(self.stamp)} of "
                f"{sources}; {completed}; uploaded {format_bytes(uploaded)}; took {took}.")

    def refresh_health_record(self, record):
        """The months this run listed, with what it wrote into them since, and the
        latest complete full backup it knows, into the health record (no LIST of its
        own: the LIST budget is the run's listing)."""
        now = format_health_date(utc_now())
        if self.listing is not None:
            months = {}
            for prefix, (objects, size) in self.listing.prefixes.items():
                month = listed_month(self.args.location, prefix)
                if month and prefix == f"{self.args.location}_{month}":
                    months[month] = [objects, size]
            for key, size in self.uploads.stored if self.uploads else []:
                month = listed_month(self.args.location, key)
                if month in months:
                    months[month][0] += 1
                    months[month][1] += size or 0
            if months:
                storage = record.get("storage")
                storage = dict(storage) if isinstance(storage, dict) else {}
                for month, (objects, size) in months.items():
                    storage[month] = {"objects": objects, "bytes": size, "listed": now}
                    if not objects:                  # listed empty: nothing stored there
                        del storage[month]
                record.update("storage", storage)
        if self.latest_full is not None:
            record.update("backups", {"full": format_stamp(self.latest_full),
                                      "incrementals": self.incrementals_since,
                                      "noted": now})

    def log_summary(self):
        self.log.section(SECTION_SUMMARY)
        for line in self.progress_lines():
            self.log.line(line)
        if self.failures:
            self.log.line(f"FAILURE: {len(self.failures)} problem(s):")
            for failure in self.failures:
                self.log.line(f"  - {failure}")
        else:
            self.log.line("SUCCESS: everything asked for was done.")
        self.log_health()

    def send_report(self, hurried=False):
        if not self.args.send_email:
            return
        scope = f"{self.scope.word} " if self.scope and self.aws_asked else ""
        types = " and ".join(t for t, on in (("local", self.local), ("AWS S3", self.aws_asked))
                             if on)
        body = [f"Backup destination types: {types}"]
        if self.aws_asked:
            body.append(f"Latest complete AWS S3 full backup: {describe_stamp(self.latest_full)}")
            body.append("Latest complete AWS S3 incremental backup: "
                        f"{describe_stamp(self.latest_incremental)}")
            body += self.progress_lines(REPORTED_ORPHANS)
        body += self.report_notes
        body += [""] + self.health if self.health else []
        if send_report(self.args, self.settings, self.session, self.log,
                       bool(self.failures), self.start or utc_now(), f"{scope}backup", body,
                       hurried):
            return
        self.report_unsent = True
        if not self.failures:
            self.log.line(f"Everything else succeeded; the exit code is {EXIT_REPORT_UNSENT} "
                          "because the report was not sent.")

def is_interactive():
    return sys.stdin is not None and sys.stdin.isatty()


class EarlyChild(typing.NamedTuple):
    """The first source's child, started before S3 answered (BackupRun.start_child_early)."""

    source: object
    argv: list
    catalogue: object
    process: object


class BackupRun(BackupDecision, BackupChildPass, BackupSourceUpload, BackupReport):
    """The user-mode pass of one backup: lock, plan, S3 query, children, upload, report.

    Its steps are written in parts, each in the section of its place in the data's way
    (BackupDecision, BackupChildPass, BackupSourceUpload, BackupReport); they are one
    object, so they share its attributes, all set in __init__ here."""

    def __init__(self, args, platform, settings, program_path):
        self.args, self.platform, self.settings = args, platform, settings
        self.program_path = program_path
        self.regular = args.operation == REGULAR_BACKUP
        self.local = "local" in args.destinations
        self.aws = "AWS" in args.destinations      # False once S3 has failed
        self.aws_asked = self.aws
        self.failures = []
        self.scope = None            # Scope, once decided
        self.base_full = None        # the full backup an incremental builds on
        self.since = None            # incremental: files changed at or after this
        self.latest_full = None      # latest complete sets, for log and report
        self.latest_incremental = None
        self.session = self.s3 = None
        self.listing = None          # BucketListing of what query_s3 listed
        self.uploads = None          # RunUploads: every upload of the run, one rate limit
        self.work_dir = None
        self.work_dir_made = False
        self.start = None            # this run's start (the log, the mirror's validation)
        self.stamp = None            # the backup's time in object names (a continued
        #                              backup keeps its first run's start)
        self.log = None
        self.completed_sources = 0
        self.early = None            # EarlyChild: the first child, started before S3 answered
        self.listing = None          # BucketListing of the months looked at
        self.journal = None          # Journal of the backup this run makes or continues
        self.continued = None        # what the journal already held, for the log and report
        self.done_sources = set()    # sources whose indicator is in S3 already
        self.orphans = []            # (name, size): volumes no backup uses, named this run
        self.uploaders = []          # PieceUploader of each source (bytes uploaded)
        self.key_refused = False     # the key differs from the chain's key check
        self.report_notes = []       # lines the e-mail report must carry
        self.report_unsent = False
        self.state_verdicts = {}     # local state path -> why it cannot be used (None: it can)
        self.digest_key = None       # of the local states (state_key)
        self.keycheck_to_write = None  # (KeyCheck, why): the chain's, before the first upload
        self.progress = BackupProgress()   # the terminal's progress line
        self.began = None            # time.monotonic() at the start (the run's duration)
        self.run_sources = []        # the sources' names, once the plan is read
        self.manifests = []          # the indicators this run wrote (the health block)
        self.incrementals_since = 0  # complete incrementals of latest_full
        self.health = []             # the health block, for the log and the e-mail

    # -- the whole run -------------------------------------------------------
    def execute(self):
        self.log = open_run_log(self.args, self.platform)
        if self.log is None:
            return EXIT_FAILURE
        if self.progress.terminal:
            self.log.progress = self.progress
        self.warn_about_a_short_key()
        try:
            lock = self.acquire_lock()
        except (KeyboardInterrupt, Interrupted):
            return self.interrupted(None)
        except LockTimeout as problem:
            self.log.section(SECTION_LOCK_FAILURE)
            return self.end_before_sources(problem, lock=None)
        try:
            return self.run()
        except (KeyboardInterrupt, Interrupted):
            return self.interrupted(lock)
        except (NoBackupSet, Refused, InstructionError) as problem:
            return self.end_before_sources(problem, lock)
        except Exception as problem:     # noqa: BLE001 - logged, then re-raised
            self.log.line(f"ERROR: unexpected {type(problem).__name__}: {problem}")
            raise
        finally:
            self.remove_work_dir()
            if self.journal:
                self.journal.close()
            lock.release()
            self.finish()

    def end_before_sources(self, problem, lock):
        """An error that stops the run before any source: logged, reported, its code."""
        self.log.line(f"ERROR: {problem}")
        self.failures.append(str(problem))
        self.log_health()
        if self.regular:
            self.send_report()
        if lock is None:
            self.finish()
        return problem.exit_code

    def warn_about_a_short_key(self):
        if self.aws_asked and len(self.args.key) < STRONG_KEY_LENGTH:
            self.log.line(f"WARNING: the archive key ({BACKUP_ARGS.ref('key')}) "
                          f"is shorter than {STRONG_KEY_LENGTH} characters. ZIP's AES key "
                          "derivation is weak (1,000 rounds of PBKDF2-SHA1), so anyone who "
                          "obtains a volume can guess a short key offline: use "
                          f"{STRONG_KEY_LENGTH} or more random characters (docs/security.md).")

    def run(self):
        self.begin()
        try:
            plan = self.plan_and_decide()
            if self.aws:
                self.open_journal_for(plan)
            if self.local or self.aws:          # else S3 failed for an AWS-only run: reported
                try:
                    if self.aws:
                        self.uploads = RunUploads(self.s3, self.args.bucket,
                                                  transfer_config(self.settings.upload_limit))
                        if self.settings.upload_limit:     # said once, before any upload
                            self.log.line(f"Uploads are limited to "
                                          f"{self.settings.upload_limit:,} bytes per second "
                                          "in all (AAM_UPLOAD_LIMIT).")
                    self.create_work_dir()
                    self.back_up_sources(plan)
                except SourceStopped as stopped:
                    self.record_stop(stopped)
        except BaseException:
            if self.uploads:     # interrupted: the volumes in flight are of no use now
                try:
                    self.keep_what_went_up()
                finally:
                    self.uploads.close(cancel=True)
            raise
        finally:
            self.stop_early_child()
            if self.uploads:
                self.uploads.close()
        self.log_summary()
        if self.regular:
            self.send_report()
        return self.exit_code()

    def keep_what_went_up(self):
        """Interrupted: each source's pieces S3 has answered are recorded (one not kept
        has its volumes named as unused by the next run), and what went up is logged."""
        for uploader in self.uploaders:
            with contextlib.suppress(Exception):
                uploader.keep_what_is_up()
            uploader.start_log_section()

    def exit_code(self):
        """A failure's code wins over an unsent report (the log says both)."""
        if self.key_refused:
            return EXIT_WRONG_KEY
        if self.failures:
            return EXIT_FAILURE
        return EXIT_REPORT_UNSENT if self.report_unsent else EXIT_OK

    def begin(self):
        self.start = backup_clock()
        self.began = time.monotonic()
        self.log.section(SECTION_START)
        self.log.line(f"Backup started {describe_stamp(self.start)} "
                      f"({local_time_text(self.start)})")
        self.work_dir = self.work_dir_path()
        self.remove_leftovers()

    def work_dir_path(self):
        """This run's work directory: made when first needed; the plan excludes it."""
        return os.path.join(self.settings.temp_root,
                            f"{self.args.location}{format_stamp(self.start)}")

    def plan_and_decide(self):
        """The instruction file's plan, and (with AWS) the full/incremental decision."""
        plan, instruction_problem = self.read_plan()
        if plan is not None:
            self.run_sources = [self.platform.source_name(s.mount) for s in plan.sources]
        if self.aws and plan is not None and instruction_problem is None:
            pending = self.pending_journal()
            if pending is None:
                self.early = self.start_child_early(plan.sources[0])
            self.query_s3(plan, pending)
            self.check_early_child()
        self.log_plan(plan)
        if instruction_problem:
            self.log.section(SECTION_INSTRUCTION_ERROR)
            raise instruction_problem
        return plan

    def back_up_sources(self, plan):
        run_sources = [self.platform.source_name(s.mount) for s in plan.sources]
        for index, source in enumerate(plan.sources, 1):
            self.back_up_source(index, source, plan, run_sources)
            checkpoint("source-done")
        if self.aws and self.completed_sources == len(plan.sources):
            if self.scope is Scope.FULL:
                self.latest_full, self.latest_incremental = self.stamp, None
                self.incrementals_since = 0
            else:
                self.latest_incremental = self.stamp
                self.incrementals_since += 1
            self.journal.delete()            # the backup is complete: nothing to continue
            self.journal = None

    def record_stop(self, stopped):
        """Log an error that ended the per-source loop; the run goes on to cleanup."""
        if not stopped.causes:
            self.log.section(stopped.section)
        self.log.line(f"ERROR: {stopped}")
        self.failures.extend(stopped.causes or [str(stopped)])

    def interrupted(self, lock):
        """Ctrl-C or SIGTERM (a scheduler's stop time): say so in the log and, for a
        regular backup, in a FAILURE report (sent in a hurry: the run is being
        stopped); the caller's cleanup still runs."""
        why = "Ctrl-C, or SIGTERM: a scheduler's stop time or a shutdown"
        message = (f"interrupted ({why}); the backup is not complete"
                   + ("; the next run continues it from its journal "
                      f"{self.journal.path}." if self.journal else "."))
        self.log.line(f"ERROR: {message}")
        self.failures.append(message)
        if self.journal:
            after = "the next run continues the backup from what is in S3 (above)."
        elif self.uploads and self.uploads.stored:       # the journal goes once complete
            after = "the backup was complete before it."
        else:
            after = "nothing was uploaded; the next run makes the backup."
        self.report_notes.append(
            f"This run was interrupted ({why}) at {local_time_text(utc_now())}; {after}")
        try:
            self.log_summary()
            if self.regular:
                self.send_report(hurried=True)
        except Exception as problem:     # noqa: BLE001 - the run is stopping: log, go on
            self.log.line(f"ERROR: the interrupted run's report failed: "
                          f"{type(problem).__name__}: {problem}")
        if lock is None:
            self.finish()
        return EXIT_INTERRUPTED

    def finish(self):
        if self.log:
            self.log.line(f"Log file: {self.log.path}")
            self.log.close()
        if not self.regular and is_interactive():
            with contextlib.suppress(EOFError):
                input("Press Enter to close...")

    # -- lock ------------------------------------------------------------
    def acquire_lock(self):
        path, poll, wait = self.settings.lock_file, self.args.lock_poll, self.args.lock_wait
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        deadline = time.monotonic() + wait
        asked = False
        while True:
            # A kernel lock (flock/LockFileEx): a killed process never leaves it held.
            lock = self.platform.try_lock(path)
            if lock is not None:
                return lock
            if not self.regular and is_interactive() and not asked:
                asked = True
                answer = input("Another backup is running. Run this incremental-only "
                               "backup when it has finished? [y/n] ")
                if answer.strip().lower() not in ("y", "yes"):
                    raise LockTimeout("Another backup is running; the user chose not to "
                                      "wait for it.")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(f"Another backup held the lock {path} for the whole "
                                  f"wait of {wait} seconds ({BACKUP_ARGS.ref('lock_wait')}); "
                                  "giving up.")
            pause = min(poll, remaining)
            self.log.line(f"Another backup is running (lock {path}); waiting "
                          f"{pause:.0f} s before the next check, at most "
                          f"{remaining:.0f} s more.")
            time.sleep(pause)

    # -- instruction file ------------------------------------------------
    def read_plan(self):
        """(BackupPlan or None, InstructionError or None); nothing is logged yet."""
        try:
            text = read_instruction_file(self.args.instruction_file)
            instructions = parse_instructions(text, self.args.instruction_file,
                                              self.platform)
            own = [self.work_dir] + ([self.args.mirror_root] if self.local else [])
            plan = plan_backup(instructions, self.platform, own)
            if not plan.sources:
                return plan, InstructionError(
                    f"{self.args.instruction_file}: none of the directories to back up "
                    "exists (see the ignored directories above)")
            self.check_key_lengths(plan)
            return plan, colliding_sources(plan, self.platform)
        except InstructionError as problem:
            return None, problem

    def check_key_lengths(self, plan):
        for source in plan.sources:
            name = ObjectName(self.args.location, self.start, self.start, False,
                              self.platform.source_name(source.mount), 999, piece=99999)
            if len(name.key.encode("utf-8")) > 1024:
                raise InstructionError(f"{source.mount}: the S3 object names for this "
                                       "source would exceed 1024 bytes; back up a "
                                       "shorter path")

    def log_plan(self, plan):
        self.log.section(SECTION_DIRECTORIES)
        if plan is None:
            self.log.line("(the instruction file could not be used)", terminal=False)
            return
        self.log.line(f"Instruction file: {self.args.instruction_file}", terminal=False)
        for source in plan.sources:
            self.log.line(f"Source (mount directory) {source.mount} -> "
                          f"{self.platform.source_name(source.mount)}", terminal=False)
            for listed in source.listed:
                self.log.line(f"  back up: {listed or '(the whole directory)'}",
                              terminal=False)
            for rel in source.excluded_dir_paths:
                self.log.line(f"  exclude directory: {rel}", terminal=False)
            for rel in source.excluded_file_paths:
                self.log.line(f"  exclude file: {rel}", terminal=False)
        for source in plan.sources[:1]:
            for pattern in source.dir_patterns:
                self.log.line(f"Exclude directories named: {pattern}", terminal=False)
            for pattern in source.file_patterns:
                self.log.line(f"Exclude files named: {pattern}", terminal=False)
        if plan.notes:
            self.log.section(SECTION_IGNORED)
            for note in plan.notes:
                self.log.line(note, terminal=False)

    journal_kind = Journal           # a preview's: JournalView (read-only)


# ============================================================================
# Preview (preview-backup: what a regular-backup would do)
# ============================================================================

# -- preview-backup: what a regular-backup would do, told without doing it -------------

EXAMPLES_SHOWN = 3       # paths shown of what each exclusion removed
# What a ZIP entry adds to its bytes with AES-256 (7-Zip, measured: about 160 bytes and its
# path twice, in its local and its central header; Zip64 fields for a big file): 256 and
# the path twice bound it.  Data that does not compress is stored as it is (-mx1 gives
# -mx0's size on random bytes), so no file's bytes grow.
ZIP_ENTRY_BYTES = 256
ZIP_END_BYTES = 1024     # the end of the central directory, its Zip64 records included


class PreviewOutput(TerminalOutput):
    """The preview's one output, the terminal (it writes no log file, as browse does not):
    everything the backup's steps say, the lines a backup writes to its log alone too."""

    def line(self, text="", terminal=True):
        super().line(text)


class Counted:
    """Files (a symbolic link counts as one, as in a backup's file count) and bytes."""

    def __init__(self):
        self.files = self.bytes = 0

    def add(self, st):
        self.files += 1
        self.bytes += st.st_size

    def text(self):
        return f"{self.files:,} file(s), {exact_bytes(self.bytes)}"


def exact_bytes(count):
    """'950 B', or '1.2 MB (1,234,567 bytes)': short, and exact."""
    short = format_bytes(count)
    return short if count < 1000 else f"{short} ({count:,} bytes)"


class CountingWalk(TreeWalk):
    """The selection's walk, counting what it selects: the files and their bytes, the
    directories (a full backup's archive holds them too), and the paths' length."""

    def __init__(self, root, plan, platform, since=None):
        super().__init__(root, plan, platform, since)
        self.selected, self.directories, self.name_bytes = Counted(), 0, 0

    def __iter__(self):
        for walked in super().__iter__():
            if stat.S_ISDIR(walked.st.st_mode):
                self.directories += 1
            else:
                self.selected.add(walked.st)
            self.name_bytes += len(walked.path.encode("utf-8", "surrogateescape"))
            yield walked


class ChangeCounter:
    """ChangeRecorder's work file and list callback in a preview: nothing is written.  It
    counts what the backup would archive, cut into pieces as PieceWriter cuts them, the
    entries it would record as gone, and those a kept piece of a continued backup holds."""

    def __init__(self, piece_size):
        self.piece_size = piece_size
        self.archived, self.gone, self.held = Counted(), 0, 0
        self.pieces = []            # [content bytes, entries, name bytes] of each piece

    def archive(self, walked):
        size = content_size(walked.st)
        if not stat.S_ISDIR(walked.st.st_mode):
            self.archived.add(walked.st)
        if not self.pieces or starts_a_piece(self.pieces[-1][0], size, self.piece_size):
            self.pieces.append([0, 0, 0])
        piece = self.pieces[-1]
        piece[0] += size
        piece[1] += 1
        piece[2] += len(walked.path.encode("utf-8", "surrogateescape"))

    def write(self, flag, entry):
        """A new or changed entry's line: counted by archive() if it is archived."""

    def write_line(self, flag, line):
        gone = line.startswith(DELETED + "\t")
        self.gone += flag == CHANGED and gone
        self.held += flag == CHANGED and not gone      # as a kept piece holds it

    def piece_bounds(self):
        """At most the bytes of each piece's archive."""
        return [archive_bound(*piece) for piece in self.pieces]


def at_most(dollars):
    """An upper bound of a cost: 'at most $1.23', or 'less than $0.01'."""
    text = format_dollars(dollars)
    return text if not dollars or text.startswith("less") else f"at most {text}"


def archive_bound(content, entries, name_bytes):
    """At most the bytes of a ZIP archive of entries holding content bytes in all, their
    paths name_bytes long in all (compression can only make it smaller)."""
    if not entries:
        return 0
    return content + entries * ZIP_ENTRY_BYTES + 2 * name_bytes + ZIP_END_BYTES


class ExclusionTally:
    """What one exclusion (an instruction-file line; None: the program's own, the mirror
    directory inside a source) removed from the walks: the entries it met, what they held,
    and the first few of them."""

    def __init__(self, exclusion, is_dir, platform):
        self.exclusion, self.is_dir, self.platform = exclusion, is_dir, platform
        self.removed, self.content, self.examples = 0, Counted(), []
        self.name = None if exclusion is None or exclusion.is_path else wildcard_regex(
            exclusion.text, platform.case_insensitive)

    def matches(self, path, is_dir):
        """It excludes path when the walk meets it."""
        if self.exclusion is None or is_dir != self.is_dir:
            return False
        if self.name is not None:
            return bool(self.name.fullmatch(self.platform.split(path)[-1]))
        return self.platform.comparable(path) == self.platform.comparable(self.exclusion.text)

    def takes_out(self, listed):
        """It takes a listed directory out of the plan (not_excluded: the exclusion wins),
        the listed directory being it or inside it."""
        return self.matches(listed, True) or (
            self.is_dir and self.name is None
            and _relative(listed, self.exclusion.text, self.platform) is not None)

    def add(self, path, note=""):
        self.removed += 1
        if len(self.examples) < EXAMPLES_SHOWN:
            self.examples.append(path + note)
        if not self.is_dir:
            with contextlib.suppress(OSError):
                self.content.add(os.lstat(self.platform.long_path(path)))
            return
        # the whole tree below it, as the selection's walk sees a tree
        for walked in TreeWalk(path, SourcePlan(path, [""], [], [], [], []), self.platform):
            if not stat.S_ISDIR(walked.st.st_mode):
                self.content.add(walked.st)

    def lines(self):
        """What it removed, then the first few of those paths."""
        platform = self.platform
        if self.exclusion is None:
            what = "the local mirror directory, inside a source (excluded by the program)"
        else:
            what = f"line {self.exclusion.line}, {self.exclusion.text}" + (
                platform.sep if self.is_dir else "")
        if not self.removed:
            gone = self.exclusion.is_path and not os.path.lexists(
                platform.long_path(self.exclusion.text))
            return [f"{what}: nothing" + (" (it does not exist)" if gone else "")]
        kind = ("directory" if self.removed == 1 else "directories") if self.is_dir else \
            "file(s)"
        held = f", holding {self.content.text()}" if self.is_dir else \
            f", {exact_bytes(self.content.bytes)}"
        return ([f"{what}: {self.removed:,} {kind}{held}"]
                + [f"    {path}" for path in self.examples]
                + ([f"    ... and {self.removed - len(self.examples):,} more"]
                   if self.removed > len(self.examples) else []))


class RemovedByExclusions:
    """What each exclusion removed from the selection's walks (TreeWalk.excluded), by
    instruction-file line; an entry that two lines exclude counts under the earlier."""

    def __init__(self, instructions, platform):
        self.platform = platform
        self.tallies = [ExclusionTally(exclusion, is_dir, platform)
                        for is_dir, exclusions in ((True, instructions.excluded_dirs),
                                                   (False, instructions.excluded_files))
                        for exclusion in exclusions]
        self.own = ExclusionTally(None, True, platform)
        self.counted = set()        # each removed path once (a listed one, then met)
        for path, number in instructions.backup_dirs:
            tally = next((t for t in self.tallies if t.takes_out(path)), None)
            if tally and os.path.isdir(platform.long_path(path)):
                self.count(tally, path, f" (listed on line {number})")

    def add(self, walk):
        for rel, is_dir in walk.excluded:
            path = walk.absolute(rel)
            self.count(next((t for t in self.tallies if t.matches(path, is_dir)), self.own),
                       path)

    def count(self, tally, path, note=""):
        key = self.platform.comparable(path)
        if key not in self.counted:
            self.counted.add(key)
            tally.add(path, note)

    def lines(self):
        tallies = sorted(self.tallies, key=lambda t: t.exclusion.line)
        return [line for tally in tallies + ([self.own] if self.own.removed else [])
                for line in tally.lines()]


@dataclasses.dataclass
class SourcePreview:
    """One source's part of the preview: what is selected, what would be archived (at
    most the bytes of each piece's archive)."""

    selected: Counted
    archived: Counted
    piece_bytes: list

    @property
    def archive_bytes(self):
        return sum(self.piece_bytes)

    def volume_sizes(self, volume_size):
        """The sizes of the volumes at most: each piece is split into volumes of its own."""
        return [size for piece in self.piece_bytes
                for size in volume_sizes(piece, volume_size)]


class BackupPreview(BackupRun):
    """preview-backup: what a regular-backup with the same arguments would do now, told
    without doing it.

    It takes the backup's own steps up to the point where a backup starts to write: the
    plan (read_plan, log_plan), the listing, the decision (query_s3: continue or give up
    a pending backup, on its journal opened read-only (JournalView); else full or
    incremental) and the key check, the local state that change detection compares with
    (SourceCatalogue.find_base); then it walks each source as the child does (TreeWalk,
    ChangeRecorder, with the kept pieces' entries of a continued backup) and counts
    instead of archiving.  It writes nothing: no lock (so it may run beside a backup),
    no log file (the terminal only), no work directory, no local state, no journal, no
    S3 object; S3 is read by LIST alone, with the backup keys.  Its exit
    code is what the backup's decision would end with: 9 for a key its chain's key check
    refuses, 1 when S3 cannot be listed (it says what it could not tell), 3 for an
    instruction file that cannot be used.
    """

    def __init__(self, args, platform, settings, program_path=None):
        super().__init__(args, platform, settings, program_path)
        self.regular = True            # what it previews is a regular-backup
        self.given_up = None           # why a backup would give the pending backup up

    def execute(self):
        try:
            return self.preview()
        finally:
            if self.journal:
                self.journal.close()

    def preview(self):
        self.log = PreviewOutput(self.args.secrets)
        self.start = utc_now()
        # Never made; the plan excludes it from a source, as a backup's plan does.
        self.work_dir = self.work_dir_path()
        self.log.line(f"{PREVIEW_BACKUP}: what regular-backup would do now with these "
                      "settings. Nothing is mirrored, archived, uploaded or written (no "
                      "lock, log file, work directory, local state or journal)"
                      + ("; S3 is only listed." if self.aws else "."))
        self.warn_about_a_short_key()
        plan, problem = self.read_plan()
        self.heading("Sources: the mount directories, and what the instruction file "
                     "selects in each")
        self.log_plan(plan)
        if problem:
            raise problem
        if self.aws:
            self.heading(f"The decision, from the listing of s3://{self.args.bucket} for "
                         f"location {self.args.location} (the backup keys, LIST only)")
            pending = self.pending_journal()
            self.query_s3(plan, pending)
            self.say_pending(pending)
            if self.keycheck_to_write:
                self.log.line("Key check: the backup would write one right before its first "
                              f"upload ({self.keycheck_to_write[1]}).")
        removed = RemovedByExclusions(plan.instructions, self.platform)
        sources = [self.preview_source(index, source, len(plan.sources), removed)
                   for index, source in enumerate(plan.sources, 1)]
        self.heading("Exclusions: what each one removed from the selection")
        for line in removed.lines() or ["(the instruction file excludes nothing)"]:
            self.log.line(line)
        self.heading("In all")
        self.say_totals(sources)
        if self.aws_asked:
            self.say_upload_and_cost(sources)
        return self.exit_code()

    def heading(self, text):
        self.log.line()
        self.log.line(f"== {text}")

    # -- a pending backup: the backup's own decision, on its journal read-only -----
    journal_kind = JournalView

    def drop_damaged_journal(self, path, problem):
        self.log.line(f"Warning: {problem}: a backup could not continue the backup it "
                      "records; it would remove the journal, decide as below, and name "
                      "the volumes that backup left in S3 as unused.")

    def abandon(self, journal, reason):
        self.given_up = reason
        super().abandon(journal, reason)

    def say_pending(self, pending):
        """What a backup would do with the pending backup, in one line (the decision's
        lines above say it in detail)."""
        if pending is None:
            return
        backup = pending.backup
        what = (f"the pending {backup['scope']} backup "
                f"{describe_stamp(parse_stamp(backup['stamp']))}")
        if self.listing is None:
            self.log.line(f"Pending: {what}; whether a backup would continue it is not "
                          "told without the listing.")
        elif self.given_up:
            self.log.line(f"Pending: a backup would give up {what}: {self.given_up}. It "
                          "would remove its journal and decide anew, as said here.")
        else:
            self.log.line(f"Pending: a backup would continue {what}: "
                          f"{self.continued['pieces']} piece(s) "
                          f"({format_bytes(self.continued['bytes'])}) already in S3, "
                          f"{len(self.done_sources)} source(s) done; it would archive only "
                          "what no kept piece holds.")

    def skip_aws(self, reason):
        super().skip_aws(reason)
        if not self.key_refused:
            self.log.line("Not told without the listing: whether the backup would be full or "
                          "incremental, whether the archive key matches its chain's key "
                          "check, and what the month holds in S3. The upload below is what a "
                          "full backup would archive (an incremental, less).")

    def preview_source(self, index, source, count, removed):
        """Walk one source as the child would, counting; say what it selects and what
        would be archived."""
        name = self.platform.source_name(source.mount)
        incremental = self.scope is Scope.INCREMENTAL
        self.heading(f"Source {index} of {count}: {source.mount} (S3 name {name})")
        if self.local:
            mirror = self.platform.mirror_directory(self.args.mirror_root, source.mount)
            self.log.line(f"Mirror directory: {mirror}")
        previous = None
        if incremental and name not in self.done_sources:
            catalogue = SourceCatalogue(self, source, name)
            catalogue.find_base()
            self.log.line(catalogue.base_note)
            previous = catalogue.base
        walk = CountingWalk(source.mount, source, self.platform,
                            self.since if incremental else None)
        counter = ChangeCounter(self.settings.piece_size)
        journal = self.journal
        if name in self.done_sources:
            collections.deque(walk, maxlen=0)   # counted; its mirror alone would be made
        else:
            # the entries the kept pieces hold, as choose_base passes them to the child
            done = (DoneEntries(journal.path, name, journal.dropped)
                    if journal is not None and journal.has_entries(name) else None)
            ChangeRecorder(walk, previous, self.platform, not incremental, done).run(
                counter, counter.archive)
        removed.add(walk)
        self.log.line(f"Selected: {walk.selected.text()}, in {walk.directories:,} "
                      f"director{'y' if walk.directories == 1 else 'ies'} (the listed ones "
                      "and those below them)")
        for special, what in walk.specials:
            self.log.line(f"Not backed up ({what}): {walk.absolute(special)}")
        for problem in walk.problems:
            self.log.line(f"WARNING: {problem}: a backup reports this as a FAILURE")
        if name in self.done_sources:
            self.log.line("Done: its completion indicator is in S3; the backup would only "
                          "refresh its mirror.")
        elif journal is not None:
            self.log.line(f"The continued backup would archive {counter.archived.text()}; "
                          f"{counter.held:,} file(s) are in its kept pieces.")
        elif incremental:
            gone = (f"; {counter.gone:,} path(s) gone since the local catalogue"
                    if previous else "")
            self.log.line(f"An incremental backup would archive {counter.archived.text()}"
                          f"{gone}.")
        return SourcePreview(walk.selected, counter.archived, counter.piece_bounds())

    def say_totals(self, sources):
        selected, archived = Counted(), Counted()
        for source in sources:
            for total, part in ((selected, source.selected), (archived, source.archived)):
                total.files += part.files
                total.bytes += part.bytes
        self.log.line(f"Selected: {selected.text()} in {len(sources)} source(s).")
        if self.journal is not None:
            self.log.line(f"The continued backup would archive {archived.text()}.")
        elif self.aws_asked and self.scope is Scope.INCREMENTAL:
            self.log.line(f"An incremental backup would archive {archived.text()}.")

    def say_upload_and_cost(self, sources):
        """The upload (at most: compression is unknown before 7-Zip runs), the requests
        it takes, and what it and the month's objects cost in storage."""
        upload = sum(source.archive_bytes for source in sources)
        sizes = [size for source in sources
                 for size in source.volume_sizes(self.settings.volume_size)]
        volumes = len(sizes)
        if self.key_refused:
            self.log.line("Upload: nothing (the archive key is refused, see above).")
            return
        level = self.settings.compression_level
        how = ("stored as they are (compression level 0, AAM_COMPRESSION_LEVEL)" if not level
               else f"compression level {level} (AAM_COMPRESSION_LEVEL) makes it smaller as "
               "far as the files compress")
        self.log.line(f"Upload: at most {exact_bytes(upload)} in at most "
                      f"{volumes} volume(s) of up to {self.settings.volume_size:,} bytes "
                      f"(AAM_VOLUME_SIZE): the files' bytes and ZIP's headers; {how}. And "
                      "for each source a catalogue and a completion indicator (STANDARD, "
                      "small).")
        if self.continued:
            self.log.line(f"(The kept pieces of the continued backup, "
                          f"{format_bytes(self.continued['bytes'])}, are in S3 already: not "
                          "counted here.)")
        elif not upload and self.scope is Scope.INCREMENTAL:
            self.log.line("(No file changed: the backup would upload no volume, only the "
                          "catalogues and completion indicators.)")
        requests = sum(upload_requests(size) for size in sizes)
        month = storage_cost(upload, volumes)
        minimum = month * DEEP_ARCHIVE_MINIMUM_DAYS / DAYS_A_MONTH
        self.log.line(f"Estimated cost (us-east-1 prices of {PRICES_TAKEN}: Deep Archive "
                      f"${STORAGE_PRICES[DEEP_ARCHIVE]} per GB-month; docs/backup.md):")
        self.log.line(f"  this backup's volumes: {at_most(month)} a month, billed for "
                      f"{DEEP_ARCHIVE_MINIMUM_DAYS} days at least (Deep Archive's minimum): "
                      f"{at_most(minimum)} for those")
        put = requests / 1000 * PUT_PRICES[DEEP_ARCHIVE]
        self.log.line(f"  its upload: at most {requests:,} PUT request(s) (the volumes' "
                      f"multipart parts): {at_most(put)}, once")
        if self.listing is None:
            return
        stored = StoredBytes.of(self.listing)
        month_text = f"{self.start:%Y-%m}"
        self.log.line(f"  stored in {month_text} (this month's listing): {stored.volumes} "
                      f"volume(s), {exact_bytes(stored.volume_bytes)}, and {stored.others} "
                      f"STANDARD object(s), {exact_bytes(stored.other_bytes)}: "
                      f"{format_dollars(stored.cost())} a month; with this backup "
                      f"{format_dollars(stored.cost() + month)} (earlier months are not "
                      "listed, and are billed too)")


# ============================================================================
# Restore: choosing the set
# ============================================================================

# -- the catalogues: the state at the restore point, and the volumes it needs ---------

RESTORE_STATES_DIR = "states"        # downloads/states/<n>.tsv: what source n restores


# -- what to restore: the restore point and the selection --------------------------

class RestoreSelection:
    """What to restore of each source: everything, or the entries the items match.

    An item is an absolute path as the source had it (a directory brings what is
    under it; a trailing separator says it must be a directory) or a name
    (matched against every name in the source, at any depth; a matching
    directory brings what is under it; a trailing separator: directories
    only).  * and ? are wildcards in both; on Windows sources names compare
    without regard to letter case, as there.
    """

    def __init__(self, items):
        self.items = list(items)

    def __bool__(self):
        return bool(self.items)

    def matcher(self, source_path, source_platform):
        """A function (path relative to the source, '/' between names, kind) -> bool;
        source_platform: the name of the platform the backup was made on."""
        if not self.items:
            return lambda _path, _kind: True
        source = platform_named(source_platform)
        rules = [self.rule(item, source_path, source) for item in self.items]
        return lambda path, kind: any(rule(path, kind) for rule in rules)

    @staticmethod
    def rule(item, source_path, source):
        is_dir = item.endswith(("/", "\\"))
        trimmed = item.rstrip("/\\") or item[:1]
        absolute = trimmed.startswith("/") or drive_letter_of(trimmed)
        split = f"[{re.escape(source.separators)}]"
        parts = [p for p in re.split(split, trimmed) if p]
        regexes = [wildcard_regex(p, source.case_insensitive) for p in parts]
        if absolute:
            mount = [p for p in re.split(split, source_path) if p]

            def match_path(path, kind):
                names = mount + path.split("/")
                if len(names) < len(regexes) or (is_dir and len(names) == len(regexes)
                                                  and kind != DIRECTORY):
                    return False
                return all(r.fullmatch(n) for r, n in zip(regexes, names))
            return match_path
        if len(regexes) != 1:
            return lambda _path, _kind: False       # a '\\' in a name on Windows: none
        regex = regexes[0]

        def match_name(path, kind):
            names = path.split("/")
            last = len(names) - 1
            return any(regex.fullmatch(name) and (not is_dir or i < last or kind == DIRECTORY)
                       for i, name in enumerate(names))
        return match_name


# -- the backup set: its chain up to the restore point -----------------------------

@dataclasses.dataclass
class RestoreVolume:
    key: str
    size: int
    sha256: str
    path: str            # where it is downloaded

    @property
    def number(self):
        return ObjectName.parse(self.key).volume


@dataclasses.dataclass
class RestoreArchive:
    """One piece of one source's archive in one backup of the set: a self-contained
    7-Zip archive.  A backup made before pieces has one, the legacy piece (no
    volumes: nothing changed); a backup in pieces with nothing to archive has one
    without volumes too, for its catalogue."""

    backup: dt.datetime
    number: int          # the source's numbered directory
    source: str
    volumes: list
    catalogue: object = None     # {"name", "size", "sha256", "kind", ...}; None: 1.0.0
    piece: int = LEGACY_PIECE

    @property
    def key(self):
        """(backup stamp, source number, piece): how plans and tallies name it."""
        return format_stamp(self.backup), self.number, self.piece


@dataclasses.dataclass
class RestoreSet:
    location: str
    full: dt.datetime
    incrementals: list   # complete incrementals up to the restore point, oldest first
    sources: list        # [(number, source name, original path)]
    archives: list       # the full's first, then each incremental's
    indicators: list     # indicator keys
    keycheck: str = None  # the chain's key check the key matched (None: it has none)

    @property
    def volumes(self):
        return [volume for archive in self.archives for volume in archive.volumes]

    @property
    def last_backup(self):
        return self.incrementals[-1] if self.incrementals else self.full

    @property
    def exact(self):
        """Every source's state at the restore point is known from catalogues: the
        restore follows them, not a replay (exact_from)."""
        return all(self.exact_from(number) is not None for number, _s, _p in self.sources)

    def exact_from(self, number):
        """Where the catalogues of source number give its exact state: the index, among
        its archives, of the first whose catalogue is a listing and after which every
        archive has one (0 for a set made by version 1.1 or later); None: no such
        archive (a set made by version 1.0.0, replayed).  The archives before it are
        of a 1.0.0 chain continued by a later version (listing_start)."""
        return listing_start([a.catalogue for a in self.archives_of(number)])

    def archives_of(self, number):
        return [a for a in self.archives if a.number == number]

    def catalogue_archives(self, number, start=0):
        """One archive per backup of source number (the pieces share its catalogue),
        from its archive start on (see exact_from)."""
        seen, found = set(), []
        for archive in self.archives_of(number)[start:]:
            if archive.backup not in seen:
                seen.add(archive.backup)
                found.append(archive)
        return found


def listing_start(catalogues):
    """The index of the first listing among catalogue descriptions (oldest first) from
    which none is missing, or None: a 1.0.0 chain continued by a later version is
    exact from its first listing on (RestoreSet.exact_from)."""
    start = None
    for index in range(len(catalogues) - 1, -1, -1):
        if not catalogues[index]:
            break
        if catalogues[index].get("kind") == LISTING:
            start = index
    return start


def read_manifest(s3, bucket, key, table=None):
    """The JSON manifest of one indicator, checked enough to be trusted."""
    with s3_call(bucket, key, table, "completion indicator"):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        manifest = json.loads(body.decode("utf-8"))
        if manifest.get("format") != INDICATOR_FORMAT:
            raise ValueError("not an AAM Auto Backup indicator")
        if int(manifest.get("format_version", 0)) > INDICATOR_VERSION:
            raise ValueError("written by a newer version of AAM Auto Backup; use it to "
                             "restore")
        for field in ("sources", "source", "source_path", "volumes"):
            if field not in manifest:
                raise ValueError(f"no '{field}'")
        return manifest
    except (ValueError, UnicodeDecodeError, AttributeError) as problem:
        raise AamError(f"The completion indicator {key} cannot be used: {problem}")


def complete_backup(s3, bucket, listing, full, incremental, table=None):
    """({source: manifest}, None) when one backup is complete, else (None, reason)."""
    present = listing.indicators.get((full, incremental), {})
    manifests = {source: read_manifest(s3, bucket, stored.name.key, table)
                 for source, stored in sorted(present.items())}
    declared = {tuple(m["sources"]) for m in manifests.values()}
    if len(declared) != 1:
        return None, "its completion indicators name different sources"
    missing = [source for source in declared.pop() if source not in manifests]
    if missing:
        return None, "no completion indicator for " + ", ".join(missing)
    return manifests, None


def describe_backup(full, incremental):
    if incremental is None:
        return f"full backup {describe_stamp(full)}"
    return f"incremental backup {describe_stamp(incremental)} (of the full {describe_stamp(full)})"


def find_restore_set(s3, bucket, listing, out, point=None):
    """The latest complete full backup at or before point (None: the latest), its
    manifests, and its complete incrementals up to point.

    Returns (full, full manifests, [(incremental, manifests)], oldest first).
    """
    full, manifests = latest_complete_full(s3, bucket, listing, out, point)
    chosen = []
    for incremental in sorted({incr for (f, incr) in listing.indicators
                               if f == full and incr is not None}):
        if point is not None and incremental > point:
            break
        found, reason = complete_backup(s3, bucket, listing, full, incremental)
        if found:
            chosen.append((incremental, found))
        else:
            out.line(f"Skipped the {describe_backup(full, incremental)}: it is incomplete "
                     f"({reason}).")
    return full, manifests, chosen


def latest_complete_full(s3, bucket, listing, out, point=None, table=None):
    """(The latest complete full backup at or before point (None: the latest), its
    manifests by source); each incomplete one passed over is said."""
    for full in listing.fulls():
        if point is not None and full > point:
            continue
        manifests, reason = complete_backup(s3, bucket, listing, full, None, table)
        if manifests:
            return full, manifests
        out.line(f"Skipped the {describe_backup(full, None)}: it is incomplete ({reason}).")
    raise NoBackupSet("No complete full backup to restore from.")


def archive_directory(downloads, backup, number, piece=LEGACY_PIECE):
    """downloads/<backup stamp>/<source number>: one backup's catalogue and legacy
    archive; .../<piece> below it: a piece's volumes (short, any path)."""
    directory = os.path.join(downloads, format_stamp(backup), str(number))
    return directory if piece == LEGACY_PIECE else os.path.join(directory, str(piece))


def volume_path(downloads, backup, number, key):
    name = ObjectName.parse(key)
    return os.path.join(archive_directory(downloads, backup, number, name.piece),
                        f"backup.zip.{name.volume:03d}")


def manifest_pieces(manifest):
    """[(piece number, its volume records)] of a manifest: a format 1 one has the
    legacy piece; a format 2 one with no piece (nothing archived), a piece-less
    entry for the catalogue alone."""
    if "pieces" not in manifest:
        return [(LEGACY_PIECE, manifest["volumes"])]
    return [(piece["number"], piece["volumes"]) for piece in manifest["pieces"]] or [
        (LEGACY_PIECE, [])]


def volumes_of(manifest, listing, full, incremental, path_of, piece=LEGACY_PIECE,
               entries=None):
    """The volumes of one piece the manifest names, each checked against the listing."""
    listed = {stored.name.key: stored.size
              for stored in listing.volumes.get((full, incremental, manifest["source"]), [])}
    volumes, problems = [], []
    for entry in manifest["volumes"] if entries is None else entries:
        name = ObjectName.parse(entry["name"])
        if (name is None or name.indicator or name.catalogue or name.full != full
                or name.incremental != incremental or name.source != manifest["source"]
                or name.piece != piece):
            problems.append(f"{entry['name']}: the manifest names a volume of another backup")
            continue
        problems += listed_problems(entry, listed.get(entry["name"]))
        volumes.append(RestoreVolume(entry["name"], int(entry["size"]), entry["sha256"],
                                     path_of(entry["name"])))
    return volumes, problems


def listed_problems(entry, listed_size):
    """Why an object the manifest names cannot be used: missing, or another size."""
    if listed_size is None:
        return [f"{entry['name']}: missing from the bucket"]
    if listed_size != entry["size"]:
        return [f"{entry['name']}: {listed_size:,} bytes in the bucket, {entry['size']:,} "
                "in the manifest"]
    return []


def catalogue_of(manifest, listing, full, incremental):
    """The manifest's catalogue (None for a backup made before catalogues existed)."""
    catalogue = manifest.get("catalogue")
    if not catalogue:
        return None, []
    stored = listing.catalogues.get((full, incremental, manifest["source"]))
    return catalogue, listed_problems(catalogue, stored.size if stored else None)


def build_restore_set(location, listing, full, chosen, full_manifests, downloads):
    """Number the sources and gather every archive; missing objects stop it here."""
    sources = [(number, source, full_manifests[source]["source_path"])
               for number, source in enumerate(sorted(full_manifests), 1)]
    numbers = {source: number for number, source, _path in sources}
    archives, indicators, problems = [], [], []
    for incremental, manifests in [(None, full_manifests)] + chosen:
        backup = incremental or full
        for source, manifest in sorted(manifests.items()):
            indicators.append(ObjectName(location, full, incremental, True, source).key)
            if source not in numbers:
                problems.append(f"{describe_backup(full, incremental)} holds the source "
                                f"{source}, which its full backup does not")
                continue
            number = numbers[source]
            catalogue, missing = catalogue_of(manifest, listing, full, incremental)
            problems += missing
            for piece, entries in manifest_pieces(manifest):
                volumes, found = volumes_of(
                    manifest, listing, full, incremental,
                    lambda key, b=backup, n=number: volume_path(downloads, b, n, key),
                    piece, entries)
                problems += found
                archives.append(RestoreArchive(backup, number, source, volumes, catalogue,
                                               piece))
    if problems:
        raise AamError("The backup set is damaged; nothing was restored:\n  "
                       + "\n  ".join(problems))
    return RestoreSet(location, full, [i for i, _m in chosen], sources, archives, indicators)


def keycheck_verdict(key, checks, full, table=RESTORE_ARGS):
    """(The key check of the chain of full that key matches, or None; why the key is
    wrong, or None).  A chain without key checks (made before they existed) gives
    (None, None): its catalogues try the key."""
    for check in checks:
        if check.matches(key):
            return check.key, None
    if not checks:
        return None, None
    return None, (f"The decryption key ({table.ref('key')}) is wrong: it is not the "
                  f"key the backups of the full backup {describe_stamp(full)} were made with "
                  f"(their key check {checks[0].key}, and their catalogue does not open with it). "
                  "Nothing was thawed.")


def check_incremental_chain(restore_set, manifests_by_backup, out):
    """Warn when an incremental was made against a backup that is not in the set."""
    previous = restore_set.full
    for incremental, manifests in manifests_by_backup:
        since = {m.get("changed_since") for m in manifests.values()}
        if since != {format_stamp(previous)}:
            out.line(f"Warning: the {describe_backup(restore_set.full, incremental)} holds "
                     f"changes since {', '.join(sorted(str(s) for s in since))}, not since "
                     f"the previous backup used ({describe_stamp(previous)}); files changed "
                     "in between may be missing.")
        previous = incremental


def point_lines(restore_set, point):
    """Which backup was chosen, and why (the plan's first lines)."""
    chosen = describe_backup(restore_set.full, restore_set.incrementals[-1]
                             if restore_set.incrementals else None)
    if point is None:
        return [f"Restore point: the latest complete backup, the {chosen}."]
    return [f"Restore point {describe_stamp(point)} ({RESTORE_ARGS.ref('restore_point')}): "
            "the latest complete "
            f"backup at or before it is the {chosen}."]


class NothingSelected(AamError):
    exit_code = EXIT_NOTHING_SELECTED


def reconstruct(catalogues, earlier_archives=False):
    """The state a chain of catalogues (oldest first) describes at its last backup.

    One pass over all of them at once, in catalogue order: for each path, each
    catalogue in turn adds, changes or deletes it (a listing also deletes what
    it does not name); memory holds one line per catalogue.  earlier_archives:
    archives without catalogues come before the first (a 1.0.0 chain continued),
    so what the first names as held by an earlier backup ('?') stays UNKNOWN, to
    be found by path in them.
    """
    listings = [catalogue.header["kind"] == LISTING for catalogue in catalogues]
    streams = [keyed_entries(catalogue, index) for index, catalogue in enumerate(catalogues)]
    for _key, group in itertools.groupby(heapq.merge(*streams), key=lambda line: line[0]):
        named = {index: entry for _key, index, entry in group}
        state = None
        for index, is_listing in enumerate(listings):
            entry = named.get(index)
            if entry is None:
                state = None if is_listing else state
            elif entry.kind == DELETED:
                state = None
            else:
                if entry.location == UNKNOWN:
                    entry = entry._replace(location=resolve_unknown(
                        entry, state, UNKNOWN if earlier_archives and index == 0 else MISSING))
                state = entry
        if state is not None:
            yield state


def keyed_entries(catalogue, index):
    """(key, index, entry) per line: merged in key order, then catalogue order."""
    for entry in catalogue:
        yield entry.key, index, entry


def resolve_unknown(entry, earlier, unresolved=MISSING):
    """Where a file of a listing made without a local state has its bytes: in the
    backup that held it before with the same type, size and time (UNKNOWN when that
    is one without a catalogue); else unresolved (MISSING: nowhere)."""
    if earlier is None:
        return unresolved
    if (earlier.kind, earlier.size, earlier.mtime) == (entry.kind, entry.size, entry.mtime):
        return earlier.location
    return MISSING


def check_catalogue_chain(catalogues, archives):
    """Each delta must describe the changes since the backup just before it."""
    for previous, (catalogue, archive) in zip(archives, zip(catalogues[1:], archives[1:])):
        base = catalogue.header.get("base")
        if catalogue.header["kind"] == DELTA and base != format_stamp(previous.backup):
            raise AamError(f"The catalogue of the {format_stamp(archive.backup)} backup "
                           f"holds the changes since {base}, not since the backup before it "
                           f"({format_stamp(previous.backup)}); the chain is broken.")


@dataclasses.dataclass
class RestoreTotals:
    """What a restore takes: entries, files, their bytes, and where their bytes lie."""

    entries: int = 0
    files: int = 0
    bytes: int = 0
    # (backup stamp, source number, piece) -> {volume numbers}
    volumes: dict = dataclasses.field(default_factory=dict)
    missing: list = dataclasses.field(default_factory=list)  # paths in no archive
    earlier: set = dataclasses.field(default_factory=set)    # sources with files found by
    # path in the archives before their first listing (RestoreSet.exact_from)
    sources: dict = dataclasses.field(default_factory=dict)  # source number -> entries

    def add(self, entry, number):
        self.entries += 1
        self.sources[number] = self.sources.get(number, 0) + 1
        if entry.kind == DIRECTORY:
            return
        self.files += 1
        self.bytes += entry.size
        place = parse_location(entry.location)
        if entry.location == MISSING:
            self.missing.append(entry.path)
        elif entry.location == UNKNOWN and entry.kind == FILE:
            self.earlier.add(number)
        elif place and entry.kind == FILE:     # links are made from the catalogue
            stamp, piece, first, last = place
            self.volumes.setdefault((stamp, number, piece), set()).update(
                range(first, last + 1))


def complete_volumes(tally, archives):
    """Whole archives: every volume of each archive that holds a file to restore."""
    return {key: {v.number for v in archives[key].volumes} for key in tally.volumes}


def openable_volumes(tally, archives, central_directory):
    """The volumes holding the chosen files, plus those 7-Zip reads to open a split
    archive: the central directory's, from its first volume to the last."""
    chosen = {}
    for key, numbers in tally.volumes.items():
        count = len(archives[key].volumes)
        # (an archive without a catalogue is thawed whole: its volumes are all chosen)
        chosen[key] = numbers | set(range(central_directory.get(key, count + 1), count + 1))
    return chosen


def central_directory_volumes(catalogue, stamp, number):
    """{(backup stamp, source number, piece): the volume where its central directory
    starts} of one backup's catalogue of source number (version 1: the legacy piece)."""
    central = {}
    if catalogue.header.get("archive"):
        central[(stamp, number, LEGACY_PIECE)] = \
            catalogue.header["archive"]["central_directory_volume"]
    for piece in catalogue.header.get("pieces") or []:
        central[(stamp, number, piece["number"])] = piece["central_directory_volume"]
    return central


# -- the plan printed before any thaw ------------------------------------------

@dataclasses.dataclass
class RestorePlan:
    """The volumes a restore thaws, downloads and verifies, and what they hold."""

    volumes: list                 # RestoreVolume, in set order
    chosen: RestoreTotals                 # the files restored
    whole: RestoreTotals                  # the whole set's files, for comparison
    whole_volumes: list           # what restoring everything would thaw
    selection: list               # the items (empty: everything)
    # archive keys of pieces holding entries their backup does not use (a backup
    # continued after changes): never extracted whole into place
    superseded: set = dataclasses.field(default_factory=set)


def plan_lines(plan, days, tier, days_ref=RESTORE_ARGS.ref("days")):
    volumes = plan.volumes
    size = sum(v.size for v in volumes)
    lines = [f"Restore plan: {len(volumes)} volume(s), {size:,} bytes "
             f"({size / GB:.3f} GB), thawed for {days} day(s) ({days_ref}) "
             "with the "
             f"{tier} tier: expected wait {EXPECTED_WAIT[tier]}.",
             f"Estimated retrieval cost (us-east-1 prices of {PRICES_TAKEN}, "
             "docs/restore.md):"]
    for name in ("Bulk", "Standard"):
        per_gb, per_thousand = RETRIEVAL_PRICES[name]
        chosen = "  <- this restore (AAM_RESTORE_TIER)" if name == tier else ""
        lines.append(f"  {name:8s} {format_dollars(retrieval_cost(name, size, len(volumes))):>16s}"
                     f"  (${per_gb}/GB + ${per_thousand:.3f} per 1,000 requests, "
                     f"{EXPECTED_WAIT[name]}){chosen}")
    lines.append(f"  Downloading out of AWS is billed apart (${TRANSFER_OUT_PER_GB}/GB): "
                 f"{format_dollars(size / GB * TRANSFER_OUT_PER_GB)}.")
    if plan.selection:
        lines += comparison_lines(plan)
    if plan.chosen.missing:
        lines.append(f"{len(plan.chosen.missing)} file(s) cannot be restored: no archive "
                     "holds them (they could not be read when they were backed up), e.g. "
                     f"{plan.chosen.missing[0]}")
    return lines


def comparison_lines(plan):
    """The selection beside the whole set: files, bytes, volumes, cost in both tiers."""
    rows = [("selection", plan.chosen, plan.volumes), ("whole set", plan.whole,
                                                         plan.whole_volumes)]
    lines = [f"Selected: {', '.join(plan.selection)}",
             f"  {'':10s} {'files':>9s} {'file bytes':>15s} {'volumes':>8s} "
             f"{'volume bytes':>15s} {'Bulk':>16s} {'Standard':>16s}"]
    for label, tally, volumes in rows:
        size = sum(v.size for v in volumes)
        costs = [format_dollars(retrieval_cost(t, size, len(volumes)))
                 for t in ("Bulk", "Standard")]
        lines.append(f"  {label:10s} {tally.files:>9,} {tally.bytes:>15,} {len(volumes):>8,} "
                     f"{size:>15,} {costs[0]:>16s} {costs[1]:>16s}")
    return lines


def backup_set_lines(restore_set, volumes):
    """The objects chosen, for the terminal and the log."""
    lines = [f"Backup set used: the {describe_backup(restore_set.full, None)} and "
             f"{len(restore_set.incrementals)} complete incremental backup(s) of it; the "
             f"data is as of {describe_stamp(restore_set.last_backup)}."]
    if not restore_set.exact:
        lines.append("This set has no catalogues (made by version 1.0.0): its archives are "
                     "replayed in time order; a file deleted after the full backup comes "
                     "back, and a later backup wins where a path changed type.")
    else:
        listings = [restore_set.archives_of(number)[restore_set.exact_from(number)].backup
                    for number, _s, _p in restore_set.sources]
        first = max(listings)
        if first != restore_set.full:
            lines.append(
                "The first backups of this set have no catalogue (made by version 1.0.0); "
                f"the state is exact from the backup {describe_stamp(first)} on, whose "
                "catalogue lists every file: a file it names as held by an earlier backup "
                "is taken by its path from the newest of those archives, which are thawed "
                "whole.")
    for number, source, path in restore_set.sources:
        lines.append(f"  source {number}: {path} ({source})")
    lines.append("Objects used:")
    for key in restore_set.indicators:
        lines.append(f"  {key}  (completion indicator)")
    shown = set()
    for archive in restore_set.archives:
        if archive.catalogue and archive.catalogue["name"] not in shown:
            shown.add(archive.catalogue["name"])
            lines.append(f"  {archive.catalogue['name']}  (catalogue)")
    for volume in volumes:
        lines.append(f"  {volume.key}  ({volume.size:,} bytes)")
    return lines


def make_plan(restoration):
    """Reconstruct each source's state at the restore point (written to a state file,
    the selection only) and choose the volumes it needs."""
    restore_set, selection = restoration.set, restoration.selection
    chosen, whole, central, superseded = RestoreTotals(), RestoreTotals(), {}, set()
    for number, _source, path in restore_set.sources:
        central.update(plan_source(restoration, number, path, chosen, whole, superseded))
    for tally in (chosen, whole):
        add_earlier_archives(tally, restore_set)
    if selection and not chosen.entries:
        raise NothingSelected(
            f"Nothing in the backup as of {describe_stamp(restore_set.last_backup)} matches "
            f"the selection ({' | '.join(selection.items)}); nothing was thawed.")
    by_key = {a.key: a for a in restore_set.archives}
    missing = sorted(set(whole.volumes) - set(by_key))
    if missing:
        raise AamError(f"The catalogue of the backup {missing[0][0]} of source "
                       f"{missing[0][1]} names piece {missing[0][2]}, which its completion "
                       "indicator does not list; the backup set is damaged.")
    wanted = (openable_volumes(chosen, by_key, central) if selection
              else complete_volumes(chosen, by_key))
    everything = complete_volumes(whole, by_key)
    return RestorePlan(volumes_in(restore_set, wanted), chosen, whole,
                       volumes_in(restore_set, everything), selection.items, superseded)


def add_earlier_archives(tally, restore_set):
    """The archives before a source's first listing, whole, when a file to restore is
    found by path in them: their names are unknown until they are thawed."""
    for number in tally.earlier:
        for archive in restore_set.archives_of(number)[:restore_set.exact_from(number)]:
            if archive.volumes:
                tally.volumes[archive.key] = {volume.number for volume in archive.volumes}


def plan_source(restoration, number, path, chosen, whole, superseded):
    """One source: its state at the restore point into its state file (the selected
    entries, and the directories leading to them), counted into chosen and whole;
    the pieces holding entries their backup does not use added to superseded.
    Returns {(backup stamp, number, piece): the volume where its central directory
    starts}.  Only the backups from the source's first listing on have catalogues to
    read (RestoreSet.exact_from)."""
    start = restoration.set.exact_from(number)
    archives = restoration.set.catalogue_archives(number, start)
    catalogues = [CatalogueFile(restoration.fetch_catalogue(a)) for a in archives]
    check_catalogue_chain(catalogues, archives)
    central = {}
    for archive, catalogue in zip(archives, catalogues):
        stamp = format_stamp(archive.backup)
        central.update(central_directory_volumes(catalogue, stamp, number))
        superseded.update((stamp, number, piece["number"])
                          for piece in catalogue.header.get("pieces") or []
                          if piece.get("superseded"))
    selection = restoration.selection
    match = selection.matcher(path, catalogues[0].header.get("platform", "posix"))
    writer = StateWriter(restoration, number, {"kind": LISTING, "source_path": path,
                                               "selection": selection.items})
    parents = OpenDirectories()
    names = NameChecker(restoration.platform) if restoration.platform.refuses_names \
        else None
    try:
        for entry in reconstruct(catalogues, earlier_archives=start > 0):
            whole.add(entry, number)
            chosen_one = match(entry.path, entry.kind) and (
                names is None or writer.creatable(entry, names))
            if chosen_one:
                for parent in parents.unwritten(entry.path):
                    writer.write(parent)      # its times and permissions come back too
                chosen.add(entry, number)
                writer.write(entry)
            parents.met(entry, chosen_one)
    finally:
        writer.close()
    return central


def volumes_in(restore_set, numbers):
    """The set's volumes whose numbers are chosen, in set order."""
    return [volume for archive in restore_set.archives for volume in archive.volumes
            if volume.number in numbers.get(archive.key, ())]


# ============================================================================
# Restore: the state on disk, thaw and download
# ============================================================================

RESTORE_STATE_FILE = ".aam-restore-state.json"
RESTORE_STATE_FORMAT = "aam-auto-backup-restore-state"
RESTORE_LOCK_FILE = ".aam-restore.lock"
RESTORE_MAP_FILE = "restore-map.txt"
DOWNLOADS_DIR = "downloads"
INCOMPLETE_SUFFIX = ".incomplete"
PART_SUFFIX = ".part"
ARCHIVED_CLASSES = ("DEEP_ARCHIVE", "GLACIER")

# Thaw states of one volume, in the order a volume goes through them.
NOT_REQUESTED = "not requested"
IN_PROGRESS = "in progress"
AVAILABLE = "available"
DOWNLOADED = "downloaded"


def set_to_json(restore_set):
    return {
        "location": restore_set.location, "full": format_stamp(restore_set.full),
        "incrementals": [format_stamp(i) for i in restore_set.incrementals],
        "sources": [list(source) for source in restore_set.sources],
        "indicators": list(restore_set.indicators),
        "keycheck": restore_set.keycheck,
        "archives": [{"backup": format_stamp(a.backup), "number": a.number,
                      "source": a.source, "catalogue": a.catalogue, "piece": a.piece,
                      "volumes": [{"name": v.key, "size": v.size, "sha256": v.sha256}
                                  for v in a.volumes]}
                     for a in restore_set.archives],
    }


def set_from_json(data, downloads):
    archives = []
    for entry in data["archives"]:
        backup = parse_stamp(entry["backup"])
        volumes = [RestoreVolume(v["name"], v["size"], v["sha256"],
                                 volume_path(downloads, backup, entry["number"], v["name"]))
                   for v in entry["volumes"]]
        archives.append(RestoreArchive(backup, entry["number"], entry["source"], volumes,
                                       entry.get("catalogue"),
                                       entry.get("piece", LEGACY_PIECE)))
    return RestoreSet(data["location"], parse_stamp(data["full"]),
                      [parse_stamp(i) for i in data["incrementals"]],
                      [tuple(source) for source in data["sources"]], archives,
                      data["indicators"], data.get("keycheck"))


# -- the destination directory and the restoration state ----------------------

class RestoreState:
    """The small JSON file in the destination that lets a re-run continue.

    It pins the backup set with every volume's size and SHA-256 (a backup
    made meanwhile does not change what is being restored, and the last step
    needs no S3 request), the restore point it was chosen by, the selection
    the numbered directories were made with, and which of them are finished.
    Everything else is derived on each run: thaw status from S3's Restore
    header, downloads from the files on disk (a volume gets its final name
    only once verified).
    """

    def __init__(self, destination, data):
        self.path = os.path.join(destination, RESTORE_STATE_FILE)
        self.data = data

    @classmethod
    def load(cls, destination):
        path = os.path.join(destination, RESTORE_STATE_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if data.get("format") != RESTORE_STATE_FORMAT:
                raise ValueError("not a restoration state file")
            set_from_json(data["set"], "")       # readable as a whole, or not at all
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as problem:
            raise AamError(f"{path} cannot be read ({problem}); remove it to start this "
                           "restoration afresh.")
        return cls(destination, data)

    @classmethod
    def new(cls, destination, bucket, restore_set, point, selection):
        return cls(destination, {
            "format": RESTORE_STATE_FORMAT, "format_version": 1,
            "program_version": VERSION, "bucket": bucket, "location": restore_set.location,
            "started": utc_now().isoformat(), "finished": None, "done": [],
            "restore_point": _restore_point.text(point), "selection": list(selection),
            "set": set_to_json(restore_set),
        })

    def restore_set(self, downloads):
        return set_from_json(self.data["set"], downloads)

    @property
    def finished(self):
        return self.data["finished"]

    @property
    def selection(self):
        return self.data.get("selection", [])

    @property
    def point_text(self):
        return self.data.get("restore_point", LATEST)

    def select(self, selection):
        """A new selection: every numbered directory is made again (the downloads stay)."""
        self.data.update(selection=list(selection), done=[], finished=None)
        self.save()

    def is_done(self, number):
        return number in self.data["done"]

    def mark_done(self, number):
        self.data["done"] = sorted(set(self.data["done"]) | {number})
        self.save()

    def mark_finished(self):
        self.data["finished"] = utc_now().isoformat()
        self.save()

    def save(self):
        temporary = self.path + ".new"
        _write_private_text(temporary, json.dumps(self.data, indent=1) + "\n")
        os.replace(temporary, self.path)


def write_restore_map(destination, bucket, restore_set, state, untouched=()):
    """restore-map.txt: which numbered directory holds which original directory; each
    source keeps its line and number, one the selection left untouched says so."""
    incrementals = ", ".join(describe_stamp(i) for i in restore_set.incrementals) or "none"
    status = (f"complete (finished {state.finished})" if state.finished
              else "NOT complete: run the restoration again to finish it")
    selection = state.selection
    lines = [
        "# AAM Auto Backup restoration map: each numbered directory holds one backup source.",
        f"# location: {restore_set.location}; bucket: {bucket}",
        f"# restore point: {state.point_text}",
        f"# full backup: {describe_stamp(restore_set.full)}",
        f"# incremental backups applied over it, in this order: {incrementals}",
        f"# the files are as of the last backup: {describe_stamp(restore_set.last_backup)}",
        "# what was restored: " + ("PARTIAL, only what these match: " + " | ".join(selection)
                                   if selection else "everything"),
        f"# status: {status}",
        "# number<TAB>original directory<TAB>state",
    ]
    for number, _source, path in restore_set.sources:
        if number in untouched:
            lines.append(f"{number}\t{path}\tnothing selected (no directory)")
            continue
        done = "restored" if state.is_done(number) else "not restored yet"
        unrestored = os.path.join(destination, f"{number}{PROBLEMS_SUFFIX}")
        if state.is_done(number) and os.path.exists(unrestored):
            with open(unrestored, encoding="utf-8", errors="replace") as handle:
                count = sum(1 for line in handle if not line.startswith("#"))
            done += f", except {count} path(s) listed in {os.path.basename(unrestored)}"
        lines.append(f"{number}\t{path}\t{done}")
    _write_private_text(os.path.join(destination, RESTORE_MAP_FILE), "\n".join(lines) + "\n")


def claimed_names(restore_set):
    names = [RESTORE_MAP_FILE, DOWNLOADS_DIR]
    for number, _source, _path in restore_set.sources:
        names += [str(number), str(number) + INCOMPLETE_SUFFIX, str(number) + PROBLEMS_SUFFIX]
    return names


# -- thaw, status, download ------------------------------------------------------

def parse_restore_header(head):
    """NOT_REQUESTED, IN_PROGRESS or AVAILABLE from a head_object answer."""
    if head.get("StorageClass") not in ARCHIVED_CLASSES:
        return AVAILABLE                  # not archived: readable as it is
    restore = head.get("Restore") or ""
    if not restore:
        return NOT_REQUESTED              # never asked, or the thawed copy expired
    return IN_PROGRESS if 'ongoing-request="true"' in restore else AVAILABLE


def request_thaw(s3, bucket, key, days, tier, table=None):
    """Ask S3 to thaw one volume; an answer that it is under way or done is fine."""
    try:
        answer = s3.restore_object(Bucket=bucket, Key=key, RestoreRequest={
            "Days": days, "GlacierJobParameters": {"Tier": tier}})
    except Exception as problem:     # noqa: BLE001 - sorted out below
        if aws_error_code(problem) == "RestoreAlreadyInProgress":
            return IN_PROGRESS
        if is_transient(problem):
            raise
        raise restore_aws_error(problem, bucket, key, table, "volume") from None
    # 202: a new thaw started; 200: the object was thawed already.
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return AVAILABLE if status == 200 else IN_PROGRESS


def file_matches(path, volume, check_hash=True):
    try:
        if os.path.getsize(path) != volume.size:
            return False
    except OSError:
        return False
    return not check_hash or sha256_of(path) == volume.sha256


def stream_to_part(s3, bucket, volume, part):
    """Download into the .part file, resuming after what an earlier run got."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    if offset > volume.size:
        os.remove(part)
        offset = 0
    if offset == volume.size:
        return
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    body = s3.get_object(Bucket=bucket, Key=volume.key, **extra)["Body"]
    progress = Progress(f"Downloading {os.path.basename(volume.path)}", volume.size)
    progress.set(offset)
    try:
        with open(part, "ab") as handle:
            for chunk in iter(lambda: body.read(MIB), b""):
                handle.write(chunk)
                progress.add(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        progress.close()


def download_volume(s3, bucket, volume, kind="volume"):
    """Download one thawed volume (or a catalogue: kind) and verify it; it gets its
    final name only then.

    A resumed download that does not verify is fetched once more from the
    start; a fresh one that does not verify means the copy in S3 is damaged.
    """
    part = volume.path + PART_SUFFIX
    os.makedirs(os.path.dirname(volume.path), mode=0o700, exist_ok=True)
    while True:
        resumed = os.path.exists(part)
        stream_to_part(s3, bucket, volume, part)
        if file_matches(part, volume):
            os.replace(part, volume.path)
            return
        actual = sha256_of(part)
        os.remove(part)
        if not resumed:
            break
    raise AamError(f"The {kind} {volume.key} in the bucket does not match its completion "
                   f"indicator (SHA-256 {actual}, expected {volume.sha256}): the copy in S3 "
                   "is damaged. Nothing was extracted.")


def fetch_catalogue(s3, args, platform, settings, described, directory):
    """Download (STANDARD: no thaw), verify and decrypt the catalogue described (an
    indicator's entry) into directory; its text file's path.  A download already
    there and matching is used as is.  Messages name the arguments of args' table
    (a restore's, a browse's, a check's)."""
    zip_path = download_catalogue(s3, args, described, directory)
    return decrypt_catalogue(settings, platform, args, described, zip_path, directory)


def download_catalogue(s3, args, described, directory):
    """The catalogue's ZIP in directory, its size and SHA-256 the indicator's."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    zip_path = os.path.join(directory, CATALOGUE_ZIP)
    volume = RestoreVolume(described["name"], described["size"], described["sha256"],
                           zip_path)
    if not file_matches(zip_path, volume):
        with s3_call(args.bucket, volume.key, args.table, "catalogue"):
            download_volume(s3, args.bucket, volume, "catalogue")
    return zip_path


def decrypt_catalogue(settings, platform, args, described, zip_path, directory):
    """The catalogue's text file, decrypted with args.key (WrongKey: another key)."""
    unpacked = os.path.join(directory, "unpacking")
    code, output = run_seven_zip(settings, platform,
                                 seven_zip_extract_argv(zip_path, unpacked), args.key)
    failure = seven_zip_failure(code, output, f"the catalogue {described['name']}",
                                args.table)
    if failure:
        raise failure
    text_path = os.path.join(directory, CATALOGUE_FILE)
    os.replace(os.path.join(unpacked, CATALOGUE_FILE), text_path)
    shutil.rmtree(unpacked)
    return text_path


# ============================================================================
# Restore: extraction
# ============================================================================

# -- extraction: exactly the state at the restore point ----------------------------

PROBLEMS_SUFFIX = ".not-restored.txt"
EXTRACT_DIR = "extracting"         # downloads/extracting: one archive at a time
OPEN_DIR = "open"                  # an archive's volumes, stand-ins for those not thawed


class SourceExtraction:
    """Makes <n> exactly as the source's state file says, from the archives holding it.

    When everything is restored, the full backup's archive is extracted whole
    straight into the staging directory (7-Zip's own speed).  Every other
    archive is extracted aside, and only the files whose latest content it
    holds are moved in, so each file is extracted from one archive and a path
    that changed type is what it was then.  A selective restore (whose archives
    are opened with stand-ins for the volumes not thawed), and any restore on a
    computer that refuses some names (7-Zip would write them changed, over
    others), extracts exactly the names wanted.  Links and directories come
    from the catalogue.  A last walk removes what the state does not hold and
    checks what it does; what could not be given is named NOT RESTORED in the
    log and listed in <n>.not-restored.txt, and the restore fails.
    """

    def __init__(self, restoration, number):
        self.restoration, self.number = restoration, number
        self.platform = restoration.platform
        self.target = os.path.join(restoration.destination, str(number))
        self.staging = self.target + INCOMPLETE_SUFFIX
        self.scratch = os.path.join(restoration.downloads, EXTRACT_DIR)
        self.state_path = restoration.state_path(number)
        self.problems = read_refused(restoration.refused_path(number))   # (path, why)
        self.known_dirs = set()
        self.unknown = None         # found_by_path

    def entries(self, kinds=None):
        for entry in CatalogueFile(self.state_path):
            if not kinds or entry.kind in kinds:
                yield entry

    def archive_files(self, archive):
        """The files whose content this archive (a piece of a backup) holds."""
        path = self.restoration.state_path(self.number, format_stamp(archive.backup),
                                           archive.piece)
        return iter(CatalogueFile(path)) if os.path.exists(path) else iter(())

    def native(self, root, path):
        return os.path.join(root, path.replace("/", os.sep))

    def run(self):
        for leftover in (self.target, self.staging, self.scratch):
            if os.path.lexists(leftover):
                shutil.rmtree(leftover)
        os.mkdir(self.staging)
        by_name = bool(self.restoration.selection) or self.platform.refuses_names
        plan, full = self.restoration.plan, self.restoration.set.full
        start = self.restoration.set.exact_from(self.number)
        for index, archive in enumerate(self.restoration.set.archives_of(self.number)):
            if archive.key not in plan.chosen.volumes:
                continue                          # holds nothing restored: not opened
            # The full backup's pieces hold disjoint files: straight into place, unless
            # a piece holds entries its backup no longer uses (continued after changes)
            if archive.backup == full and not by_name and archive.key not in plan.superseded:
                self.extract(archive, self.staging, None)
                continue
            if index < start:
                self.extract_found_by_path(archive, by_name)
                continue
            names = (e.path for e in self.archive_files(archive)) if by_name else None
            self.extract(archive, self.scratch, names)
            self.move_in(archive)
            shutil.rmtree(self.scratch)
        self.make_links_and_directories()
        self.reconcile()
        self.set_directory_times()
        self.write_problems()
        os.rename(self.staging, self.target)
        return self.problems

    def extract(self, archive, into, names):
        """7-Zip 'x' of one archive: everything, or exactly the names (no wildcards)."""
        os.makedirs(into, exist_ok=True)
        first = self.restoration.openable_first_volume(archive)
        list_path = (None if names is None
                     else os.path.join(self.restoration.downloads, "extract_list.txt"))
        argv = seven_zip_extract_argv(first, into, self.platform, list_path, names)
        self.restoration.out.line(f"Extracting {self.restoration.archive_name(archive)}")
        self.restoration.seven_zip(argv, archive)

    def extract_found_by_path(self, archive, by_name):
        """An archive before the source's first listing (a 1.0.0 chain continued): the
        files the listing says an earlier backup holds ('?') are taken from it by path,
        over what an older one gave (the archives come oldest first)."""
        wanted = self.found_by_path()
        names = None
        if by_name:
            names = [name for name in archive_entry_names(
                [v.path for v in archive.volumes], archive.volumes[0].size) if name in wanted]
            if not names:
                return
        self.extract(archive, self.scratch, names)
        for path in wanted:
            source = self.native(self.scratch, path)
            if os.path.lexists(source) and not os.path.isdir(source):
                os.replace(source, self.make_room(path))
        shutil.rmtree(self.scratch)

    def found_by_path(self):
        """The paths of the files whose content is in an archive without a catalogue."""
        if self.unknown is None:
            self.unknown = {entry.path for entry in self.entries((FILE,))
                            if entry.location == UNKNOWN}
        return self.unknown

    def move_in(self, archive):
        """Move the files whose content this archive holds from the scratch directory."""
        for entry in self.archive_files(archive):
            source = self.native(self.scratch, entry.path)
            if os.path.lexists(source):
                os.replace(source, self.make_room(entry.path))

    def make_room(self, path):
        """The staging path for path, its parents directories and nothing in its place."""
        destination = self.native(self.staging, path)
        parent = path.rpartition("/")[0]
        if parent and parent not in self.known_dirs:
            self.make_directory(parent)
        if os.path.lexists(destination):
            remove_path(destination)
        return destination

    def make_directory(self, path):
        """Every directory of path in staging, replacing files (of older backups) in the way."""
        missing = []
        while path and path not in self.known_dirs:
            missing.append(path)
            path = path.rpartition("/")[0]
        for directory in reversed(missing):
            current = self.native(self.staging, directory)
            try:
                is_dir = stat.S_ISDIR(os.lstat(current).st_mode)
            except FileNotFoundError:
                os.mkdir(current)
            else:
                if not is_dir:
                    os.remove(current)
                    os.mkdir(current)
            self.known_dirs.add(directory)

    def make_links_and_directories(self):
        for entry in self.entries((LINK, DIRECTORY)):
            if entry.kind == DIRECTORY:
                self.make_directory(entry.path)
                continue
            destination = self.make_room(entry.path)
            try:
                self.platform.make_link(entry.target, destination)
            except OSError as problem:
                self.problems.append((entry.path, f"the symbolic link to {entry.target!r} "
                                      f"cannot be made here: {problem.strerror or problem}"))

    def reconcile(self):
        """Walk staging beside the state: remove what it does not hold, check the rest."""
        expected = CatalogueCursor(self.entries())
        stack = [("", iter(sorted_listing(self.staging)))]
        while stack:
            parent, listing = stack[-1]
            entry = next(listing, None)
            if entry is None:
                stack.pop()
                self.remove_if_unexpected_and_empty(parent)
                continue
            path = parent + "/" + entry.name if parent else entry.name
            for missing in expected.before(catalogue_key(path)):
                self.report_missing(missing)
            wanted = expected.take(catalogue_key(path))
            if self.check(entry, wanted, path) and entry.is_dir(follow_symlinks=False):
                stack.append((path, iter(sorted_listing(entry.path))))
        for missing in expected.before(None):
            self.report_missing(missing)

    def check(self, found, wanted, path):
        """True to descend into found (a directory that stays)."""
        st = found.stat(follow_symlinks=False)
        if wanted is None:
            if stat.S_ISDIR(st.st_mode):
                return True               # removed on the way up if nothing in it is wanted
            os.remove(found.path)
            return False
        actual = entry_from_stat(path, st).kind
        if actual != wanted.kind:
            self.problems.append((path, f"a {KIND_NAMES[actual]} where the backup has a "
                                  f"{KIND_NAMES[wanted.kind]}"))
        elif wanted.kind == FILE and st.st_size != wanted.size:
            self.problems.append((path, f"{st.st_size:,} bytes where the backup has "
                                  f"{wanted.size:,}"))
        return actual == DIRECTORY == wanted.kind

    def remove_if_unexpected_and_empty(self, path):
        if not path or path in self.known_dirs:
            return
        with contextlib.suppress(OSError):
            os.rmdir(self.native(self.staging, path))      # only when empty

    def report_missing(self, entry):
        if entry.location == MISSING:
            self.problems.append((entry.path, "no archive holds it: it could not be read "
                                  "when it was backed up"))
        elif entry.location == UNKNOWN:
            self.problems.append((entry.path, "none of the archives made before the first "
                                  "catalogue of this source holds it"))
        else:
            self.problems.append((entry.path, "7-Zip did not extract it"))

    def set_directory_times(self):
        for entry in self.entries((DIRECTORY,)):
            path = self.native(self.staging, entry.path)
            with contextlib.suppress(OSError):
                os.chmod(path, entry.mode)
                os.utime(path, ns=(entry.mtime, entry.mtime))

    def write_problems(self):
        self.restoration.report_not_restored(self.number, self.problems)


KIND_NAMES = {FILE: "file", DIRECTORY: "directory", LINK: "symbolic link"}


class CatalogueCursor:
    """Catalogue entries in order, taken by key as a walk meets them."""

    def __init__(self, entries):
        self.entries = iter(entries)
        self.next = next(self.entries, None)

    def before(self, key):
        """The entries before key (all that are left, for None)."""
        while self.next is not None and (key is None or self.next.key < key):
            found, self.next = self.next, next(self.entries, None)
            yield found

    def take(self, key):
        if self.next is not None and self.next.key == key:
            found, self.next = self.next, next(self.entries, None)
            return found
        return None


def read_refused(path):
    """[(path, reason)] from a refused-paths file (none when there is none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return [(unescape_field(rel), reason) for rel, reason in
                (line.rstrip("\n").split("\t", 1) for line in handle)]


def sorted_listing(path):
    with os.scandir(path) as iterator:
        return sorted(iterator, key=BY_NAME)


def remove_path(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# -- extraction by replay: sets without catalogues ----------------------------------

def archive_entry_names(volume_paths, volume_size):
    """The names stored in a downloaded archive (its local headers, read in order)."""
    names = []
    index = ZipIndex(None, volume_size, on_entry=names.append)
    offset = 0
    for path in volume_paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(MIB), b""):
                index.feed(block, offset)
                offset += len(block)
    return [name.decode("utf-8", "surrogateescape") for name in names]


def clear_conflicts(root, names):
    """Before a later archive is extracted over an earlier one: where a path changes
    type, the later backup wins (the older file or directory is removed)."""
    for name in names:
        is_dir = name.endswith("/")
        parts = name.rstrip("/").split("/")
        current = root
        for depth, part in enumerate(parts):
            current = os.path.join(current, part)
            last = depth == len(parts) - 1
            if not os.path.lexists(current):
                break
            really_dir = os.path.isdir(current) and not os.path.islink(current)
            if (not last or is_dir) and not really_dir:
                os.remove(current)
                break
            if last and not is_dir and really_dir:
                shutil.rmtree(current)


def restore_absolute_links(root, platform):
    """Give absolute symbolic links back their original target.

    7-Zip extracts a link stored as '/etc/x' as '<output dir>/etc/x' (it keeps
    every path inside the output directory); the backup stored '/etc/x'.
    """
    if not platform.absolute_links_rewritten:
        return
    prefix = os.path.abspath(root) + os.sep
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                target = os.readlink(path)
                if target.startswith(prefix):
                    os.remove(path)
                    os.symlink("/" + target[len(prefix):], path)


# -- names this computer cannot create ---------------------------------------------

class NameChecker:
    """The paths of one source this computer cannot create, met in catalogue order.

    A name the platform refuses, or one that differs only in letter case from a
    name met before in the same directory where the file system ignores case (the
    second would overwrite the first): each is refused with all that is under it.
    """

    def __init__(self, platform):
        self.platform = platform
        self.seen = {}          # directory -> {case-folded name: path met}, on the path
        self.refused = []       # refused directories on the path

    def refusal(self, path):
        parent, _, name = path.rpartition("/")
        for directory in [d for d in self.seen if d and not self.is_above(d, path)]:
            del self.seen[directory]
        self.refused = [d for d in self.refused if self.is_above(d, path)]
        if self.refused:
            return f"it is inside {self.refused[-1]}, which is not restored"
        return self.platform.refusal(path, self.seen.setdefault(parent, {}), name)

    @staticmethod
    def is_above(directory, path):
        return path.startswith(directory + "/")

    def refuse(self, path):
        self.refused.append(path)


def names_to_skip(names, platform, seen):
    """{path: reason} for the names of an archive this computer cannot create
    (archives without catalogues).

    seen maps each path restored so far for this source (case-folded where the
    file system ignores case) to its spelling: of two names that differ only in
    case, the later one would overwrite the earlier one.
    """
    skipped = {}
    for name in names:
        path = name.rstrip("/")
        reason = platform.refusal(path, seen)
        if reason:
            skipped[path] = reason
    return skipped


class StateWriter:
    """A source's state to restore, and beside it, for each archive, the files whose
    content it holds (so that each archive's extraction reads only its own list)."""

    def __init__(self, restoration, number, header):
        self.restoration, self.number, self.header = restoration, number, header
        path = restoration.state_path(number)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.state = CatalogueWriter(path, header)
        self.by_archive = {}
        self.refused = None         # the paths this computer cannot create, once there is one
        with contextlib.suppress(FileNotFoundError):
            os.remove(restoration.refused_path(number))

    def creatable(self, entry, names):
        """False (and noted) when this computer cannot create the entry's path."""
        reason = names.refusal(entry.path)
        if reason is None:
            return True
        if entry.kind == DIRECTORY:
            names.refuse(entry.path)
        if self.refused is None:
            self.refused = open_private(self.restoration.refused_path(self.number),
                                        newline=None)
        self.refused.write(f"{escape_field(entry.path)}\t{reason}\n")
        return False

    def write(self, entry):
        self.state.write(entry)
        place = parse_location(entry.location)
        if entry.kind == FILE and place:
            stamp, piece = place[:2]
            if (stamp, piece) not in self.by_archive:
                self.by_archive[(stamp, piece)] = CatalogueWriter(
                    self.restoration.state_path(self.number, stamp, piece), self.header)
            self.by_archive[(stamp, piece)].write(entry)

    def close(self):
        for writer in [self.state, self.refused] + list(self.by_archive.values()):
            if writer:
                writer.close()


class OpenDirectories:
    """The directories on the way to the current catalogue line (lines come depth
    first), so that a selected entry's parent directories are restored with it."""

    def __init__(self):
        self.stack = []        # [entry, written?]

    def met(self, entry, written):
        self.leave(entry.path)
        if entry.kind == DIRECTORY:
            self.stack.append([entry, written])

    def leave(self, path):
        """Forget the directories that are not above path."""
        while self.stack and not path.startswith(self.stack[-1][0].path + "/"):
            self.stack.pop()

    def unwritten(self, path):
        """The not yet written directories above path, outermost first."""
        self.leave(path)
        for item in self.stack:
            if not item[1]:
                item[1] = True
                yield item[0]


# ============================================================================
# Restore: the run (one-step and multi-step restoration)
# ============================================================================

SECTION_RESTORE_START = "Data restoration starting time and date."
SECTION_RESTORE_SET = "the AWS S3 backup objects used in the data restoration."
SECTION_THAW = "AWS S3 Glacier Deep Archive restoration."
SECTION_DOWNLOAD = "AWS S3 download."
SECTION_EXTRACT = "decryption and decompression."
SECTION_RESTORE_ERROR = "(if applicable) data restoration error."



class NotReady(AamError):
    """The thawed copies are not all there yet: run the step again later."""

    exit_code = EXIT_NOT_READY


# -- one restoration --------------------------------------------------------------

class Restoration:
    """The state of one restoration into one destination directory."""


    def __init__(self, args, platform, settings, out):
        self.args, self.platform, self.settings, self.out = args, platform, settings, out
        self.destination = args.destination
        self.downloads = os.path.join(self.destination, DOWNLOADS_DIR)
        self.point = args.restore_point
        self.selection = RestoreSelection(args.selection)
        self.s3 = None
        self.session = None
        self.set = None
        self.plan = None
        self.state = None
        self.lock = None
        self.verified = set()      # volumes hashed by this process
        self.keycheck_problem = None   # the key does not match the chain's key check: why
        self.catalogues_opened = 0     # with the key given, by this process

    # -- opening: lock, backup set, state --------------------------------------
    def open(self):
        """Lock the destination and read its state file, if it has one."""
        try:
            os.makedirs(self.destination, exist_ok=True)
            self.lock = self.platform.try_lock(
                os.path.join(self.destination, RESTORE_LOCK_FILE), keep_file=False)
        except OSError as problem:
            raise AamError(f"The destination directory {self.destination} "
                           f"({RESTORE_ARGS.ref('destination')}) "
                           f"cannot be used: {problem}")
        if self.lock is None:
            raise AamError(f"Another restoration is running into {self.destination}.")
        self.state = RestoreState.load(self.destination)
        if self.state:
            self.check_same_restoration()

    def check_same_restoration(self):
        """A destination holds one restoration: the same bucket, location and point."""
        data, args = self.state.data, self.args
        if (data["bucket"], data["location"]) != (args.bucket, args.location):
            raise AamError(f"{self.destination} holds a restoration of location "
                           f"{data['location']} from bucket {data['bucket']}; choose another "
                           "destination.")
        if self.state.point_text != _restore_point.text(self.point):
            raise AamError(f"{self.destination} holds a restoration as of "
                           f"{self.state.point_text} ({RESTORE_ARGS.ref('restore_point')}); "
                           "give the same restore "
                           "point to continue it, or choose another destination.")

    def close(self):
        if self.lock:
            self.lock.release()

    def connect(self):
        self.session = aws_session(self.args.access_key_id, self.args.secret_access_key)
        self.s3 = aws_client(self.session, "s3", self.settings.region)

    def load_set(self):
        """Select the set, or take the one this restoration pinned."""
        args, out = self.args, self.out
        self.connect()
        if self.state:
            self.set = self.state.restore_set(self.downloads)
            out.line(f"Continuing the restoration started {self.state.data['started']} "
                     f"(state file {self.state.path}).")
            if self.set.keycheck:      # the key the restoration began with matched it
                problem = keycheck_verdict(args.key, [KeyCheck.parse(self.set.keycheck)],
                                           self.set.full)[1]
                if problem:
                    raise WrongKey(problem.replace(", and their catalogue does not open with "
                                                   "it", ", which the key this restoration "
                                                   "began with matched"))
            return
        # The latest: the last six months, as backups look back, and the key checks; a
        # point: all there is.
        prefixes = (month_prefixes(args.location, utc_now()) + [keycheck_prefix(args.location)]
                    if self.point is None else [f"{args.location}_"])
        with s3_call(args.bucket):
            listing = BucketListing.load(self.s3, args.bucket, prefixes)
        try:
            full, manifests, chosen = find_restore_set(self.s3, args.bucket, listing, out,
                                                       self.point)
        except NoBackupSet:
            raise NoBackupSet(self.no_set_message(prefixes[:MONTHS_SCANNED])) from None
        # A key that does not match the chain's key check is refused once the first
        # catalogue confirms it (prepare): a key check written with a mistyped key (the
        # first backup of a chain made by 1.1.0 writes it) must not refuse the right key.
        keycheck, self.keycheck_problem = keycheck_verdict(args.key,
                                                           listing.keychecks.get(full, []), full)
        self.set = build_restore_set(args.location, listing, full, chosen, manifests,
                                     self.downloads)
        self.set.keycheck = keycheck
        check_incremental_chain(self.set, chosen, out)

    def no_set_message(self, prefixes):
        args = self.args
        if self.point is None:
            return (f"No complete full backup of location {args.location} in bucket "
                    f"{args.bucket} in the months {prefixes[-1][-6:]} to "
                    f"{prefixes[0][-6:]} (UTC); nothing to restore.")
        return (f"No complete backup of location {args.location} in bucket {args.bucket} "
                f"at or before {describe_stamp(self.point)} "
                f"({RESTORE_ARGS.ref('restore_point')}); nothing to "
                "restore.")

    def warn_about_space(self):
        """The archives and the files they hold both land in the destination."""
        needed = sum(v.size for v in self.plan.volumes) + self.plan.chosen.bytes
        free = shutil.disk_usage(self.destination).free
        if free < needed:
            self.out.line(f"Warning: {self.destination} has {free:,} bytes free; the "
                          f"archives and the files they hold need about {needed:,}.")

    def claim_destination(self):
        """Start the state file; never take over names someone else's data uses."""
        if self.state:
            if self.state.selection != self.selection.items:
                before = " | ".join(self.state.selection) or "everything"
                self.out.line("The selection differs from the one this destination's "
                              f"restoration had ({before}): the numbered directories are "
                              "made again for the new one; what was downloaded is used again.")
                self.state.select(self.selection.items)
            return
        taken = [name for name in claimed_names(self.set)
                 if os.path.lexists(os.path.join(self.destination, name))]
        if taken:
            raise AamError(f"The destination {self.destination} "
                           f"({RESTORE_ARGS.ref('destination')}) already holds "
                           f"{', '.join(taken)}, which this restoration would write; choose "
                           "an empty or new directory.")
        self.state = RestoreState.new(self.destination, self.args.bucket, self.set,
                                      self.point, self.selection.items)
        self.state.save()
        write_restore_map(self.destination, self.args.bucket, self.set, self.state)

    def prepare(self):
        """The catalogues (with the key: a wrong one stops here, before any thaw), the
        state at the restore point, and the volumes it needs."""
        if not self.set.exact:
            if self.selection:
                raise AamError("This backup set was made by version 1.0.0 and has no "
                               "catalogue, so it cannot be restored in part: leave out the "
                               f"selection ({RESTORE_ARGS.ref('selection')} and later) to "
                               "restore all of it.")
            volumes = self.set.volumes
            self.plan = RestorePlan(volumes, RestoreTotals(), RestoreTotals(), volumes, [])
            return
        try:
            self.plan = make_plan(self)
        except WrongKey:
            if self.keycheck_problem and not self.catalogues_opened:
                raise WrongKey(self.keycheck_problem) from None
            raise                  # a later catalogue: it names the backup made otherwise
        if self.keycheck_problem:
            self.out.line("Warning: the key does not match the chain's key check, yet its "
                          "catalogues open with it: the key check was written with another "
                          "key (a mistyped key in the backup that wrote it, or an object "
                          "added by someone else); the restore goes on.")

    def report_set(self):
        self.out.section(SECTION_RESTORE_SET)
        for line in (point_lines(self.set, self.point)
                     + backup_set_lines(self.set, self.plan.volumes)):
            self.out.line(line)

    def already_finished(self):
        """True (and said) when this destination holds the finished restoration."""
        if not (self.state and self.state.finished):
            return False
        if self.state.selection != self.selection.items:
            return False                   # a new selection: made again
        last = self.state.restore_set(self.downloads).last_backup
        self.out.line(f"{self.destination} already holds the complete restoration of "
                      f"location {self.args.location} as of {describe_stamp(last)}, "
                      f"finished {self.state.finished}; nothing to do. To restore again, "
                      "use another destination directory.")
        left_out = self.not_restored_count()
        if left_out:
            self.out.line(f"Except {left_out} path(s) that could not be given: each is listed "
                          f"in <number>{PROBLEMS_SUFFIX} in {self.destination}.")
        if os.path.isdir(self.downloads):
            self.out.line(f"The downloaded archives are kept in {self.downloads}; delete "
                          "them when you no longer need them.")
        return True

    # -- catalogues ------------------------------------------------------------------
    def refused_path(self, number):
        """The paths of source number this computer cannot create, and why."""
        return os.path.join(self.downloads, RESTORE_STATES_DIR, f"{number}.refused.tsv")

    def report_not_restored(self, number, problems):
        """Name each path not given in the log, and list them in <n>.not-restored.txt."""
        path = os.path.join(self.destination, f"{number}{PROBLEMS_SUFFIX}")
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            return
        original = dict((n, p) for n, _s, p in self.set.sources)[number]
        sep = platform_of_path(original).sep           # the backed-up computer's
        lines = []
        for rel, reason in problems:
            full = original.rstrip(sep) + sep + rel.replace("/", sep)
            self.out.line(f"NOT RESTORED ({reason}): {full}")
            lines.append(f"{escape_field(full)}\t{reason}\n")
        _write_private_text(path, "# AAM Auto Backup: what this restore could not give, "
                            "and why.\n" + "".join(lines))

    def not_restored_count(self):
        count = 0
        restore_set = self.set or self.state.restore_set(self.downloads)
        for number, _source, _path in restore_set.sources:
            path = os.path.join(self.destination, f"{number}{PROBLEMS_SUFFIX}")
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    count += sum(1 for line in handle if not line.startswith("#"))
        return count

    def state_path(self, number, stamp=None, piece=LEGACY_PIECE):
        """The state of source number to restore; with a stamp, the files of it that
        the archive (the piece) of that backup holds."""
        name = f"{number}.tsv" if stamp is None else f"{number}.{stamp}.{piece}.tsv"
        return os.path.join(self.downloads, RESTORE_STATES_DIR, name)

    def fetch_catalogue(self, archive):
        """Download (STANDARD: no thaw), verify and decrypt one archive's catalogue."""
        directory = archive_directory(self.downloads, archive.backup, archive.number)
        text_path = os.path.join(directory, CATALOGUE_FILE)
        if not os.path.exists(text_path):
            fetch_catalogue(self.s3, self.args, self.platform, self.settings,
                            archive.catalogue, directory)
            self.catalogues_opened += 1
        return text_path

    # -- thaw ----------------------------------------------------------------------
    def is_downloaded(self, volume):
        return volume.key in self.verified or file_matches(volume.path, volume, False)

    def statuses(self):
        """{key: thaw state} of every volume; downloaded ones need no S3 request."""
        found = {}
        for volume in self.plan.volumes:
            if self.is_downloaded(volume):
                found[volume.key] = DOWNLOADED
                continue
            with s3_call(self.args.bucket, volume.key, self.args.table, "volume"):
                head = self.s3.head_object(Bucket=self.args.bucket, Key=volume.key)
            found[volume.key] = parse_restore_header(head)
        return found

    def request_thaws(self, statuses):
        """restore_object for each volume not thawed or requested yet."""
        asked = 0
        for volume in self.plan.volumes:
            if statuses[volume.key] == NOT_REQUESTED:
                statuses[volume.key] = request_thaw(self.s3, self.args.bucket, volume.key,
                                                    self.args.days, self.settings.restore_tier,
                                                    self.args.table)
                self.out.line(f"Thaw requested ({self.settings.restore_tier}, "
                              f"{self.args.days} days): {volume.key}", terminal=False)
                asked += 1
        return asked

    def progress_line(self, statuses):
        counts = {state: 0 for state in (DOWNLOADED, AVAILABLE, IN_PROGRESS, NOT_REQUESTED)}
        ready_bytes = 0
        for volume in self.plan.volumes:
            counts[statuses[volume.key]] += 1
            if statuses[volume.key] in (DOWNLOADED, AVAILABLE):
                ready_bytes += volume.size
        total = sum(v.size for v in self.plan.volumes)
        ready = counts[DOWNLOADED] + counts[AVAILABLE]
        parts = [f"{ready} of {len(self.plan.volumes)} volume(s) thawed "
                 f"({ready_bytes:,} of {total:,} bytes)"]
        parts += [f"{counts[state]} {state}" for state in (DOWNLOADED, IN_PROGRESS,
                                                            NOT_REQUESTED) if counts[state]]
        return f"Thaw status at {dt.datetime.now():%Y-%m-%d %H:%M:%S}: " + ", ".join(parts)

    # -- download ------------------------------------------------------------------
    def download_available(self, statuses):
        for volume in self.plan.volumes:
            if statuses[volume.key] != AVAILABLE:
                continue
            self.out.line(f"Downloading {volume.key} ({volume.size:,} bytes)")
            with s3_call(self.args.bucket, volume.key, self.args.table, "volume"):
                download_volume(self.s3, self.args.bucket, volume)
            self.verified.add(volume.key)
            statuses[volume.key] = DOWNLOADED

    def all_downloaded(self, statuses):
        return all(statuses[v.key] == DOWNLOADED for v in self.plan.volumes)

    # -- extraction ------------------------------------------------------------------
    def verify_downloads(self):
        """Every volume on disk, with the manifest's size and SHA-256."""
        missing, damaged = [], []
        for volume in self.plan.volumes:
            if not os.path.exists(volume.path):
                missing.append(volume.key)
            elif volume.key not in self.verified:
                if not file_matches(volume.path, volume):
                    damaged.append(volume.path)
                    continue
                self.verified.add(volume.key)
        if missing:
            raise NotReady(f"{len(missing)} volume(s) are not downloaded yet (first: "
                           f"{missing[0]}); run download-to-local-computer-from-aws-s3 "
                           "first. Nothing was extracted.")
        if damaged:
            raise AamError("Downloaded volume(s) do not match their SHA-256 in the "
                           f"completion indicator: {', '.join(damaged)}. Delete them and "
                           "download again. Nothing was extracted.")

    def archive_name(self, archive):
        kind = "full" if archive.backup == self.set.full else "incremental"
        piece = f", piece {archive.piece}" if archive.piece != LEGACY_PIECE else ""
        return (f"the {kind} backup {describe_stamp(archive.backup)} of source "
                f"{archive.number} ({archive.source}){piece}")

    def seven_zip(self, argv, archive):
        """7-Zip on one archive; its output (also in the log), or the error it reports."""
        code, output = run_seven_zip(self.settings, self.platform, argv, self.args.key)
        for line in output.splitlines():
            self.out.line(line, terminal=False)
        failure = seven_zip_failure(code, output, self.archive_name(archive),
                                    self.args.table.number("key"))
        if failure:
            raise failure
        return output

    def openable_first_volume(self, archive):
        """The first volume to give 7-Zip: the downloaded one when every volume is here,
        else one in a directory where sparse stand-ins of the same size take the place
        of the volumes not thawed (7-Zip reads only the entries asked for, measured)."""
        present = {v.key for v in self.plan.volumes}
        if all(v.key in present for v in archive.volumes):
            return archive.volumes[0].path
        directory = os.path.join(archive_directory(self.downloads, archive.backup,
                                                   archive.number, archive.piece), OPEN_DIR)
        if os.path.lexists(directory):
            shutil.rmtree(directory)
        os.mkdir(directory)
        for volume in archive.volumes:
            place = os.path.join(directory, os.path.basename(volume.path))
            if volume.key not in present:
                self.platform.make_stand_in(place, volume.size)
                continue
            try:
                os.link(volume.path, place)
            except OSError:             # a file system without hard links (FAT, exFAT)
                shutil.copyfile(volume.path, place)
        return os.path.join(directory, os.path.basename(archive.volumes[0].path))

    def extract(self):
        self.out.section(SECTION_EXTRACT)
        self.verify_downloads()
        pending = [n for n, _s, _p in self.set.sources if not self.state.is_done(n)]
        if self.set.exact:
            for number in pending:
                if self.selects_nothing_of(number):
                    self.remove_numbered_directory(number)
                else:
                    SourceExtraction(self, number).run()
                self.finish_source(number)
        else:
            self.test_archives(pending)
            for number in pending:
                self.replay_source(number)
                self.finish_source(number)
        self.state.mark_finished()
        write_restore_map(self.destination, self.args.bucket, self.set, self.state,
                          self.untouched_sources() if self.set.exact else set())
        self.report_extracted()
        problems = self.not_restored_count()
        if problems:
            raise AamError(f"{problems} path(s) could not be restored as they were backed "
                           "up; each is named NOT RESTORED above and listed in "
                           f"<number>{PROBLEMS_SUFFIX} in {self.destination} (the rest is "
                           f"restored). The downloaded files stay in {self.downloads}: 7-Zip "
                           "on another computer extracts a name this one cannot create.")

    def finish_source(self, number):
        self.state.mark_done(number)
        write_restore_map(self.destination, self.args.bucket, self.set, self.state,
                          self.untouched_sources())

    def selects_nothing_of(self, number):
        """A selective restore chose nothing of this source: it gets no directory."""
        return bool(self.selection) and not self.plan.chosen.sources.get(number)

    def untouched_sources(self):
        return {n for n, _s, _p in self.set.sources if self.selects_nothing_of(n)}

    def remove_numbered_directory(self, number):
        """What an earlier selection made for a source this one leaves out (ours: the
        state file says so)."""
        target = os.path.join(self.destination, str(number))
        for leftover in (target, target + INCOMPLETE_SUFFIX, target + PROBLEMS_SUFFIX):
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover)
            elif os.path.lexists(leftover):
                os.remove(leftover)

    def report_extracted(self):
        for number, _source, path in self.set.sources:
            if self.selects_nothing_of(number):
                self.out.line(f"Nothing of {path} is selected: no directory "
                              f"{os.path.join(self.destination, str(number))}")
                continue
            self.out.line(f"Restored {path} into {os.path.join(self.destination, str(number))}"
                          + (" (the selection only)" if self.selection else ""))
        self.out.line(f"Map of the numbered directories: "
                      f"{os.path.join(self.destination, RESTORE_MAP_FILE)}")

    # -- sets without catalogues: replay --------------------------------------------
    def test_archives(self, pending):
        """7-Zip 't' on everything first: a wrong key must not touch any file."""
        for archive in self.set.archives:
            if archive.number in pending and archive.volumes:
                self.out.line(f"Testing {self.archive_name(archive)}")
                self.seven_zip(["t", archive.volumes[0].path, "-bd", "-sccUTF-8"], archive)

    def replay_source(self, number):
        """Full, then each incremental in time order, with overwrite; then rename."""
        target = os.path.join(self.destination, str(number))
        staging = target + INCOMPLETE_SUFFIX
        for leftover in (target, staging):      # ours: an interrupted earlier run's
            if os.path.lexists(leftover):
                shutil.rmtree(leftover)
        os.mkdir(staging)
        seen, problems = {}, []
        for index, archive in enumerate(self.set.archives_of(number)):
            if not archive.volumes:
                continue
            names = archive_entry_names([v.path for v in archive.volumes],
                                        archive.volumes[0].size)
            if index:
                clear_conflicts(staging, names)
            self.out.line(f"Extracting {self.archive_name(archive)}")
            problems += self.replay_archive(archive, staging, names, seen)
        restore_absolute_links(staging, self.platform)
        self.report_not_restored(number, problems)
        os.rename(staging, target)

    def replay_archive(self, archive, staging, names, seen):
        """7-Zip x of one archive over the staging directory; the names this computer
        cannot create are left out (7-Zip would write them changed, over other files).
        Returns them, with the reason."""
        skipped = names_to_skip(names, self.platform, seen) if self.platform.refuses_names \
            else {}
        if not skipped:
            self.seven_zip(seven_zip_extract_argv(archive.volumes[0].path, staging), archive)
            return []
        wanted = [n for n in names if n.rstrip("/") not in skipped]
        list_path = os.path.join(self.downloads, "extract_list.txt")
        self.seven_zip(seven_zip_extract_argv(archive.volumes[0].path, staging, self.platform,
                                              list_path, wanted), archive)
        for name in wanted:                 # directories whose content was all left out
            if name.endswith("/"):
                os.makedirs(self.platform.long_path(
                    os.path.join(staging, name.rstrip("/").replace("/", os.sep))),
                    exist_ok=True)
        return sorted(skipped.items())

    def remove_downloads(self):
        if self.selection or self.not_restored_count():
            self.out.line(f"The downloaded archives stay in {self.downloads}, so that a "
                          "restore of more of this set does not download them again and "
                          "what could not be given here can be extracted elsewhere; delete "
                          "them when you no longer need them.")
        elif os.path.isdir(self.downloads):
            shutil.rmtree(self.downloads)
            self.out.line(f"Removed the downloaded archives ({self.downloads}).")


# -- the five operations -------------------------------------------------------------

def restore_to_s3(restoration):
    """restore-to-aws-s3-from-aws-s3-glacier-deep-archive: plan, then thaw requests."""
    out = restoration.out
    for line in plan_lines(restoration.plan, restoration.args.days,
                           restoration.settings.restore_tier):
        out.line(line)
    restoration.warn_about_space()
    out.section(SECTION_THAW)
    statuses = restoration.statuses()
    asked = restoration.request_thaws(statuses)
    earlier = len(statuses) - asked
    out.line(f"{asked} thaw request(s) made" + (
        f"; {earlier} volume(s) were requested, thawed or downloaded before." if earlier
        else "."))
    return statuses


def check_status(restoration):
    """check-aws-s3-restoration-status: one look, no change."""
    statuses = restoration.statuses()
    restoration.out.line(restoration.progress_line(statuses))
    if NOT_REQUESTED in statuses.values():
        raise AamError("Some volumes have no thaw request (or their thawed copy expired): "
                       "run restore-to-aws-s3-from-aws-s3-glacier-deep-archive.")
    if IN_PROGRESS in statuses.values():
        raise NotReady("The thaw is still in progress; check again later "
                       f"({EXPECTED_WAIT[restoration.settings.restore_tier]} of the request).")
    restoration.out.line("Every volume is thawed (or downloaded): run "
                         "download-to-local-computer-from-aws-s3.")
    return statuses


def download(restoration):
    """download-to-local-computer-from-aws-s3: every thawed volume not on disk yet."""
    restoration.out.section(SECTION_DOWNLOAD)
    statuses = restoration.statuses()
    restoration.download_available(statuses)
    restoration.out.line(restoration.progress_line(statuses))
    if not restoration.all_downloaded(statuses):
        raise NotReady("Not every volume is thawed yet, so not every one was downloaded: "
                       "run check-aws-s3-restoration-status, then this step again.")
    restoration.out.line(f"Every volume is downloaded into {restoration.downloads}.")


def wait_and_download(restoration):
    """One-step: check before the first sleep, download what is thawed, repeat.

    A network or S3 server error while waiting is reported and tried again
    at the next check: a restore waits for up to two days.
    """
    out, poll = restoration.out, restoration.settings.restore_poll_seconds
    restore_to_s3(restoration)
    out.section(SECTION_DOWNLOAD)
    while True:
        try:
            statuses = restoration.statuses()
            restoration.request_thaws(statuses)         # a thawed copy that expired
            restoration.download_available(statuses)
            if restoration.all_downloaded(statuses):
                return
            out.line(restoration.progress_line(statuses))
        except Exception as problem:     # noqa: BLE001 - only transient errors are retried
            if isinstance(problem, AamError) or not is_transient(problem):
                raise
            out.line(f"AWS S3 cannot be reached or failed ({describe_aws_error(problem)}); "
                     "trying again at the next check.")
        wake = dt.datetime.now() + dt.timedelta(seconds=poll)
        out.line(f"Next check in {poll} s, at {wake:%Y-%m-%d %H:%M:%S} "
                 "(AAM_RESTORE_POLL_SECONDS). Ctrl-C is safe: run the same command again "
                 "to continue.")
        time.sleep(poll)


def run_one_step(restoration):
    if restoration.already_finished():
        return
    check_seven_zip(restoration.settings)
    open_restoration(restoration)
    restoration.report_set()
    wait_and_download(restoration)
    restoration.extract()
    restoration.remove_downloads()


def open_restoration(restoration):
    """The set, the destination's state, then the catalogues and the plan."""
    restoration.load_set()
    restoration.claim_destination()
    restoration.prepare()


def run_multi_step(restoration, operation):
    if restoration.already_finished():
        return
    open_restoration(restoration)
    if operation == THAW_STEP:
        restoration.report_set()
        statuses = restore_to_s3(restoration)
        restoration.out.line(restoration.progress_line(statuses))
    elif operation == STATUS_STEP:
        check_status(restoration)
    elif operation == DOWNLOAD_STEP:
        download(restoration)
    else:
        check_seven_zip(restoration.settings)
        restoration.extract()


def restore_email(args, restoration, failed, start, out):
    """The restoration's report: which set was used.  True when it was sent."""
    restore_set = restoration.set or (restoration.state and
                                      restoration.state.restore_set(restoration.downloads))
    if restore_set:
        full = describe_stamp(restore_set.full)
        incrementals = ", ".join(describe_stamp(i) for i in restore_set.incrementals)
    else:
        full, incrementals = "none", ""
    body = [f"Unique Backup-Set Prefix: {args.location}", f"Full backup used: {full}",
            f"Incremental backups used: {incrementals or 'none'}"]
    return send_report(args, restoration.settings, restoration.session, out, failed, start,
                       "data restoration", body)


def failure_text(problem):
    """What to tell the user about an error that is not an AamError."""
    again = "run the same command again to continue"
    if is_transient(problem):     # (botocore's timeouts are OSErrors too)
        return f"AWS S3 cannot be reached or failed ({describe_aws_error(problem)}); {again}."
    if isinstance(problem, OSError):
        return (f"{problem.strerror or problem}: {problem.filename or ''} (the destination "
                f"disk?); once that is fixed, {again}.")
    return f"unexpected {type(problem).__name__}: {problem}"


def run_restore(args, platform, settings):
    """The five restore operations; only one-step writes a log and sends e-mail."""
    one_step = args.operation == ONE_STEP_RESTORE
    start = utc_now()
    out = open_run_log(args, platform) if one_step else TerminalOutput(args.secrets)
    if out is None:
        return EXIT_FAILURE
    out.section(SECTION_RESTORE_START)
    out.line(f"{args.operation} started {local_time_text(start)} "
             f"({describe_stamp(start)}); destination {args.destination}")
    restoration = Restoration(args, platform, settings, out)
    try:
        restoration.open()
        if one_step:
            run_one_step(restoration)
        else:
            run_multi_step(restoration, args.operation)
        code = EXIT_OK
    except BaseException as problem:     # noqa: BLE001 - reported, so that one-step mails
        code = report_restore_failure(problem, out)
    finally:
        restoration.close()
    if one_step:
        out.section(SECTION_SUMMARY)
        out.line("SUCCESS: the data is restored." if code == EXIT_OK
                 else "FAILURE: the data is not (completely) restored; see above.")
        if args.send_email and not restore_email(args, restoration, code != EXIT_OK, start,
                                                 out) and code == EXIT_OK:
            code = EXIT_REPORT_UNSENT
            out.line(f"The data is restored; the exit code is {EXIT_REPORT_UNSENT} because "
                     "the report was not sent.")
        out.line(f"Log file: {out.path}")
        out.close()
    return code


def report_restore_failure(problem, out):
    """Say what stopped a restore; its exit code (SystemExit and the like pass on)."""
    if isinstance(problem, (KeyboardInterrupt, Interrupted)):
        problem = Interrupted("Interrupted. Nothing finished is lost: run the same command "
                              "again to continue.")
    elif not isinstance(problem, Exception):
        raise problem
    out.section(SECTION_RESTORE_ERROR)
    if isinstance(problem, (AamError, Interrupted)):
        out.line(f"ERROR: {problem}")
        return problem.exit_code
    out.line(f"ERROR: {failure_text(problem)}")
    if not (is_transient(problem) or isinstance(problem, OSError)):
        out.line(traceback.format_exc(), terminal=False)
    return EXIT_FAILURE


# ============================================================================
# Browse (docs/restore.md, browse-aws-backups)
# ============================================================================

# -- browse: the backups in the bucket, and the versions of chosen files ------------

DEEP_ARCHIVE_MINIMUM_DAYS = 180     # Deep Archive bills every object for 180 days at least
DAYS_A_MONTH = 365.25 / 12


def browse(args, platform, settings):
    """browse-aws-backups: every complete backup of the location, and with a selection
    every version of what it matches; read with the restore keys, no thaw."""
    out = TerminalOutput(args.secrets)
    session = aws_session(args.access_key_id, args.secret_access_key)
    s3 = aws_client(session, "s3", settings.region)
    with s3_call(args.bucket, table=BROWSE_ARGS):
        listing = BucketListing.load(s3, args.bucket, [f"{args.location}_"])
    chains = complete_chains(s3, args.bucket, listing)
    if not chains:
        raise NoBackupSet(f"No complete backup of location {args.location} in bucket "
                          f"{args.bucket}.")
    for line in backup_table(chains, listing):
        out.line(line)
    if args.selection:
        found, unknown, refused = 0, [], []
        with tempfile.TemporaryDirectory(prefix="aam-browse-") as work:
            for chain in chains:
                try:
                    found += find_versions(s3, args, platform, settings, chain, listing,
                                           work, out, unknown)
                except WrongKey as problem:       # a chain made before the key changed
                    refused.append(problem)
                    out.line(another_key_line(chain[0], listing))
        if len(refused) == len(chains):
            raise refused[-1]
        wanted = " | ".join(args.selection)
        if unknown:
            # Without a catalogue only a thaw could tell what those backups hold.
            answer = (f"Unknown for the backups without a catalogue (made by version 1.0.0; "
                      f"only a restore can tell what they hold): {', '.join(unknown)}.")
            if not found:
                raise AamError(f"{answer} Nothing in the backups with a catalogue matches "
                               f"{wanted}.")
            out.line(answer)
        elif not found:
            raise NothingSelected(f"Nothing in any backup of {args.location} matches "
                                  f"{wanted}.")
    return EXIT_OK


def complete_chains(s3, bucket, listing):
    """[(full, [(backup, incremental or None, manifests)])], oldest first: each complete
    full backup with its complete incrementals."""
    chains = []
    for full in sorted(listing.fulls()):
        manifests, _reason = complete_backup(s3, bucket, listing, full, None,
                                             BROWSE_ARGS)
        if not manifests:
            continue
        backups = [(full, None, manifests)]
        for incremental in sorted({i for (f, i) in listing.indicators
                                   if f == full and i is not None}):
            found, _reason = complete_backup(s3, bucket, listing, full, incremental,
                                             BROWSE_ARGS)
            if found:
                backups.append((incremental, incremental, found))
        chains.append((full, backups))
    return chains


def backup_table(chains, listing):
    now = utc_now()
    lines = [f"{'backup (UTC)':26s} {'kind':11s} {'sources':>7s} {'files':>9s} "
             f"{'bytes':>15s} {'volumes':>7s}  age"]
    for full, backups in chains:
        for backup, incremental, manifests in backups:
            volumes = [v for m in manifests.values() for v in m["volumes"]]
            files = sum(int(m.get("files", 0)) for m in manifests.values())
            size = sum(v["size"] for v in volumes)
            age = (now - backup).days
            left = DEEP_ARCHIVE_MINIMUM_DAYS - age
            minimum = ("past Deep Archive's 180-day minimum" if left <= 0 else
                       f"{left} day(s) to Deep Archive's 180-day minimum")
            lines.append(f"{describe_stamp(backup):26s} "
                         f"{'incremental' if incremental else 'full':11s} "
                         f"{len(manifests):>7d} {files:>9,} {size:>15,} {len(volumes):>7d}  "
                         f"{age} day(s), {minimum}")
    return lines


def another_key_line(full, listing):
    """Why a chain was not searched: its catalogue does not open with the key given."""
    checks = listing.keychecks.get(full, [])
    said = f", says their key check {checks[0].key}" if checks else ""
    return (f"(the backups of the full backup {describe_stamp(full)} were made with another "
            f"key{said}: their catalogue does not open with this one; not searched)")


def find_versions(s3, args, platform, settings, chain, listing, work, out, unknown):
    """Print each version of every path the selection matches in one chain; the count.
    The backups it could not search (no catalogue) are added to unknown, by source: a
    1.0.0 chain continued by a later version is searched from its first listing on
    (RestoreSet.exact_from), and what is before it is unknown."""
    full, backups = chain
    found = 0
    sources = sorted(backups[0][2].items())
    for source, manifest in sources:
        held = list(itertools.takewhile(lambda backup: source in backup[2], backups))
        described = [manifests[source].get("catalogue") for _b, _i, manifests in held]
        start = listing_start(described)
        if start is None:         # catalogues from the full on, up to the first without
            start, end = 0, described.index(None) if None in described else len(held)
        else:                     # a 1.0.0 chain continued: from the first listing on
            end = len(held)
        catalogues = [(backup, fetch_browse_catalogue(s3, args, platform, settings,
                                                      manifests[source]["catalogue"], work))
                      for backup, _i, manifests in held[start:end]]
        where = manifest["source_path"]
        if start:
            out.line(f"(the backups of {where} before {describe_stamp(held[start][0])} have "
                     "no catalogue: made by version 1.0.0; whether they hold what is asked "
                     "for is unknown; versions are shown from that backup on)")
            unknown.append(f"{where} before {describe_stamp(held[start][0])}")
        if end < len(held):
            out.line(f"(the backups of {where} from {describe_stamp(held[end][0])} on have no "
                     "catalogue: made by version 1.0.0; whether they hold what is asked for "
                     "is unknown)")
            unknown.append(f"{where} from {describe_stamp(held[end][0])}")
        match = RestoreSelection(args.selection).matcher(
            manifest["source_path"], manifest.get("platform", "posix"))
        for path, versions in path_versions([c for _b, c in catalogues],
                                            [b for b, _c in catalogues]):
            if any(entry and match(path, entry.kind) for _b, entry in versions):
                found += 1
                out.line(f"{join_source_path(manifest['source_path'], path, manifest)}")
                for backup, entry in versions:
                    out.line("  " + version_line(backup, full, entry))
    return found


def join_source_path(source_path, path, manifest):
    sep = platform_named(manifest.get("platform", "posix")).sep
    return source_path.rstrip(sep) + sep + path.replace("/", sep)


def version_line(backup, full, entry):
    kind = "full" if backup == full else "incremental"
    if entry is None:
        return f"{describe_stamp(backup)}  {kind:11s}  deleted"
    modified = dt.datetime.fromtimestamp(entry.mtime / 1e9, dt.timezone.utc)
    what = {FILE: f"file, {entry.size:,} bytes", DIRECTORY: "directory",
            LINK: f"symbolic link to {entry.target}"}[entry.kind]
    return (f"{describe_stamp(backup)}  {kind:11s}  {what}, modified "
            f"{modified:%Y-%m-%d %H:%M:%S} UTC")


def path_versions(catalogues, backups):
    """(path, [(backup, entry or None when deleted)]) for every path of a chain, with a
    version each time its state changed."""
    listings = [catalogue.header["kind"] == LISTING for catalogue in catalogues]
    streams = [keyed_entries(catalogue, index) for index, catalogue in enumerate(catalogues)]
    for _key, group in itertools.groupby(heapq.merge(*streams), key=lambda line: line[0]):
        named = {index: entry for _key, index, entry in group}
        state, versions, path = None, [], None
        for index, is_listing in enumerate(listings):
            entry = named.get(index)
            if entry is None and not is_listing:
                continue
            new = None if entry is None or entry.kind == DELETED else entry
            if not same_version(state, new):
                versions.append((backups[index], new))
            state, path = new, (entry.path if entry is not None else path)
        if versions:
            yield path, versions


def same_version(earlier, later):
    """Nothing changed: same type, size, time, permissions, target and content."""
    if earlier is None or later is None:
        return earlier is later
    return (earlier[:5] == later[:5] and earlier.target == later.target
            and later.location in (earlier.location, UNKNOWN))


def fetch_browse_catalogue(s3, args, platform, settings, described, work):
    """A catalogue decrypted into the browse's temporary directory."""
    directory = os.path.join(work, hashlib.sha256(described["name"].encode()).hexdigest()[:16])
    return CatalogueFile(fetch_catalogue(s3, args, platform, settings, described, directory))


# ============================================================================
# Check without thaw (docs/restore.md, check-aws-backups)
# ============================================================================

# -- check: every set of the location verified without a thaw ------------------------


class CheckFailed(AamError):
    """check-aws-backups found problems; each was printed naming its object(s)."""


@dataclasses.dataclass
class ListedObject:
    key: str
    size: int
    storage_class: str

    @property
    def archived(self):
        return self.storage_class in ARCHIVED_CLASSES


class BackupCheck:
    """check-aws-backups: one LIST of the location, then every complete set verified
    with GETs of STANDARD objects only (indicators, catalogues), never a thaw and
    never a GET of a volume: each volume present at its indicator's size; each
    catalogue's SHA-256 and that it opens with the key; the catalogue's pieces and
    volumes those of the indicator; each incremental's base a complete backup; each
    chain's key check the key's.  Incomplete sets and unused volumes are listed with
    their bytes, the storage per month with its cost; the result goes to the health
    record.  A set made by 1.0.0 (no catalogue) is checked at its volumes' sizes, and
    what could not be checked is said."""

    def __init__(self, args, platform, settings):
        self.args, self.platform, self.settings = args, platform, settings
        self.out = TerminalOutput(args.secrets)
        self.problems = []        # each names its object(s)
        self.not_checked = []     # what a set without a catalogue leaves unknown
        self.unused = []          # (key, size): volumes of complete sets no indicator names
        self.checked = []         # (full, incremental or None) of each complete set
        self.read = {}            # (full, incremental) -> {source: manifest} read
        self.gone = set()         # full backups the bucket's expiry rule removed
        self.s3 = self.listing = None
        self.objects = []

    def problem(self, text):
        self.problems.append(text)
        self.out.line(f"PROBLEM: {text}")

    def object_problem(self, error):
        """An object that cannot be read is a problem of that object; keys that may not
        read it stop the check (every object would fail alike)."""
        if error.__context__ is not None and \
                aws_error_code(error.__context__) in DENIED_CODES:
            raise error
        self.problem(str(error))

    def s3_call(self, key=None, kind="object"):
        """s3_call naming this operation's arguments (the bucket, the keys)."""
        return s3_call(self.args.bucket, key, self.args.table, kind)

    def run(self):
        check_seven_zip(self.settings)
        try:
            return self.check()
        except aws_errors() as problem:          # s3_call let it pass: not the objects'
            if not is_transient(problem):
                raise
            raise AamError(f"AWS S3 could not be reached ({describe_aws_error(problem)}) after "
                           "retries; the check was not finished and not recorded: run it "
                           "again.") from None

    def check(self):
        session = aws_session(self.args.access_key_id, self.args.secret_access_key)
        self.s3 = aws_client(session, "s3", self.settings.region)
        self.list_location()
        chains = self.sets_by_chain()
        if not chains:
            raise NoBackupSet(f"No backup of location {self.args.location} in bucket "
                              f"{self.args.bucket}.")
        with tempfile.TemporaryDirectory(prefix="aam-check-") as work:
            complete = {}
            for full, backups in chains:
                complete.update(self.check_chain(full, backups, work))
        self.report_incomplete(chains, complete)
        self.report_unused()
        self.report_unknown()
        storage = self.storage_lines()
        self.report_range()
        self.report_result()
        self.record(storage)
        if self.problems:
            raise CheckFailed(f"The check found {len(self.problems)} problem(s):\n  "
                              + "\n  ".join(self.problems))
        return EXIT_OK

    # -- what is in the bucket ------------------------------------------------------
    def list_location(self):
        """Every object whose name starts with '<location>_' (one LIST, paged)."""
        self.listing = BucketListing()
        with self.s3_call():
            self.listing.load_prefix(
                self.s3, self.args.bucket, f"{self.args.location}_",
                lambda item: self.objects.append(ListedObject(
                    item["Key"], item.get("Size", 0), item.get("StorageClass", "STANDARD"))))

    def sets_by_chain(self):
        """[(full, [(incremental or None, [listed objects])])], oldest first: every backup
        with an object in the bucket, each full with the incrementals that name it."""
        backups = {}
        for listed in self.objects:
            name = ObjectName.parse(listed.key)
            if name is not None:
                backups.setdefault(name.full, {}).setdefault(name.incremental,
                                                             []).append(listed)
        return [(full, sorted(found.items(), key=lambda pair: pair[0] or full))
                for full, found in sorted(backups.items())]

    # -- one chain: a full backup and its incrementals ------------------------------
    def check_chain(self, full, backups, work):
        """Check every complete set of one chain; {(full, incremental): manifests}."""
        if self.expired(full, backups):
            return {}
        complete, key_refused = {}, self.check_key(full)
        for incremental, _objects in backups:
            manifests = self.complete_manifests(full, incremental)
            if manifests is None:
                continue
            before = len(self.problems)
            complete[(full, incremental)] = manifests
            self.checked.append((full, incremental))
            if incremental is not None:
                self.check_base(full, incremental, manifests, complete)
            named = set()
            for source, manifest in sorted(manifests.items()):
                named.update(self.check_volumes(full, incremental, manifest))
                self.check_catalogue(full, incremental, manifest, key_refused, work)
            self.unused += [(stored.name.key, stored.size)
                            for (f, i, _s), volumes in self.listing.volumes.items()
                            if (f, i) == (full, incremental) for stored in volumes
                            if stored.name.key not in named]
            volumes = [v for manifest in manifests.values() for v in manifest["volumes"]]
            self.out.line(f"{'ok' if len(self.problems) == before else 'DAMAGED':8s}"
                          f"{describe_backup(full, incremental)}: {len(manifests)} "
                          f"source(s), {len(volumes)} volume(s), "
                          f"{sum(v['size'] for v in volumes):,} bytes")
        if not any(m.get("catalogue") for ms in complete.values() for m in ms.values()) \
                and complete and not self.listing.keychecks.get(full):
            self.not_checked.append(f"the key of the backups of the full backup "
                                    f"{describe_stamp(full)}: they have neither a "
                                    "catalogue nor a key check (made by version 1.0.0)")
        return complete

    def expired(self, full, backups):
        """The full backup is gone, every object of it, and it is older than Deep
        Archive's minimum: the bucket's expiry rule (docs/aws-setup.md) removed it before
        its incrementals, which no restore can use now.  Said, not a problem."""
        if backups[0][0] is None or (utc_now() - full).days <= DEEP_ARCHIVE_MINIMUM_DAYS:
            return False
        size = sum(listed.size for _i, objects in backups for listed in objects)
        self.out.line(f"gone    full backup {describe_stamp(full)}: removed by the bucket's "
                      f"expiry rule; what is left of its chain ({len(backups)} incremental "
                      f"backup(s), {size:,} bytes) is of no use to a restore and goes the "
                      "same way")
        self.gone.add(full)
        return True

    def check_key(self, full):
        """Whether the chain's key check refuses the key (said once: its catalogues are
        then not opened); True: refused.  A problem, unless a later chain's key check is
        of the key: the key was changed on purpose since (docs/security.md), and what
        the chain holds could not be checked with this one."""
        checks = self.listing.keychecks.get(full, [])
        if not checks or any(check.matches(self.args.key) for check in checks):
            return False
        if any(later > full and any(check.matches(self.args.key) for check in found)
               for later, found in self.listing.keychecks.items()):
            self.not_checked.append(
                f"the catalogues of the backups of the full backup {describe_stamp(full)}: "
                f"made with the key before it was changed (their key check {checks[0].key}); "
                "check them with that key")
            return True
        self.problem(f"{checks[0].key}: the key ({self.args.ref('key')}) is not the key "
                     f"the backups of the full backup {describe_stamp(full)} were made "
                     "with; a restore of them needs their key (their catalogues were not "
                     "opened)")
        return True

    def complete_manifests(self, full, incremental):
        """{source: manifest} of a complete set, else None (an indicator that cannot be
        read is a problem, and its source counts as without one)."""
        present = self.listing.indicators.get((full, incremental), {})
        manifests = self.read[(full, incremental)] = {}
        for source, stored in sorted(present.items()):
            try:
                manifests[source] = read_manifest(self.s3, self.args.bucket, stored.name.key,
                                                  self.args.table)
            except AamError as problem:
                self.object_problem(problem)
        declared = {tuple(manifest["sources"]) for manifest in manifests.values()}
        if len(declared) > 1:
            self.problem(f"the completion indicators of the {describe_backup(full, incremental)} "
                         f"name different sources: {', '.join(sorted(manifests))}")
            return None
        if not declared or any(source not in manifests for source in declared.pop()):
            return None
        return manifests

    def check_base(self, full, incremental, manifests, complete):
        """An incremental holds the changes since a complete backup of its chain."""
        for source, manifest in sorted(manifests.items()):
            since = manifest.get("changed_since")
            if since not in {format_stamp(i or f) for f, i in complete}:
                indicator = ObjectName(self.args.location, full, incremental, True, source).key
                self.problem(f"{indicator}: it holds the changes since {since}, which is not "
                             "a complete backup in the bucket: files changed before it "
                             "cannot be restored as of this backup")
                return

    def check_volumes(self, full, incremental, manifest):
        """Each volume the indicator names is in the bucket at its size; the names."""
        pieces = manifest_pieces(manifest)
        in_pieces = [entry["name"] for _number, entries in pieces for entry in entries]
        indicator = ObjectName(self.args.location, full, incremental, True,
                               manifest["source"]).key
        if in_pieces != [entry["name"] for entry in manifest["volumes"]]:
            self.problem(f"{indicator}: its pieces do not name the volumes its volume list "
                         "does")
        for piece, entries in pieces:
            _volumes, problems = volumes_of(manifest, self.listing, full, incremental,
                                            lambda _key: None, piece, entries)
            for text in problems:
                self.problem(f"{text} (named by {indicator})")
        return set(in_pieces)

    # -- the catalogue ----------------------------------------------------------
    def check_catalogue(self, full, incremental, manifest, key_refused, work):
        """GET the catalogue (STANDARD), check its SHA-256, open it with the key, and
        compare what it says of the backup with the indicator."""
        described, problems = catalogue_of(manifest, self.listing, full, incremental)
        what = f"{manifest['source_path']} in the {describe_backup(full, incremental)}"
        if described is None:
            self.not_checked.append(f"the contents of {what}: no catalogue (made by version "
                                    "1.0.0); its volumes are present at their sizes")
            return
        for text in problems:
            self.problem(f"{text} (the catalogue of {what})")
        if problems:
            return
        directory = os.path.join(work, hashlib.sha256(
            described["name"].encode()).hexdigest()[:16])
        try:
            zip_path = download_catalogue(self.s3, self.args, described, directory)
            if not key_refused:
                self.open_catalogue(described, manifest, zip_path, directory)
        except AamError as problem:
            self.object_problem(problem)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def open_catalogue(self, described, manifest, zip_path, directory):
        try:
            text_path = decrypt_catalogue(self.settings, self.platform, self.args, described,
                                          zip_path, directory)
        except WrongKey:
            raise AamError(f"{described['name']}: the catalogue does not open with the key "
                           f"({self.args.ref('key')})") from None
        try:
            catalogue = CatalogueFile(text_path)
            entries = sum(1 for _entry in catalogue)
        except (OSError, ValueError) as problem:
            raise AamError(f"{described['name']}: the catalogue cannot be read ({problem})")
        for difference in catalogue_differences(catalogue, entries, described, manifest):
            self.problem(f"{described['name']}: {difference}")

    # -- what is not a complete set ---------------------------------------------
    def report_incomplete(self, chains, complete):
        """Each backup with objects but not complete: its bytes, and whether the pending
        backup of this computer's journal continues it."""
        pending = self.pending_backup()
        newest = max((incremental or full for full, incremental in complete), default=None)
        found = False
        for full, backups in chains:
            for incremental, objects in backups:
                if (full, incremental) in complete or full in self.gone:
                    continue
                if not found:
                    self.out.line("")
                    self.out.line("Incomplete backups (no restore uses them):")
                    found = True
                self.describe_incomplete(full, incremental, objects, pending, newest)

    def describe_incomplete(self, full, incremental, objects, pending, newest):
        made = incremental or full
        size = sum(listed.size for listed in objects)
        missing = self.sources_without_indicator(full, incremental)
        self.out.line(f"  the {describe_backup(full, incremental)}: {len(objects)} object(s), "
                      f"{size:,} bytes" + (f"; no completion indicator for "
                                           f"{', '.join(missing)}" if missing else ""))
        for listed in sorted(objects, key=lambda o: o.key):
            self.out.line(f"    {listed.key} ({listed.size:,} bytes)")
        if pending == (full, incremental):
            self.out.line("    pending: the next backup continues it (this computer's "
                          "journal records it)")
        elif newest is None or made > newest:
            self.problem(f"the {describe_backup(full, incremental)} is not complete, is newer "
                         "than every complete backup, and no journal on this computer "
                         "continues it: the latest backups did not finish (objects above)")
        else:
            self.out.line("    given up (no journal on this computer records it): its "
                          "objects stay unused until removed")

    def sources_without_indicator(self, full, incremental):
        """The sources the set's readable indicators name and that have none."""
        declared = {source for manifest in self.read.get((full, incremental), {}).values()
                    for source in manifest["sources"]}
        return sorted(declared - set(self.listing.indicators.get((full, incremental), {})))

    def pending_backup(self):
        """(full, incremental or None) of the backup this computer's journal records, or
        None; read only (a backup running now may be writing it)."""
        path = journal_path(self.settings.state_dir, self.args.bucket, self.args.location)
        if not os.path.exists(path):
            return None
        try:
            journal = Journal(path, read_only_connection(path))
        except journal_errors() + (ValueError, TypeError, JournalDamaged):
            return None
        try:
            backup = journal.backup
            full = parse_stamp(backup["full"])
            return full, (None if backup["scope"] == Scope.FULL.word
                          else parse_stamp(backup["stamp"]))
        finally:
            journal.close()

    def report_unused(self):
        if not self.unused:
            return
        size = sum(size for _key, size in self.unused)
        self.out.line("")
        self.out.line(f"Unused volumes of complete backups (of a piece that was lost; no "
                      f"restore reads them): {len(self.unused)} volume(s), {size:,} bytes:")
        for key, size in sorted(self.unused):
            self.out.line(f"  {key} ({size:,} bytes)")

    def report_unknown(self):
        """Objects under the location's prefix that this program did not name."""
        unknown = [listed for listed in self.objects if ObjectName.parse(listed.key) is None
                   and KeyCheck.parse(listed.key) is None]
        if unknown:
            self.out.line("")
            self.out.line(f"Objects not written by {PROGRAM_NAME} (not checked): "
                          + ", ".join(listed.key for listed in unknown))

    # -- storage, restore points, the result ------------------------------------
    def storage_lines(self):
        """Print the storage per UTC month (of the full backup, as the names' prefixes
        go) and the monthly cost; {YYYYMM: (objects, bytes)}."""
        months = {}
        for listed in self.objects:
            month = object_month(listed.key)
            counts = months.setdefault(month, [0, 0, 0, 0])  # objects, bytes, archived: n, bytes
            counts[0] += 1
            counts[1] += listed.size
            if listed.archived:
                counts[2] += 1
                counts[3] += listed.size
        self.out.line("")
        self.out.line(f"Storage (by the month of each full backup; estimated monthly cost at "
                      f"us-east-1 prices of {PRICES_TAKEN}: Deep Archive "
                      f"${STORAGE_PRICES[DEEP_ARCHIVE]}, STANDARD "
                      f"${STORAGE_PRICES['STANDARD']} per GB-month):")
        self.out.line(f"  {'month':8s} {'objects':>8s} {'bytes':>17s} {'per month':>18s}")
        total = [0, 0, 0.0]
        for month, (objects, size, archived, archived_size) in sorted(months.items()):
            cost = storage_cost(archived_size, archived, size - archived_size)
            total = [total[0] + objects, total[1] + size, total[2] + cost]
            self.out.line(f"  {month:8s} {objects:>8,} {size:>17,} {format_dollars(cost):>18s}")
        self.out.line(f"  {'total':8s} {total[0]:>8,} {total[1]:>17,} "
                      f"{format_dollars(total[2]):>18s}")
        return {month: counts[:2] for month, counts in months.items()}

    def report_range(self):
        if not self.checked:
            self.out.line("Restore points: none (no complete backup)")
            return
        points = sorted(incremental or full for full, incremental in self.checked)
        self.out.line(f"Restore points: {len(points)}, from {describe_stamp(points[0])} to "
                      f"{describe_stamp(points[-1])}")

    def report_result(self):
        if not self.checked:
            self.problem(f"no complete backup of location {self.args.location}: nothing "
                         "can be restored from the bucket yet")
        fulls = sum(1 for _full, incremental in self.checked if incremental is None)
        self.out.line(f"Checked {len(self.checked)} complete backup(s) ({fulls} full, "
                      f"{len(self.checked) - fulls} incremental): "
                      + (f"{len(self.problems)} problem(s)" if self.problems else "passed"))
        if self.not_checked:
            self.out.line("Not checked:")
            for text in self.not_checked:
                self.out.line(f"  {text}")

    def record(self, storage):
        """The result and the storage per month go to the health record (check lists
        every month, so the months it did not find are no longer stored)."""
        date = format_health_date(utc_now())
        record = HealthRecord(self.settings.state_dir, self.args.bucket, self.args.location)
        try:
            record.update("check", {"date": date,
                                    "result": "failed" if self.problems else "passed",
                                    "problems": len(self.problems), "sets": len(self.checked),
                                    "not_checked": self.not_checked})
            record.update("storage", {month: {"objects": objects, "bytes": size,
                                              "listed": date}
                                      for month, (objects, size) in storage.items()})
        except OSError as problem:
            self.out.line(f"Warning: the health record {record.path} cannot be written "
                          f"({problem.strerror or problem}).")


def object_month(key):
    """'YYYYMM' of an object of the location: its full backup's month (a key check's
    too, though it is listed under a prefix of its own: listed_month), or 'other' for
    a name this program did not write."""
    name = ObjectName.parse(key) or KeyCheck.parse(key)
    if name is not None:
        return f"{name.full:%Y%m}"
    return "other"


def catalogue_differences(catalogue, entries, described, manifest):
    """What a catalogue says of its backup that differs from its indicator."""
    header = catalogue.header
    expected = {"source": manifest["source"], "full_backup": manifest.get("full_backup"),
                "backup": manifest.get("backup"), "kind": described.get("kind"),
                "base": described.get("base")}
    found = [f"its header says {field} {header.get(field)!r}, the indicator {value!r}"
             for field, value in expected.items()
             if value is not None and header.get(field) != value]
    if described.get("entries") is not None and entries != described["entries"]:
        found.append(f"it holds {entries:,} entries, the indicator says {described['entries']:,}")
    if catalogue.version == 1:
        archive = header.get("archive") or {}
        said, held = archive.get("volumes", 0), len(manifest["volumes"])
        if said != held:
            found.append(f"it says its archive has {said} volume(s), the indicator names "
                         f"{held}")
        return found
    said = [(piece["number"], piece["volumes"], piece["central_directory_volume"])
            for piece in header.get("pieces", [])]
    held = [(piece["number"], len(piece["volumes"]), piece["central_directory_volume"])
            for piece in manifest.get("pieces", [])]
    if said != held:
        found.append(f"its pieces (number, volumes, central directory volume) {said} are "
                     f"not the indicator's {held}")
    return found


# ============================================================================
# Restore drill (docs/restore.md, Restore drill)
# ============================================================================

# The drill proves the latest full backup restorable end to end for cents: it thaws
# the few volumes of one piece that let 7-Zip test whole files (the piece's central
# directory and the files' own volumes), downloads them, checks them against the
# indicator, tests and extracts the files with the key, and compares them with the
# catalogue.  A thaw takes hours: the run that requests it records a pending drill in
# the health record and exits 7; a later run finds it and finishes.
DRILL = "drill"                    # the health record's sections (HealthRecord)
DRILL_PENDING = "drill_pending"
DRILL_FILES_RECORDED = 20          # the paths of tested files the health record keeps
TEST_OK = "Everything is Ok"       # 7-Zip's line after a test that found no error


@dataclasses.dataclass
class DrillChoice:
    """What a drill thaws and tests: some volumes of one piece, and every file whose
    bytes lie within them (the piece's central directory is in them too)."""

    archive: RestoreArchive
    volumes: list          # RestoreVolume, in piece order
    files: list            # the catalogue entries tested, in catalogue order


def file_volumes(archive, place, central):
    """The volume numbers 7-Zip reads to test the file at place (parse_location) of a
    piece: its own, and the central directory's (openable_volumes)."""
    first, last = place[2], place[3]
    tally = RestoreTotals(volumes={archive.key: set(range(first, last + 1))})
    return openable_volumes(tally, {archive.key: archive}, central)[archive.key]


def cheapest_test(restore_set, catalogues, tier):
    """(archive, volume numbers) whose thaw costs the least of those that let 7-Zip test
    a whole file (with content) of the full backup; None when no file has content."""
    stamp = format_stamp(restore_set.full)
    archives = {a.key: a for a in restore_set.archives if a.volumes}
    best, seen = None, set()
    for number, catalogue in catalogues:
        central = central_directory_volumes(catalogue, stamp, number)
        for entry in catalogue:
            place = parse_location(entry.location)
            if entry.kind != FILE or not entry.size or not place or place[0] != stamp:
                continue
            key = (stamp, number, place[1])
            if key not in archives or (key, place) in seen:
                continue
            seen.add((key, place))
            numbers = file_volumes(archives[key], place, central)
            volumes = [v for v in archives[key].volumes if v.number in numbers]
            size = sum(v.size for v in volumes)
            rank = (retrieval_cost(tier, size, len(volumes)), size)
            if best is None or rank < best[0]:
                best = (rank, archives[key], numbers)
    return best and best[1:]


def files_within(catalogue, archive, numbers):
    """The files of the catalogue whose bytes lie in those volumes of the archive."""
    stamp = format_stamp(archive.backup)
    found = []
    for entry in catalogue:
        place = parse_location(entry.location)
        if (entry.kind == FILE and place and (place[0], place[1]) == (stamp, archive.piece)
                and set(range(place[2], place[3] + 1)) <= numbers):
            found.append(entry)
    return found


class Drill(Restoration):
    """drill-aws-backups: the restore's thaw, download, verification and 7-Zip on the
    chosen volumes, in a temporary directory (work) that is gone after the run."""

    def __init__(self, args, platform, settings, out, work):
        args.destination, args.restore_point, args.selection = work, None, []
        super().__init__(args, platform, settings, out)
        self.health = HealthRecord(settings.state_dir, args.bucket, args.location)
        self.catalogues = []       # [(source number, CatalogueFile)] of the full backup
        self.choice = None

    # -- which backup, which volumes ---------------------------------------------------
    def run(self):
        """Request the thaw (NotReady), or finish the drill it requested: EXIT_OK."""
        args = self.args
        self.connect()
        prefixes = month_prefixes(args.location, utc_now()) + [keycheck_prefix(args.location)]
        with s3_call(args.bucket, table=self.args.table):
            listing = BucketListing.load(self.s3, args.bucket, prefixes)
        pending = self.health.get(DRILL_PENDING)
        if pending and not self.continue_pending(pending, listing):
            pending = None
        if not pending:
            try:
                full, manifests = latest_complete_full(self.s3, args.bucket, listing, self.out,
                                                       table=self.args.table)
            except NoBackupSet:
                raise NoBackupSet(f"No complete full backup of location {args.location} in "
                                  f"bucket {args.bucket} in the months {prefixes[5][-6:]} to "
                                  f"{prefixes[0][-6:]} (UTC): nothing can be restored.") from None
            self.open_backup(listing, full, manifests)
            self.choose()
        self.report_choice(pending)
        statuses = self.statuses()
        asked = self.request_thaws(statuses)
        self.out.line(self.progress_line(statuses))
        if any(state in (IN_PROGRESS, NOT_REQUESTED) for state in statuses.values()):
            self.record_pending(pending, asked)
            tier = self.settings.restore_tier
            raise NotReady(f"The drill waits for the thaw ({tier}: {EXPECTED_WAIT[tier]} of "
                           "the request); run drill-aws-backups again later to finish it. "
                           f"The thawed copies stay {args.days} day(s) (argument "
                           f"{args.table.number('days')}) once ready.")
        self.finish(statuses)
        return EXIT_OK

    def continue_pending(self, pending, listing):
        """Take up the pending drill: True; False when its backup is gone (said)."""
        try:
            full, names = parse_stamp(pending["backup"]), list(pending["volumes"])
        except (KeyError, TypeError, ValueError):
            self.out.line(f"The pending drill in {self.health.path} cannot be read; a new "
                          "drill begins.")
            return False
        manifests, reason = (None, "no completion indicator is listed")
        if (full, None) in listing.indicators:
            manifests, reason = complete_backup(self.s3, self.args.bucket, listing, full,
                                                None, self.args.table)
        if not manifests:
            self.out.line(f"The full backup {describe_stamp(full)} of the drill pending since "
                          f"{pending.get('requested')} is no longer a complete set in the "
                          f"bucket ({reason}; the lifecycle rule deletes backups after 180 "
                          "days): that drill is given up, and a new one begins on the latest "
                          "complete full backup.")
            self.health.update(DRILL_PENDING, None)
            return False
        newer = [f for f in listing.fulls() if f > full]
        self.out.line(f"Continuing the drill pending since {pending.get('requested')}." + (
            f" (A newer full backup, {describe_stamp(newer[0])}, exists: this drill is "
            "finished first, its thaw is paid for; the next drill takes the newer one.)"
            if newer else ""))
        self.open_backup(listing, full, manifests)
        by_name = {v.key: archive for archive in self.set.archives for v in archive.volumes}
        unknown = [name for name in names if name not in by_name]
        if unknown or len({by_name[name].key for name in names}) != 1:
            raise AamError(f"The pending drill's volume {(unknown or names)[0]} is not a "
                           "volume of one piece of the full backup "
                           f"{describe_stamp(full)} in its completion indicators; the "
                           "backup set is damaged.")
        archive = by_name[names[0]]
        self.choose_in(archive, {v.number for v in archive.volumes if v.key in names})
        return True

    def open_backup(self, listing, full, manifests):
        """The full backup's set (volumes listed at their size) and its catalogues,
        opened with the key (a wrong one stops here, before any thaw)."""
        keycheck, self.keycheck_problem = keycheck_verdict(
            self.args.key, listing.keychecks.get(full, []), full, self.args.table)
        self.set = build_restore_set(self.args.location, listing, full, [], manifests,
                                     self.downloads)
        self.set.keycheck = keycheck
        for number, _source, _path in self.set.sources:
            archive = self.set.catalogue_archives(number)[0]
            if not archive.catalogue:
                continue                  # made by version 1.0.0: nothing says where what is
            try:
                path = self.fetch_catalogue(archive)
            except WrongKey:
                if self.keycheck_problem and not self.catalogues_opened:
                    raise WrongKey(self.keycheck_problem) from None
                raise
            self.catalogues.append((number, CatalogueFile(path)))
        if not self.catalogues:
            raise AamError(f"The full backup {describe_stamp(full)} has no catalogue (made by "
                           "version 1.0.0): the drill cannot tell which volumes hold a whole "
                           "file; a restore (docs/restore.md) tests it whole.")

    def choose(self):
        found = cheapest_test(self.set, self.catalogues, self.settings.restore_tier)
        if found is None:
            raise AamError(f"The full backup {describe_stamp(self.set.full)} holds no file "
                           "with content in an archive: there is nothing to test.")
        self.choose_in(*found)

    def choose_in(self, archive, numbers):
        catalogue = dict(self.catalogues).get(archive.number)
        files = files_within(catalogue, archive, numbers) if catalogue else []
        if not files:
            raise AamError(f"No whole file of {self.archive_name(archive)} lies in the "
                           "volumes the drill chose; the catalogue and the completion "
                           "indicator disagree.")
        volumes = [v for v in archive.volumes if v.number in numbers]
        self.choice = DrillChoice(archive, volumes, files)
        self.plan = RestorePlan(volumes, RestoreTotals(), RestoreTotals(), [], [])

    def source_path(self, archive):
        return {number: path for number, _s, path in self.set.sources}[archive.number]

    def tested_paths(self):
        """The original paths of the files tested (as the health record keeps them)."""
        source = self.source_path(self.choice.archive)
        sep = platform_of_path(source).sep
        return [source.rstrip(sep) + sep + entry.path.replace("/", sep)
                for entry in self.choice.files]

    def report_choice(self, pending):
        choice, out = self.choice, self.out
        paths = self.tested_paths()
        out.line(f"Restore drill of location {self.args.location}: the "
                 f"{describe_backup(self.set.full, None)}"
                 + ("." if pending else ", the latest complete one."))
        out.line(f"Chosen: {len(choice.volumes)} of the {len(choice.archive.volumes)} "
                 f"volume(s) of piece {choice.archive.piece} of "
                 f"{self.source_path(choice.archive)}: its central directory and "
                 f"{len(paths)} whole file(s), e.g. {paths[0]}")
        for line in plan_lines(self.plan, self.args.days, self.settings.restore_tier,
                               self.args.table.ref("days")):
            out.line(line)
        for volume in choice.volumes:
            out.line(f"  {volume.key}  ({volume.size:,} bytes)")

    def record_pending(self, pending, asked):
        """The drill_pending section: what the next run needs to finish this drill."""
        requested = pending["requested"] if pending and not asked else format_health_date(utc_now())
        self.health.update(DRILL_PENDING, {
            "requested": requested, "tier": self.settings.restore_tier,
            "days": self.args.days, "backup": format_stamp(self.set.full),
            "volumes": [v.key for v in self.choice.volumes],
            "files": self.tested_paths()[:DRILL_FILES_RECORDED]})

    # -- once thawed: download, test, extract, compare ---------------------------------
    def finish(self, statuses):
        self.out.section(SECTION_DOWNLOAD)
        self.download_available(statuses)          # each checked against the indicator
        archive, files = self.choice.archive, self.choice.files
        first = self.openable_first_volume(archive)
        names = [entry.path for entry in files]
        list_path = os.path.join(self.downloads, "drill_list.txt")
        self.out.line(f"Testing {len(files)} file(s) of {self.archive_name(archive)}")
        output = self.seven_zip(["t", first, "-bd", "-sccUTF-8"]
                                + exact_names_switches(list_path, names, self.platform),
                                archive)
        self.check_test_output(output, files, archive)
        extracted = os.path.join(self.downloads, EXTRACT_DIR)
        self.seven_zip(seven_zip_extract_argv(first, extracted, self.platform, list_path,
                                              names), archive)
        problems = [problem for entry in files
                    for problem in extracted_problems(extracted, entry)]
        if problems:
            raise AamError(f"{len(problems)} file(s) of {self.archive_name(archive)} extracted "
                           "by the drill differ from the catalogue: " + "; ".join(problems[:5]))
        self.record(None)
        self.out.line(f"Restore drill PASSED: {len(files)} file(s) of the "
                      f"{describe_backup(self.set.full, None)} tested and extracted with the "
                      f"key, as the catalogue describes them (recorded in {self.health.path}).")

    def check_test_output(self, output, files, archive):
        """7-Zip's own account of the test: no error, every file, every byte (an exit
        code 0 alone would also pass a list that matched nothing)."""
        counted = re.search(r"^Files: (\d+)\s*$", output, re.M)
        size = re.search(r"^Size: +(\d+)\s*$", output, re.M)
        count = int(counted[1]) if counted else 1 if size else 0
        expected = sum(entry.size for entry in files)
        if TEST_OK not in output or count != len(files) or not size \
                or int(size[1]) != expected:
            raise AamError(f"7-Zip's test of {self.archive_name(archive)} did not confirm "
                           f"the {len(files)} file(s) of {expected:,} bytes the catalogue "
                           f"places in the volumes thawed: it tested {count} file(s), "
                           f"{int(size[1]) if size else 0:,} bytes"
                           + ("" if TEST_OK in output else ", with errors"))

    def record(self, problem):
        """The finished drill's result in the health record; the pending one goes."""
        self.health.update(DRILL, {
            "date": format_health_date(utc_now()),
            "result": "failed" if problem else "passed",
            "backup": format_stamp(self.set.full) if self.set else None,
            "files": self.tested_paths()[:DRILL_FILES_RECORDED] if self.choice else [],
            "files_tested": len(self.choice.files) if self.choice else 0,
            "volumes": [v.key for v in self.choice.volumes] if self.choice else [],
            "problem": self.out.scrub(str(problem)) if problem else None})
        self.health.update(DRILL_PENDING, None)


def extracted_problems(root, entry):
    """How a file the drill extracted differs from its catalogue line (size, time)."""
    path = os.path.join(root, entry.path.replace("/", os.sep))
    try:
        st = os.stat(path)
    except OSError:
        return [f"{entry.path}: 7-Zip did not extract it"]
    problems = []
    if st.st_size != entry.size:
        problems.append(f"{entry.path}: {st.st_size:,} bytes, the catalogue says "
                        f"{entry.size:,}")
    if abs(st.st_mtime_ns - entry.mtime) > MTIME_TOLERANCE * 1e9:
        problems.append(f"{entry.path}: modified {_iso(st.st_mtime)}, the catalogue says "
                        f"{_iso(entry.mtime / 1e9)}")
    return problems


def drill(args, platform, settings):
    """drill-aws-backups: start a restore drill, or finish the pending one."""
    out = TerminalOutput(args.secrets)
    check_seven_zip(settings)
    os.makedirs(settings.temp_root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aam-drill-", dir=settings.temp_root) as work:
        run = Drill(args, platform, settings, out, work)
        try:
            return run.run()
        except NotReady:
            raise
        except AamError as problem:
            run.record(problem)
            out.line(f"Restore drill FAILED (recorded in {run.health.path}).")
            raise
        except Exception as problem:     # noqa: BLE001 - not the backup's fault: not recorded
            if is_transient(problem):
                raise AamError(f"AWS S3 cannot be reached or failed "
                               f"({describe_aws_error(problem)}); run drill-aws-backups "
                               "again (a pending drill is kept).") from None
            if isinstance(problem, OSError):
                raise AamError(f"{problem.strerror or problem}: {problem.filename or ''} "
                               f"(the drill's temporary directory is in {settings.temp_root}, "
                               "AAM_TEMP_ROOT); a pending drill is kept.") from None
            raise


# ============================================================================
# Aam_Auto_Backup: dispatch on the operation argument
# ============================================================================

class Aam_Auto_Backup:  # noqa: N801 - the name the user asked for
    """Dispatch on argument 1 (and argument 2 for the child pass)."""

    def __init__(self, argv, platform=None):
        self.argv = list(argv)
        self.platform = platform or current_platform()
        self.program_path = os.path.abspath(__file__)

    def run(self):
        argv = self.argv
        operation = argv[0] if argv else ""
        if argv in (["--help"], ["-h"]):
            print(overview_text())
            return EXIT_OK
        if argv == ["--version"]:
            print(f"{PROGRAM_NAME} {VERSION}")
            return EXIT_OK
        if len(argv) == 2 and argv[1] in HELP_WORDS and operation in OPERATION_SUMMARIES:
            print(OPERATION_TABLES[operation].help(operation))
            return EXIT_OK
        try:
            if len(argv) > 1 and argv[1] == CHILD_AGENT:
                return self.child_pass(parse_child_args(argv))
            if operation in BACKUP_OPERATIONS:
                args = parse_backup_args(argv)
                return self.with_signals(BackupRun(args, self.platform, self.settings(),
                                                   self.program_path).execute)
            if operation == PREVIEW_BACKUP:
                args = parse_backup_args(argv)
                return self.with_signals(BackupPreview(args, self.platform, self.settings(),
                                                       self.program_path).execute)
            if operation in RESTORE_OPERATIONS:
                args = parse_restore_args(argv)
                settings = self.settings()
                return self.with_signals(lambda: run_restore(args, self.platform, settings))
            if operation == BROWSE_OPERATION:
                args = parse_browse_args(argv)
                settings = self.settings()
                return self.with_signals(lambda: browse(args, self.platform, settings))
            if operation == CHECK_OPERATION:
                args = parse_check_args(argv)
                settings = self.settings()
                return self.with_signals(BackupCheck(args, self.platform, settings).run)
            if operation == DRILL_OPERATION:
                args = parse_drill_args(argv)
                settings = self.settings()
                return self.with_signals(lambda: drill(args, self.platform, settings))
            raise UsageError(f"unknown operation {operation!r}" if operation
                             else "no operation given")
        except HelpRequested as request:
            print(OPERATION_TABLES[request.operation].help(request.operation))
            return EXIT_OK
        except UsageError as problem:
            print(f"error: {problem}", file=sys.stderr)
            print(named_usage_text(problem.operation) if problem.named
                  else usage_text(problem.operation), file=sys.stderr)
            return EXIT_USAGE
        except AamError as problem:
            print(f"error: {problem}", file=sys.stderr)
            return problem.exit_code

    def settings(self):
        return Settings.from_environment(self.platform)

    def child_pass(self, child):
        return run_child(child, self.platform, self.settings())

    @staticmethod
    def with_signals(function):
        """SIGTERM (a scheduler stopping us) unwinds like Ctrl-C: cleanup still runs."""
        def interrupt(*_ignored):
            INTERRUPTIONS.raise_or_hold(Interrupted("interrupted by a signal"))

        def ctrl_c(*_ignored):
            INTERRUPTIONS.raise_or_hold(KeyboardInterrupt())
        handlers = {signal.SIGTERM: interrupt}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            handlers[signal.SIGINT] = ctrl_c      # (not where Ctrl-C is ignored: nohup, &)
        previous = {number: signal.signal(number, handler)
                    for number, handler in handlers.items()}
        try:
            return function()
        except (KeyboardInterrupt, Interrupted):
            print("Interrupted.", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    status = Aam_Auto_Backup(sys.argv[1:] if argv is None else argv).run()
    # On exit Python collects every object once more: 0.15 s of every run once boto3's
    # models are loaded, only to free memory the OS frees anyway.  Frozen objects are
    # left out of that pass (every file this program writes is closed by now).
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(main())
