"""check-aws-backups: every set of the location verified without a thaw, through the CLI
against the local endpoint: a good chain passes reading only STANDARD objects; a volume
missing or resized, a catalogue damaged, an indicator missing, a wrong key and sets made
by 1.0.0 and 1.1.0 are told apart, each problem naming its object."""

import datetime as dt
import json
import os
import random
import re
import signal
import stat

import aam_auto_backup as aab
from conftest import ACCESS_KEY_ID, KEY, SECRET, file_times_pass, ok, write_file

PIECES = {"AAM_VOLUME_SIZE": "65536", "AAM_PIECE_SIZE": "200000"}


def noise(stream, size):
    return random.Random(stream).randbytes(size)


def check(sandbox, key=KEY, env=None, keys=(ACCESS_KEY_ID, SECRET)):
    return sandbox.run(aab.CHECK_ARGS.argv(
        operation=aab.CHECK_OPERATION, key=key, bucket=sandbox.bucket,
        location=sandbox.location, access_key_id=keys[0], secret_access_key=keys[1]),
        env=env)


def failed(result):
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    return result.stdout + result.stderr


def chain(sandbox, incrementals=2, env=None):
    """A full backup of several pieces and incrementals each changing one file."""
    mount = sandbox.single_source({f"Documents/file{n}.bin": noise(n, 150_000)
                                   for n in range(4)} | {"notes.txt": b"notes\n"})
    ok(sandbox.backup(env=env))
    for number in range(incrementals):
        file_times_pass()
        write_file(os.path.join(mount, "notes.txt"), f"change {number}\n".encode())
        ok(sandbox.backup(env=env))
    return mount


def names(sandbox, **wanted):
    """The object names of the sets with these attributes, in key order."""
    return sorted((n for n in sandbox.object_names()
                   if all(getattr(n, k) == v for k, v in wanted.items())),
                  key=lambda n: n.key)


