#!/usr/bin/env python3
"""Windows set-up helper: the daily Task Scheduler job and the two desktop batch files.

From your settings it writes, as the original Windows program's set-up had them:

  Daily AAM Auto Backup.xml               the task: daily at 00:30, run whether you
                                          are logged on or not, highest privileges,
                                          regular-backup with force full "no" and
                                          automatic force full "yes"
  backup batch files\\Regular backup.bat
  backup batch files\\Incremental-only backup.bat

and prints the schtasks command that registers the task (or runs it: --register);
--dry-run prints the files and the command instead, and writes and runs nothing.
schtasks /TR cannot hold the 22 arguments (it stops at 261 characters) and has no
"Start in", so the task is registered from XML; /RP * makes schtasks ask for your
Windows password, so it is on no command line and in no file.

Secrets: by default arguments 16, 19 and 20 are env:NAME references, so neither
the task nor the batch files contain a secret; set those user environment
variables once (docs/scheduling.md, "Windows walkthrough").  --inline-secrets
asks for the values (never on the command line, each typed twice) and writes them
into the files, if you prefer that.

The region (--region, the one tools/aws_setup.py used): the batch files set
AWS_REGION, and the task, which runs python.exe directly, reads the user
environment variable that `setx AWS_REGION <region>` sets (printed, and run with
--register).  --upload-limit RATE sets AAM_UPLOAD_LIMIT the same way.
--stop-after HOURS sets the task's "Stop the task if it runs longer than"
(default 72 hours; docs/scheduling.md, "Keeping backups to the night").
--drill also writes `Monthly AAM Auto Backup restore drill.xml`: drill-aws-backups
on the 1st and the 4th of each month at 03:00 (the first run requests the thaw, the
second finishes the drill), with the archive key as the backup's and the restore
user's keys as env:AAM_RESTORE_ACCESS_KEY_ID and env:AAM_RESTORE_SECRET_ACCESS_KEY
(docs/scheduling.md, "A monthly restore drill").

    python tools\\windows_schedule.py --python C:\\...\\python.exe --log-dir ... (see --help)
"""

import argparse
import datetime as dt
import os
import subprocess
import sys
from xml.sax.saxutils import escape

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import aam_auto_backup as aab  # noqa: E402
import option_types  # noqa: E402
from ask import ask_twice  # noqa: E402

TASK_NAME = "Daily AAM Auto Backup"
TASK_TIME = "00:30:00"                   # 12:30 am local time: the computer is on, unused
DRILL_TASK_NAME = "Monthly AAM Auto Backup restore drill"
DRILL_TIME = "03:00:00"
# The drill's two runs a month: the first requests the thaw (Bulk: done within 48
# hours), the second, three days later, finds it done and finishes; the program's
# default restoration period (3 days) keeps the thawed copies until then.
DRILL_DAYS_OF_MONTH = (1, 4)
DRILL_KEY_VARIABLES = ("AAM_RESTORE_ACCESS_KEY_ID", "AAM_RESTORE_SECRET_ACCESS_KEY")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
BATCH_DIRECTORY = "backup batch files"
REGULAR_BAT = "Regular backup.bat"
INCREMENTAL_BAT = "Incremental-only backup.bat"
PROGRAM = "aam_auto_backup.py"
SECRET_ENV_DEFAULTS = {
    "key": "AAM_BACKUP_ENCRYPTION_KEY",
    "access_key_id": "AAM_BACKUP_ACCESS_KEY_ID",
    "secret_access_key": "AAM_BACKUP_SECRET_ACCESS_KEY",
}
# Positions (1-based) the original batch files write without quotes; every other one
# is quoted.
BARE_POSITIONS = {1, 2, 4, 5, 7, 15}
WINDOWS = aab.WindowsPlatform()
DEFAULT_TIME_LIMIT_MINUTES = 72 * 60      # Task Scheduler's own default


class SettingsError(Exception):
    """A setting that cannot be written into the task or a batch file."""


