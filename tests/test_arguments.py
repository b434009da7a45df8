"""Arguments of the restore operations and the child pass; odds and ends of issue 2."""

import os
import sys

import pytest

import aam_auto_backup as aab
from conftest import KEY, REPO, SECRET
from sample_tree import read_tree

RESTORE_OPERATIONS = list(aab.RESTORE_OPERATIONS)


def restore_args(sandbox, operation, changes=None):
    values = {1: operation, 2: sandbox.logs, 3: "False", 4: "AAM Restore Report",
              5: "backup-report@example.com", 6: sandbox.recipient, 7: "2", 8: KEY,
              9: sandbox.bucket, 10: sandbox.location, 11: "AKIAIOSFODNN7EXAMPLE",
              12: SECRET, 13: os.path.join(sandbox.root, "restored")}
    values.update(changes or {})
    return [values[n] for n in range(1, 14)]


@pytest.mark.parametrize("operation", RESTORE_OPERATIONS)
@pytest.mark.parametrize("changes, argument", [
    ({3: "yes"}, 3), ({7: "0"}, 7), ({7: "two"}, 7), ({9: "No_Such_Bucket"}, 9),
    ({10: "a_b"}, 10), ({10: "pc%PATH%"}, 10), ({8: "caf\u00e9 key"}, 8), ({8: "x" * 100}, 8),
    ({12: "env:AAM_TEST_UNSET_VARIABLE"}, 12),
])
def test_bad_restore_arguments_touch_nothing(sandbox, proxy, operation, changes, argument):
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.run(restore_args(sandbox, operation, changes))
    assert result.returncode == 2
    assert f"argument {argument}" in result.stderr
    assert f"usage: aam_auto_backup.py {operation}" in result.stderr
    assert proxy.counters()["requests"] == 0
    assert not os.path.exists(sandbox.logs)
    assert not os.path.exists(os.path.join(sandbox.root, "restored"))


@pytest.mark.parametrize("operation", RESTORE_OPERATIONS)
def test_restore_argument_count(sandbox, operation):
    result = sandbox.run(restore_args(sandbox, operation)[:12])
    assert result.returncode == 2
    assert f"{operation} takes 13 arguments, 12 were given" in result.stderr


def child_args(sandbox, changes=None):
    values = {1: "regular-backup", 2: "ShadowSpawn", 3: " ", 4: " ",
              5: "20261121 170302.225333", 6: sandbox.root, 7: "q", 8: "local | AWS",
              9: sandbox.mirror, 10: "False", 11: "env:AAM_CHILD_ENCRYPTION_KEY",
              12: sandbox.location, 13: os.path.join(sandbox.temp, "work"), 14: "no",
              15: "full-backup"}
    values.update(changes or {})
    return [values[n] for n in range(1, 16)]


@pytest.mark.parametrize("changes, argument", [
    ({3: "2026-11-21"}, 3), ({5: " "}, 5), ({8: "tape"}, 8), ({10: "keep"}, 10),
    ({14: "maybe"}, 14), ({15: "partial-backup"}, 15), ({11: "env:AAM_TEST_UNSET"}, 11),
])
def test_bad_child_arguments_are_refused(sandbox, changes, argument):
    env = sandbox.env(AAM_CHILD_ENCRYPTION_KEY=KEY)
    result = sandbox.run(child_args(sandbox, changes), env=env)
    assert result.returncode == 2
    assert f"argument {argument}" in result.stderr
    assert "the child pass; never typed" in result.stderr
    assert not os.path.exists(sandbox.mirror) and not os.path.exists(sandbox.temp)


def test_the_seed_child_arguments_parse():
    # spec-notes part7.md 1.1.5: " " for no date-time, "local | AWS" with spaces
    parsed = aab.ChildArgs.parse([
        "regular-backup", "ShadowSpawn", "20201221 134337.851361", "20201221 134337.851361",
        "20201222 112502.225333", "c:\\temp", "q", "local | AWS", "F:\\backup\\main",
        "False", "1234abcd1234abcd", "main-work-computer",
        "c:\\temp\\main-work-computer20201216_170302.225333", "no", "incremental-backup"])
    assert parsed.destinations == {"local", "AWS"}
    assert parsed.latest_full.strftime(aab.STAMP_FORMAT) == "20201221_134337.851361"
    assert parsed.scope == "incremental-backup" and not parsed.keep


def test_the_seed_backup_arguments_parse(tmp_path):
    args = ["incremental-only-backup", "user", sys.executable, "600", "7200",
            str(tmp_path / "logs"), "True", "AAM Backup Report", "autoreporter@allenyong.dev",
            "allenyong@allenyong.dev", str(tmp_path / "instructions.txt"), "q", "local|AWS",
            str(tmp_path / "backup"), "False", "1234abcd1234abcd", "aam-data-backup",
            "main-work-computer", "AWS-USER-ID", "aws-user-password", "no", "yes"]
    parsed = aab.BackupArgs.parse(args)
    assert parsed.lock_poll == 600 and parsed.lock_wait == 7200
    assert parsed.destinations == {"local", "AWS"} and parsed.auto_force_full
    masked = "\n".join(parsed.masked())
    for secret in ("1234abcd1234abcd", "AWS-USER-ID", "aws-user-password"):
        assert secret not in masked


def test_the_example_instruction_file_parses_on_both_platforms():
    text = open(os.path.join(REPO, "instructions.example.txt"), encoding="utf-8").read()
    posix = aab.parse_instructions(text, "example", aab.PosixPlatform())
    assert [p for p, _n in posix.backup_dirs] == [
        "/home/ann/Documents", "/home/ann/Pictures/2024", "/srv/projects"]
    windows_part = text.split("# --- Windows")[1].splitlines()[1:]
    uncommented = "\n".join(line[2:] if line.startswith("# ") else "" for line in windows_part)
    windows = aab.parse_instructions(uncommented, "example", aab.WindowsPlatform())
    assert [p for p, _n in windows.backup_dirs][0] == "c:\\users\\allen\\documents"
    assert [e.text for e in windows.excluded_files] == [
        "~WRL*.tmp", "c:\\users\\allen\\documents\\passwords.kdbx"]


def test_aws_only_backup_makes_no_mirror(sandbox):
    sandbox.sample()
    result = sandbox.backup({13: "AWS", 14: ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not os.path.exists(sandbox.mirror)
    assert any("_yes_" in item["Key"] for item in sandbox.objects())
    (message,) = sandbox.emails()
    assert "Backup destination types: AWS S3" in message["body"]


def test_an_email_that_cannot_be_sent_is_logged_and_not_fatal(sandbox):
    tree = sandbox.sample()
    result = sandbox.backup({9: "never-verified@example.com"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The e-mail report could not be sent" in result.stdout
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert "(if applicable) email report sending error." in log
    assert "MessageRejected" in log
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]


def test_no_email_when_reports_are_off(sandbox):
    sandbox.sample()
    assert sandbox.backup({7: "False"}).returncode == 0
    assert sandbox.emails() == []
