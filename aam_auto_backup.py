#!/usr/bin/env python3
"""AAM Auto Backup: daily mirror + encrypted Deep Archive backups, one-command restore.

Every day the program mirrors the directories listed in an instruction file to a
local or USB drive and sends encrypted, multi-volume ZIP archives of them to AWS S3
Glacier Deep Archive: a full backup each calendar month (UTC), incrementals in
between.  It e-mails a report through AWS SES and restores everything from Deep
Archive with one command.  See README.md for the command lines.

The module reads top to bottom in the order the data flows:

    settings and errors      -> tunables (environment variables), exit codes
    platform layer           -> the only place where Windows and POSIX differ
    names and time stamps    -> S3 object names (SPEC section 5)
    arguments                -> positional arguments of every operation (SPEC 3)
    instruction file         -> parsing, mount directories, exclusions (SPEC 4)
    selection                -> which files of a mount are backed up
    log and report           -> the dated log file and the SES e-mail (SPEC 6)
    S3 catalog               -> what complete backup sets the bucket holds
    child run                -> the per-mount pass: mirror, 7-Zip, validation
    upload                   -> volumes as DEEP_ARCHIVE, then the indicator
    backup operations        -> regular-backup, incremental-only-backup
    restore operations       -> one-step and multi-step restoration (SPEC 7)
    Aam_Auto_Backup          -> dispatch on the operation argument
"""

import contextlib
import dataclasses
import datetime as dt
import email.utils
import enum
import hashlib
import io
import json
import ntpath
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

VERSION = "1.0.0"
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
EXIT_INTERRUPTED = 130    # Ctrl-C or SIGTERM

DEFAULT_VOLUME_SIZE = 4_000_000_000
# Measured (README, Performance): -mx1 is ~3x faster than -mx5 on mixed data for
# +2.5% size (+0.4% on already-compressed data); -mx3 gives -mx1's output, slower.
DEFAULT_COMPRESSION_LEVEL = 1
DEFAULT_REGION = "us-east-1"
MONTHS_SCANNED = 6          # the current UTC month and the previous five
DEEP_ARCHIVE = "DEEP_ARCHIVE"


class AamError(Exception):
    """An error the user can act on; the message says what and where."""

    exit_code = EXIT_FAILURE


class UsageError(AamError):
    exit_code = EXIT_USAGE

    def __init__(self, message, operation=None):
        super().__init__(message)
        self.operation = operation


class InstructionError(AamError):
    exit_code = EXIT_INSTRUCTIONS


class LockTimeout(AamError):
    exit_code = EXIT_LOCKED


class NoBackupSet(AamError):
    exit_code = EXIT_NO_BACKUP_SET


class Refused(AamError):
    exit_code = EXIT_REFUSED


class Interrupted(BaseException):
    """SIGTERM; like KeyboardInterrupt it passes 'except Exception' on its way out,
    so that cleanup (aborting multipart uploads, deleting the work directory) runs."""

    exit_code = EXIT_INTERRUPTED


_checkpoint_passes = {}


def checkpoint(name):
    """Crash tests: AAM_TEST_CRASH_AT=<name>[:<n>] kills this process (SIGKILL) the
    n-th time it passes checkpoint <name>, to prove that a crash there loses nothing."""
    spec = os.environ.get("AAM_TEST_CRASH_AT")
    if not spec or spec.partition(":")[0] != name:
        return
    _checkpoint_passes[name] = _checkpoint_passes.get(name, 0) + 1
    if _checkpoint_passes[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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


@dataclasses.dataclass
class Settings:
    """Tunables the seed fixes; each can be overridden by an environment variable."""

    volume_size: int
    compression_level: int
    temp_root: str
    seven_zip: str
    lock_file: str
    region: str
    ses_region: str
    restore_tier: str
    restore_poll_seconds: int

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
            compression_level=level,
            temp_root=temp_root,
            seven_zip=os.environ.get("AAM_7ZIP") or platform.find_seven_zip(),
            lock_file=(os.environ.get("AAM_LOCK_FILE")
                       or os.path.join(temp_root, "aam_auto_backup.lock")),
            region=region,
            ses_region=os.environ.get("AAM_SES_REGION") or region,
            restore_tier=tier,
            restore_poll_seconds=_env_int("AAM_RESTORE_POLL_SECONDS", 1800, 1),
        )


# ============================================================================
# Platform layer: every Windows/POSIX difference lives here
# ============================================================================

# Success markers printed by the child's generated script and checked by the
# parent (seed step 5.4.2).  Lines are matched exactly.
MARK_PREFIX = "AAM Auto Backup: "
MARK_NOTHING_TO_ARCHIVE = MARK_PREFIX + "no files to back up incrementally."
MARK_VALIDATION_FAILURE = MARK_PREFIX + "validation failure: "
MARK_RESULT = MARK_PREFIX + "result: "


