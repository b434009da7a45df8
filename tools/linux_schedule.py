#!/usr/bin/env python3
"""Schedule the daily regular backup on Linux (systemd timer) or macOS/Linux (cron).

It matches the Windows Task Scheduler job of the original: every day at 00:30,
whether or not the user is logged in, `regular-backup` with force full `no` and
automatic force full `yes`.  The job runs the program's named form on a settings
file it writes (`backup.settings`, which you may edit later).  Secrets never go into
the settings file, the unit files or the crontab: the settings say `env:NAME`, and
the values come from an owner-only environment file.

    .venv/bin/python tools/linux_schedule.py --instructions ~/backup-instructions.txt \\
        --log-dir ~/aam-logs --mirror /media/usb/backup --bucket aam-data-backup \\
        --location my-laptop --sender backup@example.com --recipient me@example.com \\
        --keys-file ~/aam-keys.env --write-secrets [--region R] [--dry-run] \\
        [--upload-limit 20Mbit] [--stop-after 6.5]

writes, in --config-dir (~/.config/aam-auto-backup), `backup.settings` and the
wrapper script `aam-auto-backup-daily.sh` (used by cron), and in --unit-dir
(~/.config/systemd/user) `aam-auto-backup.service` and `aam-auto-backup.timer`.
--write-secrets asks for the archive key (twice) and the backup user's AWS keys
(twice each; taken from --keys-file when it holds them) and writes `secrets.env`
(mode 0600).  The region (AWS_REGION) comes from --region, else from --keys-file
(tools/aws_setup.py writes it there), else from AWS_REGION; the job is given it.
--dry-run prints what would be written and asks for nothing.  It prints the
commands that enable the timer, and the equivalent crontab line.  --upload-limit
gives the job AAM_UPLOAD_LIMIT; --stop-after stops a run still going after that
many hours with SIGTERM, as Ctrl-C stops it (docs/scheduling.md, "Keeping backups
to the night").
"""

import argparse
import getpass
import os
import shlex
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROGRAM = os.path.join(os.path.dirname(HERE), "aam_auto_backup.py")
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import aam_auto_backup as aab  # noqa: E402
import option_types  # noqa: E402
from ask import ask_twice  # noqa: E402
from aws_setup import KEY_VARIABLES, read_keys_file  # noqa: E402

UNIT = "aam-auto-backup"
SETTINGS_FILE = "backup.settings"
SECRET_VARIABLES = ("AAM_ENCRYPTION_KEY",) + KEY_VARIABLES["backup"]
SECRET_PROMPTS = ("Archive encryption key", "AWS access key ID of the backup user",
                  "AWS secret access key of the backup user")
# After the SIGTERM of --stop-after, the time the program gets to abort its multipart
# upload and remove its work directory before it is killed.
STOP_GRACE_MINUTES = 5


class ScheduleError(Exception):
    """A setting this tool cannot use; nothing was written."""


def backup_settings(options):
    """The daily job's settings by name (force full no, automatic yes), in the table's
    order; the drive letter is Windows's only."""
    secrets = dict(zip(("key", "access_key_id", "secret_access_key"),
                       (f"env:{name}" for name in SECRET_VARIABLES)))
    values = dict(
        python=options.python, lock_poll=str(options.poll), lock_wait=str(options.wait),
        log_dir=options.log_dir, send_email="True" if options.recipient else "False",
        sender_name=options.sender_name, sender_address=options.sender or "",
        recipient=options.recipient or "", instruction_file=options.instructions,
        destinations=options.destinations, mirror_root=options.mirror or "",
        keep="True" if options.keep else "False", bucket=options.bucket,
        location=options.location, force_full="no", auto_force_full="yes", **secrets)
    return [(arg.name, values[arg.field]) for arg in aab.BACKUP_ARGS if arg.field in values]


def settings_text(options):
    lines = ["# AAM Auto Backup: the daily regular-backup's settings (written by",
             "# tools/linux_schedule.py; 'aam_auto_backup.py regular-backup --help' says what",
             "# each is).  Secrets are env:NAME: their values are in secrets.env."]
    lines += [f"{name} = {_settings_quote(value)}" for name, value in backup_settings(options)]
    return "\n".join(lines) + "\n"


def backup_argv(options, settings_file):
    """The job's command line: the program's named form on the settings file."""
    return [options.python, PROGRAM, aab.REGULAR_BACKUP, "--settings", settings_file]


def service_text(options, settings_file, secrets_file):
    command = " ".join(_systemd_quote(a) for a in backup_argv(options, settings_file))
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
        # the region of the bucket and the SES sender (tools/aws_setup.py's)
        f"Environment={_systemd_quote('AWS_REGION=' + options.region)}",
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