class ScheduleSettings:
    """The user's values for the 22 backup arguments (docs/reference.md, Arguments)."""

    def __init__(self, program_dir, python, log_dir, sender, recipient, instruction_file,
                 mirror_dir, bucket, location, user, *, lock_poll=600, lock_wait=7200,
                 send_email=True, sender_name="AAM Backup Report", drive_letter="q",
                 destinations="local|AWS", keep=False, key=None, access_key_id=None,
                 secret_access_key=None, region=None, upload_limit=None,
                 stop_after=DEFAULT_TIME_LIMIT_MINUTES):
        self.program_dir = program_dir.rstrip("\\") or program_dir
        self.python, self.log_dir = python, log_dir
        self.sender, self.recipient = sender, recipient
        self.instruction_file, self.mirror_dir = instruction_file, mirror_dir
        self.bucket, self.location, self.user = bucket, location, user
        self.lock_poll, self.lock_wait = lock_poll, lock_wait
        self.send_email, self.sender_name = send_email, sender_name
        self.drive_letter, self.destinations, self.keep = drive_letter, destinations, keep
        self.key = key or "env:" + SECRET_ENV_DEFAULTS["key"]
        self.access_key_id = access_key_id or "env:" + SECRET_ENV_DEFAULTS["access_key_id"]
        self.secret_access_key = (secret_access_key
                                  or "env:" + SECRET_ENV_DEFAULTS["secret_access_key"])
        self.region = region
        self.upload_limit = upload_limit  # bytes per second, or None
        self.stop_after = stop_after      # minutes: the task's execution time limit

    @property
    def inline_secrets(self):
        return not all(s.startswith("env:") for s in
                       (self.key, self.access_key_id, self.secret_access_key))

    @property
    def program(self):
        return self.program_dir + "\\" + PROGRAM


def backup_arguments(settings, operation):
    """The 22 positional arguments; 21 (force full) "no", 22 (automatic) "yes": a full
    backup only each month, or when the instruction file changed."""
    s = settings
    return aab.BACKUP_ARGS.argv(
        operation=operation, agent="user", python=s.python, lock_poll=str(s.lock_poll),
        lock_wait=str(s.lock_wait), log_dir=s.log_dir, send_email=str(s.send_email),
        sender_name=s.sender_name, sender_address=s.sender, recipient=s.recipient,
        instruction_file=s.instruction_file, drive_letter=s.drive_letter,
        destinations=s.destinations, mirror_root=s.mirror_dir, keep=str(s.keep), key=s.key,
        bucket=s.bucket, location=s.location, access_key_id=s.access_key_id,
        secret_access_key=s.secret_access_key, force_full="no", auto_force_full="yes")


def drill_arguments(settings):
    """The drill's positional arguments: the backup's archive key, the restore user's
    keys (env:NAME), the restoration period left at its default."""
    return aab.DRILL_ARGS.argv(
        operation=aab.DRILL_OPERATION, key=settings.key, bucket=settings.bucket,
        location=settings.location, access_key_id="env:" + DRILL_KEY_VARIABLES[0],
        secret_access_key="env:" + DRILL_KEY_VARIABLES[1])


def argument_words(arguments, bare=BARE_POSITIONS):
    """The arguments as the original batch files wrote them: a few bare, the rest in
    double quotes."""
    words = []
    for position, value in enumerate(arguments, 1):
        if '"' in value:
            raise SettingsError(f"argument {position} contains a double quote, which a "
                                "Windows command line cannot pass here; use env:NAME")
        words.append(value if position in bare else WINDOWS.quote(value))
    return " ".join(words)


def batch_file_text(settings, operation):
    """Two lines: cd /D to the program directory, then the program.

    The program starts through the .py file association (as the original did).  cmd.exe
    would expand %...% in the line, so '%' is doubled.  A line that echoes an
    inline secret is not shown ('@'); non-ASCII paths need chcp 65001, as
    cmd.exe reads a batch file in the console code page.
    """
    command = f"{PROGRAM} " + argument_words(backup_arguments(settings, operation))
    lines = [f"cd /D {WINDOWS.quote(settings.program_dir)}"]
    for name, value in user_environment(settings).items():
        lines.append(f'set "{name}={value}"')
    lines.append(("@" if settings.inline_secrets else "") + command)
    text = "\r\n".join(line.replace("%", "%%") for line in lines) + "\r\n"
    if not text.isascii():
        text = "@chcp 65001 >nul\r\n" + text
    return text