class PosixPlatform:
    """Linux and macOS: no shadow copy; the child reads the live directory."""

    name = "posix"
    sep = "/"
    case_insensitive = False
    # List files hold file names as raw bytes (names need not be valid UTF-8).
    list_charset_switch = "-scsWIN"
    invalid_name_chars = ""
    # Whether a restore must check each name with cannot_create.
    refuses_names = False
    script_name = "backup_script.sh"
    mirror_tool = "rsync"
    script_kind = "backup script"

    # -- paths ---------------------------------------------------------------
    def default_temp_root(self):
        return tempfile.gettempdir()

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
        """SPEC 5: the mount path with ':' and separators replaced by '-'."""
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

    def changed_time(self, st):
        # The inode change time catches a file copied in with an old mtime.
        return max(st.st_mtime, st.st_ctime)

    def moved_since(self, st, since_ts):
        """A directory moved or renamed (not just added to) since since_ts: a rename
        changes its inode change time but not its modification time."""
        return st.st_ctime >= since_ts and st.st_mtime < since_ts

    def decode_output(self, data):
        return data.decode("utf-8", errors="replace")

    # -- processes ---------------------------------------------------------
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

    def stop_group(self, process):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    can_pause_group = True

    def pause_group(self, process, paused):
        """SIGSTOP/SIGCONT the whole group (7-Zip waits while the upload catches up)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    # -- the child (re-invocation) -----------------------------------------
    def child_view_root(self, mount, drive_letter):
        return mount

    def child_command(self, python, script, child_args, mount, drive_letter):
        return [python, script] + list(child_args)

    # -- generated script --------------------------------------------------
    def marker(self, kind):
        """The line the generated script prints when 'script', 'mirror' or 'archive'
        succeeded; the parent checks for exactly these lines (seed step 5.4.2)."""
        tool = {"script": self.script_kind, "mirror": self.mirror_tool,
                "archive": "7-Zip"}[kind]
        return f"{MARK_PREFIX}{tool} execution success."

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

    def mirror_commands(self, view_root, target, plan, keep, work_dir):
        """rsync with the same inclusion/exclusion result as the selection."""
        rules_file = os.path.join(work_dir, MIRROR_RULES)
        # NUL-separated (--from0) so that any file name, even with a newline, fits.
        _write_private_bytes(rules_file, b"".join(
            rule.encode("utf-8", "surrogateescape") + b"\0" for rule in rsync_rules(plan)))
        argv = ["rsync", "-a", "--from0", f"--filter=merge {rules_file}"]
        if not keep:
            argv.append("--delete")
        argv += ["--", "./", target.rstrip("/") + "/"]
        marker = self.marker("mirror")
        return [
            " ".join(self.quote(a) for a in argv),
            "status=$?",
            # 23: some files could not be copied; 24: some vanished while copying.  The
            # mirror is made; the validation that follows reports each file missing.
            'if [ "$status" -eq 0 ] || [ "$status" -eq 23 ] || [ "$status" -eq 24 ]; then',
            f"  echo {self.quote(marker)}",
            "else",
            '  echo "AAM Auto Backup: rsync failed with exit code $status."',
            "fi",
        ]

    def archive_commands(self, seven_zip_argv, key_variable):
        """7-Zip reads the key from stdin, so it never appears in a process list."""
        marker = self.marker("archive")
        command = " ".join(self.quote(a) for a in seven_zip_argv)
        return [
            f'printf "%s\\n" "${key_variable}" | LC_ALL=C.UTF-8 {command}',
            "status=$?",
            # 1: warnings (a file could not be read or vanished); the archive is valid
            # and the archive check that follows reports each file that is missing.
            'if [ "$status" -eq 0 ] || [ "$status" -eq 1 ]; then',
            f"  echo {self.quote(marker)}",
            "else",
            '  echo "AAM Auto Backup: 7-Zip failed with exit code $status."',
            "fi",
        ]

    def password_switch(self, key_variable):
        return "-p"

    def missing_marker_messages(self):
        return {
            "script": "No backup script execution success message. Aborting backup.",
            "mirror": "No rsync execution success message. Aborting backup.",
            "archive": "No 7-Zip execution success message. Aborting backup.",
        }

    def list_file_line(self, relative_path, is_dir):
        return relative_path + ("/" if is_dir else "")

    # -- restore -------------------------------------------------------------
    def cannot_create(self, relative_path):
        """Why a path a backup holds cannot be created here (None: it can).

        Linux and macOS create any name the backups hold: they came from POSIX
        file systems or from Windows, whose names are a subset.
        """
        return None


class WindowsPlatform(PosixPlatform):
    """Windows, faithful to the seed: ShadowSpawn (VSS), Robocopy, 7z.exe.

    The command lines are the ones the seed's author tested by hand
    (spec-notes/part6.md sections 1-3, part7.md 1.1); every deviation from
    them is explained where it is made.  Windows command lines are built as
    strings, not lists: ShadowSpawn and cmd.exe parse their own command lines.
    """

    name = "windows"
    sep = "\\"
    case_insensitive = True
    list_charset_switch = "-scsUTF-8"
    invalid_name_chars = '<>:"|'
    refuses_names = True
    script_name = "AAM_Auto_Backup_shadow_copy.bat"
    mirror_tool = "Robocopy"
    script_kind = "backup batch file"
    shadow_spawn_name = "ShadowSpawn.exe"
    # The seed's machine (US English): the console code page when none can be read.
    fallback_code_page = 437
    # MAX_PATH (260) minus the 12 characters CreateDirectory keeps for a file name.
    long_path_threshold = 248
    # cmd.exe's longest command line; a longer batch-file line does not run.
    cmd_line_limit = 8191
    # Device names Windows reserves in every directory, with any extension.
    reserved_names = frozenset(["CON", "PRN", "AUX", "NUL"] +
                               [f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10)])
    # Robocopy exit codes below 8 are success (files copied, extras, mismatches).
    robocopy_failure_code = 8
    # Robocopy's defaults (1,000,000 retries, 30 s apart) would hold the lock for
    # months on one unwritable destination file.
    robocopy_retry_switches = ("/r:2", "/w:5")
    robocopy_log_name = "robocopy_log.txt"

    def default_temp_root(self):
        return "c:\\temp"

    def find_seven_zip(self):
        here = os.path.dirname(os.path.abspath(__file__))
        local = os.path.join(here, "7z.exe")
        return local if os.path.exists(local) else (shutil.which("7z") or "7z.exe")

    def is_absolute(self, path):
        return re.match(r"^[A-Za-z]:\\", path) is not None

    def normalize(self, path):
        path = re.sub(r"\\+", "\\\\", path.replace("/", "\\"))
        path = path.rstrip("\\")
        return path + "\\" if re.fullmatch(r"[A-Za-z]:", path) else path

    def comparable(self, path):
        return path.lower()

    def split(self, path):
        return path.rstrip("\\").split("\\")

    def join(self, elements):
        return "\\".join(elements) if len(elements) > 1 else elements[0] + "\\"

    def source_name(self, mount):
        return mount.lower().replace(":", "-").replace("\\", "-").rstrip("-")

    def mirror_directory(self, mirror_root, mount):
        """<dest>\\<drive letter>\\<rest of the path> (seed bug 7: F:\\backup\\main\\c\\users)."""
        drive, rest = mount[0], mount[2:].lstrip("\\")
        return ntpath.join(mirror_root, drive.lower(), rest) if rest else \
            ntpath.join(mirror_root, drive.lower())

    def check_drive_letter(self, text):
        """Argument 12: the free drive letter ShadowSpawn shows the shadow copy at."""
        if not re.fullmatch(r"[A-Za-z]:?", text):
            raise ValueError("must be one drive letter, such as q")
        return text.rstrip(":").lower()

    def long_path(self, path):
        """The extended-length form (\\\\?\\C:\\...) of a path long enough to hit MAX_PATH.

        Seed bugs 2 and 5: a 265-character path on the shadow drive could be
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

    # No SIGSTOP on Windows: finished volumes just wait for the upload.
    can_pause_group = False

    def stop_group(self, process):
        # taskkill /T ends the whole tree (ShadowSpawn, python, robocopy, 7z.exe).
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def is_junction(self, st):
        """A directory junction/mount point: not followed (Robocopy /xjd does the same;
        the profile's legacy junctions deny listing, and on the shadow drive a
        junction leads back to the live disk)."""
        # Only mount points: OneDrive's cloud folders are reparse points too, and are
        # real directories that must be backed up.
        return getattr(st, "st_reparse_tag", 0) == 0xA0000003   # IO_REPARSE_TAG_MOUNT_POINT

    def moved_since(self, st, since_ts):
        # Windows exposes no change time of a directory: a moved directory's files
        # come back at their old path until the next full backup (README).
        return False

    def changed_time(self, st):
        # Windows: the creation time catches a file copied in with an old mtime.
        created = getattr(st, "st_birthtime", st.st_ctime)
        return max(st.st_mtime, created)

    def list_file_line(self, relative_path, is_dir):
        # 7-Zip list files name directories with a trailing '\' (seed TEST 1 and 2).
        return relative_path + ("\\" if is_dir else "")

    def cannot_create(self, relative_path):
        """Why Windows cannot create this path from a backup made on Linux or macOS.

        Windows names cannot hold control characters or <>:"|?*, cannot end with
        a dot or a space, and cannot be a device name (CON, aux.txt, ...); 7-Zip
        would write such a name changed (a:b.txt as a_b.txt), over another file
        of that name.
        """
        for name in relative_path.split(self.sep):
            bad = sorted({c for c in name if c in self.invalid_name_chars + "?*"
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

    # -- the child's output file (seed bug 1) ---------------------------------
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
        on the seed's machine.  Bytes the code page lacks become U+FFFD.
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
        quote (seed: "no \\ at the end of source and target Robocopy
        directories!").  Windows paths and names cannot hold '"'.
        """
        if '"' in text:
            raise AamError(f"{text!r}: a double quote cannot be passed on a Windows "
                           "command line")
        return '"' + re.sub(r"(\\+)$", r"\1\1", text) + '"'

    def child_command(self, python, script, child_args, mount, drive_letter):
        """ShadowSpawn.exe "<mount>" q: "<python>" "-X" "utf8" "<script>" <15 child args>.

        The seed ran this through os.system with '> shadow_copy_command_output.txt';
        here the parent hands the output file to ShadowSpawn as its standard
        output handle (what cmd.exe's '>' does), so no cmd.exe parses paths.
        ShadowSpawn splits its command line itself (quotes kept, no backslash
        escapes) and takes any word starting with '-' for one of its own
        switches, so every word after the drive letter is quoted; python then
        parses the rest by the MSVCRT rules.  Deviations from the seed: full
        paths for ShadowSpawn.exe and the script (the working directory is not
        always the program directory), and -X utf8 so that the child writes its
        output in UTF-8 (seed bug 1).
        """
        shadow_spawn = ntpath.join(ntpath.dirname(script), self.shadow_spawn_name)
        operation, agent = child_args[:2]
        words = [self.quote(shadow_spawn), self.quote(mount),
                 f"{(drive_letter or 'q').lower()}:", self.quote(python),
                 self.quote("-X"), self.quote("utf8"), self.quote(script), operation, agent]
        words += [self.quote(arg) for arg in child_args[2:]]
        return " ".join(words)

    # -- the generated batch file --------------------------------------------
    def bat_quote(self, text):
        """quote() for a batch-file line: '%' doubled so cmd.exe keeps it."""
        return self.quote(text).replace("%", "%%")

    def write_script(self, path, view_root, commands):
        """The seed's batch file: cd /D to the shadow drive, robocopy, 7z (seed 1.5).

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

    def mirror_commands(self, view_root, target, plan, keep, work_dir):
        """robocopy "q:" "<target>" /e [/purge] /unilog:"..." /xd ... /xf ... (seed 2.2).

        Robocopy can only exclude, so /xd names every directory of the mount that
        is neither listed nor on the way to a listed one (seed 7.4) and /xf every
        file lying outside the listed directories, both as absolute paths on the
        shadow drive; then the user's exclusions.  Added to the seed's command:
        /xjd (a junction on the shadow drive leads back to the live disk, and the
        profile's legacy junctions deny listing), bounded retries, /np and /tee
        (the report also goes to the log, without progress counters).
        """
        dirs, files, problems = self.robocopy_exclusions(view_root, plan)
        words = [r'"%SystemRoot%\System32\robocopy.exe"',
                 self.bat_quote(view_root.rstrip(self.sep)), self.bat_quote(target), "/e"]
        if not keep:
            words.append("/purge")
        words.append("/unilog:" + self.bat_quote(ntpath.join(work_dir, self.robocopy_log_name)))
        if dirs:
            words += ["/xd"] + [self.bat_quote(d) for d in dirs]
        if files:
            words += ["/xf"] + [self.bat_quote(f) for f in files]
        words += ["/xjd", *self.robocopy_retry_switches, "/np", "/tee"]
        command = " ".join(words)
        if len(command) > self.cmd_line_limit:
            raise AamError(
                f"The Robocopy command for {view_root} would be {len(command)} characters, "
                f"over cmd.exe's limit of {self.cmd_line_limit}: too many directories and "
                "files lie beside the listed directories. List their parent directory "
                "instead, or move the loose files into a directory.")
        lines = [self.echo_line(MARK_VALIDATION_FAILURE + p) for p in problems]
        return lines + [command, self.status_line(self.robocopy_failure_code, "mirror")]

    def archive_commands(self, seven_zip_argv, key_variable):
        """7z.exe with the seed's list files; the key goes to its standard input.

        As on POSIX, the key is on no command line: a second cmd.exe with
        delayed expansion echoes the environment variable into the pipe ('!'
        expansion happens after parsing, so no character of the key is special;
        '&rem ' keeps a trailing blank out of the echo).  7-Zip reads stdin in
        text mode, so the CR of echo's CRLF is not part of the password.
        """
        if self.delayed_expansion_by_default():
            raise AamError(
                "cmd.exe expands '!' by default on this computer (registry value "
                "DelayedExpansion under Software\\Microsoft\\Command Processor), so the "
                "archive key would appear on a command line; set it to 0.")
        feed = f'"%ComSpec%" /d /v:on /c "echo(!{key_variable}!&rem "'
        command = " ".join(self.seven_zip_word(index, arg)
                           for index, arg in enumerate(seven_zip_argv))
        return [f"{feed}| {command}", self.status_line(1, "archive")]

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

    def seven_zip_word(self, index, arg):
        """One 7z.exe argument in the seed's form: "<exe>", switches bare, @"<list>"."""
        list_switch = re.fullmatch(r"((?:-[ix]r?-?)?@)(.+)", arg)
        if index and list_switch:
            return list_switch[1] + self.bat_quote(list_switch[2])
        if index and re.fullmatch(r"[A-Za-z]|-[A-Za-z0-9=.+:-]+", arg):
            return arg
        return self.bat_quote(arg)

    def status_line(self, failure_code, kind):
        """Echo the tool's success marker, or its exit code (errorlevel >= failure_code)."""
        tool = self.marker(kind).removeprefix(MARK_PREFIX).removesuffix(" execution success.")
        return (f"if errorlevel {failure_code} (echo {MARK_PREFIX}{tool} failed with exit "
                f"code %ERRORLEVEL%.) else (echo {self.marker(kind)})")

    def echo_line(self, text):
        """A batch line printing text as it is (cmd.exe's special characters escaped)."""
        escaped = re.sub(r"([\^&|<>()])", r"^\1", text).replace("%", "%%")
        return "echo(" + escaped

    # -- what Robocopy must skip ----------------------------------------------
    def robocopy_exclusions(self, view_root, plan):
        """(/xd entries, /xf entries, problems) for one mount on the shadow drive.

        Name patterns stay names (Robocopy matches them at any depth), except a
        pattern starting with '-', which Robocopy takes for a switch (seed 7.2:
        "not worth bothering with"), and a directory pattern that matches a
        directory leading to a listed one, which would drop the listed one: those
        are replaced by the exact paths the selection excludes.
        """
        outside_dirs, outside_files, problems = self.scan_outside_listed(view_root, plan)
        dirs = [self.view_path(view_root, rel)
                for rel in outside_dirs + plan.excluded_dir_paths]
        files = [self.view_path(view_root, rel)
                 for rel in outside_files + plan.excluded_file_paths]
        ancestors = {part for listed in plan.listed if listed
                     for part in listed.split(self.sep)[:-1]}
        exact_dirs, exact_files = [], []
        for pattern in plan.dir_patterns:
            regex = wildcard_regex(pattern, True)
            if pattern.startswith("-") or any(regex.fullmatch(a) for a in ancestors):
                exact_dirs.append(regex)
            else:
                dirs.append(pattern)
        for pattern in plan.file_patterns:
            if pattern.startswith("-"):
                exact_files.append(wildcard_regex(pattern, True))
            else:
                files.append(pattern)
        if exact_dirs or exact_files:
            # Unreadable directories are reported by the child's own walk.
            selection = walk_selection(view_root, plan, self)
            for rel, is_dir in selection.excluded:
                name = rel.rsplit(self.sep, 1)[-1]
                if any(r.fullmatch(name) for r in (exact_dirs if is_dir else exact_files)):
                    (dirs if is_dir else files).append(self.view_path(view_root, rel))
        return self.unique(dirs), self.unique(files), problems

    def unique(self, paths):
        """paths without repeats, compared case-insensitively, first spelling kept."""
        seen, kept = set(), []
        for path in paths:
            if self.comparable(path) not in seen:
                seen.add(self.comparable(path))
                kept.append(path)
        return kept

    def scan_outside_listed(self, view_root, plan):
        """Seed 7.4: what lies in the mount outside the listed directories.

        Breadth first from the shadow drive's root: a directory equal to a listed
        one is kept whole, one leading to a listed one is descended into, any
        other is returned (for /xd); every file met on the way lies outside the
        listed directories (for /xf).  With the fixes of spec-notes part6 Q9: the
        name is joined to its parent, and 'leads to' means a prefix up to a
        separator ('test' does not lead to 'test2\\x').
        """
        listed = {self.comparable(rel) for rel in plan.listed}
        dirs, files, problems = [], [], []
        level = [] if "" in listed else [""]
        while level:
            next_level = []
            for parent in level:
                where = self.view_path(view_root, parent)
                try:
                    with os.scandir(self.long_path(where)) as iterator:
                        entries = sorted(iterator, key=lambda e: (e.name.lower(), e.name))
                except OSError as problem:
                    problems.append(f"cannot read directory {where}: "
                                    f"{problem.strerror or problem}")
                    continue
                for entry in entries:
                    rel = parent + self.sep + entry.name if parent else entry.name
                    key = self.comparable(rel)
                    if not entry.is_dir(follow_symlinks=False):
                        files.append(rel)
                    elif any(item.startswith(key + self.sep) for item in listed):
                        next_level.append(rel)
                    elif key not in listed:
                        dirs.append(rel)
            level = next_level
        return dirs, files, problems

    def missing_marker_messages(self):
        return {
            "script": "No backup batch file execution success message. Aborting backup.",
            "mirror": "No Robocopy execution success message. Aborting backup.",
            "archive": "No 7z.exe execution success message. Aborting backup.",
        }


def current_platform():
    return WindowsPlatform() if os.name == "nt" else PosixPlatform()


def _write_private_bytes(path, data):
    """Create a file readable only by its owner (it may name private paths)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_private_text(path, text, encoding="utf-8"):
    """Create a file readable only by its owner (it may name private paths)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding=encoding, errors="surrogateescape",
                   newline="\n") as handle:
        handle.write(text)


# ============================================================================
# Names and time stamps (SPEC 5)
# ============================================================================

STAMP_FORMAT = "%Y%m%d_%H%M%S.%f"        # in object names, UTC
ARG_STAMP_FORMAT = "%Y%m%d %H%M%S.%f"    # in child arguments, UTC
NO_STAMP_ARG = " "                        # the seed's "none" for child args 3-4

OBJECT_NAME_RE = re.compile(
    r"^(?P<location>[^_]+)_(?P<full>\d{8}_\d{6}\.\d{6})_"
    r"(?P<incr>0_0\.0|\d{8}_\d{6}\.\d{6})_(?P<flag>no|yes)_(?P<rest>.+)$")
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


@dataclasses.dataclass(frozen=True)
class ObjectName:
    """One S3 object of a backup: a volume or a completion indicator."""

    location: str
    full: dt.datetime
    incremental: object          # datetime, or None for a full backup
    indicator: bool
    source: str
    volume: object = None        # int for volumes, None for indicators

    @property
    def key(self):
        incr = "0_0.0" if self.incremental is None else format_stamp(self.incremental)
        key = (f"{self.location}_{format_stamp(self.full)}_{incr}_"
               f"{'yes' if self.indicator else 'no'}_{self.source}")
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
        volume = VOLUME_SUFFIX_RE.match(match["rest"])
        if not volume:
            return None
        return cls(match["location"], full, incr, False, volume["source"],
                   int(volume["number"]))


def month_prefixes(location, now, months=MONTHS_SCANNED):
    """Key prefixes of the current UTC month and the previous months, newest first."""
    year, month = now.year, now.month
    prefixes = []
    for _ in range(months):
        prefixes.append(f"{location}_{year:04d}{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return prefixes


# ============================================================================
# Arguments (SPEC 3)
# ============================================================================

REGULAR_BACKUP = "regular-backup"
INCREMENTAL_ONLY_BACKUP = "incremental-only-backup"
BACKUP_OPERATIONS = (REGULAR_BACKUP, INCREMENTAL_ONLY_BACKUP)
ONE_STEP_RESTORE = "one-step-aws-data-restoration"
THAW_STEP = "restore-to-aws-s3-from-aws-s3-glacier-deep-archive"
STATUS_STEP = "check-aws-s3-restoration-status"
DOWNLOAD_STEP = "download-to-local-computer-from-aws-s3"
EXTRACT_STEP = "decompress-all-downloaded-backup-files"
RESTORE_OPERATIONS = (ONE_STEP_RESTORE, THAW_STEP, STATUS_STEP, DOWNLOAD_STEP, EXTRACT_STEP)
USER_AGENT = "user"
CHILD_AGENT = "ShadowSpawn"
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
LOCATION_RE = re.compile(r"^[^\W_][\w.-]*$")
KEY_RE = re.compile(r"^[\x20-\x7e]{1,99}$")
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


_destination_types.text = lambda value: "|".join(sorted(value))


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


_stamp_or_none.text = lambda value: format_arg_stamp(value)


def _stamp(text):
    value = _stamp_or_none(text)
    if value is None:
        raise ValueError("must be 'YYYYMMDD HHMMSS.ffffff'")
    return value


_stamp.text = _stamp_or_none.text


def _scope(text):
    try:
        return Scope(text)
    except ValueError:
        raise ValueError("must be " + " or ".join(repr(s.value) for s in Scope))


_scope.text = lambda value: value.value
_BOOL = _flag("True", "False")
_YES_NO = _flag("yes", "no")


# -- the tables: one line per positional argument ----------------------------------

@dataclasses.dataclass(frozen=True)
class Arg:
    """One positional argument of an operation.

    check turns the text into the value (or raises ValueError saying what is
    wrong); a secret also accepts env:NAME and is masked in the log; the
    check's optional .text attribute turns a value back into its text (the
    child's command line).
    """

    field: str
    label: str
    check: object = _text
    secret: bool = False

    def text(self, value):
        return getattr(self.check, "text", str)(value)


class ArgTable:
    """The positional arguments of one kind of operation, argument 1 first."""

    def __init__(self, title, *args):
        self.title = title
        self.args = args
        self.numbers = {arg.field: number for number, arg in enumerate(args, 1)}

    def __iter__(self):
        return iter(self.args)

    def __len__(self):
        return len(self.args)

    def number(self, field):
        return self.numbers[field]

    def label(self, field):
        return self.args[self.numbers[field] - 1].label

    def error(self, field, problem, operation, text=None):
        """A UsageError naming the argument by number and label."""
        shown = "" if text is None else f": {text!r}"
        return UsageError(f"argument {self.number(field)} ({self.label(field)}) "
                          f"{problem}{shown}", operation)

    def parse(self, argv, operation):
        """The checked values of argv, by field name, or a UsageError."""
        if len(argv) != len(self.args):
            raise UsageError(f"{operation} takes {len(self.args)} arguments, "
                             f"{len(argv)} were given", operation)
        values = {}
        for number, (text, arg) in enumerate(zip(argv, self.args), 1):
            if arg.secret:
                text = resolve_secret(text, f"argument {number} ({arg.label})", operation)
            try:
                values[arg.field] = arg.check(text)
            except ValueError as problem:
                shown = "" if arg.secret else f": {text!r}"
                raise UsageError(f"argument {number} ({arg.label}) {problem}{shown}",
                                 operation)
            if arg.secret:
                values[arg.field] = Secret(values[arg.field])
        return Arguments(self, list(argv), values)

    def to_argv(self, values):
        """The argument texts for values by field name (the child's command line)."""
        return [arg.text(values[arg.field]) for arg in self.args]

    def argv(self, **texts):
        """A command line's arguments from their texts by field name (tools, tests)."""
        unknown = set(texts) - set(self.numbers)
        missing = set(self.numbers) - set(texts)
        if unknown or missing:
            raise KeyError(f"arguments unknown {sorted(unknown)}, missing {sorted(missing)}")
        return [texts[arg.field] for arg in self.args]

    def usage(self, operation):
        lines = [f"usage: aam_auto_backup.py {operation or self.title} (all {len(self)} "
                 "arguments, positional; write empty values as \"\"):"]
        for number, arg in enumerate(self.args, 1):
            note = "  (accepts env:NAME)" if arg.secret else ""
            lines.append(f"  {number:2d}. {arg.label}{note}")
        return "\n".join(lines)


class Arguments:
    """The checked arguments of one command line, as attributes named by the table."""

    def __init__(self, table, raw, values):
        self.table, self.raw = table, raw
        self.__dict__.update(values)

    @property
    def secrets(self):
        return [getattr(self, arg.field) for arg in self.table if arg.secret]

    def to_argv(self):
        return self.table.to_argv(vars(self))

    def masked(self):
        """The command arguments, one per line, with every secret masked (for the log)."""
        return [f"{number:2d}. {arg.label}: {mask_argument(text, arg.secret)}"
                for number, (text, arg) in enumerate(zip(self.raw, self.table), 1)]


BACKUP_ARGS = ArgTable(
    "regular-backup|incremental-only-backup",
    Arg("operation", "operation", _choice(*BACKUP_OPERATIONS)),
    Arg("agent", "execution agent", _choice(USER_AGENT)),
    Arg("python", "python executable", _executable),
    Arg("lock_poll", "lock polling period (seconds)", _integer(1)),
    Arg("lock_wait", "lock total wait (seconds)", _integer(0)),
    Arg("log_dir", "log directory", _path),
    Arg("send_email", "send e-mail report (True/False)", _BOOL),
    Arg("sender_name", "e-mail sender name"),
    Arg("sender_address", "e-mail sender address"),
    Arg("recipient", "e-mail recipient address"),
    Arg("instruction_file", "instruction file", _path),
    Arg("drive_letter", "shadow-copy drive letter", _drive_letter),
    Arg("destinations", "destination types (local, AWS, local|AWS)", _destination_types),
    Arg("mirror_root", "local mirror directory", _optional_path),
    Arg("keep", "keep files gone from the source (True/False)", _BOOL),
    Arg("key", "archive encryption key", secret=True),
    Arg("bucket", "S3 bucket"),
    Arg("location", "location name", _location),
    Arg("access_key_id", "AWS access key ID", secret=True),
    Arg("secret_access_key", "AWS secret access key", secret=True),
    Arg("force_full", "force full backup (yes/no)", _YES_NO),
    Arg("auto_force_full", "automatic force full backup (yes/no)", _YES_NO),
)

# The child pass (started by the user-mode pass, never typed); the key travels
# as an env:NAME reference, never as text on the command line.
CHILD_ARGS = ArgTable(
    "<operation> ShadowSpawn ... (the child pass; never typed)",
    Arg("operation", "operation", _choice(*BACKUP_OPERATIONS)),
    Arg("agent", "execution agent", _choice(CHILD_AGENT)),
    Arg("latest_full", "latest complete full backup (UTC)", _stamp_or_none),
    Arg("latest_incremental", "latest complete incremental backup (UTC)", _stamp_or_none),
    Arg("start", "backup start (UTC)", _stamp),
    Arg("mount", "backup source (mount) directory", _path),
    Arg("drive_letter", "shadow-copy drive letter", _drive_letter),
    Arg("destinations", "destination types", _destination_types),
    Arg("mirror_root", "local mirror directory", _optional_path),
    Arg("keep", "keep files gone from the source (True/False)", _BOOL),
    Arg("key", "archive encryption key", secret=True),
    Arg("location", "location name", _location),
    Arg("work_dir", "archive work directory", _path),
    Arg("force_full", "force full backup (yes/no)", _YES_NO),
    Arg("scope", "backup scope", _scope),
)

RESTORE_ARGS = ArgTable(
    "|".join(RESTORE_OPERATIONS),
    Arg("operation", "operation", _choice(*RESTORE_OPERATIONS)),
    Arg("log_dir", "log directory", _path),
    Arg("send_email", "send e-mail report (True/False)", _BOOL),
    Arg("sender_name", "e-mail sender name"),
    Arg("sender_address", "e-mail sender address"),
    Arg("recipient", "e-mail recipient address"),
    Arg("days", "restoration period (days)", _integer(1, 36500)),
    Arg("key", "archive decryption key", _key, secret=True),
    Arg("bucket", "S3 bucket", _bucket),
    Arg("location", "location name", _location),
    Arg("access_key_id", "AWS access key ID", secret=True),
    Arg("secret_access_key", "AWS secret access key", secret=True),
    Arg("destination", "restoration destination directory", _path),
)

OPERATION_TABLES = {CHILD_AGENT: CHILD_ARGS,
                    **{op: BACKUP_ARGS for op in BACKUP_OPERATIONS},
                    **{op: RESTORE_ARGS for op in RESTORE_OPERATIONS}}


def usage_text(operation):
    """A short usage text for one operation (or for all of them)."""
    table = OPERATION_TABLES.get(operation)
    if table is not None:
        return table.usage(None if operation == CHILD_AGENT else operation)
    lines = ["usage: aam_auto_backup.py <operation> <arguments...>",
             "operations (all arguments are positional and all must be present):"]
    lines += [f"  {op}  ({len(OPERATION_TABLES[op])} arguments)"
              for op in BACKUP_OPERATIONS + RESTORE_OPERATIONS]
    lines.append("Run 'aam_auto_backup.py <operation>' to see its arguments; "
                 "README.md has the details.")
    return "\n".join(lines)


def resolve_secret(text, where, operation):
    """'env:NAME' reads the secret from environment variable NAME."""
    if text.startswith("env:"):
        name = text[4:]
        if name not in os.environ:
            raise UsageError(f"{where}: environment variable {name} is not set", operation)
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
    if args.send_email:
        check_email_addresses(args, BACKUP_ARGS, ("sender_address", "recipient"))
    if "local" in args.destinations and not args.mirror_root:
        raise BACKUP_ARGS.error("mirror_root", "is required when argument "
                                f"{BACKUP_ARGS.number('destinations')} includes local",
                                operation)
    if "AWS" in args.destinations:
        aws_rule = f"when argument {BACKUP_ARGS.number('destinations')} includes AWS"
        for field, check in (("bucket", _bucket), ("key", _key)):
            try:
                check(getattr(args, field))
            except ValueError as problem:
                shown = None if field == "key" else getattr(args, field)
                raise BACKUP_ARGS.error(field, f"{problem} {aws_rule}", operation, shown)
    check_key_pair(args, BACKUP_ARGS)
    return args


def parse_child_args(argv):
    return CHILD_ARGS.parse(argv, CHILD_AGENT)


def parse_restore_args(argv):
    operation = argv[0] if argv else ""
    args = RESTORE_ARGS.parse(argv, operation)
    if args.send_email and operation == ONE_STEP_RESTORE:
        check_email_addresses(args, RESTORE_ARGS, ("sender_address", "recipient"))
    check_key_pair(args, RESTORE_ARGS)
    return args


def check_email_addresses(args, table, fields):
    for field in fields:
        if "@" not in getattr(args, field):
            raise table.error(field, "must be an e-mail address when argument "
                              f"{table.number('send_email')} is True", args.operation,
                              getattr(args, field))


def check_key_pair(args, table):
    if bool(args.access_key_id) != bool(args.secret_access_key):
        first = table.number("access_key_id")
        raise UsageError(f"arguments {first} and {first + 1} must both be given, or both "
                         "be \"\" to use the default AWS credential chain", args.operation)


def child_arguments(**values):
    """The child's arguments from values by field name (the parent's side)."""
    return Arguments(CHILD_ARGS, [], values)


# ============================================================================
# Instruction file (SPEC 4)
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
        raise InstructionError(f"argument 11: the instruction file {path} does not exist")
    except OSError as problem:
        raise InstructionError(f"argument 11: the instruction file {path} cannot be read: "
                               f"{problem.strerror}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as problem:
        line = data[:problem.start].count(b"\n") + 1
        raise InstructionError(f"{path}, line {line}: the file is not UTF-8 text")


def _is_comment(line):
    # '# ...' is a comment; '#*#' (a name pattern) is not.
    return line.startswith("#") and (len(line) == 1 or line[1] in " \t")


def _blocks(text, path):
    """Split the text into its three blocks: [(line number, entry), ...] each.

    One empty line separates blocks; an empty exclusion block is one more empty
    line, so three empty lines in a row skip the excluded-directories block.
    """
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


def parse_instructions(text, path, platform):
    """Parse and check the instruction file; errors name the line."""
    listed, excluded_dirs, excluded_files = _blocks(text, path)
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
    if sep in entry or (platform.name == "windows" and "/" in entry):
        raise InstructionError(f"{where}: {entry!r} is a relative path; give a {kind} "
                               "name or an absolute path")
    return Exclusion(entry, number, False)


def compute_mounts(directories, platform):
    """Shortest shared parent directories other than the root (seed 7.3).

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
    dir_paths = [e.text for e in instructions.excluded_dirs if e.is_path]
    file_paths = [e.text for e in instructions.excluded_files if e.is_path]
    dir_patterns = [e.text for e in instructions.excluded_dirs if not e.is_path]
    file_patterns = [e.text for e in instructions.excluded_files if not e.is_path]
    for entry in instructions.excluded_dirs + instructions.excluded_files:
        if entry.is_path and not os.path.lexists(platform.long_path(entry.text)):
            notes.append(f"line {entry.line}: ignored, {entry.text} does not exist")
    dir_regexes = [wildcard_regex(p, platform.case_insensitive) for p in dir_patterns]

    # A listed directory that is also excluded is not backed up: exclusion wins.
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
    # A directory inside another listed directory is covered by its parent.
    covered = []
    for path in kept:
        parent = next((o for o in kept if o != path
                       and _relative(path, o, platform) is not None), None)
        if parent:
            notes.append(f"{path} is inside {parent} and is backed up with it")
        else:
            covered.append(path)
    sources = []
    for mount in compute_mounts(covered, platform):
        listed = sorted(r for r in (_relative(p, mount, platform) for p in covered)
                        if r is not None)
        extra = [r for r in (_relative(x, mount, platform) for x in extra_excluded)
                 if r]
        sources.append(SourcePlan(
            mount=_original_case(mount, covered, platform),
            listed=listed,
            excluded_dir_paths=[r for r in (_relative(p, mount, platform)
                                             for p in dir_paths) if r] + extra,
            excluded_file_paths=[r for r in (_relative(p, mount, platform)
                                              for p in file_paths) if r],
            dir_patterns=dir_patterns,
            file_patterns=file_patterns))
    return BackupPlan(sources, notes, covered)


def _original_case(mount, paths, platform):
    """The mount as the user wrote it (mounts are computed on comparable paths)."""
    for path in paths:
        if platform.comparable(path[:len(mount)]) == mount and (
                len(path) == len(mount) or path[len(mount)] == platform.sep
                or mount.endswith(platform.sep)):
            return path[:len(mount)]
    return mount


def write_source_plan(path, plan, view_root, platform):
    """The per-mount instruction copy handed to the child (seed: shadow_copy_instruction.txt).

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

@dataclasses.dataclass(frozen=True)
class FileEntry:
    # no per-entry __dict__: a walk of 100,000 files holds 100,000 of these
    __slots__ = ("path", "size", "mtime", "changed", "is_link")
    path: str          # relative to the mount, platform separators
    size: int
    mtime: float
    changed: float     # platform.changed_time: what an incremental compares
    is_link: bool


@dataclasses.dataclass
class Selection:
    files: list        # FileEntry for regular files and symbolic links
    empty_dirs: list   # relative paths of empty directories
    problems: list     # unreadable directories and files
    specials: list     # sockets, FIFOs, devices: never archived
    excluded: list = dataclasses.field(default_factory=list)   # (relative path, is_dir)
    dir_names: set = dataclasses.field(default_factory=set)    # every directory name seen


class Selector:
    """The single definition of 'excluded' for the walk, validation and tests."""

    def __init__(self, plan, platform):
        comparable, ci = platform.comparable, platform.case_insensitive
        self.comparable = comparable
        self.dir_paths = {comparable(p) for p in plan.excluded_dir_paths}
        self.file_paths = {comparable(p) for p in plan.excluded_file_paths}
        self.dir_regexes = [wildcard_regex(p, ci) for p in plan.dir_patterns]
        self.file_regexes = [wildcard_regex(p, ci) for p in plan.file_patterns]

    def dir_excluded(self, relative, name):
        return (self.comparable(relative) in self.dir_paths
                or any(r.fullmatch(name) for r in self.dir_regexes))

    def file_excluded(self, relative, name):
        return (self.comparable(relative) in self.file_paths
                or any(r.fullmatch(name) for r in self.file_regexes))


def walk_selection(root, plan, platform, since=None):
    """Walk the listed directories of a mount, skipping exclusions.

    Symbolic links are recorded as links and never followed.  since: keep only
    files whose modification or creation/inode-change time is at or after it,
    and everything under a directory that was moved or renamed since then
    (its files keep their old times, but their path is new).
    """
    selector, sep = Selector(plan, platform), platform.sep
    since_ts = None if since is None else since.timestamp()
    selection = Selection([], [], [], [])
    pending = [(rel, since_ts) for rel in sorted(plan.listed, reverse=True)]
    while pending:
        rel_dir, cutoff = pending.pop()
        abs_dir = root.rstrip(sep) + sep + rel_dir if rel_dir else root
        try:
            with os.scandir(platform.long_path(abs_dir)) as iterator:
                entries = sorted(iterator, key=lambda e: e.name)
        except OSError as problem:
            selection.problems.append(f"cannot read directory {abs_dir}: "
                                      f"{problem.strerror or problem}")
            continue
        if not entries and _changed_since(abs_dir, cutoff, platform):
            selection.empty_dirs.append(rel_dir)
        subdirs = []
        for entry in entries:
            rel = rel_dir + sep + entry.name if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as problem:
                selection.problems.append(f"cannot read {abs_dir}{sep}{entry.name}: "
                                          f"{problem.strerror or problem}")
                continue
            if stat.S_ISDIR(st.st_mode) and platform.is_junction(st):
                selection.specials.append(rel)
            elif stat.S_ISDIR(st.st_mode):
                selection.dir_names.add(entry.name)
                if selector.dir_excluded(rel, entry.name):
                    selection.excluded.append((rel, True))
                elif cutoff is not None and platform.moved_since(st, cutoff):
                    subdirs.append((rel, None))
                else:
                    subdirs.append((rel, cutoff))
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                if selector.file_excluded(rel, entry.name):
                    selection.excluded.append((rel, False))
                    continue
                changed = platform.changed_time(st)
                if cutoff is None or changed >= cutoff:
                    selection.files.append(FileEntry(rel, st.st_size, st.st_mtime, changed,
                                                     stat.S_ISLNK(st.st_mode)))
            else:
                selection.specials.append(rel)
        pending.extend(reversed(subdirs))
    return selection


def _changed_since(path, since_ts, platform):
    if since_ts is None:
        return True
    try:
        return platform.changed_time(os.lstat(platform.long_path(path))) >= since_ts
    except OSError:
        return False


# ============================================================================
# Log and report (SPEC 6 steps 1 and 8)
# ============================================================================

# Section headings in the seed's order (spec-notes/part1.md section 5).
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
SECTION_TEMP_DELETE_ERROR = "(if applicable) temporary output files deletion error."
SECTION_EMAIL_ERROR = "(if applicable) email report sending error."
SECTION_SUMMARY = "Summary."


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
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileExistsError:
                counter += 1
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="\n")

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
            print(text, flush=True)

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


def local_time_text(moment):
    """'YYYYMMDD HH:MM:SS.ffffff ZONE' in the computer's local time (e-mail titles)."""
    local = moment.astimezone()
    return f"{local:%Y%m%d %H:%M:%S.%f} {local.tzname() or local.strftime('%z')}"


def send_email_report(session, settings, sender_name, sender, recipient, title, body, log):
    """Send the report through SES; a failure is logged and never fatal."""
    try:
        ses = aws_client(session, "ses", settings.ses_region)
        ses.send_email(
            Source=email.utils.formataddr((sender_name, sender)),
            Destination={"ToAddresses": [recipient]},
            Message={"Subject": {"Data": title, "Charset": "UTF-8"},
                     "Body": {"Text": {"Data": body, "Charset": "UTF-8"}}})
        log.line(f"E-mail report sent to {recipient}: {title}")
        return True
    except Exception as problem:    # noqa: BLE001 - any failure is only logged
        log.section(SECTION_EMAIL_ERROR)
        log.line(f"The e-mail report could not be sent: {describe_aws_error(problem)}")
        return False


# ============================================================================
# S3 catalog: what complete backup sets the bucket holds (SPEC 5)
# ============================================================================

class AwsUnavailable(AamError):
    """S3 could not be reached or refused the request."""


def aws_session(access_key_id, secret_access_key):
    import boto3
    if access_key_id:
        return boto3.session.Session(aws_access_key_id=str(access_key_id),
                                     aws_secret_access_key=str(secret_access_key))
    return boto3.session.Session()


def aws_client(session, service, region):
    """Every client gets an explicit region; the endpoint comes from AWS_ENDPOINT_URL."""
    from botocore.config import Config
    config = Config(retries={"mode": "standard", "max_attempts": 4},
                    connect_timeout=15, read_timeout=120)
    return session.client(service, region_name=region, config=config)


def aws_errors():
    """The exceptions that mean 'AWS could not be reached or refused' (not our bugs)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from boto3.exceptions import Boto3Error
    return (BotoCoreError, ClientError, Boto3Error)


def describe_aws_error(problem):
    """A one-line description of a boto3/botocore error, naming the refused action."""
    response = getattr(problem, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        operation = getattr(problem, "operation_name", "")
        text = f"{error.get('Code', 'Error')}: {error.get('Message', '')}".strip()
        return f"{operation} failed, {text}" if operation else text
    return f"{type(problem).__name__}: {problem}"


@dataclasses.dataclass
class StoredObject:
    name: ObjectName
    size: int


class Catalog:
    """The backup objects of one location, grouped by backup set."""

    def __init__(self):
        self.indicators = {}     # (full, incremental) -> {source: StoredObject}
        self.volumes = {}        # (full, incremental, source) -> [StoredObject]

    @classmethod
    def load(cls, s3, bucket, prefixes):
        catalog = cls()
        paginator = s3.get_paginator("list_objects_v2")
        for prefix in prefixes:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    catalog.add(item["Key"], item.get("Size", 0))
        return catalog

    def add(self, key, size):
        name = ObjectName.parse(key)
        if name is None:
            return
        stored = StoredObject(name, size)
        if name.indicator:
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


# ============================================================================
# Child run: the per-mount pass (mirror, 7-Zip, validation)
# ============================================================================

PLAN_FILE = "shadow_copy_instruction.txt"
OUTPUT_FILE = "shadow_copy_command_output.txt"
INCLUSION_LIST = "inclusion_7z_list_file.txt"
NON_RECURSIVE_LIST = "non-recursive_exclusion_7z_list_file.txt"
RECURSIVE_LIST = "recursive_exclusion_7z_list_file.txt"
MIRROR_RULES = "mirror_filter_rules.txt"
ARCHIVE_DIR = "archives"
FINAL_VOLUME = re.compile(r"backup\.zip\.(\d{3,})")   # closed for good: see final_volumes
ANY_VOLUME = re.compile(r"backup\.zip\.(\d{3,})((?:\.[0-9A-Fa-f]+)?\.tmp)?")
WAITING_VOLUMES = 2       # finished volumes on disk awaiting upload before 7-Zip is paused
WORK_MARKER = ".aam_auto_backup_work"
CHILD_KEY_VARIABLE = "AAM_CHILD_ENCRYPTION_KEY"
MTIME_TOLERANCE = 2.0     # seconds: FAT/exFAT USB drives store times to 2 s


def child_say(text):
    print(text, flush=True)


def seven_zip_add_argv(settings, archive_path, list_files, password_switch, platform):
    """7-Zip 'add' with the seed's switches: ZIP, AES-256, UTF-8 names, volumes."""
    argv = [settings.seven_zip, "a", "-tzip", f"-mx={settings.compression_level}",
            "-mem=AES256", "-mcu=on", password_switch, f"-v{settings.volume_size}b",
            "-bb1", "-bd", "-snl", platform.list_charset_switch, "-sccUTF-8", "-y",
            archive_path]
    inclusion, non_recursive, recursive = list_files
    argv.append("@" + inclusion)
    if non_recursive:
        argv.append("-xr-@" + non_recursive)
    if recursive:
        argv.append("-xr@" + recursive)
    return argv


def write_full_lists(work_dir, plan, selection, platform):
    """The seed's three 7-Zip list files: inclusion, non-recursive and recursive exclusion.

    7-Zip matches a recursive pattern against every path component, ancestors
    of the listed directories included, and a pattern without a trailing
    separator matches directories too.  Where that would differ from the
    selection (a listed directory's parent named like a directory pattern, a
    directory named like a file pattern), the pattern is replaced by the exact
    paths the walk excluded, in the non-recursive list.
    """
    ci = platform.case_insensitive
    ancestors = {part for listed in plan.listed if listed
                 for part in listed.split(platform.sep)[:-1]}
    non_recursive = [list_file_entry(r, True, platform) for r in plan.excluded_dir_paths] + \
        [list_file_entry(r, False, platform) for r in plan.excluded_file_paths]
    recursive, exact = [], []
    for pattern in plan.dir_patterns:
        regex = wildcard_regex(pattern, ci)
        if any(regex.fullmatch(a) for a in ancestors):
            exact.append(lambda rel, is_dir, r=regex: is_dir and r.fullmatch(_name(rel, platform)))
        else:
            recursive.append(platform.list_file_line(pattern, True))
    for pattern in plan.file_patterns:
        regex = wildcard_regex(pattern, ci)
        if any(regex.fullmatch(d) for d in selection.dir_names | ancestors):
            exact.append(lambda rel, is_dir, r=regex: not is_dir and r.fullmatch(_name(rel, platform)))
        else:
            recursive.append(pattern)
    for rel, is_dir in selection.excluded:
        if any(rule(rel, is_dir) for rule in exact):
            non_recursive.append(list_file_entry(rel, is_dir, platform))
    lists = [os.path.join(work_dir, INCLUSION_LIST), None, None]
    included = [list_file_entry(r, True, platform) if r else "*" for r in plan.listed]
    _write_private_text(lists[0], "\n".join(included) + "\n")
    if non_recursive:
        lists[1] = os.path.join(work_dir, NON_RECURSIVE_LIST)
        _write_private_text(lists[1], "\n".join(non_recursive) + "\n")
    if recursive:
        lists[2] = os.path.join(work_dir, RECURSIVE_LIST)
        _write_private_text(lists[2], "\n".join(recursive) + "\n")
    return lists


def _name(relative, platform):
    return relative.rsplit(platform.sep, 1)[-1]


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


def write_incremental_list(work_dir, selection, platform):
    """One inclusion list naming every changed file (and new empty directory)."""
    path = os.path.join(work_dir, INCLUSION_LIST)
    lines = [list_file_entry(f.path, False, platform) for f in selection.files] + \
        [list_file_entry(d, True, platform) for d in selection.empty_dirs if d]
    _write_private_text(path, "\n".join(lines) + "\n")
    return [path, None, None]


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


def rsync_rules(plan):
    """rsync filter rules giving the same result as the selection (first match wins)."""
    def lit(text):
        return (text, True)

    def wild(pattern):
        # our wildcards are only '*' and '?'; any other rsync-special character is literal
        return ("".join("\\" + c if c in "[\\" else c for c in pattern), False)

    rules = []
    for rel in plan.excluded_dir_paths:
        rules.append("- " + rsync_pattern([lit("/" + rel + "/")]))
    for rel in plan.excluded_file_paths:
        rules.append("- " + rsync_pattern([lit("/" + rel)]))
    for listed in plan.listed:
        base = "/" + listed + "/" if listed else "/"
        for pattern in plan.dir_patterns:
            for middle in ("", "**/"):
                rules.append("- " + rsync_pattern([lit(base), (middle, False),
                                                   wild(pattern), lit("/")]))
        for pattern in plan.file_patterns:
            # a directory that merely looks like an excluded file name is kept
            for middle in ("", "**/"):
                rules.append("+ " + rsync_pattern([lit(base), (middle, False),
                                                   wild(pattern), lit("/")]))
            for middle in ("", "**/"):
                rules.append("- " + rsync_pattern([lit(base), (middle, False),
                                                   wild(pattern)]))
    # Only the listed directories and the directories leading to them.
    ancestors = set()
    for listed in plan.listed:
        if not listed:
            continue
        parts = listed.split("/")
        for depth in range(1, len(parts)):
            ancestors.add("/".join(parts[:depth]))
        rules.append("+ " + rsync_pattern([lit("/" + listed + "/")]))
    for ancestor in sorted(ancestors):
        rules.append("+ " + rsync_pattern([lit("/" + ancestor + "/")]))
    if "" not in plan.listed:
        for ancestor in [""] + sorted(ancestors):
            base = "/" + ancestor + "/" if ancestor else "/"
            rules.append("- " + rsync_pattern([lit(base), ("*", False)]))
    return rules


def validate_mirror(view_root, target, plan, platform, start):
    """Seed rule (bug 7): compare the mirror with the source after the copy.

    A missing file or a differing modification time is a failure only for a
    file that was last changed before the backup started; sizes are compared
    only then.
    """
    failures = []
    start_ts = start.timestamp()
    selection = walk_selection(view_root, plan, platform)
    for entry in selection.files:
        destination = os.path.join(target, entry.path)
        try:
            copied = os.lstat(platform.long_path(destination))
        except OSError:
            if entry.changed < start_ts:
                failures.append(f"{entry.path}: missing in the mirror {target}")
            continue
        if entry.is_link:
            continue
        if abs(copied.st_mtime - entry.mtime) > MTIME_TOLERANCE:
            if entry.mtime < start_ts:
                failures.append(
                    f"{entry.path}: mismatching modification time (source "
                    f"{_iso(entry.mtime)}, mirror {_iso(copied.st_mtime)})")
        elif entry.mtime <= start_ts and copied.st_size != entry.size:
            failures.append(f"{entry.path}: mismatching size (source {entry.size}, "
                            f"mirror {copied.st_size})")
    return failures


def _iso(timestamp):
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S.%f UTC")


class VolumeThrottle:
    """Pauses 7-Zip while WAITING_VOLUMES finished volumes wait for the parent's upload.

    The parent uploads and deletes each finished volume; when the upload is
    slower than 7-Zip, stopping the script's process group (SIGSTOP) until
    the parent catches up bounds the temporary disk to a few volumes.  POSIX
    only: without SIGSTOP (Windows) the volumes just wait.
    """

    INTERVAL = 0.02     # seconds: small against the time 7-Zip takes to write a volume

    def __init__(self, process, archive_dir, platform):
        self.process, self.archive_dir, self.platform = process, archive_dir, platform
        self.paused = False

    def run(self, done):
        if not self.platform.can_pause_group:
            return
        while not done.wait(self.INTERVAL):
            pause = self.should_pause()
            if pause != self.paused:
                self.set_paused(pause)
        self.release()

    def should_pause(self):
        volumes = {}       # number -> finished?
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.archive_dir):
                match = ANY_VOLUME.fullmatch(name)
                if match:
                    volumes[int(match[1])] = not match[2]
        # Pause only while the parent can go on: the lowest volume is finished
        # (7-Zip may still rewrite an earlier .tmp one; it must run to close it).
        return sum(volumes.values()) >= WAITING_VOLUMES and volumes[min(volumes)]

    def release(self):
        if self.paused:
            self.set_paused(False)

    def set_paused(self, paused):
        self.platform.pause_group(self.process, paused)
        self.paused = paused


def run_script(argv, env, on_line, platform, archive_dir=None):
    """Run the generated script, passing each output line to on_line.

    The script runs in its own process group so that it can be stopped as a
    whole; if our parent dies (the user-mode pass was killed), stop it too.
    With archive_dir, 7-Zip is paused while its finished volumes wait for upload.
    """
    import threading
    parent = os.getppid()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=env,
                               **platform.group_popen_options())
    throttle = VolumeThrottle(process, archive_dir, platform) if archive_dir else None
    throttle_done = threading.Event()

    def stop(*_ignored):
        throttle_done.set()
        platform.stop_group(process)
        if throttle:
            throttle.release()    # a stopped process acts on SIGTERM once continued

    previous = signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(EXIT_INTERRUPTED)))
    if throttle:
        threading.Thread(target=throttle.run, args=(throttle_done,), daemon=True).start()
    try:
        watcher_stop = threading.Event()

        def watch_parent():
            while not watcher_stop.wait(1.0):
                if os.getppid() != parent:
                    stop()
                    return

        threading.Thread(target=watch_parent, daemon=True).start()
        for raw in process.stdout:
            on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        status = process.wait()
        watcher_stop.set()
        return status
    finally:
        throttle_done.set()
        signal.signal(signal.SIGTERM, previous)


