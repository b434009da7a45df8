"""The health block that ends every backup's log and e-mail (docs/backup.md, The health
block), and the FAILURE report of an interrupted regular backup.

Through the real CLI against the local endpoint: the block's figures are compared with
what the bucket holds (the indicators' files and volumes, the objects of the month);
the last check and the last drill come from a health record written by hand here, as
check-aws-backups and drill-aws-backups write it; the LIST requests are counted by the
proxy.  The interrupted run is stopped by SIGTERM once the proxy has seen its second
piece go up, as a scheduler's stop time would stop it.
"""

import contextlib
import datetime as dt
import json
import os
import re
import signal
import sqlite3

import aam_auto_backup as aab
from conftest import KEY, SECRET, ok, snapshot, wait_for, write_file
from test_resume import assert_restores_exactly, env_through, piece_seen, \
    pieced_source, start_backup


def record_path(sandbox):
    return aab.HealthRecord(sandbox.state_dir, sandbox.bucket, sandbox.location).path


def write_record(sandbox, **sections):
    """A health record as check-aws-backups and drill-aws-backups write it."""
    os.makedirs(sandbox.state_dir, exist_ok=True)
    with open(record_path(sandbox), "w", encoding="utf-8") as handle:
        json.dump(sections, handle)


def days_ago(days):
    return aab.format_health_date(aab.utc_now() - dt.timedelta(days=days))


def health_block(text):
    """The health block: from its first line to the end of the e-mail, or in a log to
    the line naming the log file."""
    start = text.index("Health of the backups of ")
    return text[start:].split("\nLog file: ")[0]


def latest_log(sandbox):
    """The log of the last run: the one written last (two runs in one second have names
    that sort by their operation, not by their time)."""
    newest = max(sandbox.log_files(), key=lambda path: os.stat(path).st_mtime_ns)
    return open(newest, encoding="utf-8").read()


def month_objects(sandbox, month):
    return [o for o in sandbox.objects() if o["Key"].startswith(f"{sandbox.location}_{month}")]


def list_requests(proxy):
    return [r for r in proxy.requests() if r["kind"] == "LIST"]


def test_the_report_ends_with_the_health_block_of_the_run(sandbox, proxy):
    sandbox.sample(picture_size=300_000)
    check = {"date": days_ago(2), "result": "passed", "problems": 0, "sets": 3,
             "not_checked": []}
    drill = {"date": days_ago(10), "result": "passed", "backup": "20261101_010203.000000",
             "files": ["a/b.txt"], "problem": None}
    write_record(sandbox, check=check, drill=drill)
    ok(sandbox.run(sandbox.backup_args(), env=sandbox.env(
        AWS_ENDPOINT_URL=proxy.endpoint_url)))

    # the run listed the key checks and its month: no LIST of its own for the block
    assert len(list_requests(proxy)) == 2 <= 6
    log, email = latest_log(sandbox), sandbox.emails()[-1]
    assert email["subject"].startswith("SUCCESS, ")
    block = health_block(email["body"])
    assert block.split("\nFor more info")[0] in log       # the same block ends the log
    assert f"For more info, refer to the local log: {sandbox.log_files()[-1]}" \
        in email["body"]

    names = sandbox.object_names()
    indicators = [sandbox.indicator(n.key) for n in names if n.indicator]
    volumes = {o["Key"]: o["Size"] for o in sandbox.objects()
               if (aab.ObjectName.parse(o["Key"]) or aab.ObjectName).volume is not None}
    assert sum(len(m["volumes"]) for m in indicators) == len(volumes)
    stamp = aab.describe_stamp(names[0].full)
    files = sum(m["files"] for m in indicators)
    assert (f"This run: full backup {stamp} of 2 source(s) (" in block)
    assert (f"; completed 2 source(s): {files:,} file(s), "
            f"{aab.format_bytes(sum(volumes.values()))} ({sum(volumes.values()):,} bytes) in "
            f"{len(volumes)} volume(s) of {sum(len(m['pieces']) for m in indicators)} "
            "piece(s); uploaded ") in block
    assert f"Latest complete full backup: {stamp}, 0 day(s) old; 0 complete incremental(s)" \
        in block
    month = names[0].full.strftime("%Y%m")
    stored = month_objects(sandbox, month)
    total = sum(o["Size"] for o in stored)
    assert (f"Stored for {sandbox.location}: {aab.format_bytes(total)} ({total:,} bytes) in "
            f"{len(stored):,} object(s) of 1 month(s) ({month} to {month}; ") in block
    assert re.search(r"(about \$\d+\.\d\d|under \$0\.01) a month at Deep Archive "
                     r"prices", block)
    assert (f"Last check: {check['date']}, passed (3 set(s) checked, 0 problem(s))."
            in block)
    assert (f"Last drill: {drill['date']}, passed (backup {drill['backup']}, 1 file(s) "
            "tested).") in block
    assert "WARNING" not in block
    for text in (log, email["body"], email["subject"]):
        assert KEY not in text and SECRET not in text

    # the record keeps the month as listed and written, and the check and drill it had
    record = json.load(open(record_path(sandbox), encoding="utf-8"))
    assert record["check"] == check and record["drill"] == drill
    assert record["storage"][month]["bytes"] == total
    assert record["storage"][month]["objects"] == len(stored)
    assert oct(os.stat(record_path(sandbox)).st_mode & 0o777) == "0o600"

    # an incremental: counted, and the month refreshed with what it wrote
    write_file(os.path.join(sandbox.tree.first_mount, "new.txt"), b"new\n")
    proxy.reset_counters()
    ok(sandbox.run(sandbox.backup_args(), env=sandbox.env(
        AWS_ENDPOINT_URL=proxy.endpoint_url)))
    assert len(list_requests(proxy)) == 2
    block = health_block(sandbox.emails()[-1]["body"])
    assert f"Latest complete full backup: {stamp}, 0 day(s) old; 1 complete incremental(s)" \
        in block
    stored = month_objects(sandbox, month)
    assert f"({sum(o['Size'] for o in stored):,} bytes) in {len(stored):,} object(s)" in block


