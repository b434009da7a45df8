"""A wrong archive key is refused before anything is uploaded: each chain's key check.

The backup keys can list the bucket but not read it, so the key a chain was made with
is named by an empty object, <location>_keycheck_<full>_<salt>_<verifier>.  Real
parts: the CLI as a subprocess, the moto server over HTTP (through the counting
FaultProxy where the requests matter), real 7-Zip and rsync.
"""

import os
import re
import shutil
import struct

import pytest

import aam_auto_backup as aab
from conftest import KEY, extract, file_times_pass, mirrored, ok, snapshot, write_file

TYPO = KEY[:-1] + "?"                 # one character off
NEW_KEY = "A new key, changed on purpose 2027"
FILES = {"report.txt": b"quarterly report\n" * 50, "notes.md": b"# notes\n",
         "projects/alpha/main.py": b"print('alpha')\n", "photos/a.jpg": os.urandom(30_000)}
ONE_STEP = aab.ONE_STEP_RESTORE


def last_log(sandbox):
    with open(sandbox.log_files()[-1], encoding="utf-8") as handle:
        return handle.read()


def s3_requests(proxy):
    """The kinds of the S3 requests the proxy saw (the e-mail report is not one)."""
    return sorted({r["kind"] for r in proxy.requests() if r["kind"] != "ses"})


@pytest.mark.parametrize("state", ["with the local state", "without the local state"])
@pytest.mark.parametrize("destinations", ["local|AWS", "AWS"])
def test_a_mistyped_key_is_refused_before_anything_is_uploaded(sandbox, proxy, tmp_path,
                                                               state, destinations):
    mount = sandbox.single_source(FILES)
    changes = {"destinations": destinations} if destinations == "AWS" else {}
    if destinations == "AWS":
        changes["mirror_root"] = ""
    # Small volumes: without a mirror, the child started before S3 answers has its 7-Zip
    # write volumes while the (delayed) listing runs; none may be uploaded.
    env = sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url, AAM_VOLUME_SIZE="65536")
    ok(sandbox.backup(changes, env=env))
    (check,) = sandbox.keychecks()
    before = sorted(o["Key"] for o in sandbox.objects())
    first = snapshot(mount)
    if state == "without the local state":
        shutil.rmtree(sandbox.state_dir)
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"changed tonight\n")
    write_file(os.path.join(mount, "big.bin"), os.urandom(1_000_000))
    proxy.reset_counters()
    proxy.delay_requests(2, kinds={"LIST"})

    result = sandbox.backup(dict(changes, key=TYPO), env=env)
    proxy.delay_requests(0)
    assert result.returncode == aab.EXIT_WRONG_KEY == 9, result.stdout + result.stderr
    message = (f"The archive key (argument 16) is not the key of the full backup "
               f"{aab.describe_stamp(check.full)} this incremental builds on: it does not "
               f"match the key check s3://{sandbox.bucket}/{check.key}, so nothing was "
               "written to S3.")
    assert message in result.stdout and message in last_log(sandbox)
    # Nothing was written to S3: two LISTs were its only requests.
    assert s3_requests(proxy) == ["LIST"] and proxy.counters()["by_kind"]["LIST"] == 2
    assert sorted(o["Key"] for o in sandbox.objects()) == before
    assert not os.listdir(sandbox.temp)
    email = sandbox.emails()[-1]
    assert email["subject"].startswith("FAILURE, ")
    assert "nothing was written to S3" in email["body"] and check.salt.hex() not in email["body"]
    if destinations == "local|AWS":       # the mirror does not need the key: it is made
        assert "the local mirror is still made" in result.stdout
        assert mirrored(os.path.join(sandbox.mirror, mount.lstrip("/"))) == mirrored(mount)
    elif state == "with the local state":  # the early child's 7-Zip ran, for nothing
        assert re.search(r"S3 did not: it is ended \(the \d+ volume\(s\) its 7-Zip had "
                         r"begun are removed unsent\)", last_log(sandbox))

    # With the right key the chain goes on, and restores as of either backup are exact.
    ok(sandbox.backup(changes, env=env))
    second = snapshot(mount)
    assert [c.key for c in sandbox.keychecks()] == [check.key]
    stamps = sandbox.backup_stamps()
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "first", point=stamps[0]))
    assert snapshot(tmp_path / "first" / "1") == first
    ok(sandbox.restore_chosen(ONE_STEP, tmp_path / "latest"))
    assert snapshot(tmp_path / "latest" / "1") == second


