"""tools/linux_schedule.py: the systemd timer/service and the cron wrapper run the daily job
on the settings file it writes."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ACCESS_KEY_ID, KEY, REPO, SECRET

TOOL = os.path.join(REPO, "tools", "linux_schedule.py")


def schedule_args(sandbox, tmp_path, *extra):
    config, units = tmp_path / "config", tmp_path / "units"
    return [sys.executable, TOOL, "--instructions", sandbox.instructions, "--log-dir",
            sandbox.logs, "--mirror", sandbox.mirror, "--bucket", sandbox.bucket,
            "--location", sandbox.location, "--sender", "backup-report@example.com",
            "--recipient", sandbox.recipient, "--config-dir", str(config), "--unit-dir",
            str(units), "--region", "us-east-1", *extra]


def make_schedule(sandbox, tmp_path, typed=None, extra=()):
    """The schedule with --write-secrets, each secret typed twice."""
    typed = typed or f"{KEY}\n{KEY}\n{ACCESS_KEY_ID}\n{ACCESS_KEY_ID}\n{SECRET}\n{SECRET}\n"
    result = subprocess.run(schedule_args(sandbox, tmp_path, "--write-secrets", *extra),
                            input=typed, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return tmp_path / "config", tmp_path / "units", result.stdout


def test_units_run_the_settings_file_and_hold_no_secret(sandbox, tmp_path):
    sandbox.sample()
    config, units, printed = make_schedule(sandbox, tmp_path)
    timer = (units / "aam-auto-backup.timer").read_text()
    assert "OnCalendar=*-*-* 00:30:00" in timer and "Persistent=true" in timer
    service = (units / "aam-auto-backup.service").read_text()
    exec_start = next(l for l in service.splitlines() if l.startswith("ExecStart="))
    settings = config / "backup.settings"
    assert shlex.split(exec_start[len("ExecStart="):]) == [
        sys.executable, os.path.join(REPO, "aam_auto_backup.py"), "regular-backup",
        "--settings", str(settings)]
    assert "Environment=AWS_REGION=us-east-1" in service
    assert f"EnvironmentFile={config / 'secrets.env'}" in service
    # the settings say what the original's scheduled job said, by name
    lines = settings.read_text().splitlines()
    for name, value in (("force-full", "no"), ("auto-force-full", "yes"),
                        ("key", "env:AAM_ENCRYPTION_KEY"), ("bucket", sandbox.bucket),
                        ("python", sys.executable), ("lock-poll", "600")):
        assert f"{name} = {value}" in lines
    secrets = config / "secrets.env"
    assert os.stat(secrets).st_mode & 0o777 == 0o600
    for path in (units / "aam-auto-backup.service", units / "aam-auto-backup.timer",
                 config / "aam-auto-backup-daily.sh", settings):
        for secret in (KEY, SECRET, ACCESS_KEY_ID):
            assert secret not in path.read_text()
    for secret in (KEY, SECRET):
        assert secret not in printed
    assert "30 0 * * * " in printed and "systemctl --user enable --now" in printed
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify",
                                str(units / "aam-auto-backup.timer")], capture_output=True)
        assert b"error" not in check.stderr.lower()


def test_the_cron_wrapper_runs_a_real_backup_in_the_region(sandbox, tmp_path):
    tree = sandbox.sample()
    config, _units, _printed = make_schedule(sandbox, tmp_path)
    env = sandbox.env()
    env["AWS_REGION"] = "eu-west-1"          # the wrapper's region wins over the caller's
    result = subprocess.run([str(config / "aam-auto-backup-daily.sh")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Backup scope: full" in result.stdout
    assert any("_yes_" in item["Key"] for item in sandbox.objects())
    (message,) = sandbox.emails()            # sent in us-east-1, where the sender is verified
    assert message["subject"].startswith("SUCCESS, ")
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert KEY not in log and SECRET not in log
    assert f"named form, settings file {config / 'backup.settings'}" in log
    for mount in tree.mounts:
        assert os.path.isdir(os.path.join(sandbox.mirror, mount.lstrip("/")))


def test_each_secret_is_typed_twice_and_a_mismatch_writes_nothing(sandbox, tmp_path):
    typos = f"{KEY}\n{KEY}x\n{KEY}\n{KEY}\n{ACCESS_KEY_ID}\n{ACCESS_KEY_ID}\n{SECRET}\n{SECRET}\n"
    config, _units, _printed = make_schedule(sandbox, tmp_path, typos)
    assert f"AAM_ENCRYPTION_KEY='{KEY}'" in (config / "secrets.env").read_text()
    never = "".join(f"{KEY}\n{KEY}{n}\n" for n in range(3))
    result = subprocess.run(schedule_args(sandbox, tmp_path / "other", "--write-secrets"),
                            input=never, capture_output=True, text=True)
    assert result.returncode == 2
    assert ("error: Archive encryption key: not typed the same way twice in 3 tries; "
            "nothing was written") in result.stderr
    assert not (tmp_path / "other").exists()


def test_the_backup_keys_and_the_region_come_from_the_keys_file(sandbox, tmp_path):
    keys_file = tmp_path / "aam-keys.env"
    keys_file.write_text(f"AWS_REGION=eu-west-1\nAAM_BACKUP_ACCESS_KEY_ID={ACCESS_KEY_ID}\n"
                         f"AAM_BACKUP_SECRET_ACCESS_KEY={SECRET}\n"
                         "AAM_RESTORE_ACCESS_KEY_ID=restore-id\n"
                         "AAM_RESTORE_SECRET_ACCESS_KEY=restore-secret\n")
    args = [a for a in schedule_args(sandbox, tmp_path) if a not in ("--region", "us-east-1")]
    result = subprocess.run(args + ["--keys-file", str(keys_file), "--write-secrets"],
                            input=f"{KEY}\n{KEY}\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    secrets = (tmp_path / "config" / "secrets.env").read_text()
    assert f"AAM_BACKUP_SECRET_ACCESS_KEY='{SECRET}'" in secrets
    assert "restore" not in secrets                  # the restore key stays offline
    assert "Environment=AWS_REGION=eu-west-1" in \
        (tmp_path / "units" / "aam-auto-backup.service").read_text()
    assert "AWS_REGION=eu-west-1\nexport AWS_REGION" in \
        (tmp_path / "config" / "aam-auto-backup-daily.sh").read_text()


def test_dry_run_prints_everything_and_writes_nothing(sandbox, tmp_path):
    result = subprocess.run(schedule_args(sandbox, tmp_path, "--write-secrets", "--dry-run"),
                            input="", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Dry run: nothing is written.")
    for name in ("backup.settings", "aam-auto-backup.service", "aam-auto-backup.timer",
                 "aam-auto-backup-daily.sh", "secrets.env"):
        assert f"/{name} (mode " in result.stdout
    assert "ExecStart=" in result.stdout and f"bucket = {sandbox.bucket}" in result.stdout
    assert not (tmp_path / "config").exists() and not (tmp_path / "units").exists()


def test_settings_the_program_would_refuse_are_refused_before_anything(sandbox, tmp_path):
    args = schedule_args(sandbox, tmp_path)
    args[args.index("--location") + 1] = "my_laptop"
    result = subprocess.run(args + ["--write-secrets"], input="", capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert ("error: the program would refuse these settings: backup.settings, line 18: "
            "location must be letters, digits") in result.stderr
    assert not (tmp_path / "config").exists()
    no_region = [a for a in schedule_args(sandbox, tmp_path) if a not in ("--region",
                                                                            "us-east-1")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    missing = subprocess.run(no_region, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "the region is not known" in missing.stderr


def test_the_docstring_offers_only_options_the_tool_takes():
    import linux_schedule
    documented = set(re.findall(r"(--[a-z][a-z-]+)", linux_schedule.__doc__))
    parser_help = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True,
                                 text=True).stdout
    taken = set(re.findall(r"(--[a-z][a-z-]+)", parser_help))
    assert documented and documented <= taken | {"--settings"}, documented - taken


def test_the_wrapper_runs_another_operation_by_hand_with_the_same_settings(sandbox, tmp_path):
    sandbox.sample()
    config, _units, _printed = make_schedule(sandbox, tmp_path)
    wrapper = str(config / "aam-auto-backup-daily.sh")
    ok_full = subprocess.run([wrapper, "regular-backup", "--send-email", "False"],
                             env=sandbox.env(), capture_output=True, text=True, timeout=300)
    assert ok_full.returncode == 0, ok_full.stdout + ok_full.stderr
    assert sandbox.emails() == []                   # the option overrode the settings
    incremental = subprocess.run([wrapper, "incremental-only-backup"], env=sandbox.env(),
                                 capture_output=True, text=True, timeout=300)
    assert incremental.returncode == 0, incremental.stdout + incremental.stderr
    assert "Backup scope: incremental" in incremental.stdout


def test_the_upload_limit_and_the_stop_time_reach_the_job(sandbox, tmp_path):
    sandbox.sample()
    config, units, printed = make_schedule(
        sandbox, tmp_path, extra=("--upload-limit", "20Mbit", "--stop-after", "6.5"))
    service = (units / "aam-auto-backup.service").read_text().splitlines()
    # Type=oneshot: the run is the unit's start-up, so TimeoutStartSec= stops it
    assert "Type=oneshot" in service and "TimeoutStartSec=390min" in service
    assert "Environment=AAM_UPLOAD_LIMIT=2500000" in service
    assert "KillMode=mixed" in service            # SIGTERM to the program alone
    wrapper = (config / "aam-auto-backup-daily.sh").read_text()
    assert "AAM_UPLOAD_LIMIT=2500000\nexport AAM_UPLOAD_LIMIT\n" in wrapper
    assert f"exec {shutil.which('timeout')} --signal=TERM --kill-after=5m 390m " in wrapper
    assert "2,500,000 bytes per second" in printed and "after 6.5 hours" in printed
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify",
                                str(units / "aam-auto-backup.service")], capture_output=True)
        assert b"error" not in check.stderr.lower() and b"unknown" not in check.stderr.lower()


@pytest.mark.parametrize("option, value, message", [
    ("--upload-limit", "20Mb", "'20Mb' is not a rate"),
    ("--stop-after", "0", "'0' is not a number of hours"),
    ("--stop-after", "night", "'night' is not a number of hours")])
def test_a_wrong_limit_or_stop_time_writes_nothing(sandbox, tmp_path, option, value, message):
    result = subprocess.run(schedule_args(sandbox, tmp_path, option, value),
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "config").exists()


def test_the_stop_time_ends_a_run_as_ctrl_c_does_and_the_next_run_completes(
        sandbox, proxy, tmp_path):
    """timeout(1) passes the SIGTERM it gets, or sends at the stop time, to the program."""
    sandbox.sample(picture_size=3_000_000)
    config, _units, _printed = make_schedule(sandbox, tmp_path,
                                             extra=("--upload-limit", "10M", "--stop-after", "6"))
    proxy.limit_upload(1_000_000)                 # the night's slow uplink
    env = sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url)
    job = subprocess.Popen([str(config / "aam-auto-backup-daily.sh")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proxy.wait_for(lambda c: c["bytes_received"] >= 1_000_000, 300)
    job.send_signal(signal.SIGTERM)               # the wrapper is timeout(1) now (exec)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 130, out
    assert "Uploads are limited to 10,000,000 bytes per second" in out
    assert "ERROR: interrupted" in out
    assert not any("_yes_" in item["Key"] for item in sandbox.objects())
    assert sandbox.s3().list_multipart_uploads(Bucket=sandbox.bucket).get("Uploads", []) == []
    assert not os.listdir(sandbox.temp)
    proxy.limit_upload(None)
    again = subprocess.run([str(config / "aam-auto-backup-daily.sh")], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert any("_yes_" in item["Key"] for item in sandbox.objects())



def test_the_monthly_drill_runs_with_the_restore_keys_read_by_it_alone(sandbox, tmp_path):
    sandbox.sample()
    typed = (f"{KEY}\n{KEY}\n{ACCESS_KEY_ID}\n{ACCESS_KEY_ID}\n{SECRET}\n{SECRET}\n"
             "restore-id\nrestore-id\nrestore-secret\nrestore-secret\n")
    config, units, printed = make_schedule(sandbox, tmp_path, typed, extra=("--drill",))
    timer = (units / "aam-auto-backup-drill.timer").read_text()
    assert "OnCalendar=*-*-01,04 03:00:00" in timer and "Persistent=true" in timer
    service = (units / "aam-auto-backup-drill.service").read_text().splitlines()
    assert "SuccessExitStatus=7" in service           # a thaw under way is no failure
    assert f"EnvironmentFile={config / 'drill-secrets.env'}" in service
    exec_start = next(l for l in service if l.startswith("ExecStart="))
    assert shlex.split(exec_start[len("ExecStart="):])[2:] == [
        "drill-aws-backups", "--settings", str(config / "drill.settings")]
    drill_secrets = config / "drill-secrets.env"
    assert os.stat(drill_secrets).st_mode & 0o777 == 0o600
    assert drill_secrets.read_text() == ("AAM_RESTORE_ACCESS_KEY_ID='restore-id'\n"
                                         "AAM_RESTORE_SECRET_ACCESS_KEY='restore-secret'\n")
    assert "restore" not in (config / "secrets.env").read_text()   # not the backup's
    assert "restore" not in (units / "aam-auto-backup.service").read_text()
    settings = (config / "drill.settings").read_text().splitlines()
    assert "access-key-id = env:AAM_RESTORE_ACCESS_KEY_ID" in settings
    assert "key = env:AAM_ENCRYPTION_KEY" in settings
    assert "restore-secret" not in printed and KEY not in printed
    assert "0 3 1,4 * * " in printed and "aam-auto-backup-daily.sh drill-aws-backups" in printed
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify",
                                str(units / "aam-auto-backup-drill.timer")],
                               capture_output=True)
        assert b"error" not in check.stderr.lower()
    # the cron line's command: the first run requests the thaw (7), the next finishes
    wrapper = str(config / "aam-auto-backup-daily.sh")
    backup = subprocess.run([wrapper, "regular-backup", "--send-email", "False"],
                            env=sandbox.env(), capture_output=True, text=True, timeout=300)
    assert backup.returncode == 0, backup.stdout + backup.stderr
    requested = subprocess.run([wrapper, "drill-aws-backups"], env=sandbox.env(),
                               capture_output=True, text=True, timeout=300)
    assert requested.returncode == 7, requested.stdout + requested.stderr
    finished = subprocess.run([wrapper, "drill-aws-backups"], env=sandbox.env(),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "Restore drill PASSED" in finished.stdout


def test_dry_run_shows_the_drill_and_writes_nothing(sandbox, tmp_path):
    result = subprocess.run(schedule_args(sandbox, tmp_path, "--write-secrets", "--dry-run",
                                          "--drill"),
                            input="", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("drill.settings", "aam-auto-backup-drill.service",
                 "aam-auto-backup-drill.timer", "drill-secrets.env"):
        assert f"/{name} (mode " in result.stdout
    assert "OnCalendar=*-*-01,04 03:00:00" in result.stdout
    assert "AAM_RESTORE_ACCESS_KEY_ID (asked)" in result.stdout
    assert "systemctl --user enable --now aam-auto-backup-drill.timer" in result.stdout
    assert not (tmp_path / "config").exists() and not (tmp_path / "units").exists()
