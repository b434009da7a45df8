"""Restoration end to end: the CLI as a subprocess, moto over HTTP, real 7-Zip.

Months are simulated only through object-name time stamps; Deep Archive thaws
through moto's state manager (objects stay "in progress" for a number of
look-ups).  Each test checks what a user cares about: the restored bytes.
"""

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from conftest import (ACCESS_KEY_ID, KEY, PROGRAM, SECRET, SENDER, file_times_pass,
                      numbered_directories, ok, read_until, write_file)

import aam_auto_backup as aam

ONE_STEP = aam.ONE_STEP_RESTORE
THAW, CHECK, DOWNLOAD, DECOMPRESS = MULTI_STEP = [
    aam.THAW_STEP, aam.STATUS_STEP, aam.DOWNLOAD_STEP, aam.EXTRACT_STEP]
EXIT_NOT_READY = aam.EXIT_NOT_READY


# ----------------------------------------------------------------- helpers

@pytest.fixture
def slow_thaw(aws):
    """Deep Archive thaws that stay in progress for `checks` look-ups."""
    def set_checks(checks):
        aws.set_restore_progression(checks)
    try:
        yield set_checks
    finally:
        aws.set_restore_immediate()


def make_history(sandbox, env=None, **sample):
    """Full + two incrementals over two sources; returns what a restore must give.

    {mount: {relative path: bytes or None}} as of the last backup: the file
    deleted after the full backup is not there.
    """
    tree = sandbox.sample(**sample)
    first, second = tree.first_mount, tree.second_mount
    docs = os.path.join(first, "Documents")
    os.symlink("report.txt", os.path.join(docs, "link-inside"))
    os.symlink("/etc/hostname", os.path.join(docs, "link-absolute"))
    expected = {mount: dict(files) for mount, files in tree.expected.items()}
    expected[first]["Documents/link-inside"] = expected[first]["Documents/report.txt"]
    expected[first]["Documents/link-absolute"] = open("/etc/hostname", "rb").read()
    ok(sandbox.backup(env=env))                                     # the full backup

    file_times_pass()
    write_file(os.path.join(docs, "report.txt"), b"rewritten report\n")      # changed
    write_file(os.path.join(docs, "added in incr 1.txt"), b"new one\n")      # added
    os.remove(os.path.join(docs, "notes with space.md"))               # deleted
    del expected[first]["Documents/notes with space.md"]
    expected[first]["Documents/report.txt"] = b"rewritten report\n"
    expected[first]["Documents/link-inside"] = b"rewritten report\n"
    expected[first]["Documents/added in incr 1.txt"] = b"new one\n"
    ok(sandbox.backup(env=env))                                     # incremental 1

    file_times_pass()
    write_file(os.path.join(second, "docs", "readme.md"), b"second source, edited\n")
    write_file(os.path.join(second, "docs", "new", "added in incr 2.md"), b"two\n")
    write_file(os.path.join(docs, "report.txt"), b"rewritten twice\n")
    expected[second]["docs/readme.md"] = b"second source, edited\n"
    expected[second]["docs/new/added in incr 2.md"] = b"two\n"
    expected[first]["Documents/report.txt"] = b"rewritten twice\n"
    expected[first]["Documents/link-inside"] = b"rewritten twice\n"
    ok(sandbox.backup(env=env))                                     # incremental 2
    return tree, expected


def indicator_keys(sandbox):
    return sorted(name.key for name in sandbox.object_names() if name.indicator)


def volume_keys(sandbox):
    return sorted(name.key for name in sandbox.object_names() if name.volume)


def restore_log(sandbox):
    (log,) = [p for p in sandbox.log_files() if p.endswith(f"_{ONE_STEP}.log")]
    return open(log, encoding="utf-8").read()


def restoration_emails(sandbox):
    return [m for m in sandbox.emails() if "data restoration" in m["subject"]]


def counters_during(proxy, run):
    proxy.reset_counters()
    result = run()
    return result, proxy.counters()["by_kind"]


