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
        [--upload-limit 20Mbit] [--stop-after 6.5] [--drill]

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
to the night").  --drill adds the monthly restore drill: `drill.settings`, and
`aam-auto-backup-drill.service` and `.timer` (the 1st and the 4th of each month: the
first run requests the thaw, the second finishes the drill); it runs with the restore
user's keys, which --write-secrets then writes to `drill-secrets.env` (mode 0600,
read by the drill alone; docs/scheduling.md, "A monthly restore drill").
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
DRILL_UNIT = f"{UNIT}-drill"
DRILL_SETTINGS_FILE = "drill.settings"
DRILL_SECRETS_FILE = "drill-secrets.env"
DRILL_VARIABLES = KEY_VARIABLES["restore"]
DRILL_PROMPTS = ("AWS access key ID of the restore user",
                 "AWS secret access key of the restore user")
# The drill's two runs a month: the first requests the thaw (Bulk: done within 48
# hours), the second, three days later, finds it done and finishes; the program's
# default restoration period (3 days) keeps the thawed copies until then.
DRILL_DAYS_OF_MONTH = (1, 4)
DRILL_TIME = "03:00"
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


def drill_settings(options):
    """The drill's settings by name, in the table's order: the archive key and the
    restore user's keys as env:NAME."""
    values = dict(key="env:" + SECRET_VARIABLES[0], bucket=options.bucket,
                  location=options.location, access_key_id="env:" + DRILL_VARIABLES[0],
                  secret_access_key="env:" + DRILL_VARIABLES[1])
    return [(arg.name, values[arg.field]) for arg in aab.DRILL_ARGS if arg.field in values]


def drill_settings_text(options):
    lines = ["# AAM Auto Backup: the monthly restore drill's settings (written by",
             "# tools/linux_schedule.py; 'aam_auto_backup.py drill-aws-backups --help' says",
             "# what each is).  Secrets are env:NAME: the archive key's value is in",
             f"# secrets.env, the restore user's keys' in {DRILL_SECRETS_FILE}."]
    lines += [f"{name} = {_settings_quote(value)}" for name, value in drill_settings(options)]
    return "\n".join(lines) + "\n"


def drill_service_text(options, settings_file, secrets_file, drill_secrets_file):
    command = " ".join(_systemd_quote(a) for a in [
        options.python, PROGRAM, aab.DRILL_OPERATION, "--settings", settings_file])
    return "\n".join([
        *service_head("monthly restore drill", options, secrets_file),
        f"EnvironmentFile={drill_secrets_file}",
        f"ExecStart={command}",
        # 7: the thaw is requested or still in progress; the next run finishes the drill
        f"SuccessExitStatus={aab.EXIT_NOT_READY}",
        "Nice=10",
        "",
    ])


def drill_timer_text():
    days = ",".join(f"{day:02d}" for day in DRILL_DAYS_OF_MONTH)
    return "\n".join([
        "[Unit]",
        f"Description=AAM Auto Backup: restore drill on days {days} of each month",
        "",
        "[Timer]",
        f"OnCalendar=*-*-{days} {DRILL_TIME}:00",
        "Persistent=true",
        f"Unit={DRILL_UNIT}.service",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


def drill_crontab_line(wrapper):
    hour, minute = DRILL_TIME.split(":")
    days = ",".join(str(day) for day in DRILL_DAYS_OF_MONTH)
    return (f"{int(minute)} {int(hour)} {days} * * {shlex.quote(wrapper)} "
            f"{aab.DRILL_OPERATION} >/dev/null 2>&1")


def settings_text(options):
    lines = ["# AAM Auto Backup: the daily regular-backup's settings (written by",
             "# tools/linux_schedule.py; 'aam_auto_backup.py regular-backup --help' says what",
             "# each is).  Secrets are env:NAME: their values are in secrets.env."]
    lines += [f"{name} = {_settings_quote(value)}" for name, value in backup_settings(options)]
    return "\n".join(lines) + "\n"


def backup_argv(options, settings_file):
    """The job's command line: the program's named form on the settings file."""
    return [options.python, PROGRAM, aab.REGULAR_BACKUP, "--settings", settings_file]


def service_head(what, options, secrets_file):
    """A job's unit and service lines up to its own: a oneshot run once online, in the
    region of the bucket and the SES sender (tools/aws_setup.py's), with the secrets."""
    return ["[Unit]",
            f"Description=AAM Auto Backup: {what}",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=oneshot",
            f"Environment={_systemd_quote('AWS_REGION=' + options.region)}",
            f"EnvironmentFile={secrets_file}"]


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
        *service_head("daily regular backup", options, secrets_file),
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


def wrapper_text(options, settings_file, secrets_file, drill_files=None):
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
    settings = shlex.quote(settings_file)
    drill = []
    if drill_files:
        # the drill: its own settings, and the restore user's keys, read by it alone
        drill_settings_file, drill_secrets_file = drill_files
        drill = [f'if [ "$operation" = {aab.DRILL_OPERATION} ]; then',
                 f"  settings={shlex.quote(drill_settings_file)}",
                 "  set -a",
                 f"  . {shlex.quote(drill_secrets_file)}",
                 "  set +a",
                 "fi"]
        settings = '"$settings"'
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
        *([f"settings={shlex.quote(settings_file)}"] + drill if drill else []),
        f'exec {program} "$operation" --settings {settings} "$@"',
        "",
    ])


def crontab_line(wrapper):
    return f"30 0 * * * {shlex.quote(wrapper)} >/dev/null 2>&1"


def secrets_text(values, names=SECRET_VARIABLES):
    return "".join(f"{name}={_env_file_quote(value)}\n"
                   for name, value in zip(names, values))


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


