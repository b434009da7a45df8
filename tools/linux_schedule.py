#!/usr/bin/env python3
"""Schedule the daily regular backup on Linux (systemd timer) or macOS/Linux (cron).

It matches the Windows Task Scheduler job of the original: every day at 00:30,
whether or not the user is logged in, `regular-backup` with force full `no` and
automatic force full `yes`.  Secrets never go into the unit files or the crontab:
the job passes `env:NAME` arguments and reads the values from an owner-only
environment file.

    python3 tools/linux_schedule.py --instructions ~/backup-instructions.txt \\
        --log-dir ~/aam-logs --mirror /media/usb/backup --bucket aam-data-backup \\
        --location my-laptop --sender backup@example.com --recipient me@example.com \\
        [--write-secrets] [--unit-dir DIR] [--upload-limit 20Mbit] [--stop-after 6]

writes `aam-auto-backup.service`, `aam-auto-backup.timer`, the wrapper script
`aam-auto-backup-daily.sh` (used by cron) and, with --write-secrets, asks for
the secrets and writes `secrets.env` (mode 0600).  It prints the commands that
enable the timer, and the equivalent crontab line.  --upload-limit sets
AAM_UPLOAD_LIMIT for the job; --stop-after stops a run still going after that many
hours with SIGTERM, as Ctrl-C stops it (docs/scheduling.md, "Keeping backups to the
night").
"""

import argparse
import getpass
import os
import shlex
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(os.path.dirname(HERE), "aam_auto_backup.py")
sys.path.insert(0, os.path.dirname(HERE))

import aam_auto_backup as aab  # noqa: E402
import option_types  # noqa: E402
UNIT = "aam-auto-backup"
SECRET_VARIABLES = ("AAM_ENCRYPTION_KEY", "AAM_BACKUP_ACCESS_KEY_ID",
                    "AAM_BACKUP_SECRET_ACCESS_KEY")
# After the SIGTERM of --stop-after, the time the program gets to abort its multipart
# upload and remove its work directory before it is killed.
STOP_GRACE_MINUTES = 5


def backup_argv(options):
    """The 22 positional arguments of the daily job (force full no, automatic yes)."""
    return [options.python, PROGRAM] + aab.BACKUP_ARGS.argv(
        operation=aab.REGULAR_BACKUP, agent="user", python=options.python,
        lock_poll=str(options.poll), lock_wait=str(options.wait), log_dir=options.log_dir,
        send_email="True" if options.recipient else "False",
        sender_name=options.sender_name, sender_address=options.sender or "",
        recipient=options.recipient or "", instruction_file=options.instructions,
        drive_letter="q", destinations=options.destinations,
        mirror_root=options.mirror or "", keep="True" if options.keep else "False",
        key=f"env:{SECRET_VARIABLES[0]}", bucket=options.bucket, location=options.location,
        access_key_id=f"env:{SECRET_VARIABLES[1]}",
        secret_access_key=f"env:{SECRET_VARIABLES[2]}", force_full="no",
        auto_force_full="yes")


def service_text(options, secrets_file):
    command = " ".join(_systemd_quote(a) for a in backup_argv(options))
    limit = ([f"Environment=AAM_UPLOAD_LIMIT={options.upload_limit}"]
             if options.upload_limit else [])
    stop = []
    if options.stop_after:
        stop = [
            # Type=oneshot: the whole run is its start-up (RuntimeMaxSec= has no effect)
            f"TimeoutStartSec={options.stop_after}min",
            f"TimeoutStopSec={STOP_GRACE_MINUTES}min",
        ]
    return "\n".join([
        "[Unit]",
        "Description=AAM Auto Backup: daily regular backup",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        f"EnvironmentFile={secrets_file}",
        *limit,
        f"ExecStart={command}",
        # a stop's SIGTERM goes to the program alone, which stops its child pass and
        # 7-Zip itself, then aborts its upload; what is left afterwards is killed
        "KillMode=mixed",
        *stop,
        # a backup should not slow the computer down
        "Nice=10",
        "IOSchedulingClass=idle",
        "",
    ])