def test_the_warnings_appear_when_due_and_not_otherwise(sandbox, proxy):
    """No drill, a failed one or one passed too long ago: the drill warning; a full
    backup of an earlier month only: the full warning (an incremental-only backup,
    which lists up to six months, builds on last month's full)."""
    mount = sandbox.single_source({"doc.txt": b"one\n"})
    now = aab.utc_now()
    last_month = now.replace(day=1) - dt.timedelta(days=1)
    ok(sandbox.run(sandbox.backup_args(), env=sandbox.env(
        AAM_TEST_NOW=aab.format_arg_stamp(last_month.replace(hour=1)))))
    block = health_block(sandbox.emails()[-1]["body"])
    assert "Last check: never on this computer (check-aws-backups)." in block
    assert "Last drill: never on this computer (drill-aws-backups)." in block
    assert f"WARNING: no restore drill has passed in the last {aab.DRILL_DUE_DAYS} days" \
        in block

    write_file(os.path.join(mount, "doc.txt"), b"two\n")
    incremental_only = sandbox.backup_args(aab.INCREMENTAL_ONLY_BACKUP,
                                           {"auto_force_full": "no"})
    drills = [({"date": days_ago(100), "result": "passed"}, True),
              ({"date": days_ago(1), "result": "failed", "problem": "wrong size"}, True),
              ({"date": days_ago(1), "result": "passed"}, False)]
    for drill, warned in drills:
        write_record(sandbox, **dict(json.load(open(record_path(sandbox))), drill=drill))
        proxy.reset_counters()
        ok(sandbox.run(incremental_only, env=sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url)))
        assert 3 <= len(list_requests(proxy)) <= 6     # key checks and two months
        block = health_block(latest_log(sandbox))
        assert ("WARNING: no restore drill has passed" in block) is warned, block
        assert f"WARNING: no complete full backup of this month ({now:%Y-%m}, UTC)" in block
        assert "0 day(s) old" not in block
        assert f" of 1 month(s) ({last_month:%Y%m} to {last_month:%Y%m}; " in block
    assert "Last drill: " + drills[-1][0]["date"] + ", passed" in block
    assert "3 complete incremental(s) since" in block

    # a damaged record is read as empty, a damaged section passed over, never an error
    write_file(record_path(sandbox), b"{not json")
    ok(sandbox.run(incremental_only))
    assert "Last drill: never on this computer" in health_block(latest_log(sandbox))
    write_record(sandbox, drill="yesterday", check=[1], storage={"200001": {"bytes": "x"}})
    ok(sandbox.run(incremental_only))
    block = health_block(latest_log(sandbox))
    assert "Last drill: never on this computer" in block
    assert "Last check: never on this computer" in block
    assert f" of 1 month(s) ({last_month:%Y%m} to {last_month:%Y%m}; " in block