def via_proxy(sandbox, proxy):
    sandbox.endpoint_url = proxy.endpoint_url


# ----------------------------------------------------------------- one-step

def test_one_step_restores_full_and_incrementals_into_numbered_directories(
        sandbox, tmp_path, slow_thaw):
    tree, expected = make_history(sandbox)
    destination = tmp_path / "restored"
    # A wrapper records 7-Zip's command lines: the key must never be on one.
    argv_log = tmp_path / "7zz-argv.txt"
    wrapper = tmp_path / "7zz-wrapper"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {argv_log}\nexec 7zz "$@"\n')
    wrapper.chmod(0o755)
    slow_thaw(2)

    result = ok(sandbox.restore(ONE_STEP, destination,
                                env=sandbox.restore_env(AAM_7ZIP=str(wrapper))))

    assert numbered_directories(destination, tree) == expected
    first = os.path.join(destination, "1")
    deleted = os.path.join("Documents", "notes with space.md")   # deleted after the full
    assert not os.path.lexists(os.path.join(first, deleted))
    assert os.readlink(os.path.join(first, "Documents", "link-inside")) == "report.txt"
    assert os.readlink(os.path.join(first, "Documents", "link-absolute")) == "/etc/hostname"
    source = os.path.join(tree.first_mount, "Documents", "report.txt")
    restored = os.path.join(first, "Documents", "report.txt")
    assert abs(os.stat(source).st_mtime_ns - os.stat(restored).st_mtime_ns) < 1000
    assert sorted(os.listdir(destination)) == [
        ".aam-restore-state.json", ".aam-restore.lock", "1", "2", "restore-map.txt"]

    out = result.stdout
    # the chosen objects, then the plan, before any thaw
    for key in volume_keys(sandbox) + indicator_keys(sandbox):
        assert key in out
    assert "2 complete incremental backup(s)" in out
    assert re.search(r"Restore plan: \d+ volume\(s\), [\d,]+ bytes .* Bulk tier: expected "
                     r"wait within 48 hours", out)
    assert re.search(r"Bulk +less than \$0\.01 +\(\$0\.0025/GB \+ \$0\.025 per 1,000", out)
    assert re.search(r"Standard +less than \$0\.01 +\(\$0\.02/GB \+ \$0\.100 per 1,000", out)
    assert out.index("Restore plan") < out.index("thaw request(s) made")
    assert "in progress" in out and "Next check in 1 s" in out
    assert "Removed the downloaded archives" in out

    log_text = restore_log(sandbox)
    assert "Thaw requested (Bulk, 2 days)" in log_text
    assert all(key in log_text for key in volume_keys(sandbox))
    (message,) = restoration_emails(sandbox)
    assert re.fullmatch(r"SUCCESS, \d{8} \d\d:\d\d:\d\d\.\d{6} \S+ data restoration!",
                        message["subject"])
    body = message["body"].splitlines()
    assert body[0] == f"Unique Backup-Set Prefix: {sandbox.location}"
    (log_path,) = [p for p in sandbox.log_files() if p.endswith(f"_{ONE_STEP}.log")]
    assert body[-1] == f"For more info, refer to the local log: {log_path}"
    assert len(body) == 4 and body[2].count("UTC") == 2

    for secret in (KEY, SECRET, ACCESS_KEY_ID):
        assert secret not in result.stdout + result.stderr + log_text
        assert secret not in message["subject"] + message["body"]
        assert secret not in argv_log.read_text()
    assert "-snld20" in argv_log.read_text() and " -p" not in argv_log.read_text()


def test_status_is_checked_before_the_first_sleep(sandbox, tmp_path):
    tree, expected = make_history(sandbox)
    # immediate thaws and the default 30-minute poll: no sleep may happen
    env = sandbox.env()
    result = sandbox.run(sandbox.restore_args(ONE_STEP, tmp_path / "r"), env=env, timeout=120)
    ok(result)
    assert "Next check" not in result.stdout
    assert numbered_directories(tmp_path / "r", tree) == expected