def run_child(child, platform, settings):
    """The ShadowSpawn-executed pass (seed V.1.3) for one mount directory.

    Everything is printed: the parent appends this output to the log and
    checks the success markers.  Exit status 0 means the pass ran to its end.
    """
    view_root = platform.child_view_root(child.mount, child.drive_letter)
    work_dir = child.work_dir
    plan = read_source_plan(os.path.join(work_dir, PLAN_FILE), view_root, platform)
    full = child.scope is Scope.FULL
    since = None if full else (child.latest_incremental or child.latest_full)
    if not full and since is None:
        child_say("AAM Auto Backup: an incremental backup needs the latest complete "
                  "backup time (arguments 3 and 4).")
        return EXIT_FAILURE
    child_say(f"Source {child.mount}: {'full' if full else 'incremental'} backup"
              + ("" if full else f" of files changed since {describe_stamp(since)}"))
    selection = walk_selection(view_root, plan, platform, since)
    for problem in selection.problems:
        child_say(MARK_VALIDATION_FAILURE + problem)
    for special in selection.specials:
        child_say(f"Not backed up (not a regular file, directory or link): {special}")

    commands = []
    target = None
    if "local" in child.destinations:
        target = platform.mirror_directory(child.mirror_root, child.mount)
        os.makedirs(platform.long_path(target), exist_ok=True)
        commands.append(platform.mirror_commands(view_root, target, plan, child.keep,
                                                 work_dir))
    to_archive = "AWS" in child.destinations and (
        full or selection.files or any(selection.empty_dirs))
    archive_dir = os.path.join(work_dir, ARCHIVE_DIR)
    if to_archive:
        os.makedirs(archive_dir, mode=0o700, exist_ok=True)
        lists = (write_full_lists(work_dir, plan, selection, platform) if full
                 else write_incremental_list(work_dir, selection, platform))
        argv = seven_zip_add_argv(settings, os.path.join(archive_dir, "backup.zip"), lists,
                                  platform.password_switch(CHILD_KEY_VARIABLE), platform)
        commands.append(platform.archive_commands(argv, CHILD_KEY_VARIABLE))
    elif "AWS" in child.destinations:
        child_say(MARK_NOTHING_TO_ARCHIVE)

    script = os.path.join(work_dir, platform.script_name)
    platform.write_script(script, view_root, commands)
    archived, unread, in_warnings = set(), set(), [False]

    def on_line(line):
        # '+ path' is printed before 7-Zip opens a file; the files it then could not
        # read are listed under 'WARNINGS for files:' as 'path : errno=N : reason'.
        if line.startswith("+ "):
            archived.add(line[2:].replace("/", platform.sep))
        elif line == "WARNINGS for files:":
            in_warnings[0] = True
        elif in_warnings[0] and line.startswith("----"):
            in_warnings[0] = False
        elif in_warnings[0] and " : errno=" in line:
            unread.add(line.rsplit(" : errno=", 1)[0].replace("/", platform.sep))
        child_say(line)

    env = dict(os.environ, **{CHILD_KEY_VARIABLE: child.key})
    status = run_script(platform.script_argv(script), env, on_line, platform,
                        archive_dir if to_archive else None)
    if status != 0:
        child_say(f"AAM Auto Backup: the backup script ended with exit code {status}.")

    failures = list(selection.problems)
    if to_archive:
        failures += verify_archived(view_root, selection, archived - unread, platform)
    if target is not None:
        failures += validate_mirror(view_root, target, plan, platform, child.start)
    for failure in failures[len(selection.problems):]:
        child_say(MARK_VALIDATION_FAILURE + failure)
    child_say(MARK_RESULT + json.dumps({
        "files": len(archived - unread) if to_archive else 0,
        "failures": len(failures),
    }))
    return EXIT_OK