def health(sandbox):
    path = os.path.join(sandbox.state_dir, f"{sandbox.location}-"
                        f"{aab.location_digest(sandbox.bucket, sandbox.location)}.health.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_a_good_chain_passes_reading_only_standard_objects(sandbox, proxy):
    chain(sandbox, env=sandbox.env(**PIECES))
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.reset_counters()
    result = ok(check(sandbox))

    objects = {o["Key"]: o for o in sandbox.objects()}
    requests = proxy.requests()
    assert {r["kind"] for r in requests} == {"LIST", "GetObject"}, requests
    assert sum(r["kind"] == "LIST" for r in requests) == 1
    read = [r["key"] for r in requests if r["kind"] == "GetObject"]
    assert all(objects[key].get("StorageClass", "STANDARD") == "STANDARD" for key in read)
    assert sorted(set(read)) == sorted(n.key for n in sandbox.object_names()
                                       if n.indicator or n.catalogue)

    out = result.stdout
    assert "Checked 3 complete backup(s) (1 full, 2 incremental): passed" in out
    (full,) = names(sandbox, indicator=True, incremental=None)
    volumes = sandbox.indicator(full.key)["volumes"]
    assert len(volumes) >= 4 and len({aab.ObjectName.parse(v["name"]).piece
                                      for v in volumes}) >= 3
    assert (f"ok      full backup {aab.describe_stamp(full.full)}: 1 source(s), "
            f"{len(volumes)} volume(s), {sum(v['size'] for v in volumes):,} bytes") in out
    stamps = sorted(n.incremental or n.full for n in names(sandbox, indicator=True))
    assert (f"Restore points: 3, from {aab.describe_stamp(stamps[0])} to "
            f"{aab.describe_stamp(stamps[-1])}") in out
    month = f"{full.full:%Y%m}"
    total = sum(o["Size"] for o in objects.values())
    assert f"  {month:8s} {len(objects):>8,} {total:>17,}" in out
    assert "Not checked" not in out and "PROBLEM" not in out

    record = health(sandbox)
    assert record["check"]["result"] == "passed" and record["check"]["problems"] == 0
    assert record["check"]["sets"] == 3 and record["check"]["not_checked"] == []
    assert {m: (s["objects"], s["bytes"]) for m, s in record["storage"].items()} == {
        month: (len(objects), total)}


def test_a_missing_or_resized_volume_and_a_damaged_catalogue_are_each_named(sandbox):
    chain(sandbox, env=sandbox.env(**PIECES))
    s3, bucket = sandbox.s3(), sandbox.bucket
    full_volume = names(sandbox, incremental=None, catalogue=False, indicator=False)[1]
    s3.delete_object(Bucket=bucket, Key=full_volume.key)
    first, second = sorted({n.incremental for n in names(sandbox) if n.incremental})
    (resized,) = names(sandbox, incremental=first, catalogue=False, indicator=False)
    s3.put_object(Bucket=bucket, Key=resized.key, Body=b"shorter", StorageClass="DEEP_ARCHIVE")
    (catalogue,) = names(sandbox, incremental=second, catalogue=True)
    body = bytearray(s3.get_object(Bucket=bucket, Key=catalogue.key)["Body"].read())
    body[len(body) // 2] ^= 0xFF                                     # same size, other bytes
    s3.put_object(Bucket=bucket, Key=catalogue.key, Body=bytes(body))

    out = failed(check(sandbox))
    assert f"{full_volume.key}: missing from the bucket" in out
    assert f"{resized.key}: 7 bytes in the bucket" in out
    assert f"The catalogue {catalogue.key} in the bucket does not match its completion " \
           "indicator" in out
    assert "The check found 3 problem(s)" in out
    assert out.count("DAMAGED") == 3
    assert health(sandbox)["check"]["result"] == "failed"
    assert health(sandbox)["check"]["problems"] == 3


def test_a_missing_indicator_leaves_an_incomplete_set_listed_with_its_bytes(sandbox):
    chain(sandbox, incrementals=2)
    s3, bucket = sandbox.s3(), sandbox.bucket
    latest = max(n.incremental for n in names(sandbox) if n.incremental)
    (indicator,) = names(sandbox, incremental=latest, indicator=True)
    s3.delete_object(Bucket=bucket, Key=indicator.key)
    (full,) = names(sandbox, incremental=None, indicator=True)
    lost = aab.ObjectName(sandbox.location, full.full, None, False, full.source, 1, piece=99)
    s3.put_object(Bucket=bucket, Key=lost.key, Body=b"x" * 1234, StorageClass="DEEP_ARCHIVE")

    out = failed(check(sandbox))
    left = {o["Key"]: o["Size"] for o in sandbox.objects()
            if aab.ObjectName.parse(o["Key"]) and
            aab.ObjectName.parse(o["Key"]).incremental == latest}
    assert (f"  the incremental backup {aab.describe_stamp(latest)} (of the full "
            f"{aab.describe_stamp(full.full)} UTC): {len(left)} object(s), "
            f"{sum(left.values()):,} bytes").replace(" UTC UTC", " UTC") in out
    for key, size in left.items():
        assert f"    {key} ({size:,} bytes)" in out
    assert "is newer than every complete backup, and no journal on this computer " \
           "continues it" in out
    assert "Unused volumes of complete backups (of a piece that was lost; no restore " \
           "reads them): 1 volume(s), 1,234 bytes:" in out
    assert f"  {lost.key} (1,234 bytes)" in out
    assert "The check found 1 problem(s)" in out

    # the full's indicator missing: its incrementals build on a backup no restore has
    s3.delete_object(Bucket=bucket, Key=full.key)
    out = failed(check(sandbox))
    (earlier,) = names(sandbox, incremental=min(n.incremental for n in names(sandbox)
                                                if n.incremental), indicator=True)
    assert f"{earlier.key}: it holds the changes since {aab.format_stamp(full.full)}, which " \
           "is not a complete backup in the bucket" in out


def test_a_pending_backup_is_told_from_an_abandoned_one(sandbox):
    mount = chain(sandbox, incrementals=0)
    file_times_pass()
    for n in range(3):
        write_file(os.path.join(mount, f"Documents/new{n}.bin"), noise(10 + n, 150_000))
    env = sandbox.env(**PIECES)
    crashed = sandbox.run(sandbox.backup_args(),
                          env=dict(env, AAM_TEST_CRASH_AT="piece-done:1"))
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr
    sandbox.wait_until_no_process_runs()

    result = ok(check(sandbox))
    assert "pending: the next backup continues it (this computer's journal records it)" \
        in result.stdout
    assert "Checked 1 complete backup(s) (1 full, 0 incremental): passed" in result.stdout

    journal = aab.journal_path(sandbox.state_dir, sandbox.bucket, sandbox.location)
    os.rename(journal, journal + ".elsewhere")       # the check runs on another computer
    out = failed(check(sandbox))
    assert "is newer than every complete backup, and no journal on this computer" in out


def test_a_wrong_key_names_the_key_check_and_is_never_shown(sandbox):
    chain(sandbox, incrementals=1)
    wrong = "Not the key of these backups 123"
    out = failed(check(sandbox, key=wrong))
    (keycheck,) = sandbox.keychecks()
    assert f"{keycheck.key}: the key (argument 2) is not the key the backups of the full " \
           f"backup {aab.describe_stamp(keycheck.full)} were made with" in out
    assert "The check found 1 problem(s)" in out
    assert wrong not in out and KEY not in out
    # without a key check, the catalogues tell
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=keycheck.key)
    out = failed(check(sandbox, key=wrong))
    assert "the catalogue does not open with the key (argument 2)" in out
    assert "The check found 2 problem(s)" in out


def test_a_set_made_by_1_1_0_is_checked_whole(sandbox, tmp_path):
    chain(sandbox, incrementals=1)
    sandbox.as_made_by("1.1.0", tmp_path)
    result = ok(check(sandbox))
    assert "Checked 2 complete backup(s) (1 full, 1 incremental): passed" in result.stdout
    assert "Not checked" not in result.stdout
    (catalogue,) = names(sandbox, incremental=None, catalogue=True)
    sandbox.s3().put_object(Bucket=sandbox.bucket, Key=catalogue.key,
                            Body=sandbox.encrypt_catalogue("not a catalogue\n", tmp_path))
    assert re.search(rf"{re.escape(catalogue.key)}: [\d,]+ bytes in the bucket, [\d,]+ in "
                     "the manifest", failed(check(sandbox)))


def test_a_set_made_by_1_0_0_says_what_could_not_be_checked(sandbox, tmp_path):
    chain(sandbox, incrementals=1)
    sandbox.as_made_by("1.0.0", tmp_path)
    result = ok(check(sandbox))
    out = result.stdout
    assert "Checked 2 complete backup(s) (1 full, 1 incremental): passed" in out
    assert "Not checked:" in out
    assert out.count("no catalogue (made by version 1.0.0); its volumes are present at "
                     "their sizes") == 2
    assert "they have neither a catalogue nor a key check (made by version 1.0.0)" in out
    assert len(health(sandbox)["check"]["not_checked"]) == 3

    (volume,) = names(sandbox, incremental=None, indicator=False)
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=volume.key)
    assert f"{volume.key}: missing from the bucket" in failed(check(sandbox))


