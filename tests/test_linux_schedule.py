"""tools/linux_schedule.py: the systemd timer/service and the cron wrapper run the daily job."""

import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ACCESS_KEY_ID, KEY, REPO, SECRET

TOOL = os.path.join(REPO, "tools", "linux_schedule.py")


def make_schedule(sandbox, tmp_path, *extra):
    config, units = tmp_path / "config", tmp_path / "units"
    result = subprocess.run(
        [sys.executable, TOOL, "--instructions", sandbox.instructions, "--log-dir", sandbox.logs,
         "--mirror", sandbox.mirror, "--bucket", sandbox.bucket, "--location",
         sandbox.location, "--sender", "backup-report@example.com", "--recipient",
         sandbox.recipient, "--config-dir", str(config), "--unit-dir", str(units),
         "--write-secrets", *extra],
        input=f"{KEY}\n{ACCESS_KEY_ID}\n{SECRET}\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return config, units, result.stdout


def test_units_match_the_task_scheduler_job_and_hold_no_secret(sandbox, tmp_path):
    sandbox.sample()
    config, units, printed = make_schedule(sandbox, tmp_path)
    timer = (units / "aam-auto-backup.timer").read_text()
    assert "OnCalendar=*-*-* 00:30:00" in timer and "Persistent=true" in timer
    service = (units / "aam-auto-backup.service").read_text()
    exec_start = next(l for l in service.splitlines() if l.startswith("ExecStart="))
    argv = shlex.split(exec_start[len("ExecStart="):])
    assert argv[2:5] == ["regular-backup", "user", sys.executable]
    assert len(argv) == 2 + 22 and argv[-2:] == ["no", "yes"]
    assert argv[17] == "env:AAM_ENCRYPTION_KEY"
    assert f"EnvironmentFile={config / 'secrets.env'}" in service
    secrets = config / "secrets.env"
    assert os.stat(secrets).st_mode & 0o777 == 0o600
    for path in (units / "aam-auto-backup.service", units / "aam-auto-backup.timer",
                 config / "aam-auto-backup-daily.sh"):
        for secret in (KEY, SECRET, ACCESS_KEY_ID):
            assert secret not in path.read_text()
    for secret in (KEY, SECRET):
        assert secret not in printed
    assert "30 0 * * * " in printed and "systemctl --user enable --now" in printed
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify",
                                str(units / "aam-auto-backup.timer")], capture_output=True)
        assert b"error" not in check.stderr.lower()


def test_the_cron_wrapper_runs_a_real_backup(sandbox, tmp_path):
    tree = sandbox.sample()
    config, _units, _printed = make_schedule(sandbox, tmp_path)
    result = subprocess.run([str(config / "aam-auto-backup-daily.sh")], env=sandbox.env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Backup scope: full" in result.stdout
    assert any("_yes_" in item["Key"] for item in sandbox.objects())
    (message,) = sandbox.emails()
    assert message["subject"].startswith("SUCCESS, ")
    log = open(sandbox.log_files()[0], encoding="utf-8").read()
    assert KEY not in log and SECRET not in log
    for mount in tree.mounts:
        assert os.path.isdir(os.path.join(sandbox.mirror, mount.lstrip("/")))


def test_the_upload_limit_and_the_stop_time_reach_the_job(sandbox, tmp_path):
    sandbox.sample()
    config, units, printed = make_schedule(sandbox, tmp_path, "--upload-limit", "20Mbit",
                                           "--stop-after", "6.5")
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
    result = subprocess.run(
        [sys.executable, TOOL, "--instructions", sandbox.instructions, "--log-dir", sandbox.logs,
         "--bucket", sandbox.bucket, "--location", sandbox.location,
         "--config-dir", str(tmp_path / "config"), "--unit-dir", str(tmp_path / "units"),
         option, value], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "units").exists()


def test_the_stop_time_ends_a_run_as_ctrl_c_does_and_the_next_run_completes(
        sandbox, proxy, tmp_path):
    """timeout(1) passes the SIGTERM it gets, or sends at the stop time, to the program."""
    sandbox.sample(picture_size=3_000_000)
    config, _units, _printed = make_schedule(sandbox, tmp_path, "--upload-limit", "10M",
                                             "--stop-after", "6")
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