def verify_archived(view_root, selection, archived, platform):
    """Every selected file must be in the archive, unless it vanished meanwhile.

    This catches any difference between 7-Zip's list-file semantics and the
    selection, and files 7-Zip could not read (exit code 1 = warnings).
    """
    failures = []

    def console_form(name):
        # 7-Zip prints control characters as '_'; undecodable bytes come out replaced.
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return platform.comparable(re.sub(r"[\x00-\x1f\x7f]", "_", name))

    names = {console_form(p) for p in archived}
    for entry in selection.files:
        if console_form(entry.path) in names:
            continue
        full_path = view_root.rstrip(platform.sep) + platform.sep + entry.path
        if os.path.lexists(platform.long_path(full_path)):
            failures.append(f"{entry.path}: not in the archive (7-Zip could not read it)")
    return failures


# ============================================================================
# Upload: volumes as DEEP_ARCHIVE, then the indicator (SPEC 5, 6 step 6)
# ============================================================================

MIB = 1024 * 1024
INDICATOR_FORMAT = "aam-auto-backup-indicator"
UPLOAD_POLL_SECONDS = 0.1   # how often the parent looks for finished volumes


def transfer_config():
    """Multipart uploads with a few parallel parts; memory stays small."""
    from boto3.s3.transfer import TransferConfig
    return TransferConfig(multipart_threshold=64 * MIB, multipart_chunksize=16 * MIB,
                          max_concurrency=4, use_threads=True)


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