def timer_text():
    return "\n".join([
        "[Unit]",
        "Description=AAM Auto Backup: every day at 00:30",
        "",
        "[Timer]",
        "OnCalendar=*-*-* 00:30:00",
        # a run missed while the computer was off happens at the next start
        "Persistent=true",
        f"Unit={UNIT}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def wrapper_text(options, secrets_file):
    argv = backup_argv(options)
    if options.stop_after:
        # timeout(1) sends SIGTERM after the time, SIGKILL if the program is still there
        # STOP_GRACE_MINUTES later
        argv = [options.timeout, "--signal=TERM", f"--kill-after={STOP_GRACE_MINUTES}m",
                f"{options.stop_after}m"] + argv
    command = " ".join(shlex.quote(a) for a in argv)
    limit = ([f"AAM_UPLOAD_LIMIT={options.upload_limit}", "export AAM_UPLOAD_LIMIT"]
             if options.upload_limit else [])
    return "\n".join([
        "#!/bin/sh",
        "# AAM Auto Backup daily job (for cron); the secrets come from an owner-only file.",
        "set -a",
        f". {shlex.quote(secrets_file)}",
        "set +a",
        *limit,
        f"exec {command}",
        "",
    ])


def crontab_line(wrapper):
    return f"30 0 * * * {shlex.quote(wrapper)} >/dev/null 2>&1"


def secrets_text(values):
    return "".join(f"{name}={_env_file_quote(value)}\n"
                   for name, value in zip(SECRET_VARIABLES, values))


def _systemd_quote(text):
    # systemd splits ExecStart like a shell, with C-style escapes in double quotes
    if text and all(c.isalnum() or c in "/._-:=@+," for c in text):
        return text.replace("%", "%%")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _env_file_quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def write_file(path, text, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


def parse_options(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--location", required=True)
    parser.add_argument("--mirror", help="local mirror directory")
    parser.add_argument("--destinations", default="local|AWS")
    parser.add_argument("--keep", action="store_true",
                        help="keep files in the mirror that are gone from the source")
    parser.add_argument("--sender", help="e-mail sender (no e-mail without --recipient)")
    parser.add_argument("--sender-name", default="AAM Backup Report")
    parser.add_argument("--recipient")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--poll", type=int, default=600)
    parser.add_argument("--wait", type=int, default=7200)
    parser.add_argument("--config-dir",
                        default=os.path.expanduser("~/.config/aam-auto-backup"))
    parser.add_argument("--unit-dir", default=os.path.expanduser("~/.config/systemd/user"))
    parser.add_argument("--write-secrets", action="store_true",
                        help="ask for the key and the AWS keys and write secrets.env")
    parser.add_argument("--upload-limit", type=option_types.rate, metavar="RATE",
                        help="AAM_UPLOAD_LIMIT for the job: the whole run's upload at most "
                             "this rate, e.g. 20Mbit or 2.5M (bytes per second)")
    parser.add_argument("--stop-after", type=option_types.hours_as_minutes, metavar="HOURS",
                        help="stop a run still going after HOURS (e.g. 6 or 6.5) with "
                             "SIGTERM, as Ctrl-C does: keeps backups to the night")
    options = parser.parse_args(argv)
    if options.recipient and not options.sender:
        parser.error("--recipient needs --sender (the SES-verified sender address)")
    options.timeout = shutil.which("timeout")
    if options.stop_after and not options.timeout:
        parser.error("--stop-after: the cron wrapper needs timeout(1) from GNU coreutils, "
                     "which is not on PATH")
    for name in ("instructions", "log_dir", "mirror", "config_dir", "unit_dir"):
        if getattr(options, name):
            setattr(options, name, os.path.abspath(os.path.expanduser(getattr(options, name))))
    return options


def main(argv=None):
    options = parse_options(argv)
    os.makedirs(options.config_dir, mode=0o700, exist_ok=True)
    os.makedirs(options.unit_dir, exist_ok=True)
    secrets_file = os.path.join(options.config_dir, "secrets.env")
    wrapper = os.path.join(options.config_dir, f"{UNIT}-daily.sh")
    if options.write_secrets:
        values = [getpass.getpass("Archive encryption key: "),
                  getpass.getpass("AWS access key ID of the backup user: "),
                  getpass.getpass("AWS secret access key of the backup user: ")]
        write_file(secrets_file, secrets_text(values), 0o600)
    write_file(os.path.join(options.unit_dir, f"{UNIT}.service"),
               service_text(options, secrets_file), 0o644)
    write_file(os.path.join(options.unit_dir, f"{UNIT}.timer"), timer_text(), 0o644)
    write_file(wrapper, wrapper_text(options, secrets_file), 0o700)
    print(f"Wrote {UNIT}.service and {UNIT}.timer in {options.unit_dir},")
    print(f"and {wrapper}. Secrets are read from {secrets_file} (mode 0600).")
    if options.upload_limit:
        print(f"Uploads are limited to {options.upload_limit:,} bytes per second "
              "(AAM_UPLOAD_LIMIT).")
    if options.stop_after:
        print(f"A run still going after {options.stop_after / 60:g} hours is stopped "
              "(SIGTERM, as Ctrl-C).")
    print("Enable the daily timer (and let it run while you are logged out):")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT}.timer")
    print(f"  loginctl enable-linger {getpass.getuser()}")
    print("Or, with cron instead of systemd, add this line with 'crontab -e':")
    print(f"  {crontab_line(wrapper)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
