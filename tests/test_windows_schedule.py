"""tools/windows_schedule.py: the Task Scheduler job and the two desktop batch files.

The expected text is the original design's scheduled task and batch files,
written out by hand with its own example values.
"""

import datetime as dt
import os
import re
import xml.etree.ElementTree as ElementTree

import pytest

import aam_auto_backup as aab
import windows_schedule as ws

PROGRAM_DIR = "C:\\Users\\Allen\\Documents\\AAM Auto Backup"
PYTHON = "C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python39\\python.exe"


def example_settings(**changes):
    values = dict(
        program_dir=PROGRAM_DIR, python=PYTHON, log_dir=PROGRAM_DIR + "\\logs",
        sender="autoreporter@allenyoung.dev", recipient="allenyoung@allenyoung.dev",
        instruction_file=PROGRAM_DIR + "\\instructions\\main_computer_backup_instructions.txt",
        mirror_dir="F:\\backup\\main", bucket="aam-data-backup", location="main-work-computer",
        user="ALLEN-PC\\Allen")
    values.update(changes)
    return ws.ScheduleSettings(**values)


# The original design's Task Scheduler "Add arguments", its placeholders filled in and
# env:NAME references for the three secrets.
TASK_ARGUMENTS = (
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\aam_auto_backup.py" regular-backup user '
    '"C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python39\\python.exe" 600 7200 '
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\logs" True "AAM Backup Report" '
    '"autoreporter@allenyoung.dev" "allenyoung@allenyoung.dev" '
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\instructions\\'
    'main_computer_backup_instructions.txt" "q" "local|AWS" "F:\\backup\\main" False '
    '"env:AAM_BACKUP_ENCRYPTION_KEY" "aam-data-backup" "main-work-computer" '
    '"env:AAM_BACKUP_ACCESS_KEY_ID" "env:AAM_BACKUP_SECRET_ACCESS_KEY" "no" "yes"')

EXPECTED_TASK_XML = """<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>AAM Auto Backup: daily regular backup (force full no, auto yes).</Description>
  </RegistrationInfo>
  <Triggers>
    <CalendarTrigger>
      <StartBoundary>2021-03-29T00:30:00</StartBoundary>
      <Enabled>true</Enabled>
      <ScheduleByDay>
        <DaysInterval>1</DaysInterval>
      </ScheduleByDay>
    </CalendarTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>ALLEN-PC\\Allen</UserId>
      <LogonType>Password</LogonType>
      <RunLevel>HighestAvailable</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <AllowHardTerminate>true</AllowHardTerminate>
    <StartWhenAvailable>false</StartWhenAvailable>
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
    <ExecutionTimeLimit>PT72H</ExecutionTimeLimit>
    <Priority>7</Priority>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>"C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python39\\python.exe"</Command>
      <Arguments>""" + TASK_ARGUMENTS + """</Arguments>
      <WorkingDirectory>C:\\Users\\Allen\\Documents\\AAM Auto Backup</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
"""


def test_task_xml_is_the_original_task():
    assert ws.task_xml(example_settings(), dt.date(2021, 3, 29)) == EXPECTED_TASK_XML


def test_task_xml_is_well_formed_and_says_what_the_design_asks():
    xml = ws.task_xml(example_settings(), dt.date(2021, 3, 29))
    task = ElementTree.fromstring(xml.split("\n", 1)[1])
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    assert task.find("t:Triggers/t:CalendarTrigger/t:StartBoundary", ns).text.endswith(
        "T00:30:00")
    assert task.find("t:Principals/t:Principal/t:LogonType", ns).text == "Password"
    assert task.find("t:Principals/t:Principal/t:RunLevel", ns).text == "HighestAvailable"
    assert task.find("t:Actions/t:Exec/t:Arguments", ns).text.endswith(' "no" "yes"')


def test_schtasks_command_registers_from_xml_and_asks_for_the_password():
    assert ws.schtasks_command(example_settings(), PROGRAM_DIR + "\\Daily AAM Auto Backup.xml") == (
        'schtasks /Create /TN "Daily AAM Auto Backup" /XML '
        '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\Daily AAM Auto Backup.xml" '
        '/RU "ALLEN-PC\\Allen" /RP * /F')


# The original design's batch file: two lines, cd /D to the program directory, then the
# program through the .py file association (its AAM_auto_backup.py is aam_auto_backup.py).
ARGUMENTS_2_TO_22 = TASK_ARGUMENTS.split(" regular-backup ", 1)[1]


def test_regular_backup_batch_file():
    assert ws.batch_file_text(example_settings(), "regular-backup") == (
        'cd /D "C:\\Users\\Allen\\Documents\\AAM Auto Backup"\r\n'
        "aam_auto_backup.py regular-backup " + ARGUMENTS_2_TO_22 + "\r\n")


def test_incremental_only_backup_batch_file():
    assert ws.batch_file_text(example_settings(), "incremental-only-backup") == (
        'cd /D "C:\\Users\\Allen\\Documents\\AAM Auto Backup"\r\n'
        "aam_auto_backup.py incremental-only-backup " + ARGUMENTS_2_TO_22 + "\r\n")