def directory_size(path):
    """Bytes in the files of a directory (7-Zip's volumes, finished or not)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
    return total


def reported_volume_count(lines):
    """The number of volumes 7-Zip reported ('Volumes: N', its last summary line)."""
    for line in reversed(lines):
        match = re.fullmatch(r"Volumes: (\d+)", line.strip())
        if match:
            return int(match[1])
    return None


class VolumeCountMismatch(AamError):
    """The volumes uploaded are not exactly the ones 7-Zip reported."""


class VolumeUploader:
    """Uploads 7-Zip's volumes while 7-Zip writes the next ones (pipelined upload).

    poll() is called every UPLOAD_POLL_SECONDS while the child runs: each final
    volume goes up in number order and is deleted once uploaded, so the disk
    holds a few volumes, not the whole archive (the child pauses 7-Zip while
    WAITING_VOLUMES finished ones wait).  After an upload error the remaining
    volumes are deleted unread, so 7-Zip is never left paused; the error is
    raised by finish(), and no indicator is written.
    """

    def __init__(self, s3, bucket, archive_dir, key_for, log):
        self.s3, self.bucket, self.archive_dir = s3, bucket, archive_dir
        self.key_for = key_for          # volume number -> S3 key
        self.log = log
        self.config = transfer_config()
        self.records = []
        self.next_number = 1
        self.error = None
        self.held_lines = []            # announced while the child ran; logged later
        self.live = False

    def uploaded_bytes(self):
        return sum(record["size"] for record in self.records)

    def poll(self):
        """Upload (or, after an error, discard) every final volume next in order."""
        volumes = final_volumes(self.archive_dir)
        while self.next_number in volumes:
            path = volumes.pop(self.next_number)
            try:
                if self.error is None:
                    self.upload(path, self.key_for(self.next_number))
                os.remove(path)
                checkpoint("volume-uploaded")
            except Interrupted:
                raise
            except Exception as problem:     # noqa: BLE001 - reported by finish()
                self.error = self.error or problem
                with contextlib.suppress(OSError):
                    os.remove(path)
            self.next_number += 1

    def upload(self, path, key):
        size = os.path.getsize(path)
        digest = sha256_of(path)
        self.announce(f"Uploading {key} ({size:,} bytes, DEEP_ARCHIVE)")
        progress = Progress(f"Uploading volume {key.rsplit('.', 1)[-1]}", size)
        try:
            self.s3.upload_file(path, self.bucket, key, Config=self.config,
                                Callback=progress.add,
                                ExtraArgs={"StorageClass": DEEP_ARCHIVE})
        finally:
            progress.close()
        self.records.append({"name": key, "size": size, "sha256": digest})

    def announce(self, text):
        """Live on the terminal; in the log under the upload section (seed order)."""
        if self.live:
            self.log.line(text)
        else:
            print(self.log.scrub(text), flush=True)
            self.held_lines.append(text)

    def start_log_section(self):
        self.live = True
        for text in self.held_lines:
            self.log.line(text, terminal=False)
        self.held_lines = []

    def finish(self, reported_count):
        """Upload what is left; the volume records, exactly 7-Zip's volumes."""
        self.poll()
        if self.error is not None:
            raise self.error
        uploaded = self.next_number - 1
        leftovers = sorted(os.listdir(self.archive_dir)) if os.path.isdir(
            self.archive_dir) else []
        expected = uploaded if reported_count is None else reported_count
        if leftovers or uploaded != expected:
            raise VolumeCountMismatch(
                f"7-Zip reported {reported_count} volume(s), {uploaded} were uploaded"
                + (f", and {', '.join(leftovers)} remained" if leftovers else ""))
        return self.records


def indicator_body(run_sources, source_name, source_path, files, volumes, full, backup,
                   since, platform):
    """The indicator's JSON manifest: what a restore needs to trust this source."""
    return json.dumps({
        "format": INDICATOR_FORMAT,
        "format_version": 1,
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
        "volumes": volumes,
    }, indent=1).encode("utf-8")


# ============================================================================
# Backup operations: regular-backup and incremental-only-backup (SPEC 6)
# ============================================================================