def test_re_running_a_finished_one_step_changes_nothing(sandbox, tmp_path, proxy):
    tree, expected = make_history(sandbox)
    destination = tmp_path / "r"
    ok(sandbox.restore(ONE_STEP, destination, {"send_email": "False"}))
    via_proxy(sandbox, proxy)
    result, kinds = counters_during(
        proxy, lambda: sandbox.restore(ONE_STEP, destination, {"send_email": "False"}))
    ok(result)
    assert "already holds the complete restoration" in result.stdout
    assert kinds == {}                                    # not one S3 request
    assert numbered_directories(destination, tree) == expected


def test_standard_tier_override_is_used_and_planned(sandbox, tmp_path):
    make_history(sandbox)
    result = ok(sandbox.restore(ONE_STEP, tmp_path / "r",
                                env=sandbox.restore_env(AAM_RESTORE_TIER="standard")))
    assert "Standard tier: expected wait within 12 hours" in result.stdout
    assert "<- this restore" in [l for l in result.stdout.splitlines() if "Standard " in l
                                 and "$0.02/GB" in l][0]
    assert "Thaw requested (Standard, 2 days)" in restore_log(sandbox)


# ----------------------------------------------------------------- multi-step

def test_the_four_steps_give_what_one_step_gives_and_reruns_are_harmless(
        sandbox, tmp_path, slow_thaw):
    tree, expected = make_history(sandbox)
    one, multi = tmp_path / "one-step", tmp_path / "multi-step"
    logs_before = sandbox.log_files()
    slow_thaw(3)

    first = ok(sandbox.restore(THAW, multi))
    assert "Restore plan" in first.stdout
    again = ok(sandbox.restore(THAW, multi))              # harmless: nothing re-requested
    assert "0 thaw request(s) made" in again.stdout
    early = sandbox.restore(DECOMPRESS, multi)            # too early: says so, extracts nothing
    assert early.returncode == EXIT_NOT_READY, early.stdout + early.stderr
    assert "not downloaded yet" in early.stdout
    assert not os.path.exists(multi / "1") and not os.path.exists(multi / "1.incomplete")

    checks = [sandbox.restore(CHECK, multi) for _ in range(4)]
    codes = [c.returncode for c in checks]
    assert codes[0] == EXIT_NOT_READY and codes[-1] == 0, [c.stdout for c in checks]
    assert "still in progress" in checks[0].stdout
    ok(sandbox.restore(DOWNLOAD, multi))
    ok(sandbox.restore(DOWNLOAD, multi))                 # harmless: nothing to fetch
    ok(sandbox.restore(DECOMPRESS, multi))

    assert numbered_directories(multi, tree) == expected
    ok(sandbox.restore(ONE_STEP, one, {"send_email": "False"}))
    assert numbered_directories(multi, tree) == numbered_directories(one, tree)
    one_map = open(one / "restore-map.txt", encoding="utf-8").read()
    multi_map = open(multi / "restore-map.txt", encoding="utf-8").read()
    strip = lambda text: re.sub(r"finished [^)]*", "", text)  # noqa: E731
    assert strip(one_map) == strip(multi_map)
    assert os.path.isdir(multi / "downloads")              # multi-step keeps the archives

    for operation in MULTI_STEP:                           # each re-run is harmless
        ok(sandbox.restore(operation, multi))
    assert numbered_directories(multi, tree) == expected
    assert len(sandbox.log_files()) == len(logs_before) + 1   # one-step's only
    assert restoration_emails(sandbox) == []               # and no e-mail