def pieces_done(sandbox):
    """The pieces the pending backup's journal records as done (read-only)."""
    path = aab.journal_path(sandbox.state_dir, sandbox.bucket, sandbox.location)
    if not os.path.exists(path):
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as journal:
            return journal.execute("SELECT count(*) FROM piece WHERE state = ?",
                                   (aab.PIECE_DONE,)).fetchone()[0]
    except sqlite3.Error:           # being created, or locked by a write: not yet
        return 0


def test_an_interrupted_backup_reports_failure_and_is_continued(sandbox, proxy, tmp_path):
    mount = pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    now = aab.utc_now()
    last_month = now.replace(day=1) - dt.timedelta(days=1)
    ok(sandbox.run(sandbox.backup_args(), env=dict(
        env, AAM_TEST_NOW=aab.format_arg_stamp(last_month.replace(hour=1)))))
    older_full = aab.describe_stamp(sandbox.object_names()[0].full)
    expected = snapshot(mount)

    # this month's full backup, stopped (SIGTERM) once its second piece goes up
    proxy.reset_counters()
    emails_before = len(sandbox.emails())
    process = start_backup(sandbox, env)
    # the journal has recorded a piece (its volumes all answered by S3), and the next
    # piece is going up
    wait_for(lambda: (pieces_done(sandbox) >= 1 and piece_seen(proxy, 2))
             or process.poll() is not None, 180)
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0]
    assert process.returncode == aab.EXIT_INTERRUPTED, out
    sandbox.wait_until_no_process_runs()
    emails = sandbox.emails()[emails_before:]
    assert len(emails) == 1, emails
    subject, body = emails[0]["subject"], emails[0]["body"]
    assert subject.startswith("FAILURE, ") and "full backup!" in subject
    assert "This run was interrupted (Ctrl-C, or SIGTERM: a scheduler's stop time" in body
    assert re.search(r"The full backup \d{8} \d{6}\.\d{6} UTC is not complete: the next run "
                     r"continues it \([1-9]\d* piece\(s\), ", body), body
    block = health_block(body)
    assert "This run: full backup " in block and "; completed no source; uploaded " in block
    assert f"Latest complete full backup: {older_full}, " in block
    assert f"WARNING: no complete full backup of this month ({now:%Y-%m}, UTC)" in block
    assert block.split("\nFor more info")[0] in latest_log(sandbox)
    assert KEY not in body and SECRET not in body

    # the next run continues it, and says all is well this month
    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert "continuing the full backup" in result.stdout
    block = health_block(sandbox.emails()[-1]["body"])
    assert sandbox.emails()[-1]["subject"].startswith("SUCCESS, ")
    assert "WARNING: no complete full backup" not in block
    assert_restores_exactly(sandbox, tmp_path, mount, expected)


def test_the_report_of_a_stopped_run_does_not_hold_up_its_stop(sandbox, proxy):
    """SES does not answer while the run is being stopped: the report gets one short
    attempt (a scheduler kills a run that does not end after its stop signal), the
    run ends with its code and the log says the report was not sent."""
    pieced_source(sandbox)
    process = start_backup(sandbox, env_through(sandbox, proxy))
    wait_for(lambda: piece_seen(proxy, 1) or process.poll() is not None, 180)
    proxy.stop_responding(services={"ses"})
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0]      # boto3's usual retries: 8 minutes
    assert process.returncode == aab.EXIT_INTERRUPTED, out
    assert proxy.counters()["stalled"] == 1               # one attempt, no retry
    log = latest_log(sandbox)
    assert "ERROR: The e-mail report could not be sent from " in log
    assert "Health of the backups of " in log
    sandbox.wait_until_no_process_runs()