def task_arguments(settings):
    """The task's "Add arguments" field: the program path, then the 22 arguments."""
    return (WINDOWS.quote(settings.program) + " "
            + argument_words(backup_arguments(settings, aab.REGULAR_BACKUP)))


def drill_task_arguments(settings):
    return (WINDOWS.quote(settings.program) + " "
            + argument_words(drill_arguments(settings), bare={1}))


DAILY_SCHEDULE = """      <ScheduleByDay>
        <DaysInterval>1</DaysInterval>
      </ScheduleByDay>"""


def drill_schedule():
    days = "".join(f"<Day>{day}</Day>" for day in DRILL_DAYS_OF_MONTH)
    months = "".join(f"<{month} />" for month in MONTHS)
    return (f"      <ScheduleByMonth>\n        <DaysOfMonth>{days}</DaysOfMonth>\n"
            f"        <Months>{months}</Months>\n      </ScheduleByMonth>")


def drill_task_xml(settings, start_date):
    """The drill's task: as the daily one, but on the 1st and the 4th at 03:00, run at
    the next start when missed, stopped after a day."""
    return task_xml(settings, start_date, "AAM Auto Backup: monthly restore drill "
                    "(the first run requests the thaw, the second finishes it).",
                    DRILL_TIME, drill_schedule(), drill_task_arguments(settings),
                    start_when_available=True, stop_after=24 * 60)


def task_xml(settings, start_date, description=None, time=TASK_TIME,
             schedule=DAILY_SCHEDULE, arguments=None, start_when_available=False,
             stop_after=None):
    """The Task Scheduler definition (schema 1.2, Windows Vista and later).

    General: run whether the user is logged on or not (password stored), with
    highest privileges, not hidden.  Trigger: daily at 00:30.  Action: python.exe
    in double quotes, the arguments, "Start in" the program directory without
    quotes.  Conditions: all unchecked.  Settings: the defaults (runs on demand),
    stopped after settings.stop_after minutes (72 hours unless chosen).  The
    other parameters make another job of it (drill_task_xml).
    """
    description = description or ("AAM Auto Backup: daily regular backup (force full no, "
                                  "auto yes).")
    arguments = arguments or task_arguments(settings)
    start = f"{start_date.isoformat()}T{time}"
    hours, minutes = divmod(stop_after or settings.stop_after, 60)
    limit = "PT" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    return f"""<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>{escape(description)}</Description>
  </RegistrationInfo>
  <Triggers>
    <CalendarTrigger>
      <StartBoundary>{start}</StartBoundary>
      <Enabled>true</Enabled>
{schedule}
    </CalendarTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>{escape(settings.user)}</UserId>
      <LogonType>Password</LogonType>
      <RunLevel>HighestAvailable</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>{str(start_when_available).lower()}</StartWhenAvailable>
    <RunOnlyIfNetworkAvailable>false</RunOnlyIfNetworkAvailable>
    <IdleSettings>
      <StopOnIdleEnd>false</StopOnIdleEnd>
      <RestartOnIdle>false</RestartOnIdle>
    </IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>false</Hidden>
    <RunOnlyIfIdle>false</RunOnlyIfIdle>
    <WakeToRun>false</WakeToRun>
    <ExecutionTimeLimit>{limit}</ExecutionTimeLimit>
    <Priority>7</Priority>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>{escape(WINDOWS.quote(settings.python))}</Command>
      <Arguments>{escape(arguments)}</Arguments>
      <WorkingDirectory>{escape(settings.program_dir)}</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


def schtasks_argv(settings, xml_path, name=TASK_NAME):
    """Register (or replace, /F) the task; /RP * asks for the Windows password."""
    return ["schtasks", "/Create", "/TN", name, "/XML", xml_path,
            "/RU", settings.user, "/RP", "*", "/F"]


def schtasks_command(settings, xml_path, name=TASK_NAME):
    """schtasks_argv as one line to paste into an administrator terminal."""
    plain = {"schtasks", "/Create", "/TN", "/XML", "/RU", "/RP", "*", "/F"}
    return " ".join(word if word in plain else WINDOWS.quote(word)
                    for word in schtasks_argv(settings, xml_path, name))


def files_to_write(settings, output_dir, start_date, drill=False):
    """[(path, bytes)]: the task XML, the two batch files, and the drill's task XML."""
    batch_dir = os.path.join(output_dir, BATCH_DIRECTORY)
    # schtasks reads task XML as UTF-16 with a byte-order mark.
    files = [(os.path.join(output_dir, TASK_NAME + ".xml"),
              task_xml(settings, start_date).replace("\n", "\r\n").encode("utf-16"))]
    for name, operation in ((REGULAR_BAT, "regular-backup"),
                            (INCREMENTAL_BAT, "incremental-only-backup")):
        files.append((os.path.join(batch_dir, name),
                      batch_file_text(settings, operation).encode("utf-8")))
    if drill:
        files.append((os.path.join(output_dir, DRILL_TASK_NAME + ".xml"),
                      drill_task_xml(settings, start_date).replace("\n", "\r\n")
                      .encode("utf-16")))
    return files