def test_the_arguments_are_browses_and_take_the_named_form(sandbox):
    chain(sandbox, incrementals=0)
    help_text = ok(sandbox.run([aab.CHECK_OPERATION, "--help"])).stdout
    assert "check-aws-backups: check every backup set" in help_text
    wrong = sandbox.run([aab.CHECK_OPERATION, KEY, sandbox.bucket])
    assert wrong.returncode == aab.EXIT_USAGE
    assert "check-aws-backups takes 6 arguments, 3 were given" in wrong.stderr
    bad = sandbox.run(aab.CHECK_ARGS.argv(
        operation=aab.CHECK_OPERATION, key=KEY, bucket=sandbox.bucket,
        location="no_underscore", access_key_id="", secret_access_key=""))
    assert bad.returncode == aab.EXIT_USAGE and "argument 4 (location name)" in bad.stderr
    env = sandbox.env(AAM_KEY_FOR_CHECK=KEY, AAM_ID=ACCESS_KEY_ID, AAM_SECRET=SECRET)
    named = ok(sandbox.run([aab.CHECK_OPERATION, "--key", "env:AAM_KEY_FOR_CHECK",
                            "--bucket", sandbox.bucket, "--location", sandbox.location,
                            "--access-key-id", "env:AAM_ID",
                            "--secret-access-key", "env:AAM_SECRET"], env=env))
    assert "Checked 1 complete backup(s) (1 full, 0 incremental): passed" in named.stdout