def test_inline_secrets_are_not_echoed_and_percent_survives_cmd():
    text = ws.batch_file_text(example_settings(key="100%secret", access_key_id="AKIA",
                                            secret_access_key="s^&|<>"), "regular-backup")
    second = text.split("\r\n")[1]
    assert second.startswith("@aam_auto_backup.py regular-backup ")
    assert '"100%%secret" "aam-data-backup" "main-work-computer" "AKIA" "s^&|<>"' in second


def test_a_secret_with_a_double_quote_must_be_an_env_reference():
    with pytest.raises(ws.SettingsError, match="argument 16 .* env:NAME"):
        ws.batch_file_text(example_settings(key='say "hi"'), "regular-backup")


def test_non_ascii_paths_switch_the_batch_file_to_utf8():
    text = ws.batch_file_text(example_settings(mirror_dir="F:\\Sicherung\\J\u00fcrgen"),
                              "regular-backup")
    assert text.startswith("@chcp 65001 >nul\r\ncd /D ")


def test_files_are_written_where_the_design_puts_them(tmp_path):
    paths = ws.write_files(example_settings(), str(tmp_path), dt.date(2021, 3, 29))
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        "Daily AAM Auto Backup.xml",
        os.path.join("backup batch files", "Regular backup.bat"),
        os.path.join("backup batch files", "Incremental-only backup.bat")]
    with open(paths[0], "rb") as handle:
        data = handle.read()
    assert data.startswith(b"\xff\xfe")                 # UTF-16 with its byte-order mark
    assert data.decode("utf-16") == EXPECTED_TASK_XML.replace("\n", "\r\n")


def test_the_command_line_writes_env_references_by_default(tmp_path, capsys):
    code = ws.main([
        "--program-dir", PROGRAM_DIR, "--python", PYTHON, "--log-dir", "C:\\logs",
        "--sender", "a@example.com", "--recipient", "b@example.com",
        "--instructions", "C:\\i.txt", "--mirror-dir", "F:\\m", "--bucket", "aam-data-backup",
        "--location", "pc", "--user", "PC\\me", "--output", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "backup batch files" / "Regular backup.bat", encoding="utf-8") as f:
        bat = f.read()
    assert '"env:AAM_BACKUP_ENCRYPTION_KEY"' in bat and "@aam" not in bat
    assert 'schtasks /Create /TN "Daily AAM Auto Backup" /XML' in capsys.readouterr().out


COMMAND_LINE = ["--program-dir", PROGRAM_DIR, "--python", PYTHON, "--log-dir", "C:\\logs",
                "--sender", "a@example.com", "--recipient", "b@example.com",
                "--instructions", "C:\\i.txt", "--mirror-dir", "F:\\m",
                "--bucket", "aam-data-backup", "--location", "pc", "--user", "PC\\me"]


def test_dry_run_prints_the_files_and_commands_and_writes_nothing(tmp_path, capsys):
    output = tmp_path / "out"
    code = ws.main(COMMAND_LINE + ["--output", str(output), "--region", "eu-west-1",
                                   "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Dry run: nothing is written, asked or run.")
    assert "<Arguments>" in printed and 'set "AWS_REGION=eu-west-1"' in printed
    assert 'schtasks /Create /TN "Daily AAM Auto Backup"' in printed
    assert "    setx AWS_REGION eu-west-1\n" in printed
    assert not output.exists()


def test_the_region_is_set_in_the_batch_files(tmp_path):
    settings = example_settings(region="eu-west-1")
    text = ws.batch_file_text(settings, "regular-backup")
    lines = text.split("\r\n")
    assert lines[1] == 'set "AWS_REGION=eu-west-1"'
    assert lines[2].startswith("aam_auto_backup.py regular-backup user ")
    assert ws.task_xml(settings, dt.date(2021, 3, 29)) == EXPECTED_TASK_XML


def test_inline_secrets_are_typed_twice(tmp_path, monkeypatch, capsys):
    typed = iter(["key of twenty characters", "key of twenty characterz",   # a typo
                  "key of twenty characters", "key of twenty characters",
                  "AKIDEXAMPLE", "AKIDEXAMPLE", "secret", "secret"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(typed))
    assert ws.main(COMMAND_LINE + ["--output", str(tmp_path), "--inline-secrets"]) == 0
    bat = (tmp_path / "backup batch files" / "Regular backup.bat").read_text()
    assert '"key of twenty characters"' in bat and "characterz" not in bat
    assert "The two differ; once more." in capsys.readouterr().err
    never = iter(["a", "b"] * 3)
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(never))
    assert ws.main(COMMAND_LINE + ["--output", str(tmp_path / "x"), "--inline-secrets"]) == 2
    assert not (tmp_path / "x").exists()


def test_the_docstring_offers_only_options_the_tool_takes(capsys):
    with pytest.raises(SystemExit):
        ws.parse_command_line(["--help"])
    taken = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out))
    documented = set(re.findall(r"(--[a-z][a-z-]+)", ws.__doc__))
    assert documented and documented <= taken, documented - taken


