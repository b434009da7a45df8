"""The local mirror and the Deep Archive backup are independent destinations, and the
mirror validation also reports what is in the mirror but should not be.

Real parts: the CLI as a subprocess, real rsync and 7-Zip, the moto server over HTTP,
a real 1 MB filesystem for the full drive.
"""

import os
import re
import shutil

import pytest

import aam_auto_backup as aab
from conftest import numbered_directories, write_file


def mirrored(sandbox, mount, rel=""):
    return os.path.join(sandbox.mirror, mount.lstrip("/"), rel)


def log_text(sandbox):
    return open(sandbox.log_files()[-1], encoding="utf-8").read()


def plant(path, data=b"planted\n"):
    write_file(path, data)


def test_keep_false_reports_any_file_the_selection_does_not_hold(sandbox):
    tree = sandbox.sample()
    local_only = {"send_email": "False", "destinations": "local", "keep": "False"}
    assert sandbox.backup(local_only).returncode == 0
    # Places rsync --delete leaves alone: beside the listed directories, and under a
    # name the instructions exclude.
    plant(mirrored(sandbox, tree.first_mount, "planted-beside.txt"))
    plant(mirrored(sandbox, tree.first_mount, "Documents/~WRLplanted.tmp"))
    result = sandbox.backup(local_only)
    assert result.returncode == 1, result.stdout + result.stderr
    log = log_text(sandbox)
    for rel in ("planted-beside.txt", "Documents/~WRLplanted.tmp"):
        assert (f"validation failure: {rel}: in the mirror "
                f"{mirrored(sandbox, tree.first_mount).rstrip('/')} but not in the source "
                "(argument 15 is False); delete it there") in log
    # True keeps what the source no longer has: the same files are no failure then.
    assert sandbox.backup({**local_only, "keep": "True"}).returncode == 0


def test_keep_true_reports_an_excluded_file_copied_into_the_mirror(sandbox):
    tree = sandbox.sample()
    local_only = {"send_email": "False", "destinations": "local", "keep": "True"}
    assert sandbox.backup(local_only).returncode == 0
    for rel in ("Documents/private/secret-plan.txt", "Documents/~WRL1234.tmp",
                "Pictures/2023/old.jpg"):
        plant(mirrored(sandbox, tree.first_mount, rel),
              open(os.path.join(tree.first_mount, rel), "rb").read())
    shutil.copytree(os.path.join(tree.second_mount, "cache"),
                    mirrored(sandbox, tree.second_mount, "cache"))
    result = sandbox.backup(local_only)
    assert result.returncode == 1, result.stdout + result.stderr
    log = log_text(sandbox)
    for mount, rel in ((tree.first_mount, "Documents/private/"),
                       (tree.first_mount, "Documents/~WRL1234.tmp"),
                       (tree.first_mount, "Pictures/2023/"),
                       (tree.second_mount, "cache/")):
        assert (f"validation failure: {rel}: excluded by the instruction file, yet in the "
                f"mirror {mirrored(sandbox, mount).rstrip('/')}; delete it there") in log
    assert "secret-plan.txt" not in log            # a directory is named once, as a whole


@pytest.mark.parametrize("keep", ["True", "False"])
def test_an_rsync_that_ignores_filter_rules_is_caught(sandbox, tmp_path, keep):
    """Apple's openrsync (macOS 15.0-15.3) ignored anchored rules and ended in success."""
    tree = sandbox.sample()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "rsync").write_text(
        "#!/bin/sh\n"
        "for a; do shift; case \"$a\" in --filter=*) ;; *) set -- \"$@\" \"$a\";; esac; done\n"
        f"exec {shutil.which('rsync')} \"$@\"\n")
    (fake / "rsync").chmod(0o755)
    env = sandbox.env(PATH=f"{fake}:{os.environ['PATH']}")
    result = sandbox.backup({"send_email": "False", "destinations": "local", "keep": keep},
                            env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert os.path.exists(mirrored(sandbox, tree.first_mount, "Documents/passwords.kdbx"))
    log = log_text(sandbox)
    for rel in ("Documents/passwords.kdbx", "Documents/private/", "loose-in-mount-root.txt"):
        assert f"validation failure: {rel}: excluded by the instruction file, yet in" in log


def test_a_full_mirror_drive_still_completes_the_deep_archive_backup(sandbox, tiny_tmpfs,
                                                                     tmp_path):
    tree = sandbox.sample(picture_size=3_000_000)       # far more than the 1 MB drive
    result = sandbox.backup({"mirror_root": tiny_tmpfs})
    assert result.returncode == 1, result.stdout + result.stderr
    for mount in tree.mounts:                            # rsync's own words, per source
        assert re.search(rf"{re.escape(mount)}: the local mirror failed \(rsync failed"
                         r".*No space left on device", result.stdout)
    assert sandbox.emails()[-1]["subject"].startswith("FAILURE, ")
    assert len([o for o in sandbox.objects() if "_yes_" in o["Key"]]) == 2
    destination = tmp_path / "restored"
    restored = sandbox.restore(aab.ONE_STEP_RESTORE, destination)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert numbered_directories(destination, tree) == tree.expected


def test_a_missing_mirror_drive_still_completes_the_deep_archive_backup(sandbox):
    tree = sandbox.sample()
    missing = "/proc/no-such-drive/backup"               # cannot be created, even by root
    result = sandbox.backup({"send_email": "False", "mirror_root": missing})
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"{tree.first_mount}: the local mirror failed (rsync failed: the mirror "
            f"directory {missing}{tree.first_mount} cannot be created") in result.stdout
    assert len([o for o in sandbox.objects() if "_yes_" in o["Key"]]) == 2
    # That night's backup counts: the next one builds on it.
    again = sandbox.backup({"send_email": "False"})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Backup scope: incremental" in again.stdout


def test_a_child_that_fails_is_named_with_its_real_exit_code(sandbox, tmp_path):
    sandbox.sample()
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\nexit 7\n")
    broken.chmod(0o755)
    result = sandbox.backup({"python": str(broken), "send_email": "False"})
    assert result.returncode == 1
    assert ("Critical error. The child pass (aam_auto_backup.py) execution failure Aborting "
            "regular-backup operation. (exit code 7)") in result.stdout
    assert "ShadowSpawn" not in result.stdout
