"""The Windows code paths for real: Windows Python 3.11 and 7z.exe under Wine.

Black-box, like the rest of the suite: the program runs as a Windows process
(tests/windows_under_wine.py) against the moto server on the Linux side over
HTTP, and the results are compared with what the Linux program gives for the
same backup set.  What Wine cannot run (Robocopy is a stub, cmd.exe differs from
Windows' in a few constructs) stays pinned by tests/test_windows_commands.py;
docs/development.md, "Windows under Wine", lists both.
"""

import json
import os
import subprocess

import pytest

import aam_auto_backup as aab
from conftest import KEY, file_times_pass, ok, pieces_of, read_until
from sample_tree import read_tree
from windows_under_wine import windows_path

ONE_STEP = aab.ONE_STEP_RESTORE
# In a parallel run (tools/test) these tests share one worker: one Wine prefix.
pytestmark = pytest.mark.xdist_group("wine")


def one_step_args(sandbox, destination, log_dir):
    return sandbox.restore_args(ONE_STEP, destination, {"log_dir": log_dir})


def windows_env(sandbox, **extra):
    """The sandbox's environment with its paths as Windows sees them."""
    env = sandbox.restore_env(**extra)
    for name in ("AAM_TEMP_ROOT", "AAM_LOCK_FILE"):
        env[name] = windows_path(env[name])
    return env


def run_windows(wine, args, env):
    result = wine.run(wine.python(wine.program, *args), env=env)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"))