def write_files(settings, output_dir, start_date, drill=False):
    """Write the task XML and the two batch files; return their paths."""
    files = files_to_write(settings, output_dir, start_date, drill)
    os.makedirs(os.path.join(output_dir, BATCH_DIRECTORY), exist_ok=True)
    for path, data in files:
        aab._write_private_bytes(path, data)
    return [path for path, _data in files]


def user_environment(settings):
    """{name: value} the job needs in its environment: the batch files set them, and the
    task, which runs python.exe directly with no environment of its own, reads them as
    the user's environment variables (setx_argvs)."""
    values = {"AWS_REGION": settings.region,
              "AAM_UPLOAD_LIMIT": settings.upload_limit and str(settings.upload_limit)}
    return {name: value for name, value in values.items() if value}


def setx_argvs(settings):
    """Make each of user_environment the user's environment variable, which the task sees."""
    return [["setx", name, value] for name, value in user_environment(settings).items()]


def default_user():
    domain, name = os.environ.get("USERDOMAIN", ""), os.environ.get("USERNAME", "")
    return f"{domain}\\{name}" if domain and name else name


def parse_command_line(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--program-dir", default=REPO, help="where aam_auto_backup.py, ShadowSpawn.exe "
        "and 7z.exe are (default: this checkout)")
    add("--python", required=True, help="python.exe full path (argument 3; the task's "
        "program)")
    add("--log-dir", required=True, help="argument 6")
    add("--sender", required=True, help="argument 9: the SES-verified sender address")
    add("--recipient", required=True, help="argument 10")
    add("--instructions", required=True, help="argument 11: the instruction file")
    add("--mirror-dir", default="", help="argument 14: the local mirror directory")
    add("--bucket", required=True, help="argument 17")
    add("--location", required=True, help="argument 18: this computer's name, no '_'")
    add("--user", default=default_user(), help="the Windows account the task runs as "
        "(default: %(default)s)")
    add("--destinations", default="local|AWS", help="argument 13 (default: %(default)s)")
    add("--drive-letter", default="q", help="argument 12 (default: %(default)s)")
    add("--keep", choices=("True", "False"), default="False", help="argument 15")
    add("--send-email", choices=("True", "False"), default="True", help="argument 7")
    add("--sender-name", default="AAM Backup Report", help="argument 8")
    add("--lock-poll", type=int, default=600, help="argument 4, seconds")
    add("--lock-wait", type=int, default=7200, help="argument 5, seconds")
    add("--region", help="the AWS region of the bucket and SES (tools/aws_setup.py's): "
        "set in the batch files, and as your AWS_REGION for the task")
    for field, variable in SECRET_ENV_DEFAULTS.items():
        add(f"--{field.replace('_', '-')}-variable", default=variable,
            help=f"environment variable for the {field.replace('_', ' ')} "
                 "(default: %(default)s)")
    add("--inline-secrets", action="store_true", help="ask for the key and the AWS "
        "secret and write them into the task and the batch files instead")
    add("--output", default=None, help="where to write the files (default: the program "
        "directory)")
    add("--upload-limit", type=option_types.rate, metavar="RATE", help="AAM_UPLOAD_LIMIT: the "
        "whole run's upload at most this rate, e.g. 20Mbit or 2.5M; set in the batch files, "
        "and as yours for the task")
    add("--stop-after", type=option_types.hours_as_minutes, metavar="HOURS",
        default=DEFAULT_TIME_LIMIT_MINUTES, help="stop a run still going after HOURS, e.g. "
        "6 or 6.5 (default 72, Task Scheduler's own)")
    add("--register", action="store_true", help="run schtasks (and setx for --region and "
        "--upload-limit) now (Windows, administrator)")
    add("--dry-run", action="store_true", help="print the files and the commands; write, "
        "ask and run nothing")
    add("--drill", action="store_true", help="also the monthly restore drill's task "
        "(drill-aws-backups on the 1st and the 4th, with the restore user's keys as "
        "env:AAM_RESTORE_ACCESS_KEY_ID and env:AAM_RESTORE_SECRET_ACCESS_KEY)")
    return parser.parse_args(argv)