def test_stop_after_sets_the_tasks_time_limit():
    xml = ws.task_xml(example_settings(stop_after=390), dt.date(2021, 3, 29))
    assert xml == EXPECTED_TASK_XML.replace(
        "<ExecutionTimeLimit>PT72H</ExecutionTimeLimit>",
        "<ExecutionTimeLimit>PT6H30M</ExecutionTimeLimit>")
    hours = ws.task_xml(example_settings(stop_after=360), dt.date(2021, 3, 29))
    assert "<ExecutionTimeLimit>PT6H</ExecutionTimeLimit>" in hours
    minutes = ws.task_xml(example_settings(stop_after=45), dt.date(2021, 3, 29))
    assert "<ExecutionTimeLimit>PT45M</ExecutionTimeLimit>" in minutes


def test_the_upload_limit_is_set_in_the_batch_files_and_as_the_users(tmp_path, capsys):
    code = ws.main(COMMAND_LINE + ["--output", str(tmp_path), "--region", "eu-west-1",
                                   "--stop-after", "7", "--upload-limit", "20 Mbit/s"])
    assert code == 0
    with open(tmp_path / "Daily AAM Auto Backup.xml", "rb") as handle:
        assert "<ExecutionTimeLimit>PT7H</ExecutionTimeLimit>" in handle.read().decode("utf-16")
    lines = (tmp_path / "backup batch files" / "Regular backup.bat").read_text().splitlines()
    assert lines[1:3] == ['set "AWS_REGION=eu-west-1"', 'set "AAM_UPLOAD_LIMIT=2500000"']
    printed = capsys.readouterr().out
    assert "make AWS_REGION and AAM_UPLOAD_LIMIT yours" in printed
    assert "    setx AWS_REGION eu-west-1\n    setx AAM_UPLOAD_LIMIT 2500000\n" in printed


@pytest.mark.parametrize("option, value", [("--stop-after", "0"), ("--upload-limit", "20")])
def test_the_command_line_refuses_a_wrong_stop_time_or_limit(tmp_path, option, value):
    with pytest.raises(SystemExit) as stopped:
        ws.main(COMMAND_LINE + ["--output", str(tmp_path), option, value])
    assert stopped.value.code == 2
    assert not os.listdir(tmp_path)


def test_the_drill_task_runs_the_drill_on_the_1st_and_the_4th_with_the_restore_keys():
    settings = example_settings()
    xml = ws.drill_task_xml(settings, dt.date(2021, 3, 29))
    task = ElementTree.fromstring(xml.split("\n", 1)[1])
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    trigger = task.find("t:Triggers/t:CalendarTrigger", ns)
    assert trigger.find("t:StartBoundary", ns).text == "2021-03-29T03:00:00"
    days = [d.text for d in trigger.findall("t:ScheduleByMonth/t:DaysOfMonth/t:Day", ns)]
    assert days == ["1", "4"]
    assert len(trigger.find("t:ScheduleByMonth/t:Months", ns)) == 12
    assert task.find("t:Settings/t:StartWhenAvailable", ns).text == "true"   # missed: later
    assert task.find("t:Principals/t:Principal/t:LogonType", ns).text == "Password"
    arguments = task.find("t:Actions/t:Exec/t:Arguments", ns).text
    words = re.findall(r'"([^"]*)"|(\S+)', arguments)
    argv = [quoted or bare for quoted, bare in words][1:]   # after the program's path
    parsed = aab.DRILL_ARGS.parse(
        [w.replace("env:", "") if w.startswith("env:") else w for w in argv],
        aab.DRILL_OPERATION)
    assert (parsed.bucket, parsed.location, parsed.days) == ("aam-data-backup",
                                                            "main-work-computer", 3)
    assert argv[1:] == ["env:AAM_BACKUP_ENCRYPTION_KEY", "aam-data-backup",
                        "main-work-computer", "env:AAM_RESTORE_ACCESS_KEY_ID",
                        "env:AAM_RESTORE_SECRET_ACCESS_KEY"]
    # the daily task is the original one still
    assert ws.task_xml(settings, dt.date(2021, 3, 29)) == EXPECTED_TASK_XML


def test_dry_run_with_the_drill_prints_its_task_and_command(tmp_path, capsys):
    output = tmp_path / "out"
    assert ws.main(COMMAND_LINE + ["--output", str(output), "--dry-run", "--drill"]) == 0
    printed = capsys.readouterr().out
    assert "Monthly AAM Auto Backup restore drill.xml" in printed
    assert "<Day>1</Day><Day>4</Day>" in printed and " drill-aws-backups " in printed
    assert 'schtasks /Create /TN "Monthly AAM Auto Backup restore drill" /XML' in printed
    assert "AAM_RESTORE_ACCESS_KEY_ID and AAM_RESTORE_SECRET_ACCESS_KEY" in printed
    assert not output.exists()
    assert ws.main(COMMAND_LINE + ["--output", str(output), "--drill"]) == 0
    written = (output / "Monthly AAM Auto Backup restore drill.xml").read_bytes()
    assert written.startswith(b"\xff\xfe") and "drill-aws-backups" in written.decode("utf-16")