def _read_pid(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def is_interactive():
    return sys.stdin is not None and sys.stdin.isatty()


class BackupRun:
    """The user-mode pass of one backup: lock, plan, S3 query, children, upload, report."""

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
        self.work_dir = None
        self.start = None
        self.log = None
        self.completed_sources = 0

    # -- the whole run -------------------------------------------------------
    def execute(self):
        args = self.args
        try:
            self.log = RunLog(args.log_dir, args.operation, args.secrets, self.platform)
        except OSError as problem:
            print(f"The log file cannot be created in {args.log_dir}: {problem.strerror}",
                  file=sys.stderr)
            return EXIT_FAILURE
        self.log.section(SECTION_ARGUMENTS)
        self.log.line(f"{PROGRAM_NAME} {VERSION}, {args.operation}", terminal=False)
        for line in args.masked():
            self.log.line(line, terminal=False)
        try:
            lock = self.acquire_lock()
        except (KeyboardInterrupt, Interrupted):
            return self.interrupted(None)
        except LockTimeout as problem:
            self.log.section(SECTION_LOCK_FAILURE)
            self.log.line(f"ERROR: {problem}")
            self.failures.append(str(problem))
            if self.regular:
                self.send_report()
            self.finish()
            return problem.exit_code
        try:
            code = self.run()
        except (KeyboardInterrupt, Interrupted):
            code = self.interrupted(lock)
        except (NoBackupSet, Refused, InstructionError) as problem:
            self.log.line(f"ERROR: {problem}")
            self.failures.append(str(problem))
            code = problem.exit_code
            if self.regular:
                self.send_report()
        except Exception as problem:     # noqa: BLE001 - logged, then re-raised
            self.log.line(f"ERROR: unexpected {type(problem).__name__}: {problem}")
            raise
        finally:
            self.remove_work_dir()
            lock.release()
            self.finish()
        return code

    def run(self):
        self.start = utc_now()
        self.log.section(SECTION_START)
        self.log.line(f"Backup started {describe_stamp(self.start)} "
                      f"({local_time_text(self.start)})")
        self.work_dir = os.path.join(self.settings.temp_root,
                                     f"{self.args.location}{format_stamp(self.start)}")
        self.remove_leftovers()
        plan, instruction_problem = self.read_plan()
        if self.aws and plan is not None:
            self.query_s3(plan)
        self.log_plan(plan)
        if instruction_problem:
            self.log.section(SECTION_INSTRUCTION_ERROR)
            raise instruction_problem
        if not self.local and not self.aws:
            self.send_report()
            return EXIT_FAILURE
        if not self.create_work_dir():
            self.send_report()
            return EXIT_FAILURE
        run_sources = [self.platform.source_name(s.mount) for s in plan.sources]
        for index, source in enumerate(plan.sources, 1):
            if not self.back_up_source(index, source, plan, run_sources):
                break
            checkpoint("source-done")
        if self.aws and self.completed_sources == len(plan.sources):
            if self.scope is Scope.FULL:
                self.latest_full, self.latest_incremental = self.start, None
            else:
                self.latest_incremental = self.start
        self.log_summary()
        if self.regular:
            self.send_report()
        return EXIT_FAILURE if self.failures else EXIT_OK

    def interrupted(self, lock):
        """Ctrl-C or SIGTERM: say so; the caller's cleanup still runs."""
        self.log.line("ERROR: interrupted; nothing of this run counts as a complete backup.")
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

    # -- lock (SPEC 6 step 2) ---------------------------------------------
    def acquire_lock(self):
        import filelock
        path, poll, wait = self.settings.lock_file, self.args.lock_poll, self.args.lock_wait
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # A kernel lock (flock/LockFileEx): a killed process never leaves it held.
        lock = filelock.FileLock(path, fallback_to_soft=False, preserve_lock_file=True)
        deadline = time.monotonic() + wait
        asked = False
        while True:
            try:
                lock.acquire(timeout=0)
                return lock
            except filelock.Timeout:
                pass
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
                                  f"wait of {wait} seconds (argument 5); giving up.")
            pause = min(poll, remaining)
            self.log.line(f"Another backup is running (lock {path}); waiting "
                          f"{pause:.0f} s before the next check, at most "
                          f"{remaining:.0f} s more.")
            time.sleep(pause)

    # -- instruction file (SPEC 4) -----------------------------------------
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
            return plan, None
        except InstructionError as problem:
            return None, problem

    def check_key_lengths(self, plan):
        for source in plan.sources:
            name = ObjectName(self.args.location, self.start, self.start, False,
                              self.platform.source_name(source.mount), 999)
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

    # -- S3 query and the full/incremental decision (SPEC 6 step 4) ------
    def query_s3(self, plan):
        self.log.section(SECTION_LATEST)
        sources = [self.platform.source_name(s.mount) for s in plan.sources]
        months = 1 if self.regular else MONTHS_SCANNED
        try:
            self.session = aws_session(self.args.access_key_id, self.args.secret_access_key)
            self.s3 = aws_client(self.session, "s3", self.settings.region)
            prefixes = month_prefixes(self.args.location, self.start, months)
            catalog = Catalog.load(self.s3, self.args.bucket, prefixes)
        except aws_errors() as problem:
            message = (f"AWS S3 cannot be queried ({describe_aws_error(problem)}); the AWS "
                       "part of this backup is skipped"
                       + (", the local mirror is still made." if self.local else "."))
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)
            self.aws = False
            return
        month = (self.start.year, self.start.month)
        full = catalog.latest_complete_full(sources, month if self.regular else None)
        incrementals = catalog.complete_incrementals(full, sources) if full else []
        self.latest_full = full
        self.latest_incremental = incrementals[-1] if incrementals else None
        where = (f"in {self.start:%Y-%m} (UTC)" if self.regular
                 else f"in the last {MONTHS_SCANNED} months")
        self.log.line(f"Latest complete full backup {where}: {describe_stamp(full)}")
        self.log.line(f"Latest complete incremental backup of it: "
                      f"{describe_stamp(self.latest_incremental)}")
        self.decide_scope(full, sources, where)

    def decide_scope(self, full, sources, where):
        changed = self.instruction_file_changed()
        if self.regular:
            if self.args.force_full:
                reason = "forced by argument 21"
            elif full is None:
                reason = f"no complete full backup of the {len(sources)} current sources {where}"
            elif self.args.auto_force_full and changed > full:
                reason = (f"the instruction file changed ({describe_stamp(changed)}) after "
                          "the latest complete full backup (argument 22)")
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
                              "required (argument 22); run a regular backup instead.")
        self.scope, self.base_full = Scope.INCREMENTAL, full
        self.since = self.latest_incremental or full
        self.log.line(f"Backup scope: incremental, based on the full backup "
                      f"{describe_stamp(full)}; files changed since "
                      f"{describe_stamp(self.since)}.")

    def instruction_file_changed(self):
        st = os.stat(self.args.instruction_file)
        return dt.datetime.fromtimestamp(self.platform.changed_time(st), dt.timezone.utc)

    # -- work directory --------------------------------------------------
    def create_work_dir(self):
        try:
            os.makedirs(self.settings.temp_root, exist_ok=True)
            os.mkdir(self.work_dir, 0o700)
            _write_private_text(os.path.join(self.work_dir, WORK_MARKER), f"{os.getpid()}\n")
            return True
        except OSError as problem:
            self.log.section(SECTION_WORK_DIR_ERROR)
            message = f"The work directory {self.work_dir} cannot be created: {problem}"
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)
            return False

    def remove_work_dir(self):
        if not self.work_dir or not os.path.exists(self.work_dir):
            return
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
            try:
                shutil.rmtree(path)
                self.log.line(f"Removed the work directory of an interrupted run: {path}",
                              terminal=False)
            except OSError as problem:
                self.log.line(f"Cannot remove the leftover work directory {path}: {problem}")

    # -- one source: child run, markers, upload ---------------------------
    def back_up_source(self, index, source, plan, run_sources):
        """Run the child for one mount and upload its archive; False stops the run."""
        platform, args = self.platform, self.args
        name = platform.source_name(source.mount)
        self.log.section(SECTION_CHILD_OUTPUT)
        self.log.line(f"Source {index} of {len(plan.sources)}: {source.mount}")
        view_root = platform.child_view_root(source.mount, args.drive_letter)
        output = os.path.join(self.work_dir, OUTPUT_FILE)
        try:
            write_source_plan(os.path.join(self.work_dir, PLAN_FILE), source, view_root,
                              platform)
            if os.path.exists(output):
                os.remove(output)
        except OSError as problem:
            return self.stop(SECTION_TEMP_FILE_ERROR,
                             f"A temporary file cannot be written: {problem}")
        destinations = {"local"} if self.local else set()
        if self.aws:
            destinations.add("AWS")
        incremental = self.scope is Scope.INCREMENTAL
        child = child_arguments(
            operation=args.operation, agent=CHILD_AGENT, latest_full=self.latest_full,
            latest_incremental=self.since if incremental else None,
            start=self.start, mount=source.mount, drive_letter=args.drive_letter or "q",
            destinations=frozenset(destinations), mirror_root=args.mirror_root,
            keep=args.keep, key="env:" + CHILD_KEY_VARIABLE, location=args.location,
            work_dir=self.work_dir, force_full=not incremental,
            scope=Scope.INCREMENTAL if incremental else Scope.FULL)
        argv = platform.child_command(args.python, self.program_path,
                                      child.to_argv(),
                                      source.mount, args.drive_letter)
        # Pipelined upload: volumes go up while the child's 7-Zip writes the next.
        uploader = self.volume_uploader(name) if self.aws else None
        try:
            watch = self.while_child_runs(uploader)
            status = self.run_child_process(argv, output, watch)
            if watch:
                watch.close()
        except OSError as problem:
            self.note_orphans(uploader)
            return self.stop(SECTION_CHILD_ERROR, "Critical error. ShadowSpawn.exe execution "
                             f"failure Aborting {args.operation} operation. ({problem})")
        try:
            self.log.append_output(output)
            with open(output, "rb") as handle:
                # 7-Zip's '+ <file>' lines (one per file) are only logged, not checked
                lines = [platform.decode_output(raw).rstrip("\r\n") for raw in handle
                         if not raw.startswith(b"+ ")]
        except OSError:
            self.note_orphans(uploader)
            return self.stop(SECTION_OUTPUT_READ_ERROR, "File I/O error. ShadowSpawn.exe "
                             "command output file reading error.")
        result = self.check_child_output(lines, status, "AWS" in destinations)
        if result is None:
            self.note_orphans(uploader)
            return False
        checkpoint("child-done")
        if result["failures"]:
            self.failures.append(f"{source.mount}: {result['failures']} validation or "
                                 "read failure(s); see the lines marked 'validation "
                                 "failure' in this log")
        if self.aws:
            return self.upload_source(source, name, result["files"], run_sources, uploader,
                                      reported_volume_count(lines))
        return True

    def while_child_runs(self, uploader):
        """Upload finished volumes; on a terminal, show how much 7-Zip has written."""
        if uploader is None:
            return None
        progress = Progress("7-Zip archive written")

        def step():
            uploader.poll()
            written = uploader.uploaded_bytes() + directory_size(uploader.archive_dir)
            if written and progress.terminal:
                progress.set(written)
        step.close = progress.close
        return step

    def run_child_process(self, argv, output, while_running=None):
        """Run the child to its end, calling while_running every UPLOAD_POLL_SECONDS."""
        env = dict(os.environ, **{CHILD_KEY_VARIABLE: self.args.key})
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env,
                                       **self.platform.group_popen_options())
            try:
                while True:
                    try:
                        return process.wait(UPLOAD_POLL_SECONDS if while_running else None)
                    except subprocess.TimeoutExpired:
                        while_running()
            except BaseException:
                if while_running:
                    while_running.close()
                self.platform.stop_group(process)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=30)
                raise

    def check_child_output(self, lines, status, archive_expected):
        """The seed's marker checks, in order: script, mirror, archive (seed 5.4.2)."""
        messages = self.platform.missing_marker_messages()
        present = set(lines)
        required = ["script"] + (["mirror"] if self.local else [])
        if archive_expected and MARK_NOTHING_TO_ARCHIVE not in present:
            required.append("archive")
        missing = [messages[k] for k in required if self.platform.marker(k) not in present]
        results = [line[len(MARK_RESULT):] for line in lines if line.startswith(MARK_RESULT)]
        if missing or status != 0 or not results:
            self.log.section(SECTION_CHILD_ERROR)
            for message in missing:
                self.log.line(f"ERROR: {message}")
            return self.stop(SECTION_CHILD_ERROR, "Critical error. ShadowSpawn.exe execution "
                             f"failure Aborting {self.args.operation} operation. "
                             f"(exit code {status})", missing)
        return json.loads(results[-1])

    def stop(self, section, message, causes=()):
        """Log an error that ends the per-source loop; the run goes on to cleanup."""
        if not causes:
            self.log.section(section)
        self.log.line(f"ERROR: {message}")
        self.failures.extend(list(causes) or [message])
        return None if section == SECTION_CHILD_ERROR else False

    def backup_times(self):
        """(full, incremental) date-times of this run's S3 object names."""
        if self.scope is Scope.FULL:
            return self.start, None
        return self.base_full, self.start

    def volume_uploader(self, name):
        full, incremental = self.backup_times()
        return VolumeUploader(
            self.s3, self.args.bucket, os.path.join(self.work_dir, ARCHIVE_DIR),
            lambda number: ObjectName(self.args.location, full, incremental, False, name,
                                      number).key,
            self.log)

    def note_orphans(self, uploader):
        """Volumes uploaded before a failure have no indicator, so nothing uses them."""
        if uploader and uploader.records:
            uploader.start_log_section()
            self.log.line(f"{len(uploader.records)} volume(s) uploaded before the failure "
                          "stay in the bucket without a completion indicator; no backup or "
                          "restore uses them (the backup user cannot delete them).")

    def upload_source(self, source, name, files, run_sources, uploader, reported_count):
        """Volumes first (most went up while 7-Zip ran), the indicator strictly after."""
        self.log.section(SECTION_UPLOAD)
        uploader.start_log_section()
        full, incremental = self.backup_times()
        indicator = ObjectName(self.args.location, full, incremental, True, name)
        try:
            records = uploader.finish(reported_count)
            body = indicator_body(run_sources, name, source.mount, files, records, full,
                                  self.start, self.since, self.platform)
            checkpoint("before-indicator")
            self.s3.put_object(Bucket=self.args.bucket, Key=indicator.key, Body=body,
                               ContentType="application/json")
            self.log.line(f"Uploaded the completion indicator {indicator.key} "
                          f"({files} files in {len(records)} volumes)")
            self.completed_sources += 1
            return True
        except aws_errors() + (OSError, VolumeCountMismatch) as problem:
            self.log.section(SECTION_UPLOAD_ERROR)
            message = (f"Upload to s3://{self.args.bucket} failed for {source.mount} "
                       f"({describe_aws_error(problem)}); no completion indicator was "
                       "written, so this backup set is not used; no further uploads.")
            self.note_orphans(uploader)
            self.log.line(f"ERROR: {message}")
            self.failures.append(message)
            self.aws = False
            shutil.rmtree(os.path.join(self.work_dir, ARCHIVE_DIR), ignore_errors=True)
            return True          # the local mirror of the next sources is still made

    # -- summary and report (SPEC 6 step 8) -------------------------------
    def log_summary(self):
        self.log.section(SECTION_SUMMARY)
        if self.failures:
            self.log.line(f"FAILURE: {len(self.failures)} problem(s):")
            for failure in self.failures:
                self.log.line(f"  - {failure}")
        else:
            self.log.line("SUCCESS: everything asked for was done.")

    def send_report(self):
        if not self.args.send_email:
            return
        args = self.args
        status = "FAILURE" if self.failures else "SUCCESS"
        scope = f" {self.scope.word}" if self.scope and self.aws_asked else ""
        title = f"{status}, {local_time_text(self.start or utc_now())}{scope} backup!"
        types = " and ".join(t for t, on in (("local", self.local), ("AWS S3", self.aws_asked))
                             if on)
        body = [f"Backup destination types: {types}"]
        if self.aws_asked:
            body.append(f"Latest complete AWS S3 full backup: {describe_stamp(self.latest_full)}")
            body.append("Latest complete AWS S3 incremental backup: "
                        f"{describe_stamp(self.latest_incremental)}")
        body.append("For more info, refer to the local backup log.")
        session = self.session or aws_session(args.access_key_id, args.secret_access_key)
        send_email_report(session, self.settings, args.sender_name, args.sender_address,
                          args.recipient, title, "\n".join(body) + "\n", self.log)


# ============================================================================
# Restore operations (SPEC 7)
# ============================================================================

# Deep Archive retrieval prices for us-east-1 as the design notes recorded them
# from aws.amazon.com/s3/pricing on 2020-10-05 (README lists them): dollars per
# GB retrieved and per 1,000 restore requests.  Only used for the estimate.
PRICES_TAKEN = "2020-10-05"
RETRIEVAL_PRICES = {"Bulk": (0.0025, 0.025), "Standard": (0.02, 0.10)}
TRANSFER_OUT_PER_GB = 0.09
EXPECTED_WAIT = {"Bulk": "within 48 hours", "Standard": "within 12 hours"}
GB = 1024 ** 3                    # AWS bills a GB as 2^30 bytes

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

SECTION_RESTORE_START = "Data restoration starting time and date."
SECTION_RESTORE_SET = "the AWS S3 backup objects used in the data restoration."
SECTION_THAW = "AWS S3 Glacier Deep Archive restoration."
SECTION_DOWNLOAD = "AWS S3 download."
SECTION_EXTRACT = "decryption and decompression."
SECTION_RESTORE_ERROR = "(if applicable) data restoration error."

# The permission each S3 call of a restore needs (for a refused call's message).
S3_PERMISSIONS = {
    "ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "RestoreObject": "s3:RestoreObject",
}
DENIED_CODES = ("AccessDenied", "403", "Forbidden", "AllAccessDisabled")


class NotReady(AamError):
    """The thawed copies are not all there yet: run the step again later."""

    exit_code = EXIT_NOT_READY


