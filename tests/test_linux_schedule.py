"""tools/linux_schedule.py: the systemd timer/service and the cron wrapper run the daily job."""

import os
import shlex
import shutil
import subprocess
import sys


from conftest import ACCESS_KEY_ID, KEY, REPO, SECRET

TOOL = os.path.join(REPO, "tools", "linux_schedule.py")


def make_schedule(sandbox, tmp_path):
    config, units = tmp_path / "config", tmp_path / "units"
    result = subprocess.run(
        [sys.executable, TOOL, "--instructions", sandbox.instructions, "--log-dir", sandbox.logs,
         "--mirror", sandbox.mirror, "--bucket", sandbox.bucket, "--location",
         sandbox.location, "--sender", "backup-report@example.com", "--recipient",
         sandbox.recipient, "--config-dir", str(config), "--unit-dir", str(units),
         "--region", "us-east-1", "--write-secrets"],
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
    # the region of the bucket and of the SES sender (a report is sent only from there)
    assert "Environment=AWS_REGION=us-east-1" in service.splitlines()
    wrapper = (config / "aam-auto-backup-daily.sh").read_text()
    assert "AWS_REGION=us-east-1\nexport AWS_REGION\n" in wrapper
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


def test_the_region_is_required_unless_the_shell_has_one(sandbox, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}
    base = [sys.executable, TOOL, "--instructions", sandbox.instructions, "--log-dir",
            sandbox.logs, "--bucket", sandbox.bucket, "--location", sandbox.location,
            "--config-dir", str(tmp_path / "c"), "--unit-dir", str(tmp_path / "u")]
    missing = subprocess.run(base, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "--region" in missing.stderr
    wrong = subprocess.run(base + ["--region", "eu west 1"], env=env, capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and "is not an AWS region name" in wrong.stderr
    inherited = subprocess.run(base, env=dict(env, AWS_REGION="eu-central-1"),
                               capture_output=True, text=True)
    assert inherited.returncode == 0, inherited.stderr
    assert "Environment=AWS_REGION=eu-central-1" in (
        tmp_path / "u" / "aam-auto-backup.service").read_text()