def start_windows(wine, args, env):
    return subprocess.Popen(wine.python(wine.program, *args), env=wine.env(env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace")


def log_text(log_dir, operation, which=0):
    """The log of a run (the first one, by default), by the time in its name."""
    logs = sorted(n for n in os.listdir(log_dir) if n.endswith(f"_{operation}.log"))
    return open(os.path.join(log_dir, logs[which]), encoding="utf-8").read()


# Names a Linux backup may hold that Windows cannot, with the reason the log gives.
IMPOSSIBLE_ON_WINDOWS = {
    "Documents/odd/a:b.txt": "cannot hold ':'",
    "Documents/odd/what?.txt": "cannot hold '?'",
    "Documents/odd/star*.txt": "cannot hold '*'",
    'Documents/odd/say "hi".txt': "cannot hold '\"'",
    "Documents/odd/pipe|lt<gt>.txt": "cannot hold '<>|'",
    "Documents/odd/trailing dot.": "cannot end with a dot or a space",
    "Documents/odd/trailing space ": "cannot end with a dot or a space",
    "Documents/odd/CON": "CON is a device name",
    "Documents/odd/aux.txt": "aux is a device name",
    "Documents/odd/dir./inside.txt": "cannot end with a dot or a space",
}
# Beside them, names 7-Zip would have written a changed name over.
NEIGHBOURS = {
    "Documents/odd/a_b.txt": b"the real a_b.txt\n",
    "Documents/odd/_CON": b"the real _CON\n",
    "Documents/odd/trailing dot_": b"the real one\n",
}
# Of two names that differ only in letter case Windows keeps the first: here the
# full backup's; the incremental's is left out.
CASE_PAIR = ("Documents/odd/Case.txt", "Documents/odd/case.txt")
# Over 260 characters once under R:\restored\1\ on Windows.
LONG = "Documents/" + "/".join(["a directory name of fifty characters, more or less"] * 5) + \
    "/long path file \u00e9.txt"


def write_files(root, files):
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


def test_which_names_windows_cannot_create():
    """The rule itself, without Wine: what is refused, and look-alikes that are not."""
    windows = aab.WindowsPlatform()
    refused = ["a:b", "x/what?", "star*", 'q"', "p|q", "<a>", "tab\there", "dot.",
               "space ", "CON", "con", "aux.txt", "Nul.tar.gz", "COM1", "lpt9.log",
               "ok/CON/inside.txt", "dir./file", "back\\slash"]
    allowed = ["console.txt", "CON_x", "COM10", "auxiliary", " leading space", "a.b",
               "ok/normal name.txt", "\u00fcml\u00e4ut \u65e5\u672c"]
    assert [n for n in refused if windows.cannot_create(n) is None] == []
    assert [n for n in allowed if windows.cannot_create(n) is not None] == []
    assert aab.PosixPlatform().cannot_create("a:b/CON.") is None


def linux_backups_with_windows_pitfalls(sandbox):
    """A full backup and an incremental, made on Linux."""
    tree = sandbox.sample()
    write_files(tree.first_mount, dict(NEIGHBOURS, **{LONG: b"deep\n", CASE_PAIR[0]: b"A"},
                                       **{p: p.encode() for p in IMPOSSIBLE_ON_WINDOWS}))
    ok(sandbox.backup())
    file_times_pass()
    write_files(tree.first_mount, {CASE_PAIR[1]: b"a", "Documents/report.txt": b"changed\n"})
    ok(sandbox.backup())
    return tree


def restored_by_number(destination):
    return {name: read_tree(os.path.join(destination, name)) for name in ("1", "2")}


def test_a_linux_backup_restores_under_windows_as_on_linux_but_names_windows_refuse(
        sandbox, wine, tmp_path):
    tree = linux_backups_with_windows_pitfalls(sandbox)
    drive = tmp_path / "r-drive"
    drive.mkdir()
    wine.map_drive("r", drive)
    windows_logs = tmp_path / "windows-logs"
    args = one_step_args(sandbox, "R:\\restored", windows_path(windows_logs))
    # A first run holds the destination's lock while the thaw is in progress; a
    # second is refused; killed, the first leaves no lock, and a third continues it.
    sandbox.aws.set_restore_progression(10_000)
    first = start_windows(wine, args, windows_env(sandbox))
    try:
        read_until(first, "Next check in")
        second = run_windows(wine, args, windows_env(sandbox))
        assert second.returncode == 1, second.stdout + second.stderr
        assert "Another restoration is running into R:\\restored" in second.stdout
    finally:
        first.kill()
        first.wait(timeout=60)
        sandbox.aws.set_restore_immediate()
    for name in os.listdir(windows_logs):       # the third run's log, alone
        os.remove(windows_logs / name)

    result = run_windows(wine, args, windows_env(sandbox))

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Continuing the restoration started" in result.stdout
    linux_destination = tmp_path / "linux-restore"
    ok(sandbox.run(one_step_args(sandbox, str(linux_destination), sandbox.logs),
                   env=sandbox.restore_env()))
    linux = restored_by_number(linux_destination)
    assert linux["1"]["Documents/report.txt"] == b"changed\n"
    log = log_text(windows_logs, ONE_STEP)
    mount = tree.first_mount
    left_out = dict(IMPOSSIBLE_ON_WINDOWS, **{
        CASE_PAIR[1]: f"differs only in letter case from {CASE_PAIR[0]}"})
    for rel, reason in left_out.items():
        prefix = "" if " from " in reason or "device" in reason else "a Windows name "
        assert f"NOT RESTORED ({prefix}{reason}" in log and f"{mount}/{rel}\n" in log, rel
    assert f"{mount}/Documents/odd/dir.\n" in log          # the directory, and its file
    assert f"{len(left_out) + 1} path(s) could not be restored" in log
    destination = drive / "restored"
    expected = {"1": {rel: data for rel, data in linux["1"].items() if rel not in left_out},
                "2": linux["2"]}
    assert restored_by_number(destination) == expected
    assert len(windows_path(destination / "1" / LONG)) > 260
    assert "FAILURE" in log
    # The state file and the map say so; the archives stay for a Linux extraction.
    assert os.listdir(destination / "downloads")
    restore_map = (destination / "restore-map.txt").read_text(encoding="utf-8")
    assert f"restored, except {len(left_out) + 1} path(s) listed in 1.not-restored.txt" \
        in restore_map
    listed = (destination / "1.not-restored.txt").read_text(encoding="utf-8")
    assert all(f"{mount}/{rel}\t" in listed for rel in left_out if "\t" not in rel)
    again = run_windows(wine, args, windows_env(sandbox))
    assert again.returncode == 0 and f"Except {len(left_out) + 1} path(s)" in again.stdout


# -- the Windows child: ShadowSpawn stand-in, cmd.exe, 7z.exe ----------------------

MOUNT_NAME = "Dokumente f\u00fcr Ann"        # '\u00fc' is 0x81 in code page 437
SOURCE_FILES = {
    "Documents/report.txt": b"quarterly report\n" * 40,
    "Documents/R\u00e9sum\u00e9 na\u00efve \u20ac \u65e5\u672c.txt": b"d\xc3\xa9j\xc3\xa0 vu\n",
    "Documents/sub/deep/keep.txt": b"deep file\n",
    "Documents/zero-bytes.txt": b"",
    "Documents/big.bin": os.urandom(200_000),          # spans several 64 KiB volumes
    "Pictures/2024/beach.jpg": os.urandom(30_000),
}
EXCLUDED_FILES = {
    "Documents/~WRL1234.tmp": b"word temp file\n",
    "Documents/-audio/song.mp3": b"excluded by the directory name -*\n",
    "Documents/private/plan.txt": b"excluded by its full path\n",
    "Pictures/2023/old.jpg": b"beside the listed directory\n",
    "loose.txt": b"in the mount, outside the listed directories\n",
}


def windows_source(tmp_path, wine):
    """S:\\Dokumente f\u00fcr Ann with the files above; the Windows instruction file."""
    drive = tmp_path / "s-drive"
    for rel, data in {**SOURCE_FILES, **EXCLUDED_FILES}.items():
        path = drive / MOUNT_NAME / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (drive / MOUNT_NAME / "Documents" / "empty-dir").mkdir()
    wine.map_drive("s", drive)
    mount = f"S:\\{MOUNT_NAME}"
    instructions = tmp_path / "instructions-windows.txt"
    instructions.write_text("\r\n".join([
        f"{mount}\\Documents\\", f"{mount}\\Pictures\\2024\\", "",
        f"{mount}\\Documents\\private\\", "-*\\", "", "~WRL*.tmp", ""]), encoding="utf-8")
    return mount, windows_path(instructions)


def windows_backup_args(sandbox, wine, instructions, changes=None):
    return sandbox.backup_args(changes={
        "python": wine.python_exe, "log_dir": windows_path(sandbox.logs),
        "instruction_file": instructions, "destinations": "AWS", "mirror_root": "",
        **(changes or {})})


def test_the_windows_child_archives_exactly_the_selection_and_linux_restores_it(
        sandbox, wine, tmp_path):
    mount, instructions = windows_source(tmp_path, wine)
    gate = tmp_path / "snapshot-done"
    added = tmp_path / "s-drive" / MOUNT_NAME / "Documents" / "ajout\u00e9 pendant.txt"
    args = windows_backup_args(sandbox, wine, instructions)
    # pieces of 150 KB of files: big.bin is one of its own, the files before and after
    # it make two more, each made by a batch file of its own
    env = windows_env(sandbox, AAM_VOLUME_SIZE="65536", AAM_PIECE_SIZE="150000")
    first = start_windows(wine, args, dict(env, SHADOWSPAWN_STAND_IN_GATE=windows_path(gate)))
    second = None
    try:
        # The lock: while the first run holds it (its snapshot is slow), a run that
        # may not wait gives up and one that may waits, then builds on the first.
        read_until(first, "Source 1 of 1")
        added.write_bytes(b"in the full backup and, changed since its start, the next one\n")
        refused = run_windows(wine, args, env)
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "held the lock" in refused.stdout
        second = start_windows(wine, windows_backup_args(sandbox, wine, instructions,
                                                         {"lock_wait": "600"}), env)
        read_until(second, "Another backup is running")
        gate.touch()
        assert first.wait(timeout=300) == 0, first.stdout.read()
        log = log_text(sandbox.logs, aab.REGULAR_BACKUP)
        rest = second.stdout.read()
        assert second.wait(timeout=300) == 0, rest
        assert "Backup scope: incremental" in rest
        incremental_log = log_text(sandbox.logs, aab.REGULAR_BACKUP, -1)
        assert "(1 files in 1 piece(s), 1 volume(s))" in incremental_log
        (full_indicator,) = [n.key for n in sandbox.object_names()
                             if n.indicator and n.incremental is None]
        assert len(sandbox.indicator(full_indicator)["pieces"]) == 3
    finally:
        gate.touch()
        for process in (first, second):
            if process and process.poll() is None:
                process.kill()
    # ShadowSpawn's own lines are in the console code page (437), the child's in
    # UTF-8 (-X utf8, 7z.exe -sccUTF-8): both read right.
    assert f"Shadowing {mount} at q:" in log
    assert "+ Documents\\R\u00e9sum\u00e9 na\u00efve \u20ac \u65e5\u672c.txt" in log
    assert "validation failure" not in log and "SUCCESS" in log
    volumes = sorted(o["Key"] for o in sandbox.objects()
                     if "_piece" in o["Key"] and "_0_0.0_" in o["Key"])   # the full's
    assert len(volumes) > 3
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    stored, firsts = set(), []
    for piece in pieces_of(volumes).values():       # each piece opens on its own
        paths = [sandbox.fetch_volume(key, str(downloads)) for key in piece]
        listing = subprocess.run(["7zz", "l", "-ba", "-slt", paths[0]], capture_output=True,
                                 text=True, check=True).stdout
        stored |= {line[7:] for line in listing.splitlines() if line.startswith("Path = ")}
        firsts.append(paths[0])
    expected = set(SOURCE_FILES) | {"Documents/empty-dir", "Documents/" + added.name}
    ancestors = {rel.rsplit("/", n)[0] for rel in expected for n in range(1, rel.count("/") + 1)}
    # exactly the selection, with (some of) the directories leading to it
    assert expected <= stored <= expected | ancestors
    extracted = tmp_path / "extracted"
    for first in firsts:
        assert subprocess.run(["7zz", "x", f"-p{KEY}", f"-o{extracted}", first],
                              capture_output=True).returncode == 0
    selection = {**SOURCE_FILES, "Documents/empty-dir": None,
                 os.path.relpath(added, added.parents[1]): added.read_bytes()}
    assert read_tree(extracted) == selection
    # The Linux program restores the Windows backup.
    linux_destination = tmp_path / "linux-restore"
    ok(sandbox.run(one_step_args(sandbox, str(linux_destination), sandbox.logs),
                   env=sandbox.restore_env()))
    assert read_tree(linux_destination / "1") == selection
    assert f"1\t{mount}\trestored" in (linux_destination / "restore-map.txt").read_text()


def test_a_windows_preview_counts_as_the_windows_walk_selects(sandbox, wine, tmp_path):
    """preview-backup as a Windows process: paths and name patterns compared without
    regard to letter case (a path and a pattern written in other cases still exclude and
    are counted by their line), and nothing written."""
    mount, _instructions = windows_source(tmp_path, wine)
    instructions = tmp_path / "instructions-other-case.txt"
    instructions.write_text("\r\n".join([
        f"{mount}\\Documents\\", f"{mount}\\Pictures\\2024\\", "",
        f"{mount.lower()}\\DOCUMENTS\\Private\\", "-*\\", "", "~wrl*.TMP", ""]),
        encoding="utf-8")
    before = [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files]
    result = run_windows(wine, windows_backup_args(sandbox, wine, windows_path(instructions),
                                                   {"operation": aab.PREVIEW_BACKUP}),
                         windows_env(sandbox, PYTHONIOENCODING="utf-8"))
    out = ok(result).stdout
    assert [os.path.join(d, n) for d, dirs, files in os.walk(tmp_path)
            for n in dirs + files] == before
    assert not sandbox.objects()
    size = sum(len(data) for data in SOURCE_FILES.values())
    assert f"Selected: {len(SOURCE_FILES)} file(s), {aab.exact_bytes(size)} in 1 source(s)." \
        in out
    assert "Backup scope: full (no complete full backup of the 1 current sources" in out
    private = len(EXCLUDED_FILES["Documents/private/plan.txt"])
    assert (f"line 4, {mount.lower()}\\DOCUMENTS\\Private\\: 1 directory, holding 1 file(s), "
            f"{private} B\r\n    {mount}\\Documents\\private\r\n") in out
    assert (f"line 5, -*\\: 1 directory, holding 1 file(s), "
            f"{len(EXCLUDED_FILES['Documents/-audio/song.mp3'])} B") in out
    assert (f"line 7, ~wrl*.TMP: 1 file(s), {len(EXCLUDED_FILES['Documents/~WRL1234.tmp'])} B"
            f"\r\n    {mount}\\Documents\\~WRL1234.tmp") in out


def test_a_windows_backup_cut_off_by_an_outage_is_continued_by_the_next_run(
        sandbox, wine, proxy, tmp_path):
    """The journal under Windows: the next run reads what the done pieces hold (the child
    opens the journal read-only by a file URI with a drive letter) and uploads only the
    rest; Linux restores the continued backup exactly."""
    mount, instructions = windows_source(tmp_path, wine)
    args = windows_backup_args(sandbox, wine, instructions, {"send_email": "False"})
    env = dict(windows_env(sandbox, AAM_VOLUME_SIZE="65536", AAM_PIECE_SIZE="150000"),
               AWS_ENDPOINT_URL=proxy.endpoint_url)
    proxy.fail_after(4, services={"s3"})   # the LIST, piece 1 (one volume), two of piece 2
    cut = run_windows(wine, args, env)
    assert cut.returncode == 1, cut.stdout + cut.stderr
    assert "the next run continues it" in cut.stdout
    proxy.clear_faults()
    first = {r["key"] for r in proxy.requests() if r["kind"] == "PutObject"}
    proxy.reset_counters()
    again = run_windows(wine, args, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Backup scope: continuing the full backup" in again.stdout
    assert any("_piece0001_" in key for key in first)
    # piece 1 was kept and nothing of it archived again: the next run made big.bin's
    # piece and the last one, numbered after piece 2 that the outage cut off (and after
    # piece 3, if the cut run had begun it: numbers are never used twice)
    (indicator,) = [n.key for n in sandbox.object_names() if n.indicator]
    numbers = [p["number"] for p in sandbox.indicator(indicator)["pieces"]]
    assert numbers[0] == 1 and len(numbers) == 3 and 2 < numbers[1] < numbers[2], numbers
    linux_destination = tmp_path / "linux-restore"
    ok(sandbox.run(one_step_args(sandbox, str(linux_destination), sandbox.logs),
                   env=sandbox.restore_env()))
    assert read_tree(linux_destination / "1") == {**SOURCE_FILES, "Documents/empty-dir": None}


SHARED_FILE_SCRIPT = r'''
import ctypes, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import aam_auto_backup as aab

path = sys.argv[2]
kernel32 = ctypes.windll.kernel32
kernel32.CreateFileW.restype = ctypes.c_void_p
GENERIC_READ, DELETE, SHARE_ALL, OPEN_EXISTING = 0x80000000, 0x00010000, 7, 3
refused = threading.Event()
real_sleep = time.sleep


def sleep(seconds):          # the shared-file retry waits: it was refused once
    refused.set()
    real_sleep(seconds)


time.sleep = sleep
outcome = {}


def attempt(name, action, *args):
    try:
        outcome[name] = action(*args)
    except OSError as problem:
        outcome[name] = repr(problem)
    finally:
        refused.set()          # ended without waiting: nothing to wait for

# The reader: the other process holds the file as a rename into place does (DELETE).
aab._write_whole(path, json.dumps({"piece": 3}))
handle = kernel32.CreateFileW(path, GENERIC_READ | DELETE, SHARE_ALL, None, OPEN_EXISTING,
                              0, None)
try:
    open(path).close()
    outcome["plain_open"] = "allowed"
except PermissionError:
    outcome["plain_open"] = "refused"
reader = threading.Thread(target=attempt, args=("read", aab._read_whole_json, path))
reader.start()
refused.wait()
kernel32.CloseHandle(ctypes.c_void_p(handle))
reader.join()

# The writer: the other process has the file open (a reader, with Python's open).
refused.clear()
holder = open(path)
writer = threading.Thread(target=attempt,
                          args=("write", aab._write_whole, path, json.dumps({"piece": 4})))
writer.start()
refused.wait()
holder.close()
writer.join()
outcome["written"] = aab._read_whole_json(path)
print(json.dumps(outcome))
'''


def test_files_the_two_passes_share_are_read_and_replaced_through_windows_sharing(
        wine, tmp_path):
    """Windows refuses for a moment to open a file the other pass is renaming into place,
    or to replace a file the other pass has open (the parent once failed a backup on a
    piece's .done file this way): both sides wait for the other to let go."""
    script = tmp_path / "shared.py"
    script.write_text(SHARED_FILE_SCRIPT)
    result = wine.run(wine.python(windows_path(str(script)), windows_path(wine.program_dir),
                                  windows_path(str(tmp_path / "3.done"))))
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert outcome == {"plain_open": "refused", "read": {"piece": 3}, "write": None,
                       "written": {"piece": 4}}
