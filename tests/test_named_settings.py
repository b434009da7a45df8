"""The named form: a settings file and --NAME VALUE options with the tables' names,
beside the positional form; --help of every operation."""

import os
import re
import sys

import pytest

import aam_auto_backup as aab
from conftest import (ACCESS_KEY_ID, KEY, SECRET, SENDER, numbered_directories, ok,
                      write_file)

SECRET_VARIABLES = {"AAM_TEST_KEY": KEY, "AAM_TEST_KEY_ID": ACCESS_KEY_ID,
                    "AAM_TEST_SECRET": SECRET}
NAMED_OPERATIONS = list(aab.OPERATION_SUMMARIES)


def backup_settings(sandbox):
    """A backup's settings by name: what a user writes; the rest take their defaults."""
    return {"log-dir": sandbox.logs, "instruction-file": sandbox.instructions,
            "destinations": "local|AWS", "mirror-root": sandbox.mirror,
            "key": "env:AAM_TEST_KEY", "bucket": sandbox.bucket,
            "location": sandbox.location, "access-key-id": "env:AAM_TEST_KEY_ID",
            "secret-access-key": "env:AAM_TEST_SECRET", "sender-address": SENDER,
            "recipient": sandbox.recipient}


def write_settings(path, settings, extra_lines=()):
    lines = ["# settings of a test", ""] + [f"{name} = {value}"
                                           for name, value in settings.items()]
    write_file(str(path), ("\n".join(lines + list(extra_lines)) + "\n").encode())
    return str(path)


def named_env(sandbox, **extra):
    return sandbox.env(**SECRET_VARIABLES, **extra)


def test_a_backup_from_a_settings_file_restores_exactly_with_named_options(
        sandbox, tmp_path):
    tree = sandbox.sample()
    settings = write_settings(tmp_path / "backup.settings", backup_settings(sandbox))
    result = ok(sandbox.run([aab.REGULAR_BACKUP, "--settings", settings, "--lock-wait", "0"],
                            env=named_env(sandbox)))
    assert "Backup scope: full" in result.stdout
    (message,) = sandbox.emails()                  # send-email: True, as recipient is given
    assert message["subject"].startswith("SUCCESS, ")
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert f"named form, settings file {settings}" in log
    # the defaults: the agent, the running Python, no drive letter off Windows, the lock
    number = aab.BACKUP_ARGS.number
    for field, text in (("agent", "user"), ("python", sys.executable), ("drive_letter", ""),
                        ("lock_poll", "60"), ("lock_wait", "0"), ("force_full", "no"),
                        ("auto_force_full", "yes"), ("key", "env:AAM_TEST_KEY")):
        assert f"{number(field):2d}. {aab.BACKUP_ARGS.label(field)}: {text}\n" in log
    for secret in (KEY, SECRET, ACCESS_KEY_ID):
        assert secret not in log + result.stdout + result.stderr

    destination = tmp_path / "restored"
    restored = ok(sandbox.run(
        [aab.ONE_STEP_RESTORE, "--log-dir", sandbox.logs, "--days", "1",
         "--key=env:AAM_TEST_KEY", "--bucket", sandbox.bucket, "--location", sandbox.location,
         "--access-key-id", "env:AAM_TEST_KEY_ID", "--secret-access-key",
         "env:AAM_TEST_SECRET", "--destination", str(destination)],
        env=named_env(sandbox, AAM_RESTORE_POLL_SECONDS="1")))
    assert "Restore point: the latest complete backup" in restored.stdout
    assert numbered_directories(destination, tree) == tree.expected
    assert len(sandbox.emails()) == 1              # no recipient given: no restore report


def test_named_options_override_the_file_and_the_selection_repeats(sandbox, tmp_path):
    mount = sandbox.single_source({"a.txt": b"a\n", "b.txt": b"b\n", "c.txt": b"c\n"})
    settings = backup_settings(sandbox)
    settings.update({"recipient": "", "destinations": "AWS", "mirror-root": ""})
    ok(sandbox.run([aab.REGULAR_BACKUP, "--settings",
                    write_settings(tmp_path / "b.settings", settings)],
                   env=named_env(sandbox)))
    assert sandbox.emails() == [] and not os.path.exists(sandbox.mirror)

    restore = {"log-dir": sandbox.logs, "days": "1", "key": "env:AAM_TEST_KEY",
               "bucket": "overridden-below", "location": sandbox.location,
               "access-key-id": "env:AAM_TEST_KEY_ID",
               "secret-access-key": "env:AAM_TEST_SECRET",
               "destination": str(tmp_path / "unused")}
    path = write_settings(tmp_path / "r.settings", restore,
                          ["selection = a.txt", 'selection = "b.txt"'])
    destination = tmp_path / "restored"
    ok(sandbox.run([aab.ONE_STEP_RESTORE, "--settings", path, "--bucket", sandbox.bucket,
                    f"--destination={destination}"],
                   env=named_env(sandbox, AAM_RESTORE_POLL_SECONDS="1")))
    assert sorted(os.listdir(destination / "1")) == ["a.txt", "b.txt"]
    assert not (tmp_path / "unused").exists()

    # a selection on the command line replaces the file's
    again = tmp_path / "again"
    ok(sandbox.run([aab.ONE_STEP_RESTORE, "--settings", path, "--bucket", sandbox.bucket,
                    "--destination", str(again), "--selection", "c.txt",
                    "--restore-point", "latest"],
                   env=named_env(sandbox, AAM_RESTORE_POLL_SECONDS="1")))
    assert os.listdir(again / "1") == ["c.txt"]
    assert open(again / "1" / "c.txt", "rb").read() == b"c\n"
    assert mount