def settings_from(options):
    secrets = {field: "env:" + getattr(options, f"{field}_variable")
               for field in SECRET_ENV_DEFAULTS}
    if options.inline_secrets and not options.dry_run:
        number = aab.BACKUP_ARGS.number
        for field, what in (("key", "Archive encryption key"),
                            ("access_key_id", "AWS access key ID"),
                            ("secret_access_key", "AWS secret access key")):
            secrets[field] = ask_twice(f"{what} (argument {number(field)})",
                                       warn=lambda text: print(text, file=sys.stderr))
    elif options.inline_secrets:
        secrets = {field: "(asked for)" for field in SECRET_ENV_DEFAULTS}
    return ScheduleSettings(
        options.program_dir, options.python, options.log_dir, options.sender,
        options.recipient, options.instructions, options.mirror_dir, options.bucket,
        options.location, options.user, lock_poll=options.lock_poll,
        lock_wait=options.lock_wait, send_email=options.send_email == "True",
        sender_name=options.sender_name, drive_letter=options.drive_letter,
        destinations=options.destinations, keep=options.keep == "True", region=options.region,
        upload_limit=options.upload_limit, stop_after=options.stop_after, **secrets)


def main(argv=None):
    options = parse_command_line(sys.argv[1:] if argv is None else argv)
    if options.register and options.dry_run:
        print("error: --register and --dry-run exclude each other", file=sys.stderr)
        return 2
    try:
        settings = settings_from(options)
        files = files_to_write(settings, options.output or settings.program_dir,
                               dt.date.today(), options.drill)
    except (SettingsError, ValueError) as problem:
        print(f"error: {problem}; nothing was written", file=sys.stderr)
        return 2
    if options.dry_run:
        print("Dry run: nothing is written, asked or run.")
        for path, data in files:
            text = data.decode("utf-16" if path.endswith(".xml") else "utf-8")
            print(f"\n--- {path}\n{text.replace(chr(13), '')}", end="")
    else:
        write_files(settings, options.output or settings.program_dir, dt.date.today(),
                    options.drill)
        for path, _data in files:
            print(f"Wrote {path}")
    if settings.inline_secrets and not options.dry_run:
        print("These files hold your secrets: keep them private, and delete the XML file "
              "once the task is registered.")
    setx = setx_argvs(settings)
    commands = [schtasks_command(settings, files[0][0])] + [" ".join(argv) for argv in setx]
    if options.drill:
        commands.append(schtasks_command(settings, files[-1][0], DRILL_TASK_NAME))
    print("\nRegister the daily task from an administrator terminal "
          "(schtasks asks for your Windows password)"
          + (f" and make {' and '.join(user_environment(settings))} yours" if setx else "")
          + (", and the monthly restore drill's task" if options.drill else "")
          + ":\n\n" + "".join(f"    {command}\n" for command in commands))
    if options.drill:
        print("The drill runs with the restore user's keys: make "
              f"{' and '.join(DRILL_KEY_VARIABLES)} your user environment variables "
              "(docs/scheduling.md, A monthly restore drill).")
    if options.register:
        if os.name != "nt":
            print("error: --register needs Windows (schtasks)", file=sys.stderr)
            return 2
        if any(subprocess.run(argv).returncode for argv in setx):
            return 1
        code = subprocess.run(schtasks_argv(settings, files[0][0])).returncode
        if code or not options.drill:
            return code
        return subprocess.run(schtasks_argv(settings, files[-1][0], DRILL_TASK_NAME)).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
