"""The Windows code paths for real: Windows Python 3.11 and 7z.exe under Wine.

Black-box, like the rest of the suite: the program runs as a Windows process
(tests/windows_under_wine.py) against the moto server on the Linux side over
HTTP, and the results are compared with what the Linux program gives for the
same backup set.  What Wine cannot run (Robocopy is a stub, cmd.exe differs from
Windows' in a few constructs) stays pinned by tests/test_windows_commands.py;
README, "Windows under Wine", lists both.
"""

import os
import subprocess
import sys

import pytest

from conftest import ACCESS_KEY_ID, KEY, PROGRAM, SECRET, SENDER
from sample_tree import read_tree
from windows_under_wine import windows_path

ONE_STEP = "one-step-aws-data-restoration"


def restore_args(sandbox, destination, log_dir, changes=None):
    values = {1: ONE_STEP, 2: log_dir, 3: "True", 4: "AAM Restore Report", 5: SENDER,
              6: sandbox.recipient, 7: "2", 8: KEY, 9: sandbox.bucket, 10: sandbox.location,
              11: ACCESS_KEY_ID, 12: SECRET, 13: destination}
    values.update(changes or {})
    return [values[n] for n in range(1, 14)]


def windows_env(sandbox, **extra):
    """The sandbox's environment with its paths as Windows sees them."""
    env = sandbox.env(AAM_RESTORE_POLL_SECONDS="1", **extra)
    for name in ("AAM_TEMP_ROOT", "AAM_LOCK_FILE"):
        env[name] = windows_path(env[name])
    return env


def run_windows(wine, args, env):
    result = wine.run(wine.python(wine.program, *args), env=env)
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"))


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def log_text(log_dir, operation):
    (log,) = [n for n in os.listdir(log_dir) if n.endswith(f"_{operation}.log")]
    return open(os.path.join(log_dir, log), encoding="utf-8").read()


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
# Windows keeps one of two names that differ only in letter case: the first met.
CASE_PAIR = ("Documents/odd/Case.txt", "Documents/odd/case.txt")
# Over 260 characters once under R:\restored\1\ on Windows.
LONG = "Documents/" + "/".join(["a directory name of fifty characters, more or less"] * 5) + \
    "/long path file \u00e9.txt"


def linux_backup_with_windows_pitfalls(sandbox):
    tree = sandbox.sample()
    extra = dict(NEIGHBOURS, **{LONG: b"deep\n"}, **{CASE_PAIR[0]: b"upper", CASE_PAIR[1]: b"lower"})
    extra.update({path: path.encode() for path in IMPOSSIBLE_ON_WINDOWS})
    for rel, data in extra.items():
        path = os.path.join(tree.first_mount, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    ok(sandbox.backup())
    return tree


def restored_by_number(destination):
    return {name: read_tree(os.path.join(destination, name)) for name in ("1", "2")}


def test_a_linux_backup_restores_under_windows_as_on_linux_but_names_windows_refuses(
        sandbox, wine, tmp_path):
    tree = linux_backup_with_windows_pitfalls(sandbox)
    linux_destination = tmp_path / "linux-restore"
    ok(sandbox.run(restore_args(sandbox, str(linux_destination), sandbox.logs),
                   env=sandbox.env(AAM_RESTORE_POLL_SECONDS="1")))
    linux = restored_by_number(linux_destination)
    assert len(linux["1"]) > len(IMPOSSIBLE_ON_WINDOWS) + len(NEIGHBOURS)
    drive = tmp_path / "r-drive"
    drive.mkdir()
    wine.map_drive("r", drive)
    windows_logs = tmp_path / "windows-logs"

    result = run_windows(wine, restore_args(sandbox, "R:\\restored", windows_path(windows_logs)),
                         windows_env(sandbox))

    assert result.returncode == 1, result.stdout + result.stderr
    log = log_text(windows_logs, ONE_STEP)
    mount = tree.first_mount
    (kept,) = [rel for rel in CASE_PAIR
               if f"NOT RESTORED (differs only in letter case from {rel}): {mount}/" in log]
    left_out = dict(IMPOSSIBLE_ON_WINDOWS, **{
        rel: f"differs only in letter case from {kept}" for rel in CASE_PAIR if rel != kept})
    for rel, reason in left_out.items():
        prefix = "" if " from " in reason or "device" in reason else "a Windows name "
        assert f"NOT RESTORED ({prefix}{reason}" in log and f"{mount}/{rel}\n" in log, rel
    assert f"{mount}/Documents/odd/dir.\n" in log          # the directory, and its file
    assert f"{len(left_out) + 1} name(s) in the backup cannot be created" in log
    destination = drive / "restored"
    expected = {"1": {rel: data for rel, data in linux["1"].items() if rel not in left_out},
                "2": linux["2"]}
    assert restored_by_number(destination) == expected
    assert len(windows_path(destination / "1" / LONG)) > 260
    assert "FAILURE" in log
    # The state file and the map say so; the archives stay for a Linux extraction.
    assert os.listdir(destination / "downloads")
    restore_map = (destination / "restore-map.txt").read_text(encoding="utf-8")
    assert f"restored except {len(left_out) + 1} name(s)" in restore_map