BAD_FILES = [
    # (lines added to a good backup settings file, what the message says)
    (["key = " + KEY], r"line 14: key must be env:NAME .* a secret is never written in a "
                       r"settings file"),
    (["secret-access-key = " + SECRET], r"line 14: secret-access-key must be env:NAME"),
    (["log-dir = logs"], r"line 14: log-dir must be an absolute path in a settings file"),
    (["bucket = other-bucket"], r"line 14: bucket is set again \(first on line \d+\)"),
    (["bukcet = x"], r"line 14: regular-backup has no setting 'bukcet' \(did you mean "
                     r"bucket\?\)"),
    (["just words"], r"line 14: not a setting; write NAME = VALUE"),
    (["keep = maybe"], r"line 14: keep must be 'True' or 'False': 'maybe'"),
    (["selection = x"], r"line 14: regular-backup has no setting 'selection'"),
    (["operation = regular-backup"], r"line 14: regular-backup has no setting 'operation'"),
    (["lock-poll = 0"], r"line 14: lock-poll must be at least 1: '0'"),
]


@pytest.mark.parametrize("lines, message", BAD_FILES)
def test_a_bad_settings_file_is_refused_naming_file_and_line(
        sandbox, proxy, tmp_path, lines, message):
    sandbox.sample()
    sandbox.endpoint_url = proxy.endpoint_url
    path = write_settings(tmp_path / "b.settings", backup_settings(sandbox), lines)
    result = sandbox.run([aab.REGULAR_BACKUP, "--settings", path], env=named_env(sandbox))
    assert result.returncode == 2
    assert re.search(re.escape(path) + ", " + message, result.stderr), result.stderr
    assert "--help' says what each setting is" in result.stderr
    assert KEY not in result.stderr and SECRET not in result.stderr
    assert proxy.counters()["requests"] == 0
    assert not os.path.exists(sandbox.logs) and not os.path.exists(sandbox.mirror)


BAD_OPTIONS = [
    # (command line words after the settings file, what the message says)
    (["--key", KEY], r"--key must be env:NAME .* a secret is never written on the command "
                     r"line"),
    (["--bucket", "a", "--bucket", "b"], r"--bucket is given twice"),
    (["--force-full"], r"--force-full needs a value"),
    (["stray"], r"argument 4 is not a setting"),
    (["--send-email", "True", "--recipient", ""],
     r"the setting sender-address|--recipient must be an e-mail address when send-email "
     r"is True"),
    (["--destinations", "local", "--mirror-root", ""],
     r"--mirror-root is required when destinations includes local"),
    (["--bucket", ""], r"--bucket is not a valid S3 bucket name .* when destinations "
                       r"includes AWS"),
    (["--access-key-id", ""], r"access-key-id and secret-access-key must both be given"),
    (["--key", "env:AAM_TEST_UNSET_VARIABLE"],
     r"--key names environment variable AAM_TEST_UNSET_VARIABLE, which is not set"),
    (["--settings", "/nonexistent/other.settings"], r"--settings is given twice"),
]


@pytest.mark.parametrize("words, message", BAD_OPTIONS)
def test_bad_named_options_are_refused_by_name(sandbox, proxy, tmp_path, words, message):
    sandbox.sample()
    sandbox.endpoint_url = proxy.endpoint_url
    path = write_settings(tmp_path / "b.settings", backup_settings(sandbox))
    result = sandbox.run([aab.REGULAR_BACKUP, "--settings", path] + words,
                         env=named_env(sandbox))
    assert result.returncode == 2
    assert re.search("^error: (" + message + ")", result.stderr, re.M), result.stderr
    assert KEY not in result.stderr
    assert proxy.counters()["requests"] == 0 and not os.path.exists(sandbox.logs)


def test_missing_settings_are_named_all_at_once(sandbox):
    result = sandbox.run([aab.ONE_STEP_RESTORE, "--bucket", sandbox.bucket])
    assert result.returncode == 2
    assert ("missing setting(s) log-dir, days, key, location, destination" in result.stderr)
    result = sandbox.run([aab.BROWSE_OPERATION, "--settings", "/nonexistent/x.settings"])
    assert result.returncode == 2
    assert "the settings file /nonexistent/x.settings cannot be read" in result.stderr