def wrapper_text(options, settings_file, secrets_file):
    """The cron job's script; by hand it also runs another operation on the same settings,
    secrets and region: '<script> incremental-only-backup', '<script> regular-backup
    --force-full yes'."""
    program = backup_argv(options, settings_file)[:2]
    if options.stop_after:
        # timeout(1) sends SIGTERM after the time, SIGKILL if the program is still there
        # STOP_GRACE_MINUTES later
        program = [options.timeout, "--signal=TERM", f"--kill-after={STOP_GRACE_MINUTES}m",
                   f"{options.stop_after}m"] + program
    program = " ".join(shlex.quote(a) for a in program)
    limit = ([f"AAM_UPLOAD_LIMIT={options.upload_limit}", "export AAM_UPLOAD_LIMIT"]
             if options.upload_limit else [])
    return "\n".join([
        "#!/bin/sh",
        "# AAM Auto Backup daily job (for cron); the secrets come from an owner-only file.",
        "# By hand: this script [operation [--NAME VALUE ...]], e.g. incremental-only-backup.",
        f"AWS_REGION={shlex.quote(options.region)}",
        "export AWS_REGION",
        *limit,
        "set -a",
        f". {shlex.quote(secrets_file)}",
        "set +a",
        f"operation=${{1:-{aab.REGULAR_BACKUP}}}",
        "[ $# -gt 0 ] && shift",
        f'exec {program} "$operation" --settings {shlex.quote(settings_file)} "$@"',
        "",
    ])


def crontab_line(wrapper):
    return f"30 0 * * * {shlex.quote(wrapper)} >/dev/null 2>&1"


def secrets_text(values):
    return "".join(f"{name}={_env_file_quote(value)}\n"
                   for name, value in zip(SECRET_VARIABLES, values))


def _settings_quote(value):
    # A settings-file value keeps its outer spaces, or is empty, only inside "...".
    return f'"{value}"' if not value or value != value.strip() else value


def _systemd_quote(text):
    # systemd splits ExecStart like a shell, with C-style escapes in double quotes
    if text and all(c.isalnum() or c in "/._-:=@+," for c in text):
        return text.replace("%", "%%")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _env_file_quote(value):
    return "'" + value.replace("'", "'\\''") + "'"


def ask_secrets(options):
    """The three secrets: the backup user's keys from --keys-file when it has them."""
    known = read_keys_file(options.keys_file) if options.keys_file else {}
    values = []
    for name, prompt in zip(SECRET_VARIABLES, SECRET_PROMPTS):
        if known.get(name):
            print(f"{prompt}: from {options.keys_file}")
            values.append(known[name])
        else:
            try:
                values.append(ask_twice(prompt, warn=lambda text: print(text,
                                                                          file=sys.stderr)))
            except ValueError as problem:
                raise ScheduleError(f"{problem}; nothing was written")
    key_problem = None
    try:
        aab._key(values[0])
    except ValueError as problem:
        key_problem = problem
    if key_problem:
        raise ScheduleError(f"the archive encryption key {key_problem}; nothing was written")
    if len(values[0]) < aab.STRONG_KEY_LENGTH:
        print(f"Warning: the archive key has fewer than {aab.STRONG_KEY_LENGTH} characters "
              "(see docs/security.md).", file=sys.stderr)
    return values


def write_file(path, text, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)


