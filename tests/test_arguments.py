"""Arguments of the restore operations and the child pass, and the usage text."""

import datetime as dt
import os
import re
import sys

import pytest

import aam_auto_backup as aab
from conftest import KEY, REPO, SECRET, ok
from sample_tree import read_tree

RESTORE_OPERATIONS = list(aab.RESTORE_OPERATIONS)


def quiet_restore_args(sandbox, operation, changes=None):
    return sandbox.restore_args(operation, os.path.join(sandbox.root, "restored"),
                                dict({"send_email": "False"}, **(changes or {})))


@pytest.mark.parametrize("operation", RESTORE_OPERATIONS)
@pytest.mark.parametrize("argument, text", [
    ("send_email", "yes"), ("days", "0"), ("days", "two"), ("bucket", "No_Such_Bucket"),
    ("location", "a_b"), ("location", "pc%PATH%"), ("key", "caf\u00e9 key"), ("key", "x" * 100),
    ("secret_access_key", "env:AAM_TEST_UNSET_VARIABLE"),
])
def test_bad_restore_arguments_touch_nothing(sandbox, proxy, operation, argument, text):
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.run(quiet_restore_args(sandbox, operation, {argument: text}))
    assert result.returncode == 2
    assert f"argument {aab.RESTORE_ARGS.number(argument)} (" in result.stderr
    assert f"usage: aam_auto_backup.py {operation}" in result.stderr
    assert proxy.counters()["requests"] == 0
    assert not os.path.exists(sandbox.logs)
    assert not os.path.exists(os.path.join(sandbox.root, "restored"))


@pytest.mark.parametrize("operation", RESTORE_OPERATIONS)
def test_restore_argument_count(sandbox, operation):
    result = sandbox.run(quiet_restore_args(sandbox, operation)[:12])
    assert result.returncode == 2
    assert f"{operation} takes 13 or more arguments, 12 were given" in result.stderr


@pytest.mark.parametrize("argument, text", [
    ("latest_full", "2026-11-21"), ("start", " "), ("destinations", "tape"), ("keep", "keep"),
    ("force_full", "maybe"), ("scope", "partial-backup"), ("key", "env:AAM_TEST_UNSET"),
])
def test_bad_child_arguments_are_refused(sandbox, argument, text):
    env = sandbox.env(AAM_CHILD_ENCRYPTION_KEY=KEY)
    result = sandbox.run(sandbox.child_args({argument: text}), env=env)
    assert result.returncode == 2
    assert f"argument {aab.CHILD_ARGS.number(argument)} (" in result.stderr
    assert "the child pass; never typed" in result.stderr
    assert not os.path.exists(sandbox.mirror) and not os.path.exists(sandbox.temp)


def test_the_original_child_arguments_parse():
    # The original program's tested child line: " " for no date-time, "local | AWS" with spaces
    parsed = aab.parse_child_args([
        "regular-backup", "ShadowSpawn", "20201221 134337.851361", "20201221 134337.851361",
        "20201222 112502.225333", "c:\\temp", "q", "local | AWS", "F:\\backup\\main",
        "False", "1234abcd1234abcd", "main-work-computer",
        "c:\\temp\\main-work-computer20201216_170302.225333", "no", "incremental-backup"])
    assert parsed.destinations == {"local", "AWS"}
    assert parsed.latest_full.strftime(aab.STAMP_FORMAT) == "20201221_134337.851361"
    assert parsed.scope is aab.Scope.INCREMENTAL and not parsed.keep