def test_an_interrupted_download_resumes_where_it_stopped(sandbox, tmp_path, proxy):
    env = sandbox.restore_env(AAM_VOLUME_SIZE="65536")
    tree, _expected = make_history(sandbox, env, picture_size=300_000)
    destination = tmp_path / "r"
    ok(sandbox.restore(THAW, destination, env=env))
    ok(sandbox.restore(DOWNLOAD, destination, env=env))
    volume = max((os.path.join(d, n) for d, _s, names in os.walk(destination / "downloads")
                  for n in names), key=os.path.getsize)
    size = os.path.getsize(volume)
    with open(volume, "rb") as handle:
        head = handle.read(size // 2)
    os.remove(volume)
    write_file(volume + ".part", head)                        # as a killed download leaves it

    via_proxy(sandbox, proxy)
    result, kinds = counters_during(proxy, lambda: sandbox.restore(DOWNLOAD, destination))
    ok(result)
    assert kinds.get("GetObject") == 1
    assert proxy.counters()["bytes_sent"] < size          # only the missing half came
    assert os.path.getsize(volume) == size and not os.path.exists(volume + ".part")
    ok(sandbox.restore(DECOMPRESS, destination))


# ----------------------------------------------------------------- kills

def start_restore(sandbox, destination, env, email=False):
    return subprocess.Popen([sys.executable, PROGRAM] + sandbox.restore_args(
        ONE_STEP, destination, {"send_email": str(email)}), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def waiting_restore(sandbox, destination, slow_thaw, checks, email=False):
    """A one-step restore that has requested its thaws and sleeps till the next check."""
    slow_thaw(checks)
    process = start_restore(sandbox, destination, sandbox.restore_env(), email)
    read_until(process, r"Next check in 1 s")
    return process


def test_sigkill_while_waiting_then_rerun_requests_no_second_thaw(
        sandbox, tmp_path, slow_thaw, proxy):
    tree, expected = make_history(sandbox)
    via_proxy(sandbox, proxy)
    destination = tmp_path / "r"
    process = waiting_restore(sandbox, destination, slow_thaw, 6)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert proxy.counters()["by_kind"]["RestoreObject"] == len(volume_keys(sandbox))

    result, kinds = counters_during(proxy, lambda: sandbox.restore(ONE_STEP, destination,
                                                                   {"send_email": "False"}))
    ok(result)
    assert "RestoreObject" not in kinds
    assert "Continuing the restoration started" in result.stdout
    assert numbered_directories(destination, tree) == expected


def test_sigterm_while_waiting_reports_failure_and_a_rerun_finishes(
        sandbox, tmp_path, slow_thaw):
    tree, expected = make_history(sandbox)
    destination = tmp_path / "r"
    process = waiting_restore(sandbox, destination, slow_thaw, 6, email=True)
    process.send_signal(signal.SIGTERM)             # a scheduler or shutdown stopping it
    rest = process.communicate(timeout=60)[0]
    assert process.returncode == 130, rest
    assert "run the same command again to continue" in rest
    (message,) = restoration_emails(sandbox)
    assert message["subject"].startswith("FAILURE, ")
    ok(sandbox.restore(ONE_STEP, destination))
    assert numbered_directories(destination, tree) == expected


def test_s3_failing_during_the_wait_is_retried_at_the_next_check(
        sandbox, tmp_path, slow_thaw, proxy):
    tree, expected = make_history(sandbox)
    via_proxy(sandbox, proxy)
    destination = tmp_path / "r"
    process = waiting_restore(sandbox, destination, slow_thaw, 4)
    proxy.fail_after(0, status=503, services="s3")
    read_until(process, r"trying again at the next check")
    proxy.clear_faults()
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 0, rest
    assert numbered_directories(destination, tree) == expected


def test_sigkill_during_download_then_rerun_fetches_only_what_is_missing(
        sandbox, tmp_path, proxy):
    env = sandbox.restore_env(AAM_VOLUME_SIZE="65536")
    tree, expected = make_history(sandbox, env, picture_size=300_000)
    via_proxy(sandbox, proxy)
    destination = tmp_path / "r"
    env = sandbox.restore_env(AAM_VOLUME_SIZE="65536")
    volumes = len(volume_keys(sandbox))
    assert volumes >= 6
    process = start_restore(sandbox, destination, env)
    read_until(process, r"^Downloading .*\.zip\.00[1-9]")
    read_until(process, r"^Downloading ")
    proxy.stop_responding(services="s3")        # the next download hangs...
    assert proxy.wait_for(lambda counters: counters["stalled"] >= 1, timeout=60)
    process.send_signal(signal.SIGKILL)         # ...and the power goes
    process.wait()
    proxy.clear_faults()
    kept = downloaded_volumes(destination)
    assert 0 < len(kept) < volumes

    result, kinds = counters_during(proxy, lambda: sandbox.restore(
        ONE_STEP, destination, {"send_email": "False"}, env=env))
    ok(result)
    assert "RestoreObject" not in kinds
    assert kinds["GetObject"] <= volumes - len(kept)      # verified volumes: not again
    assert "LIST" not in kinds                            # the pinned set needs no listing
    assert numbered_directories(destination, tree) == expected


def downloaded_volumes(destination):
    """{path: inode} of the verified volumes in the destination's downloads."""
    return {os.path.join(d, n): os.stat(os.path.join(d, n)).st_ino
            for d, _s, names in os.walk(destination / "downloads") for n in names
            if re.fullmatch(r"backup\.zip\.\d{3}", n)}


def test_kept_volumes_are_not_fetched_again(sandbox, tmp_path, proxy):
    """The inodes of volumes verified before an interruption stay the same."""
    tree, expected = make_history(sandbox)
    destination = tmp_path / "r"
    ok(sandbox.restore(THAW, destination))
    ok(sandbox.restore(DOWNLOAD, destination))
    before = {os.path.join(d, n): os.stat(os.path.join(d, n)).st_ino
              for d, _s, names in os.walk(destination / "downloads") for n in names}
    via_proxy(sandbox, proxy)
    result, kinds = counters_during(proxy, lambda: sandbox.restore(ONE_STEP, destination,
                                                                   {"send_email": "False"}))
    ok(result)
    assert "GetObject" not in kinds and "RestoreObject" not in kinds
    assert numbered_directories(destination, tree) == expected
    assert before and not os.path.exists(destination / "downloads")


# ----------------------------------------------------------------- failures

def assert_nothing_extracted(destination):
    names = os.listdir(destination) if os.path.isdir(destination) else []
    assert not [n for n in names if re.fullmatch(r"\d+(\.incomplete)?", n)], names


def test_a_wrong_key_is_refused_by_the_key_check_and_the_catalogue_before_any_thaw(
        sandbox, tmp_path, proxy):
    tree, expected = make_history(sandbox)
    destination = tmp_path / "r"
    via_proxy(sandbox, proxy)
    proxy.reset_counters()
    wrong = sandbox.restore(ONE_STEP, destination, {"key": "Incorrect horse battery staple"})
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    (check,) = sandbox.keychecks()
    assert ("The decryption key (argument 8) is wrong: it is not the key the backups of the "
            f"full backup {aam.describe_stamp(check.full)} were made with (their key check "
            f"{check.key}, and their catalogue does not open with it). Nothing was thawed."
            ) in wrong.stdout
    # the indicators and one catalogue were read: no volume, no thaw
    kinds = proxy.counters()["by_kind"]
    assert "RestoreObject" not in kinds and "HeadObject" not in kinds
    catalogues = sorted(name.key for name in sandbox.object_names() if name.catalogue)
    read = [r["key"] for r in proxy.requests() if r["kind"] == "GetObject"]
    assert sorted(set(read) - set(indicator_keys(sandbox))) == catalogues[:1]
    assert_nothing_extracted(destination)
    assert not downloaded_volumes(destination)
    (message,) = restoration_emails(sandbox)
    assert message["subject"].startswith("FAILURE, ")

    proxy.reset_counters()
    ok(sandbox.restore(ONE_STEP, destination))
    fetched = [r["key"] for r in proxy.requests() if r["kind"] == "GetObject"]
    # each volume once; the catalogue the wrong key could not open is not fetched again
    assert sorted(fetched) == sorted(volume_keys(sandbox) + catalogues[1:])
    assert numbered_directories(destination, tree) == expected


def test_a_wrong_key_on_a_set_without_key_check_is_caught_by_the_catalogue(sandbox, tmp_path):
    """A chain made by version 1.1.0 has no key check: its catalogue tries the key."""
    make_history(sandbox)
    for check in sandbox.keychecks():
        sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=check.key)
    destination = tmp_path / "r"
    wrong = sandbox.restore(ONE_STEP, destination, {"key": "Incorrect horse battery staple"})
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "The decryption key (argument 8) is wrong: 7-Zip cannot open the catalogue" \
        in wrong.stdout
    assert not downloaded_volumes(destination)


def test_a_changed_byte_in_the_bucket_is_caught_before_extraction(sandbox, tmp_path):
    make_history(sandbox)
    key = volume_keys(sandbox)[0]
    path = sandbox.fetch_volume(key, str(tmp_path))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    sandbox.s3().put_object(Bucket=sandbox.bucket, Key=key, Body=bytes(data),
                            StorageClass="DEEP_ARCHIVE")
    destination = tmp_path / "r"
    result = sandbox.restore(ONE_STEP, destination)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"The volume {key} in the bucket does not match its completion indicator" \
        in result.stdout
    assert "Nothing was extracted" in result.stdout
    assert_nothing_extracted(destination)
    assert "not (completely) restored" in result.stdout


def test_a_damaged_catalogue_is_called_a_catalogue(sandbox, tmp_path):
    make_history(sandbox)
    key = sorted(name.key for name in sandbox.object_names() if name.catalogue)[-1]
    data = bytearray(sandbox.s3().get_object(Bucket=sandbox.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    sandbox.s3().put_object(Bucket=sandbox.bucket, Key=key, Body=bytes(data))
    result = sandbox.restore(ONE_STEP, tmp_path / "r")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"The catalogue {key} in the bucket does not match its completion indicator" \
        in result.stdout
    assert "The volume" not in result.stdout
    assert_nothing_extracted(tmp_path / "r")
    browse = sandbox.run(aam.BROWSE_ARGS.argv(
        operation=aam.BROWSE_OPERATION, key=KEY, bucket=sandbox.bucket,
        location=sandbox.location, access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCY", selection=["report.txt"]))
    assert browse.returncode == 1
    assert f"The catalogue {key} in the bucket does not match" in browse.stdout + browse.stderr


def test_a_downloaded_volume_damaged_on_disk_is_caught_before_extraction(sandbox, tmp_path):
    make_history(sandbox)
    destination = tmp_path / "r"
    ok(sandbox.restore(THAW, destination))
    ok(sandbox.restore(DOWNLOAD, destination))
    volume = sorted(downloaded_volumes(destination))[0]
    data = bytearray(open(volume, "rb").read())
    data[-30] ^= 0x80
    write_file(volume, bytes(data))
    result = sandbox.restore(DECOMPRESS, destination)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"do not match their SHA-256 in the completion indicator: {volume}" in result.stdout
    assert_nothing_extracted(destination)


def test_two_restores_into_one_directory_cannot_run_at_once(sandbox, tmp_path):
    import filelock
    make_history(sandbox)
    destination = tmp_path / "r"
    os.makedirs(destination)
    with filelock.FileLock(str(destination / ".aam-restore.lock")):
        result = sandbox.restore(THAW, destination)
    assert result.returncode == 1
    assert f"Another restoration is running into {destination}" in result.stdout


def test_a_missing_volume_stops_before_any_thaw(sandbox, tmp_path, proxy):
    env = sandbox.restore_env(AAM_VOLUME_SIZE="65536")
    make_history(sandbox, env, picture_size=300_000)
    key = [k for k in volume_keys(sandbox) if k.endswith(".zip.002")][0]
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=key)
    via_proxy(sandbox, proxy)
    env = sandbox.restore_env()
    destination = tmp_path / "r"
    result, kinds = counters_during(proxy, lambda: sandbox.restore(ONE_STEP, destination,
                                                                   env=env))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{key}: missing from the bucket" in result.stdout
    assert "The backup set is damaged; nothing was restored" in result.stdout
    assert kinds.get("LIST") and "RestoreObject" not in kinds
    assert_nothing_extracted(destination)
    assert not os.path.exists(destination / "restore-map.txt")


def test_an_incomplete_latest_set_falls_back_to_the_previous_complete_one(
        sandbox, tmp_path):
    tree = sandbox.sample()
    ok(sandbox.backup())
    older = indicator_keys(sandbox)
    write_file(os.path.join(tree.first_mount, "Documents", "report.txt"), b"newer\n")
    ok(sandbox.backup({"force_full": "yes"}))                       # a second full backup
    newer = [k for k in indicator_keys(sandbox) if k not in older]
    assert len(newer) == 2
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=newer[0])   # as if killed
    destination = tmp_path / "r"
    result = ok(sandbox.restore(ONE_STEP, destination))
    assert re.search(r"Skipped the full backup \d{8} \d{6}\.\d{6} UTC: it is incomplete "
                     r"\(no completion indicator for .+\)", result.stdout)
    assert numbered_directories(destination, tree) == tree.expected   # the older data


def relabel_backups(sandbox, months_back, work):
    """Move every backup of the sandbox months_back calendar months into the past
    (the time stamps in object names, manifests and catalogues)."""
    s3 = sandbox.s3()
    now = aam.utc_now()
    month = now.month - months_back
    year = now.year + (month - 1) // 12
    month = (month - 1) % 12 + 1
    stamps = {}

    def moved(stamp):
        new = stamp.replace(year=year, month=month, day=15)
        stamps[aam.format_stamp(stamp)] = aam.format_stamp(new)
        return new

    def new_key(key):
        name = aam.ObjectName.parse(key)
        return aam.ObjectName(name.location, moved(name.full),
                              name.incremental and moved(name.incremental), name.indicator,
                              name.source, name.volume, name.catalogue, name.piece).key

    def relabelled(text):
        for old, new in stamps.items():
            text = text.replace(old, new)
        return text

    items = [(name.key, name) for name in sandbox.object_names()]
    for key, name in items:                  # volumes first: every stamp becomes known
        if name.volume:
            s3.restore_object(Bucket=sandbox.bucket, Key=key, RestoreRequest={"Days": 1})
            body = s3.get_object(Bucket=sandbox.bucket, Key=key)["Body"].read()
            s3.put_object(Bucket=sandbox.bucket, Key=new_key(key), Body=body,
                          StorageClass="DEEP_ARCHIVE")
            s3.delete_object(Bucket=sandbox.bucket, Key=key)
    catalogues = {}
    for key, name in items:
        if name.catalogue:
            body = sandbox.encrypt_catalogue(relabelled(sandbox.catalogue(key)), work)
            catalogues[new_key(key)] = body
            s3.put_object(Bucket=sandbox.bucket, Key=new_key(key), Body=body)
            s3.delete_object(Bucket=sandbox.bucket, Key=key)
    for key, name in items:
        if name.indicator:
            manifest = json.loads(relabelled(json.dumps(sandbox.indicator(key))))
            if "catalogue" in manifest:
                body = catalogues[manifest["catalogue"]["name"]]
                manifest["catalogue"].update(size=len(body),
                                             sha256=hashlib.sha256(body).hexdigest())
            s3.put_object(Bucket=sandbox.bucket, Key=new_key(key),
                          Body=json.dumps(manifest).encode())
            s3.delete_object(Bucket=sandbox.bucket, Key=key)
    for check in sandbox.keychecks():         # the chain's key check, named by its full
        moved_check = aam.KeyCheck(check.location, moved(check.full), check.salt,
                                   check.verifier)
        s3.put_object(Bucket=sandbox.bucket, Key=moved_check.key, Body=b"")
        s3.delete_object(Bucket=sandbox.bucket, Key=check.key)


def test_a_set_five_months_back_is_found(sandbox, tmp_path):
    tree, expected = make_history(sandbox)
    relabel_backups(sandbox, 5, tmp_path)
    destination = tmp_path / "r"
    ok(sandbox.restore(ONE_STEP, destination))
    assert numbered_directories(destination, tree) == expected


def test_no_set_in_the_last_six_months_exits_5(sandbox, tmp_path):
    sandbox.sample()
    ok(sandbox.backup())
    relabel_backups(sandbox, 6, tmp_path)
    result = sandbox.restore(ONE_STEP, tmp_path / "r")
    assert result.returncode == 5, result.stdout + result.stderr
    assert (f"No complete full backup of location {sandbox.location} in bucket "
            f"{sandbox.bucket}") in result.stdout
    (message,) = restoration_emails(sandbox)
    assert message["subject"].startswith("FAILURE, ")


def test_an_empty_bucket_exits_5_for_every_step(sandbox, tmp_path):
    for operation in [ONE_STEP] + MULTI_STEP:
        result = sandbox.restore(operation, tmp_path / "r")
        assert result.returncode == 5, result.stdout + result.stderr
        assert "nothing to restore" in result.stdout


def test_a_destination_holding_other_data_is_refused(sandbox, tmp_path):
    make_history(sandbox)
    destination = tmp_path / "r"
    write_file(str(destination / "1" / "mine.txt"), b"precious\n")
    result = sandbox.restore(ONE_STEP, destination)
    assert result.returncode == 1
    assert "already holds 1, which this restoration would write" in result.stdout
    assert open(destination / "1" / "mine.txt", "rb").read() == b"precious\n"
    assert sorted(os.listdir(destination)) == [".aam-restore.lock", "1"]


# ----------------------------------------------------------------- permissions

def test_backup_credentials_cannot_restore_and_the_message_names_the_permission(
        sandbox, tmp_path, aws):
    tree, expected = make_history(sandbox)
    backup_keys, restore_keys = sandbox.user_keys()
    with aws.iam_enforced():
        refused = sandbox.restore(ONE_STEP, tmp_path / "refused",
                                  {"send_email": "False", "access_key_id": backup_keys[0],
                                   "secret_access_key": backup_keys[1]})
        allowed = sandbox.restore(ONE_STEP, tmp_path / "allowed",
                                  {"send_email": "True", "access_key_id": restore_keys[0],
                                   "secret_access_key": restore_keys[1]})
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "lack the permission s3:GetObject" in refused.stdout
    assert "use the restore user's keys" in refused.stdout
    assert backup_keys[1] not in refused.stdout + refused.stderr
    ok(allowed)
    assert numbered_directories(tmp_path / "allowed", tree) == expected
    # exactly docs/aws-setup.md's restore policy is enough, e-mail report included
    assert any(m["subject"].startswith("SUCCESS, ") and m["subject"].endswith(
        " data restoration!") for m in sandbox.emails())


# ----------------------------------------------------------------- pieces

def test_a_thaw_already_in_progress_is_fine(sandbox, slow_thaw):
    s3 = sandbox.s3()
    s3.put_object(Bucket=sandbox.bucket, Key="v", Body=b"x", StorageClass="DEEP_ARCHIVE")
    slow_thaw(3)
    assert aam.request_thaw(s3, sandbox.bucket, "v", 1, "Bulk") == aam.IN_PROGRESS
    assert aam.request_thaw(s3, sandbox.bucket, "v", 1, "Bulk") == aam.IN_PROGRESS  # 409
    head = s3.head_object(Bucket=sandbox.bucket, Key="v")
    assert aam.parse_restore_header(head) == aam.IN_PROGRESS


def test_restore_files_are_private(sandbox, tmp_path):
    make_history(sandbox)
    destination = tmp_path / "r"
    ok(sandbox.restore(ONE_STEP, destination))
    for name in ("restore-map.txt", ".aam-restore-state.json"):
        assert stat.S_IMODE(os.stat(destination / name).st_mode) == 0o600
    state = json.load(open(destination / ".aam-restore-state.json"))
    volumes = [v for a in state["set"]["archives"] for v in a["volumes"]]
    assert all(re.fullmatch(r"[0-9a-f]{64}", v["sha256"]) for v in volumes)
    assert hashlib.sha256(KEY.encode()).hexdigest() not in json.dumps(state)