def parse_options(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="docs/scheduling.md has the details.")
    parser.add_argument("--instructions", required=True, help="the instruction file")
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--location", required=True, help="this computer's name, no '_'")
    parser.add_argument("--mirror", help="local mirror directory")
    parser.add_argument("--destinations", default="local|AWS")
    parser.add_argument("--keep", action="store_true",
                        help="keep files in the mirror that are gone from the source")
    parser.add_argument("--sender", help="e-mail sender (no e-mail without --recipient)")
    parser.add_argument("--sender-name", default="AAM Backup Report")
    parser.add_argument("--recipient")
    parser.add_argument("--region", help="the AWS region of the bucket and SES (default: "
                        "AWS_REGION of --keys-file, else of the environment)")
    parser.add_argument("--keys-file", help="tools/aws_setup.py's keys file: the region, "
                        "and with --write-secrets the backup user's keys")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--poll", type=int, default=600, help="lock-poll, seconds")
    parser.add_argument("--wait", type=int, default=7200, help="lock-wait, seconds")
    parser.add_argument("--config-dir",
                        default=os.path.expanduser("~/.config/aam-auto-backup"))
    parser.add_argument("--unit-dir", default=os.path.expanduser("~/.config/systemd/user"))
    parser.add_argument("--write-secrets", action="store_true",
                        help="ask for the key and the AWS keys and write secrets.env")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be written; write and ask nothing")
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
    for name in ("instructions", "log_dir", "mirror", "config_dir", "unit_dir", "keys_file"):
        if getattr(options, name):
            setattr(options, name, os.path.abspath(os.path.expanduser(getattr(options, name))))
    if options.keys_file and not os.path.isfile(options.keys_file):
        parser.error(f"--keys-file {options.keys_file} does not exist")
    options.region = (options.region
                      or (read_keys_file(options.keys_file) if options.keys_file else {})
                      .get("AWS_REGION")
                      or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
    if not options.region:
        parser.error("the region is not known: give --region (the region tools/aws_setup.py "
                     "used) or --keys-file (its keys file names it)")
    return options


def check_settings(text):
    """The settings as the program will read them: a value it would refuse is refused
    now, before anything is written or asked for."""
    for name in SECRET_VARIABLES:
        os.environ.setdefault(name, "a placeholder to check the settings with")
    with tempfile.TemporaryDirectory(prefix="aam-schedule-") as directory:
        path = os.path.join(directory, SETTINGS_FILE)
        write_file(path, text, 0o600)
        try:
            aab.parse_backup_args([aab.REGULAR_BACKUP, "--settings", path])
        except aab.UsageError as problem:
            raise ScheduleError(f"the program would refuse these settings: "
                                f"{str(problem).replace(path, SETTINGS_FILE)}")


def files_to_write(options):
    """[(path, text, mode)] of every file, secrets.env aside."""
    settings_file = os.path.join(options.config_dir, SETTINGS_FILE)
    secrets_file = os.path.join(options.config_dir, "secrets.env")
    wrapper = os.path.join(options.config_dir, f"{UNIT}-daily.sh")
    return settings_file, secrets_file, wrapper, [
        (settings_file, settings_text(options), 0o600),
        (os.path.join(options.unit_dir, f"{UNIT}.service"),
         service_text(options, settings_file, secrets_file), 0o644),
        (os.path.join(options.unit_dir, f"{UNIT}.timer"), timer_text(), 0o644),
        (wrapper, wrapper_text(options, settings_file, secrets_file), 0o700),
    ]


def main(argv=None):
    options = parse_options(argv)
    settings_file, secrets_file, wrapper, files = files_to_write(options)
    try:
        check_settings(files[0][1])
        if options.dry_run:
            show(files, secrets_file, options)
        else:
            write_all(files, settings_file, secrets_file, options)
    except ScheduleError as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    verb = "Would enable" if options.dry_run else "Enable"
    print(f"{verb} the daily timer (and let it run while you are logged out):")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {UNIT}.timer")
    print(f"  loginctl enable-linger {getpass.getuser()}")
    print("Or, with cron instead of systemd, add this line with 'crontab -e':")
    print(f"  {crontab_line(wrapper)}")
    return 0


def show(files, secrets_file, options):
    print("Dry run: nothing is written.")
    for path, text, mode in files:
        print(f"\n--- {path} (mode {mode:04o})\n{text}", end="")
    if options.write_secrets:
        known = read_keys_file(options.keys_file) if options.keys_file else {}
        sources = [f"{name} ({'from ' + options.keys_file if known.get(name) else 'asked'})"
                   for name in SECRET_VARIABLES]
        print(f"\n--- {secrets_file} (mode 0600): {', '.join(sources)}; never shown")
    print()


def write_all(files, settings_file, secrets_file, options):
    secrets = ask_secrets(options) if options.write_secrets else None
    os.makedirs(options.config_dir, mode=0o700, exist_ok=True)
    os.makedirs(options.unit_dir, exist_ok=True)
    if secrets is not None:
        write_file(secrets_file, secrets_text(secrets), 0o600)
    for path, text, mode in files:
        write_file(path, text, mode)
    print(f"Wrote {settings_file} (the job's settings; edit it to change them),")
    print(f"{UNIT}.service and {UNIT}.timer in {options.unit_dir}, and {files[3][0]}.")
    print(f"Secrets are read from {secrets_file} (mode 0600); the region is "
          f"AWS_REGION={options.region}.")
    if options.upload_limit:
        print(f"Uploads are limited to {options.upload_limit:,} bytes per second "
              "(AAM_UPLOAD_LIMIT).")
    if options.stop_after:
        print(f"A run still going after {options.stop_after / 60:g} hours is stopped "
              "(SIGTERM, as Ctrl-C).")


if __name__ == "__main__":
    sys.exit(main())