def test_the_original_backup_arguments_parse(tmp_path):
    args = ["incremental-only-backup", "user", sys.executable, "600", "7200",
            str(tmp_path / "logs"), "True", "AAM Backup Report", "autoreporter@allenyong.dev",
            "allenyong@allenyong.dev", str(tmp_path / "instructions.txt"), "q", "local|AWS",
            str(tmp_path / "backup"), "False", "1234abcd1234abcd", "aam-data-backup",
            "main-work-computer", "AWS-USER-ID", "aws-user-password", "no", "yes"]
    parsed = aab.parse_backup_args(args)
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
    result = sandbox.backup({"destinations": "AWS", "mirror_root": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not os.path.exists(sandbox.mirror)
    assert any("_yes_" in item["Key"] for item in sandbox.objects())
    (message,) = sandbox.emails()
    assert "Backup destination types: AWS S3" in message["body"]


def test_an_unsent_report_has_its_own_exit_code_and_the_log_says_why(sandbox, tmp_path):
    tree = sandbox.sample()
    result = sandbox.backup({"sender_address": "never-verified@example.com"})
    assert result.returncode == aab.EXIT_REPORT_UNSENT == 10, result.stdout + result.stderr
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert "(if applicable) email report sending error." in log
    assert ("ERROR: The e-mail report could not be sent from never-verified@example.com "
            "through SES in region us-east-1 (from AWS_REGION): ") in log
    assert "MessageRejected" in log and "verified in that region" in log
    assert "Everything else succeeded; the exit code is 10" in result.stdout
    # everything else was done: the mirror and the complete backup
    for mount in tree.mounts:
        assert read_tree(os.path.join(sandbox.mirror, mount.lstrip("/"))) == tree.expected[mount]
    assert len([o for o in sandbox.objects() if "_yes_" in o["Key"]]) == 2

    # The sender is verified in us-east-1 only: with the region unset the default is
    # us-east-1, so the report is sent; another region for SES refuses it, and says so.
    unset = {k: v for k, v in sandbox.env().items() if k != "AWS_REGION"}
    sent = sandbox.backup(env=unset)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    refused = sandbox.backup(env=sandbox.env(AAM_SES_REGION="eu-west-1"))
    assert refused.returncode == 10, refused.stdout + refused.stderr
    assert ("could not be sent from backup-report@example.com through SES in region "
            "eu-west-1 (from AAM_SES_REGION)") in refused.stdout
    default = sandbox.backup({"sender_address": "never-verified@example.com"}, env=unset)
    assert default.returncode == 10
    assert ("through SES in region us-east-1 (the default: none of AAM_SES_REGION, AWS_REGION "
            "and AWS_DEFAULT_REGION is set)") in default.stdout

    # A one-step restore whose report cannot be sent: the data is restored, exit 10.
    restored = sandbox.restore(aab.ONE_STEP_RESTORE, tmp_path / "r",
                               {"sender_address": "never-verified@example.com"})
    assert restored.returncode == 10, restored.stdout + restored.stderr
    assert "The data is restored; the exit code is 10" in restored.stdout


def test_a_failed_run_keeps_its_failure_code_when_the_report_is_not_sent_either(sandbox):
    sandbox.sample()
    sandbox.endpoint_url = "http://127.0.0.1:9"        # neither S3 nor SES answers
    result = sandbox.backup()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "AWS S3 cannot be queried" in result.stdout
    assert "The e-mail report could not be sent" in result.stdout
    assert "Everything else succeeded" not in result.stdout


def test_no_email_when_reports_are_off(sandbox):
    sandbox.sample()
    assert sandbox.backup({"send_email": "False"}).returncode == 0
    assert sandbox.emails() == []


@pytest.mark.parametrize("operation", aab.BACKUP_OPERATIONS + aab.RESTORE_OPERATIONS
                         + (aab.CHILD_AGENT, aab.DRILL_OPERATION))
def test_the_usage_text_is_the_argument_table(sandbox, operation):
    """Parser and usage text come from one table: each line is the table's, in order."""
    table = aab.OPERATION_TABLES[operation]
    argv = ["regular-backup", operation] if operation == aab.CHILD_AGENT else [operation]
    result = sandbox.run(argv)
    assert result.returncode == 2
    listed = [line.strip() for line in result.stderr.splitlines()
              if re.match(r"\s*\d+\.", line)]
    assert len(listed) == len(table)
    for number, (line, arg) in enumerate(zip(listed, table), 1):
        assert line.startswith(f"{number}{'...' if arg.repeated else '.'} {arg.label}")
        assert ("(accepts env:NAME)" in line) == arg.secret
        assert ("(optional" in line) == (arg.optional or arg.repeated)
    assert f"takes {table.count_text()}, {len(argv)} were given" in result.stderr


def test_help_prints_the_overview_and_version_the_version(sandbox):
    helped = sandbox.run(["--help"])
    assert helped.returncode == 0 and "error:" not in helped.stdout + helped.stderr
    for operation in aab.BACKUP_OPERATIONS + aab.RESTORE_OPERATIONS + (aab.BROWSE_OPERATION,
                                                                       aab.DRILL_OPERATION):
        assert f"  {operation} (" in helped.stdout
    version = sandbox.run(["--version"])
    assert version.returncode == 0 and version.stdout == f"AAM Auto Backup {aab.VERSION}\n"


def thaw_step_args(sandbox, destination, point):
    """The thaw step into destination, as of point (None: argument 14 left out)."""
    changes = {"send_email": "False"}
    if point is not None:
        changes["restore_point"] = point
    return sandbox.restore_args(aab.THAW_STEP, destination, changes)


def test_every_documented_restore_point_form_chooses_the_backup(sandbox, tmp_path):
    """Each form docs/reference.md lists, through the CLI: at or after the backup it is
    chosen; before it, nothing is (exit 5)."""
    sandbox.single_source({"a.txt": b"a\n"})
    ok(sandbox.backup({"send_email": "False"}))
    (stamp,) = sandbox.backup_stamps()
    made = dt.datetime.strptime(stamp, "%Y%m%d %H%M%S.%f")
    later = made + dt.timedelta(minutes=1)
    at_or_after = [
        None, "latest", "", "LATEST",
        stamp, stamp + " UTC",                                   # as browse prints it
        made.strftime("%Y%m%d_%H%M%S.%f"),                       # as object names hold it
        made.isoformat(), made.isoformat() + "Z", made.isoformat() + "+00:00",
        made.strftime("%Y-%m-%d %H:%M:%S.%f"),
        later.strftime("%Y%m%d %H%M%S"), later.strftime("%Y-%m-%d %H:%M:%S"),
        later.strftime("%Y-%m-%d %H:%M"), later.strftime("%Y-%m-%dT%H:%M:%S"),
        later.strftime("%Y-%m-%dT%H:%M"), later.strftime("%Y-%m-%dT%H:%M:%S.5"),
        made.strftime("%Y-%m-%d"), made.strftime("%Y%m%d"),       # the end of that day
    ]
    for number, point in enumerate(at_or_after):
        result = sandbox.run(thaw_step_args(sandbox, tmp_path / f"d{number}", point))
        assert result.returncode == 0, (point, result.stdout + result.stderr)
        assert f"the full backup {stamp} UTC." in result.stdout, (point, result.stdout)
    earlier = made - dt.timedelta(days=1)
    for number, point in enumerate((earlier.strftime("%Y-%m-%d"),
                                    earlier.isoformat(timespec="microseconds"))):
        result = sandbox.run(thaw_step_args(sandbox, tmp_path / f"e{number}", point))
        assert result.returncode == aab.EXIT_NO_BACKUP_SET, (point, result.stdout)