@pytest.mark.parametrize("operation", NAMED_OPERATIONS)
def test_help_of_each_operation_names_numbers_and_explains_every_setting(
        sandbox, operation):
    table = aab.OPERATION_TABLES[operation]
    for word in ("--help", "-h"):
        result = sandbox.run([operation, word])
        assert result.returncode == 0 and result.stderr == ""
        text = result.stdout
        assert text.startswith(f"aam_auto_backup.py {operation}: ")
        for number, arg in enumerate(table, 1):
            if number == 1:
                continue
            mark = "+" if arg.repeated else " "
            assert re.search(rf"^{number:2d}{re.escape(mark)} {arg.name} +\S", text, re.M), \
                arg.name
        assert re.search(r"^Example settings file:\n(  [a-z-]+ = .+\n)+", text, re.M)
        assert f"  aam_auto_backup.py {operation} " in text
    # --help after other settings is help too, and touches nothing
    late = sandbox.run([operation, "--bucket", "b", "--help"])
    assert late.returncode == 0 and late.stdout == text


def test_every_example_in_the_help_parses(tmp_path, monkeypatch):
    """The help's example settings file and positional example are valid command lines."""
    for name, value in (("AAM_ENCRYPTION_KEY", KEY), ("AAM_BACKUP_ACCESS_KEY_ID", "id"),
                        ("AAM_BACKUP_SECRET_ACCESS_KEY", "secret"),
                        ("AAM_RESTORE_ACCESS_KEY_ID", "id"),
                        ("AAM_RESTORE_SECRET_ACCESS_KEY", "secret")):
        monkeypatch.setenv(name, value)
    parsers = {aab.BACKUP_ARGS: aab.parse_backup_args, aab.RESTORE_ARGS: aab.parse_restore_args,
               aab.BROWSE_ARGS: aab.parse_browse_args, aab.DRILL_ARGS: aab.parse_drill_args}
    for operation in NAMED_OPERATIONS:
        table = aab.OPERATION_TABLES[operation]
        argv = table.example_argv(operation)
        if "python" in table.numbers:            # an existing program on this computer
            argv[table.number("python") - 1] = sys.executable
        assert parsers[table](argv).operation == operation
        path = write_settings(tmp_path / f"{operation}.settings", {},
                              table.example_settings())
        parsed = parsers[table]([operation, "--settings", path])
        assert parsed.named and parsed.settings_file == path


def test_incremental_only_refuses_force_full_yes_naming_the_argument(sandbox, proxy):
    sandbox.sample()
    sandbox.endpoint_url = proxy.endpoint_url
    result = sandbox.run(sandbox.backup_args(aab.INCREMENTAL_ONLY_BACKUP,
                                             {"force_full": "yes"}))
    assert result.returncode == 2
    number = aab.BACKUP_ARGS.number("force_full")
    assert (f"error: argument {number} (force full backup (yes/no)) must be no for "
            "incremental-only-backup, which never makes a full backup") in result.stderr
    assert proxy.counters()["requests"] == 0 and not os.path.exists(sandbox.logs)
    ok(sandbox.run(sandbox.backup_args(aab.REGULAR_BACKUP, {"force_full": "yes"})))


def test_a_positional_browse_key_that_starts_with_dashes_stays_positional(sandbox):
    """Argument 2 of browse is the key: only a setting's name makes it the named form."""
    sandbox.single_source({"a.txt": b"a\n"})
    ok(sandbox.backup())
    result = sandbox.run(aab.BROWSE_ARGS.argv(
        operation=aab.BROWSE_OPERATION, key="--a key that looks like an option",
        bucket=sandbox.bucket, location=sandbox.location, access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET))
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\d{8} \d{6}\.\d{6} UTC +full ", result.stdout, re.M)
    typo = sandbox.run([aab.BROWSE_OPERATION, "--bukcet", sandbox.bucket])
    assert typo.returncode == 2
    assert "argument 2 starts with '--' but is none of its settings" in typo.stderr
    assert "--bukcet" not in typo.stderr              # it might have been a key


def test_the_four_restore_steps_take_the_named_form(sandbox, tmp_path):
    tree = sandbox.sample()
    ok(sandbox.backup({"send_email": "False"}))
    restore = {"log-dir": sandbox.logs, "days": "1", "key": "env:AAM_TEST_KEY",
               "bucket": sandbox.bucket, "location": sandbox.location,
               "access-key-id": "env:AAM_TEST_KEY_ID",
               "secret-access-key": "env:AAM_TEST_SECRET"}
    path = write_settings(tmp_path / "restore.settings", restore)
    destination = tmp_path / "steps"
    for operation in (aab.THAW_STEP, aab.STATUS_STEP, aab.DOWNLOAD_STEP, aab.EXTRACT_STEP):
        ok(sandbox.run([operation, "--settings", path, "--destination", str(destination)],
                       env=named_env(sandbox)))
    assert numbered_directories(destination, tree) == tree.expected