def aws_error_code(problem):
    response = getattr(problem, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def is_transient(problem):
    """A network failure or an S3 server error (5xx): worth trying again later."""
    import botocore.exceptions as errors
    if isinstance(problem, (errors.ConnectionError, errors.HTTPClientError,
                            errors.IncompleteReadError)):
        return True
    response = getattr(problem, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500


def restore_aws_error(problem, bucket, key=None):
    """An AamError for a failed S3 call of a restore, naming a missing permission."""
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    operation = getattr(problem, "operation_name", "")
    if aws_error_code(problem) in DENIED_CODES:
        permission = S3_PERMISSIONS.get(operation, "an S3 permission")
        return AamError(
            f"AWS refused {operation or 'the request'} on {where} (access denied): the "
            f"credentials of arguments 11 and 12 lack the permission {permission}. A "
            "restore needs s3:ListBucket, s3:GetObject and s3:RestoreObject on the bucket: "
            "use the restore user's keys (README, AWS setup); the backup user is "
            "write-only by design.")
    if aws_error_code(problem) in ("404", "NoSuchKey"):
        return AamError(f"{where} does not exist (any more); the backup set is damaged.")
    if aws_error_code(problem) == "NoSuchBucket":
        return AamError(f"The bucket {bucket} (argument 9) does not exist.")
    return AamError(f"AWS S3 request on {where} failed: {describe_aws_error(problem)}")


@contextlib.contextmanager
def s3_call(bucket, key=None):
    """Turn a refused or failed S3 call into a clear AamError; transient ones pass on."""
    try:
        yield
    except AamError:
        raise
    except Exception as problem:     # noqa: BLE001 - boto3 raises many kinds
        if is_transient(problem):
            raise
        raise restore_aws_error(problem, bucket, key) from None


class TerminalOutput:
    """The multi-step operations write no log (seed decision): terminal only.

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


# -- the backup set to restore (SPEC 7 step 1) --------------------------------

@dataclasses.dataclass
class RestoreVolume:
    key: str
    size: int
    sha256: str
    path: str            # where it is downloaded


@dataclasses.dataclass
class RestoreArchive:
    """One source's archive in one backup of the set (no volumes: nothing changed)."""

    backup: dt.datetime
    number: int          # the source's numbered directory
    source: str
    volumes: list


@dataclasses.dataclass
class RestoreSet:
    location: str
    full: dt.datetime
    incrementals: list   # complete incrementals, oldest first
    sources: list        # [(number, source name, original path)]
    archives: list       # the full's first, then each incremental's
    indicators: list     # indicator keys

    @property
    def volumes(self):
        return [volume for archive in self.archives for volume in archive.volumes]

    @property
    def last_backup(self):
        return self.incrementals[-1] if self.incrementals else self.full

    def archives_of(self, number):
        return [a for a in self.archives if a.number == number]


def read_manifest(s3, bucket, key):
    """The JSON manifest of one indicator, checked enough to be trusted."""
    with s3_call(bucket, key):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        manifest = json.loads(body.decode("utf-8"))
        if manifest.get("format") != INDICATOR_FORMAT:
            raise ValueError("not an AAM Auto Backup indicator")
        if int(manifest.get("format_version", 0)) > 1:
            raise ValueError("written by a newer version of AAM Auto Backup; use it to "
                             "restore")
        for field in ("sources", "source", "source_path", "volumes"):
            if field not in manifest:
                raise ValueError(f"no '{field}'")
        return manifest
    except (ValueError, UnicodeDecodeError, AttributeError) as problem:
        raise AamError(f"The completion indicator {key} cannot be used: {problem}")


def complete_backup(s3, bucket, catalog, full, incremental):
    """({source: manifest}, None) when one backup is complete, else (None, reason)."""
    present = catalog.indicators.get((full, incremental), {})
    manifests = {source: read_manifest(s3, bucket, stored.name.key)
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


def find_restore_set(s3, bucket, catalog, out):
    """The latest complete full backup, its manifests and its complete incrementals.

    Returns (full, full manifests, [(incremental, manifests)], oldest first).
    """
    for full in catalog.fulls():
        manifests, reason = complete_backup(s3, bucket, catalog, full, None)
        if manifests:
            break
        out.line(f"Skipped the {describe_backup(full, None)}: it is incomplete ({reason}).")
    else:
        raise NoBackupSet("No complete full backup to restore from.")
    chosen = []
    for incremental in sorted({incr for (f, incr) in catalog.indicators
                               if f == full and incr is not None}):
        found, reason = complete_backup(s3, bucket, catalog, full, incremental)
        if found:
            chosen.append((incremental, found))
        else:
            out.line(f"Skipped the {describe_backup(full, incremental)}: it is incomplete "
                     f"({reason}).")
    return full, manifests, chosen


def volume_path(downloads, backup, number, key):
    """downloads/<backup stamp>/<source number>/backup.zip.NNN (short, any source path)."""
    return os.path.join(downloads, format_stamp(backup), str(number),
                        f"backup.zip.{ObjectName.parse(key).volume:03d}")


def volumes_of(manifest, catalog, full, incremental, path_of):
    """The manifest's volumes, each checked against the bucket listing."""
    listed = {stored.name.key: stored.size
              for stored in catalog.volumes.get((full, incremental, manifest["source"]), [])}
    volumes, problems = [], []
    for entry in manifest["volumes"]:
        name = ObjectName.parse(entry["name"])
        if (name is None or name.indicator or name.full != full
                or name.incremental != incremental or name.source != manifest["source"]):
            problems.append(f"{entry['name']}: the manifest names a volume of another backup")
            continue
        if entry["name"] not in listed:
            problems.append(f"{entry['name']}: missing from the bucket")
        elif listed[entry["name"]] != entry["size"]:
            problems.append(f"{entry['name']}: {listed[entry['name']]:,} bytes in the bucket, "
                            f"{entry['size']:,} in the manifest")
        volumes.append(RestoreVolume(entry["name"], int(entry["size"]), entry["sha256"],
                                     path_of(entry["name"])))
    return volumes, problems


def build_restore_set(location, catalog, full, chosen, full_manifests, downloads):
    """Number the sources and gather every archive; missing volumes stop it here."""
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
            volumes, found = volumes_of(
                manifest, catalog, full, incremental,
                lambda key, b=backup, n=number: volume_path(downloads, b, n, key))
            problems += found
            archives.append(RestoreArchive(backup, number, source, volumes))
    if problems:
        raise AamError("The backup set is damaged; nothing was restored:\n  "
                       + "\n  ".join(problems))
    return RestoreSet(location, full, [i for i, _m in chosen], sources, archives, indicators)


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


# -- the plan printed before any thaw ------------------------------------------

def format_dollars(amount):
    return "less than $0.01" if 0 < amount < 0.005 else f"${amount:,.2f}"


def retrieval_cost(tier, size, requests):
    per_gb, per_thousand = RETRIEVAL_PRICES[tier]
    return size / GB * per_gb + requests / 1000 * per_thousand


def plan_lines(restore_set, days, tier):
    volumes = restore_set.volumes
    size = sum(v.size for v in volumes)
    lines = [f"Restore plan: {len(volumes)} volume(s), {size:,} bytes "
             f"({size / GB:.3f} GB), thawed for {days} day(s) (argument 7) with the "
             f"{tier} tier: expected wait {EXPECTED_WAIT[tier]}.",
             f"Estimated retrieval cost (us-east-1 prices of {PRICES_TAKEN}, README):"]
    for name in ("Bulk", "Standard"):
        per_gb, per_thousand = RETRIEVAL_PRICES[name]
        chosen = "  <- this restore (AAM_RESTORE_TIER)" if name == tier else ""
        lines.append(f"  {name:8s} {format_dollars(retrieval_cost(name, size, len(volumes))):>16s}"
                     f"  (${per_gb}/GB + ${per_thousand:.3f} per 1,000 requests, "
                     f"{EXPECTED_WAIT[name]}){chosen}")
    lines.append(f"  Downloading out of AWS is billed apart (${TRANSFER_OUT_PER_GB}/GB): "
                 f"{format_dollars(size / GB * TRANSFER_OUT_PER_GB)}.")
    return lines


def set_lines(restore_set):
    """The objects chosen (SPEC 7 step 1), for the terminal and the log."""
    lines = [f"Backup set used: the {describe_backup(restore_set.full, None)} and "
             f"{len(restore_set.incrementals)} complete incremental backup(s) of it; the "
             f"data is as of {describe_stamp(restore_set.last_backup)}."]
    for number, source, path in restore_set.sources:
        lines.append(f"  source {number}: {path} ({source})")
    lines.append("Objects used:")
    for key in restore_set.indicators:
        lines.append(f"  {key}  (completion indicator)")
    for volume in restore_set.volumes:
        lines.append(f"  {volume.key}  ({volume.size:,} bytes)")
    return lines


def set_to_json(restore_set):
    return {
        "location": restore_set.location, "full": format_stamp(restore_set.full),
        "incrementals": [format_stamp(i) for i in restore_set.incrementals],
        "sources": [list(source) for source in restore_set.sources],
        "indicators": list(restore_set.indicators),
        "archives": [{"backup": format_stamp(a.backup), "number": a.number,
                      "source": a.source,
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
        archives.append(RestoreArchive(backup, entry["number"], entry["source"], volumes))
    return RestoreSet(data["location"], parse_stamp(data["full"]),
                      [parse_stamp(i) for i in data["incrementals"]],
                      [tuple(source) for source in data["sources"]], archives,
                      data["indicators"])


# -- the destination directory and the restoration state ----------------------

class RestoreState:
    """The small JSON file in the destination that lets a re-run continue.

    It pins the backup set with every volume's size and SHA-256 (a backup
    made meanwhile does not change what is being restored, and the last step
    needs no S3 request) and records which numbered directories are finished.
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
    def new(cls, destination, bucket, restore_set):
        return cls(destination, {
            "format": RESTORE_STATE_FORMAT, "format_version": 1,
            "program_version": VERSION, "bucket": bucket, "location": restore_set.location,
            "started": utc_now().isoformat(), "finished": None, "done": [],
            "set": set_to_json(restore_set),
        })

    def restore_set(self, downloads):
        return set_from_json(self.data["set"], downloads)

    @property
    def finished(self):
        return self.data["finished"]

    def is_done(self, number):
        return number in self.data["done"]

    def mark_done(self, number):
        self.data["done"] = sorted(set(self.data["done"]) | {number})
        self.save()

    def mark_finished(self):
        self.data["finished"] = utc_now().isoformat()
        self.save()

    @property
    def left_out(self):
        """{numbered directory (text): how many names it could not create here}."""
        return self.data.get("not_restorable", {})

    def note_left_out(self, number, count):
        self.data.setdefault("not_restorable", {})[str(number)] = count

    def save(self):
        temporary = self.path + ".new"
        _write_private_text(temporary, json.dumps(self.data, indent=1) + "\n")
        os.replace(temporary, self.path)


def write_restore_map(destination, bucket, restore_set, state):
    """restore-map.txt: which numbered directory holds which original directory."""
    incrementals = ", ".join(describe_stamp(i) for i in restore_set.incrementals) or "none"
    status = (f"complete (finished {state.finished})" if state.finished
              else "NOT complete: run the restoration again to finish it")
    lines = [
        "# AAM Auto Backup restoration map: each numbered directory holds one backup source.",
        f"# location: {restore_set.location}; bucket: {bucket}",
        f"# full backup: {describe_stamp(restore_set.full)}",
        f"# incremental backups applied over it, in this order: {incrementals}",
        f"# the files are as of the last backup: {describe_stamp(restore_set.last_backup)}",
        f"# status: {status}",
        "# number<TAB>original directory<TAB>state",
    ]
    left_out = state.left_out
    for number, _source, path in restore_set.sources:
        done = "restored" if state.is_done(number) else "not restored yet"
        if str(number) in left_out:
            done += (f" except {left_out[str(number)]} name(s) this computer cannot create "
                     "(NOT RESTORED in the log)")
        lines.append(f"{number}\t{path}\t{done}")
    _write_private_text(os.path.join(destination, RESTORE_MAP_FILE), "\n".join(lines) + "\n")


def claimed_names(restore_set):
    names = [RESTORE_MAP_FILE, DOWNLOADS_DIR]
    for number, _source, _path in restore_set.sources:
        names += [str(number), str(number) + INCOMPLETE_SUFFIX]
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


def request_thaw(s3, bucket, key, days, tier):
    """Ask S3 to thaw one volume; an answer that it is under way or done is fine."""
    try:
        answer = s3.restore_object(Bucket=bucket, Key=key, RestoreRequest={
            "Days": days, "GlacierJobParameters": {"Tier": tier}})
    except Exception as problem:     # noqa: BLE001 - sorted out below
        if aws_error_code(problem) == "RestoreAlreadyInProgress":
            return IN_PROGRESS
        if is_transient(problem):
            raise
        raise restore_aws_error(problem, bucket, key) from None
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


def download_volume(s3, bucket, volume):
    """Download one thawed volume and verify it; it gets its final name only then.

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
    raise AamError(f"The volume {volume.key} in the bucket does not match its completion "
                   f"indicator (SHA-256 {actual}, expected {volume.sha256}): the copy in S3 "
                   "is damaged. Nothing was extracted.")


# -- 7-Zip: test, then extract (SPEC 7 step 4) -------------------------------------

def check_seven_zip(settings):
    """Before any thaw: finding 7-Zip missing after a two-day wait would hurt."""
    program = settings.seven_zip
    found = program if os.path.isfile(program) else shutil.which(program)
    if not found:
        raise AamError(f"7-Zip ({program}) is not installed or not on PATH; install it (or "
                       "set AAM_7ZIP) before restoring.")


def run_seven_zip(settings, platform, argv, key):
    """7-Zip with the key on stdin: no -p, so the key is on no command line."""
    env = dict(os.environ, LC_ALL="C.UTF-8")
    try:
        result = subprocess.run([settings.seven_zip] + argv,
                                input=(key + "\n").encode("utf-8"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
    except OSError as problem:
        raise AamError(f"7-Zip ({settings.seven_zip}) cannot be started: {problem}")
    return result.returncode, platform.decode_output(result.stdout)


def seven_zip_failure(code, output, archive_name):
    """None when 7-Zip succeeded, else an AamError saying what went wrong."""
    if code == 0:
        return None
    errors = [line.strip() for line in output.splitlines()
              if line.startswith("ERROR") or "Unexpected end" in line]
    if any(line.startswith("ERROR: Wrong password") for line in errors):
        return AamError(f"The decryption key (argument 8) is wrong: 7-Zip cannot open "
                        f"{archive_name}. Nothing was extracted; the downloaded volumes "
                        "are kept, so a re-run with the right key does not download them "
                        "again.")
    shown = "; ".join(errors[:5]) or f"exit code {code}"
    return AamError(f"7-Zip failed on {archive_name} (exit code {code}): {shown}")


def restore_absolute_links(root):
    """Give absolute symbolic links back their original target.

    7-Zip extracts a link stored as '/etc/x' as '<output dir>/etc/x' (it keeps
    every path inside the output directory); the backup stored '/etc/x'.
    """
    if os.name == "nt":
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

class VolumeChain(io.RawIOBase):
    """The volumes of a split archive read as one file (they are a plain byte split)."""

    def __init__(self, paths):
        super().__init__()
        self.parts = [(path, os.path.getsize(path)) for path in paths]
        self.position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position,
                io.SEEK_END: sum(size for _path, size in self.parts)}[whence]
        self.position = base + offset
        return self.position

    def readinto(self, buffer):
        start = self.position
        for path, size in self.parts:
            if start < size:
                with open(path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(min(len(buffer), size - start))
                buffer[:len(data)] = data
                self.position += len(data)
                return len(data)
            start -= size
        return 0


def archive_entries(volume_paths, sep):
    """[(relative path, is directory)] of an archive, from the ZIP central directory
    (not encrypted, so no key is needed; names exactly as stored)."""
    with zipfile.ZipFile(io.BufferedReader(VolumeChain(volume_paths))) as archive:
        return [(info.filename.rstrip("/").replace("/", sep), info.is_dir())
                for info in archive.infolist()]


def names_to_skip(entries, platform, seen):
    """{path: reason} for entries this computer cannot create.

    seen maps each path restored so far for this source (case-folded where the
    file system ignores case) to its spelling: of two names that differ only in
    case, the later one would overwrite the earlier one.
    """
    skipped = {}
    for path, _is_dir in entries:
        reason = platform.cannot_create(path)
        key = platform.comparable(path)
        if reason is None and seen.setdefault(key, path) != path:
            reason = f"differs only in letter case from {seen[key]}"
        if reason:
            skipped[path] = reason
    return skipped


def inclusion_list(entries, skipped, platform):
    """7-Zip list-file lines naming exactly the other entries.

    Files and empty directories only: a directory names its whole content for
    7-Zip.  The names left hold no '*' or '?' (Windows refuses those), so no
    line matches more than its own entry.
    """
    parents = {path.rsplit(platform.sep, 1)[0] for path, _is_dir in entries
               if platform.sep in path}
    return [list_file_entry(path, is_dir, platform) for path, is_dir in entries
            if path not in skipped and not (is_dir and path in parents)]


# -- one restoration --------------------------------------------------------------

class Restoration:
    """The state of one restoration into one destination directory."""

    def __init__(self, args, platform, settings, out):
        self.args, self.platform, self.settings, self.out = args, platform, settings, out
        self.destination = args.destination
        self.downloads = os.path.join(self.destination, DOWNLOADS_DIR)
        self.s3 = None
        self.session = None
        self.set = None
        self.state = None
        self.lock = None
        self.verified = set()      # volumes hashed by this process

    # -- opening: lock, backup set, state --------------------------------------
    def open(self):
        """Lock the destination and read its state file, if it has one."""
        import filelock
        try:
            os.makedirs(self.destination, exist_ok=True)
            self.lock = filelock.FileLock(os.path.join(self.destination, RESTORE_LOCK_FILE),
                                          fallback_to_soft=False)
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            raise AamError(f"Another restoration is running into {self.destination}.")
        except OSError as problem:
            raise AamError(f"The destination directory {self.destination} (argument 13) "
                           f"cannot be used: {problem}")
        self.state = RestoreState.load(self.destination)
        if self.state and (self.state.data["bucket"], self.state.data["location"]) != (
                self.args.bucket, self.args.location):
            raise AamError(f"{self.destination} holds a restoration of location "
                           f"{self.state.data['location']} from bucket "
                           f"{self.state.data['bucket']}; choose another destination.")

    def close(self):
        if self.lock:
            self.lock.release()

    def connect(self):
        self.session = aws_session(self.args.access_key_id, self.args.secret_access_key)
        self.s3 = aws_client(self.session, "s3", self.settings.region)

    def load_set(self):
        """Select the set (SPEC 7 step 1), or take the one this restoration pinned."""
        args, out = self.args, self.out
        self.connect()
        if self.state:
            self.set = self.state.restore_set(self.downloads)
            out.line(f"Continuing the restoration started {self.state.data['started']} "
                     f"(state file {self.state.path}).")
            return
        prefixes = month_prefixes(args.location, utc_now())
        with s3_call(args.bucket):
            catalog = Catalog.load(self.s3, args.bucket, prefixes)
        try:
            full, manifests, chosen = find_restore_set(self.s3, args.bucket, catalog, out)
        except NoBackupSet:
            raise NoBackupSet(
                f"No complete full backup of location {args.location} in bucket "
                f"{args.bucket} in the months {prefixes[-1][-6:]} to {prefixes[0][-6:]} "
                "(UTC); nothing to restore.") from None
        self.set = build_restore_set(args.location, catalog, full, chosen, manifests,
                                     self.downloads)
        check_incremental_chain(self.set, chosen, out)

    def warn_about_space(self):
        """The archives and the files they hold both land in the destination."""
        needed = 2 * sum(v.size for v in self.set.volumes)
        free = shutil.disk_usage(self.destination).free
        if free < needed:
            self.out.line(f"Warning: {self.destination} has {free:,} bytes free; the "
                          f"archives and the files they hold need about {needed:,}.")

    def claim_destination(self):
        """Start the state file; never take over names someone else's data uses."""
        if self.state:
            return
        taken = [name for name in claimed_names(self.set)
                 if os.path.lexists(os.path.join(self.destination, name))]
        if taken:
            raise AamError(f"The destination {self.destination} (argument 13) already holds "
                           f"{', '.join(taken)}, which this restoration would write; choose "
                           "an empty or new directory.")
        self.state = RestoreState.new(self.destination, self.args.bucket, self.set)
        self.state.save()
        write_restore_map(self.destination, self.args.bucket, self.set, self.state)

    def report_set(self):
        self.out.section(SECTION_RESTORE_SET)
        for line in set_lines(self.set):
            self.out.line(line)

    def already_finished(self):
        """True (and said) when this destination holds the finished restoration."""
        if not (self.state and self.state.finished):
            return False
        last = self.state.restore_set(self.downloads).last_backup
        self.out.line(f"{self.destination} already holds the complete restoration of "
                      f"location {self.args.location} as of {describe_stamp(last)}, "
                      f"finished {self.state.finished}; nothing to do. To restore again, "
                      "use another destination directory.")
        left_out = sum(self.state.left_out.values())
        if left_out:
            self.out.line(f"Except {left_out} name(s) this computer cannot create: they are "
                          "named NOT RESTORED in the log of the run that extracted them.")
        if os.path.isdir(self.downloads):
            self.out.line(f"The downloaded archives are kept in {self.downloads}; delete "
                          "them when you no longer need them.")
        return True

    # -- thaw ----------------------------------------------------------------------
    def is_downloaded(self, volume):
        return volume.key in self.verified or file_matches(volume.path, volume, False)

    def statuses(self):
        """{key: thaw state} of every volume; downloaded ones need no S3 request."""
        found = {}
        for volume in self.set.volumes:
            if self.is_downloaded(volume):
                found[volume.key] = DOWNLOADED
                continue
            with s3_call(self.args.bucket, volume.key):
                head = self.s3.head_object(Bucket=self.args.bucket, Key=volume.key)
            found[volume.key] = parse_restore_header(head)
        return found

    def request_thaws(self, statuses):
        """restore_object for each volume not thawed or requested yet (SPEC 7 step 2)."""
        asked = 0
        for volume in self.set.volumes:
            if statuses[volume.key] == NOT_REQUESTED:
                statuses[volume.key] = request_thaw(self.s3, self.args.bucket, volume.key,
                                                    self.args.days, self.settings.restore_tier)
                self.out.line(f"Thaw requested ({self.settings.restore_tier}, "
                              f"{self.args.days} days): {volume.key}", terminal=False)
                asked += 1
        return asked

    def progress_line(self, statuses):
        counts = {state: 0 for state in (DOWNLOADED, AVAILABLE, IN_PROGRESS, NOT_REQUESTED)}
        ready_bytes = 0
        for volume in self.set.volumes:
            counts[statuses[volume.key]] += 1
            if statuses[volume.key] in (DOWNLOADED, AVAILABLE):
                ready_bytes += volume.size
        total = sum(v.size for v in self.set.volumes)
        ready = counts[DOWNLOADED] + counts[AVAILABLE]
        parts = [f"{ready} of {len(self.set.volumes)} volume(s) thawed "
                 f"({ready_bytes:,} of {total:,} bytes)"]
        parts += [f"{counts[state]} {state}" for state in (DOWNLOADED, IN_PROGRESS,
                                                            NOT_REQUESTED) if counts[state]]
        return f"Thaw status at {dt.datetime.now():%Y-%m-%d %H:%M:%S}: " + ", ".join(parts)

    # -- download ------------------------------------------------------------------
    def download_available(self, statuses):
        for volume in self.set.volumes:
            if statuses[volume.key] != AVAILABLE:
                continue
            self.out.line(f"Downloading {volume.key} ({volume.size:,} bytes)")
            with s3_call(self.args.bucket, volume.key):
                download_volume(self.s3, self.args.bucket, volume)
            self.verified.add(volume.key)
            statuses[volume.key] = DOWNLOADED

    def all_downloaded(self, statuses):
        return all(statuses[v.key] == DOWNLOADED for v in self.set.volumes)

    # -- extraction ------------------------------------------------------------------
    def verify_downloads(self):
        """Every volume on disk, with the manifest's size and SHA-256."""
        missing, damaged = [], []
        for volume in self.set.volumes:
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
        return (f"the {kind} backup {describe_stamp(archive.backup)} of source "
                f"{archive.number} ({archive.source})")

    def seven_zip(self, argv, archive):
        code, output = run_seven_zip(self.settings, self.platform, argv, self.args.key)
        for line in output.splitlines():
            self.out.line(line, terminal=False)
        failure = seven_zip_failure(code, output, self.archive_name(archive))
        if failure:
            raise failure

    def test_archives(self, pending):
        """7-Zip 't' on everything first: a wrong key must not touch any file."""
        for archive in self.set.archives:
            if archive.number in pending and archive.volumes:
                self.out.line(f"Testing {self.archive_name(archive)}")
                self.seven_zip(["t", archive.volumes[0].path, "-bd", "-sccUTF-8"], archive)

    def extract_source(self, number):
        """Full, then each incremental in time order, with overwrite; then rename."""
        target = os.path.join(self.destination, str(number))
        staging = target + INCOMPLETE_SUFFIX
        for leftover in (target, staging):      # ours: an interrupted earlier run's
            if os.path.lexists(leftover):
                shutil.rmtree(leftover)
        os.mkdir(staging)
        seen, skipped = {}, 0
        for archive in self.set.archives_of(number):
            if archive.volumes:
                self.out.line(f"Extracting {self.archive_name(archive)}")
                skipped += self.extract_archive(archive, staging, seen)
        restore_absolute_links(staging)
        os.rename(staging, target)
        if skipped:
            self.state.note_left_out(number, skipped)
        self.state.mark_done(number)
        write_restore_map(self.destination, self.args.bucket, self.set, self.state)

    def extract_archive(self, archive, staging, seen):
        """7-Zip x of one archive; names this computer cannot create are left out and
        each is named in the log (7-Zip would write them changed, over other files).
        Returns how many were left out."""
        argv = ["x", archive.volumes[0].path, f"-o{os.path.abspath(staging)}", "-aoa", "-y",
                "-snld20", "-bd", "-sccUTF-8"]
        platform, skipped = self.platform, {}
        if platform.refuses_names:
            entries = archive_entries([v.path for v in archive.volumes], platform.sep)
            skipped = names_to_skip(entries, platform, seen)
        if not skipped:
            self.seven_zip(argv, archive)
            return 0
        original = dict((n, p) for n, _s, p in self.set.sources)[archive.number]
        sep = "/" if original.startswith("/") else "\\"    # the backed-up computer's
        for path, reason in sorted(skipped.items()):
            line = f"NOT RESTORED ({reason}): {original.rstrip(sep)}{sep}{path}"
            self.out.line(line.replace(platform.sep, sep))
        wanted = inclusion_list(entries, skipped, platform)
        if wanted:
            list_file = os.path.join(self.downloads, "restore-inclusion-list.txt")
            _write_private_text(list_file, "\n".join(wanted) + "\n")
            # -ssc: Windows 7-Zip matches names ignoring case, which would take in
            # the other spelling of a name that differs only in case.
            self.seven_zip(argv + ["-ssc", "-scsUTF-8", "-i@" + list_file], archive)
            os.remove(list_file)
        for path, is_dir in entries:        # directories whose content was all left out
            if is_dir and path not in skipped:
                os.makedirs(platform.long_path(os.path.join(staging, path)), exist_ok=True)
        return len(skipped)

    def extract(self):
        self.out.section(SECTION_EXTRACT)
        self.verify_downloads()
        pending = [n for n, _s, _p in self.set.sources if not self.state.is_done(n)]
        self.test_archives(pending)
        for number in pending:
            self.extract_source(number)
        self.state.mark_finished()
        write_restore_map(self.destination, self.args.bucket, self.set, self.state)
        for number, _source, path in self.set.sources:
            self.out.line(f"Restored {path} into {os.path.join(self.destination, str(number))}")
        self.out.line(f"Map of the numbered directories: "
                      f"{os.path.join(self.destination, RESTORE_MAP_FILE)}")
        left_out = sum(self.state.left_out.values())
        if left_out:
            raise AamError(
                f"{left_out} name(s) in the backup cannot be created on this computer and "
                "were not restored (each is named above, NOT RESTORED); everything else "
                f"is. The downloaded archives are kept in {self.downloads}: 7-Zip on Linux "
                "or macOS extracts those names.")

    def remove_downloads(self):
        if os.path.isdir(self.downloads):
            shutil.rmtree(self.downloads)
            self.out.line(f"Removed the downloaded archives ({self.downloads}).")


# -- the five operations -------------------------------------------------------------

def restore_to_s3(restoration):
    """restore-to-aws-s3-from-aws-s3-glacier-deep-archive: plan, then thaw requests."""
    out = restoration.out
    for line in plan_lines(restoration.set, restoration.args.days,
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
    restoration.load_set()
    restoration.claim_destination()
    restoration.report_set()
    wait_and_download(restoration)
    restoration.extract()
    restoration.remove_downloads()


def run_multi_step(restoration, operation):
    if restoration.already_finished():
        return
    restoration.load_set()
    restoration.claim_destination()
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
    """SPEC 6 step 8 / seed 2.2.4: title and the short body, nothing else."""
    title = (f"{'FAILURE' if failed else 'SUCCESS'}, {local_time_text(start)} "
             "data restoration!")
    restore_set = restoration.set or (restoration.state and
                                      restoration.state.restore_set(restoration.downloads))
    if restore_set:
        full = describe_stamp(restore_set.full)
        incrementals = ", ".join(describe_stamp(i) for i in restore_set.incrementals)
    else:
        full, incrementals = "none", ""
    body = [f"Unique Backup-Set Prefix: {args.location}",
            f"Full backup used: {full}",
            f"Incremental backups used: {incrementals or 'none'}",
            "For more info, refer to the local backup log."]
    session = restoration.session or aws_session(args.access_key_id, args.secret_access_key)
    send_email_report(session, restoration.settings, args.sender_name, args.sender_address,
                      args.recipient, title, "\n".join(body) + "\n", out)


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
    if one_step:
        try:
            out = RunLog(args.log_dir, args.operation, args.secrets, platform)
        except OSError as problem:
            print(f"The log file cannot be created in {args.log_dir}: {problem.strerror}",
                  file=sys.stderr)
            return EXIT_FAILURE
        out.section(SECTION_ARGUMENTS)
        out.line(f"{PROGRAM_NAME} {VERSION}, {args.operation}", terminal=False)
        for line in args.masked():
            out.line(line, terminal=False)
    else:
        out = TerminalOutput(args.secrets)
    out.section(SECTION_RESTORE_START)
    out.line(f"{args.operation} started {local_time_text(start)} "
             f"({describe_stamp(start)}); destination {args.destination}")
    restoration = Restoration(args, platform, settings, out)
    code = EXIT_OK
    try:
        restoration.open()
        if one_step:
            run_one_step(restoration)
        else:
            run_multi_step(restoration, args.operation)
    except (AamError, KeyboardInterrupt, Interrupted) as problem:
        if isinstance(problem, (KeyboardInterrupt, Interrupted)):
            problem = Interrupted("Interrupted. Nothing finished is lost: run the same "
                                  "command again to continue.")
        out.section(SECTION_RESTORE_ERROR)
        out.line(f"ERROR: {problem}")
        code = problem.exit_code
    except Exception as problem:     # noqa: BLE001 - reported, so that one-step still mails
        out.section(SECTION_RESTORE_ERROR)
        out.line(f"ERROR: {failure_text(problem)}")
        if not (is_transient(problem) or isinstance(problem, OSError)):
            out.line(traceback.format_exc(), terminal=False)
        code = EXIT_FAILURE
    finally:
        restoration.close()
    if one_step:
        out.section(SECTION_SUMMARY)
        out.line("SUCCESS: the data is restored." if code == EXIT_OK
                 else "FAILURE: the data is not (completely) restored; see above.")
        if args.send_email:
            restore_email(args, restoration, code != EXIT_OK, start, out)
        out.line(f"Log file: {out.path}")
        out.close()
    return code


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
        try:
            if len(argv) > 1 and argv[1] == CHILD_AGENT:
                return self.child_pass(parse_child_args(argv))
            if operation in BACKUP_OPERATIONS:
                args = parse_backup_args(argv)
                return self.with_signals(BackupRun(args, self.platform, self.settings(),
                                                   self.program_path).execute)
            if operation in RESTORE_OPERATIONS:
                args = parse_restore_args(argv)
                settings = self.settings()
                return self.with_signals(lambda: run_restore(args, self.platform, settings))
            raise UsageError(f"unknown operation {operation!r}" if operation
                             else "no operation given")
        except UsageError as problem:
            print(f"error: {problem}", file=sys.stderr)
            print(usage_text(problem.operation), file=sys.stderr)
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
            raise Interrupted("interrupted by a signal")
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return function()
        except (KeyboardInterrupt, Interrupted):
            print("Interrupted.", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="replace")
    return Aam_Auto_Backup(sys.argv[1:] if argv is None else argv).run()


if __name__ == "__main__":
    sys.exit(main())