def ask_drill_secrets(options):
    """The restore user's keys for the drill: from --keys-file when it has them."""
    return ask_values(options, DRILL_VARIABLES, DRILL_PROMPTS)


def ask_values(options, names, prompts):
    """Each secret from --keys-file when it holds it, else typed twice."""
    known = read_keys_file(options.keys_file) if options.keys_file else {}
    values = []
    for name, prompt in zip(names, prompts):
        if known.get(name):
            print(f"{prompt}: from {options.keys_file}")
            values.append(known[name])
        else:
            try:
                values.append(ask_twice(prompt, warn=lambda text: print(text,
                                                                          file=sys.stderr)))
            except ValueError as problem:
                raise ScheduleError(f"{problem}; nothing was written")
    return values


def ask_secrets(options):
    """The three secrets: the backup user's keys from --keys-file when it has them."""
    values = ask_values(options, SECRET_VARIABLES, SECRET_PROMPTS)
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
    parser.add_argument("--drill", action="store_true",
                        help="also the monthly restore drill (drill-aws-backups, with the "
                             "restore user's keys) on the 1st and the 4th")
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


def check_settings(text, name=SETTINGS_FILE, operation=aab.REGULAR_BACKUP,
                   parse=aab.parse_backup_args):
    """The settings as the program will read them: a value it would refuse is refused
    now, before anything is written or asked for."""
    for variable in SECRET_VARIABLES + DRILL_VARIABLES:
        os.environ.setdefault(variable, "a placeholder to check the settings with")
    with tempfile.TemporaryDirectory(prefix="aam-schedule-") as directory:
        path = os.path.join(directory, name)
        write_file(path, text, 0o600)
        try:
            parse([operation, "--settings", path])
        except aab.UsageError as problem:
            raise ScheduleError(f"the program would refuse these settings: "
                                f"{str(problem).replace(path, name)}")


def files_to_write(options):
    """[(path, text, mode)] of every file, secrets.env aside."""
    settings_file = os.path.join(options.config_dir, SETTINGS_FILE)
    secrets_file = os.path.join(options.config_dir, "secrets.env")
    wrapper = os.path.join(options.config_dir, f"{UNIT}-daily.sh")
    drill_settings_file = os.path.join(options.config_dir, DRILL_SETTINGS_FILE)
    drill_secrets_file = os.path.join(options.config_dir, DRILL_SECRETS_FILE)
    drill_files = (drill_settings_file, drill_secrets_file) if options.drill else None
    files = [
        (settings_file, settings_text(options), 0o600),
        (os.path.join(options.unit_dir, f"{UNIT}.service"),
         service_text(options, settings_file, secrets_file), 0o644),
        (os.path.join(options.unit_dir, f"{UNIT}.timer"), timer_text(), 0o644),
        (wrapper, wrapper_text(options, settings_file, secrets_file, drill_files), 0o700),
    ]
    if options.drill:
        files += [
            (drill_settings_file, drill_settings_text(options), 0o600),
            (os.path.join(options.unit_dir, f"{DRILL_UNIT}.service"),
             drill_service_text(options, drill_settings_file, secrets_file,
                                drill_secrets_file), 0o644),
            (os.path.join(options.unit_dir, f"{DRILL_UNIT}.timer"), drill_timer_text(),
             0o644),
        ]
    return settings_file, secrets_file, wrapper, files


def main(argv=None):
    options = parse_options(argv)
    settings_file, secrets_file, wrapper, files = files_to_write(options)
    try:
        check_settings(files[0][1])
        if options.drill:
            check_settings(files[4][1], DRILL_SETTINGS_FILE, aab.DRILL_OPERATION,
                           aab.parse_drill_args)
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
    if options.drill:
        print(f"{verb} the monthly restore drill's timer:")
        print(f"  systemctl --user enable --now {DRILL_UNIT}.timer")
    print("Or, with cron instead of systemd, add this line with 'crontab -e':"
          if not options.drill else
          "Or, with cron instead of systemd, add these lines with 'crontab -e':")
    print(f"  {crontab_line(wrapper)}")
    if options.drill:
        print(f"  {drill_crontab_line(wrapper)}")
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
        if options.drill:
            drill_sources = [f"{name} ("
                             f"{'from ' + options.keys_file if known.get(name) else 'asked'})"
                             for name in DRILL_VARIABLES]
            print(f"\n--- {os.path.join(options.config_dir, DRILL_SECRETS_FILE)} (mode "
                  f"0600): {', '.join(drill_sources)}; never shown")
    print()


def write_all(files, settings_file, secrets_file, options):
    secrets = ask_secrets(options) if options.write_secrets else None
    drill_secrets = (ask_drill_secrets(options) if options.write_secrets and options.drill
                     else None)
    os.makedirs(options.config_dir, mode=0o700, exist_ok=True)
    os.makedirs(options.unit_dir, exist_ok=True)
    if secrets is not None:
        write_file(secrets_file, secrets_text(secrets), 0o600)
    if drill_secrets is not None:
        write_file(os.path.join(options.config_dir, DRILL_SECRETS_FILE),
                   secrets_text(drill_secrets, DRILL_VARIABLES), 0o600)
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
    if options.drill:
        print(f"The restore drill: {files[4][0]}, {DRILL_UNIT}.service and "
              f"{DRILL_UNIT}.timer; the restore user's keys are read from "
              f"{os.path.join(options.config_dir, DRILL_SECRETS_FILE)} (mode 0600) by the "
              "drill alone.")


if __name__ == "__main__":
    sys.exit(main())