def test_incremental_only_with_a_mistyped_key_is_refused(sandbox):
    sandbox.single_source(FILES)
    ok(sandbox.backup())
    before = sorted(o["Key"] for o in sandbox.objects())
    result = sandbox.backup({"key": TYPO}, operation=aab.INCREMENTAL_ONLY_BACKUP)
    assert result.returncode == 9, result.stdout + result.stderr
    assert "does not match the key check" in result.stdout
    assert sorted(o["Key"] for o in sandbox.objects()) == before


def test_a_new_full_backup_must_match_the_latest_chain_unless_forced(sandbox, tmp_path):
    mount = sandbox.single_source(FILES)
    ok(sandbox.backup())
    old = snapshot(mount)
    (first,) = sandbox.keychecks()
    # A full backup that is not forced (the instruction file changed: argument 22)
    # continues the latest chain's key: a typo is refused, the same key gets a key
    # check with the same salt and verifier (a lister learns nothing new).
    file_times_pass()
    sandbox.write_instructions(mount + "/\n")
    refused = sandbox.backup({"key": TYPO})
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert "Backup scope: full (the instruction file changed" in refused.stdout
    assert (f"is not the key of the latest chain (full backup {aab.describe_stamp(first.full)}"
            f"): it does not match the key check s3://{sandbox.bucket}/{first.key}"
            ) in refused.stdout
    assert "argument 21 (force full backup) yes, which starts a new chain" in refused.stdout
    assert sandbox.keychecks() == [first]
    ok(sandbox.backup())
    second = sandbox.keychecks()[-1]
    assert second.full > first.full and (second.salt, second.verifier) == (
        first.salt, first.verifier)

    # The key changed on purpose: argument 21 yes starts a new chain, said loudly.
    file_times_pass()
    write_file(os.path.join(mount, "notes.md"), b"# notes under the new key\n")
    changed = ok(sandbox.backup({"key": NEW_KEY, "force_full": "yes"}))
    warning = ("WARNING: the archive key (argument 16) is not the key of the latest chain "
               f"(key check {second.key}). This full backup is forced (argument 21), so it "
               "starts a new chain with the new key.")
    assert warning in changed.stdout and warning in last_log(sandbox)
    assert "the archive key changed" in sandbox.emails()[-1]["body"]
    third = sandbox.keychecks()[-1]
    assert third.salt != first.salt and third.matches(NEW_KEY) and not third.matches(KEY)
    # The new chain goes on with the new key only; the old key is now the wrong one.
    file_times_pass()
    os.remove(os.path.join(mount, "projects", "alpha", "main.py"))
    assert sandbox.backup().returncode == 9
    ok(sandbox.backup({"key": NEW_KEY}))
    new = snapshot(mount)

    ok(sandbox.restore(ONE_STEP, tmp_path / "new", {"key": NEW_KEY, "send_email": "False"}))
    assert snapshot(tmp_path / "new" / "1") == new
    old_point = sandbox.backup_stamps()[0]
    ok(sandbox.restore(ONE_STEP, tmp_path / "old", {"send_email": "False",
                                                     "restore_point": old_point}))
    assert snapshot(tmp_path / "old" / "1") == old
    wrong = sandbox.restore(ONE_STEP, tmp_path / "wrong", {"send_email": "False"})
    assert wrong.returncode == 1
    assert f"their key check {third.key}" in wrong.stdout

    # browse searches the chains the key opens and names the others
    found = browse(sandbox, NEW_KEY, "notes.md")
    assert found.returncode == 0, found.stdout + found.stderr
    for check in (first, second):
        assert (f"(the backups of the full backup {aab.describe_stamp(check.full)} were made "
                f"with another key, says their key check {check.key}: their catalogue does "
                "not open with this one; not searched)") in found.stdout
    assert f"{mount}/notes.md\n" in found.stdout and found.stdout.count(", modified ") == 1
    none = browse(sandbox, TYPO, "notes.md")
    assert none.returncode == 1
    assert "The decryption key (argument 2) is wrong: 7-Zip cannot open the catalogue" \
        in none.stderr