def test_a_catalogue_that_describes_other_pieces_than_its_indicator_is_named(
        sandbox, tmp_path):
    import hashlib
    chain(sandbox, incrementals=0, env=sandbox.env(**PIECES))
    (indicator,) = names(sandbox, indicator=True)
    (catalogue,) = names(sandbox, catalogue=True)
    head, rest = sandbox.catalogue(catalogue.key).split("\n", 1)
    fields = head.split("\t", 2)
    header = json.loads(fields[2])
    header["pieces"][0]["volumes"] += 1                  # a volume the indicator lacks
    body = sandbox.encrypt_catalogue(
        f"{fields[0]}\t{fields[1]}\t{json.dumps(header)}\n{rest}", tmp_path)
    s3 = sandbox.s3()
    s3.delete_object(Bucket=sandbox.bucket, Key=catalogue.key)
    s3.put_object(Bucket=sandbox.bucket, Key=catalogue.key, Body=body)
    manifest = sandbox.indicator(indicator.key)
    manifest["catalogue"].update(size=len(body), sha256=hashlib.sha256(body).hexdigest())
    s3.put_object(Bucket=sandbox.bucket, Key=indicator.key, Body=json.dumps(manifest).encode())

    out = failed(check(sandbox))
    assert f"{catalogue.key}: its pieces (number, volumes, central directory volume)" in out
    assert "The check found 1 problem(s)" in out


def test_the_backup_keys_stop_the_check_naming_the_missing_permission(sandbox, aws):
    chain(sandbox, incrementals=0)
    backup_keys, restore_keys = sandbox.user_keys()
    with aws.iam_enforced():
        refused = check(sandbox, keys=backup_keys)
        allowed = check(sandbox, keys=restore_keys)
    assert refused.returncode == 1
    assert refused.stderr.count("lack the permission s3:GetObject") == 1, refused.stderr
    assert "credentials of arguments 5 and 6" in refused.stderr
    assert "PROBLEM" not in refused.stdout and backup_keys[1] not in refused.stderr
    assert "passed" in ok(allowed).stdout


def test_a_chain_whose_full_the_expiry_rule_removed_is_said_and_is_no_problem(sandbox):
    mount = sandbox.single_source({"notes.txt": b"notes\n"})
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=200)).replace(day=10)
    ok(sandbox.backup(env=sandbox.env(AAM_TEST_NOW=aab.format_arg_stamp(old))))
    write_file(os.path.join(mount, "notes.txt"), b"changed\n")
    ok(sandbox.backup({"auto_force_full": "no"}, env=sandbox.env(     # the instruction
        AAM_TEST_NOW=aab.format_arg_stamp(old + dt.timedelta(days=1)))))  # file is newer
    ok(sandbox.backup())                                    # this month's full backup
    (gone,) = {n.full for n in names(sandbox) if n.incremental}
    for name in names(sandbox, full=gone, incremental=None):
        sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=name.key)

    out = ok(check(sandbox)).stdout
    assert f"gone    full backup {aab.describe_stamp(gone)}: removed by the bucket's expiry " \
           "rule; what is left of its chain (1 incremental backup(s)" in out
    assert "Checked 1 complete backup(s) (1 full, 0 incremental): passed" in out
    assert "Incomplete" not in out


def test_after_a_key_change_the_older_chains_are_said_to_need_the_old_key(sandbox):
    new_key = "A new key, changed on purpose 2027"
    chain(sandbox, incrementals=1)
    ok(sandbox.backup({"force_full": "yes", "key": new_key}))
    old_check, new_check = sandbox.keychecks()

    result = ok(check(sandbox, key=new_key))
    assert "Checked 3 complete backup(s) (2 full, 1 incremental): passed" in result.stdout
    assert (f"the catalogues of the backups of the full backup "
            f"{aab.describe_stamp(old_check.full)}: made with the key before it was changed "
            f"(their key check {old_check.key}); check them with that key") in result.stdout
    # the old key checks the old chain, and names the new one as of another key
    out = failed(check(sandbox, key=KEY))
    assert f"{new_check.key}: the key (argument 2) is not the key" in out
    assert "The check found 1 problem(s)" in out


def test_an_s3_outage_stops_the_check_unrecorded_never_blaming_an_object(sandbox, proxy):
    chain(sandbox, incrementals=0)
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.fail_after(1, status=503, services={"s3"})          # the LIST, then nothing
    out = failed(check(sandbox))
    assert "AWS S3 could not be reached" in out and "run it again" in out
    assert "PROBLEM" not in out
    record = aab.HealthRecord(sandbox.state_dir, sandbox.bucket, sandbox.location)
    assert record.get("check") is None       # the backups' sections only