def browse(sandbox, key, *selection):
    return sandbox.run(aab.BROWSE_ARGS.argv(
        operation=aab.BROWSE_OPERATION, key=key, bucket=sandbox.bucket,
        location=sandbox.location, access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCY", selection=list(selection)))


def test_a_chain_made_before_key_checks_gets_one_for_the_key_in_use(sandbox):
    """Version 1.0.0 and 1.1.0 wrote no key check: the next backup writes one."""
    mount = sandbox.single_source(FILES)
    ok(sandbox.backup())
    (check,) = sandbox.keychecks()
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=check.key)
    file_times_pass()
    write_file(os.path.join(mount, "notes.md"), b"# later\n")
    ok(sandbox.backup())
    (written,) = sandbox.keychecks()
    assert written.full == check.full and written.salt != check.salt and written.matches(KEY)
    assert (f"Key check: uploaded {written.key} (its chain (the full backup "
            f"{aab.describe_stamp(check.full)}) has none: made by version 1.0.0 or 1.1.0; "
            "written for the archive key in use).") in last_log(sandbox)
    assert sandbox.backup({"key": TYPO}).returncode == 9


def test_a_key_check_written_with_a_mistyped_key_does_not_refuse_the_right_key(sandbox,
                                                                                tmp_path):
    """The first backup of this version on a chain made by 1.1.0 writes its key check for
    the key it is given: a typo then is taken for the chain's.  A restore with the right
    key is refused only when the catalogues do not open with it either."""
    mount = sandbox.single_source(FILES)
    ok(sandbox.backup())
    full = snapshot(mount)
    (check,) = sandbox.keychecks()
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=check.key)       # made by 1.1.0
    file_times_pass()
    write_file(os.path.join(mount, "notes.md"), b"# under a mistyped key\n")
    ok(sandbox.backup({"key": TYPO}))
    (written,) = sandbox.keychecks()
    assert written.matches(TYPO) and not written.matches(KEY)
    point = sandbox.backup_stamps()[0]
    result = sandbox.restore(ONE_STEP, tmp_path / "full", {"send_email": "False",
                                                            "restore_point": point})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning: the key does not match the chain's key check, yet its catalogues open " \
        "with it" in result.stdout
    assert snapshot(tmp_path / "full" / "1") == full
    # the incremental made with the typo opens only with the typo: said, not guessed
    latest = sandbox.restore(ONE_STEP, tmp_path / "latest", {"send_email": "False"})
    assert latest.returncode == 1
    assert "The decryption key (argument 8) is wrong: it is not the key the backups of the " \
        "full backup" not in latest.stdout
    assert "The decryption key (argument 8) is wrong: 7-Zip cannot open the catalogue" \
        in latest.stdout


def test_the_verifier_is_the_one_zip_aes_stores_beside_each_file(sandbox, tmp_path):
    """A key check holds what a volume holds for each of its files: the same
    derivation, so it is no cheaper to attack than a volume."""
    sandbox.single_source(FILES)
    ok(sandbox.backup())
    (volume,) = [n.key for n in sandbox.object_names() if n.volume]
    with open(sandbox.fetch_volume(volume, str(tmp_path)), "rb") as handle:
        data = handle.read()
    name_length, extra_length = struct.unpack("<HH", data[26:30])
    start = 30 + name_length + extra_length           # AES: salt (16 bytes), verifier (2)
    salt, verifier = data[start:start + 16], data[start + 16:start + 18].hex()
    assert aab.key_verifier(KEY, salt) == verifier != aab.key_verifier(TYPO, salt)
    (check,) = sandbox.keychecks()
    assert check.verifier == aab.key_verifier(KEY, check.salt) and len(check.salt) == 16
    assert extract(os.path.join(tmp_path, volume), str(tmp_path / "x"))
    # the key check is an empty STANDARD object
    head = sandbox.s3().head_object(Bucket=sandbox.bucket, Key=check.key)
    assert head["ContentLength"] == 0 and head.get("StorageClass", "STANDARD") == "STANDARD"
