"""preview-backup: what a regular-backup would do, told without doing it.

Real parts: the CLI as a subprocess with regular-backup's own arguments, the moto server
over HTTP behind the counting FaultProxy (a preview may only LIST), and real backups
before and after it, whose indicators say what was archived.  "Nothing was written" is
proved on the whole sandbox (sources, logs, lock, work and state directories, mirror):
its snapshot, file contents and times, is the same after a preview as before.
"""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

import aam_auto_backup as aab
from conftest import ACCESS_KEY_ID, SECRET, file_times_pass, ok, snapshot, write_file
from local_aws import backup_policy
from test_resume import SIZE, crash_at, env_through, pending_incremental, pieced_source, \
    volume_puts

PREVIEW = aab.PREVIEW_BACKUP


def preview(sandbox, proxy=None, changes=None, env=None):
    """preview-backup with the sandbox's regular-backup arguments (through the proxy)."""
    env = env or sandbox.env(**({"AWS_ENDPOINT_URL": proxy.endpoint_url} if proxy else {}))
    return sandbox.run(sandbox.backup_args(PREVIEW, changes), env=env)


def everything(sandbox):
    """The sandbox's files and directories, with their times, and the bucket's objects."""
    roots = [sandbox.root] + ([sandbox.second_root] if sandbox.tree else [])
    return [snapshot(root) for root in roots], sorted(o["Key"] for o in sandbox.objects())


def s3_requests(proxy):
    return [r["kind"] for r in proxy.requests()]


def section(output, heading):
    """The lines under one '== heading' of the preview, up to the next heading."""
    start = output.index(f"== {heading}")
    end = output.find("\n== ", start + 1)
    return output[start:end if end >= 0 else None]


def files_and_bytes(tree):
    contents = [data for files in tree.expected.values() for data in files.values()
                if data is not None]
    return len(contents), sum(len(data) for data in contents)


def volumes_in_bucket(sandbox, backup=None):
    """(count, bytes) of the volumes in the bucket (of one backup: its date-time)."""
    sizes = [o["Size"] for o in sandbox.objects()
             if (name := aab.ObjectName.parse(o["Key"])) and not name.indicator
             and not name.catalogue and backup in (None, name.incremental or name.full)]
    return len(sizes), sum(sizes)


def archived_files(sandbox, backup):
    """The files the completion indicators of one backup say were archived, in all."""
    names = [aab.ObjectName.parse(o["Key"]) for o in sandbox.objects()]
    return sum(sandbox.indicator(name.key)["files"] for name in names
               if name and name.indicator and (name.incremental or name.full) == backup)


def upload_bound(output):
    return int(re.search(r"Upload: at most \S+ \S+ \(([\d,]+) bytes\)", output)[1]
               .replace(",", ""))


def sizes(tree, mount, *paths):
    """The bytes of excluded files of the sample, as the preview shows them."""
    return aab.exact_bytes(sum(len(tree.excluded[mount][path]) for path in paths))


def test_a_fresh_bucket_is_previewed_as_a_full_backup_with_the_backup_keys(sandbox, proxy,
                                                                             aws):
    tree = sandbox.sample()
    key_id, secret = aws.create_user_with_policy(f"backup-{sandbox.location}",
                                                 backup_policy(sandbox.bucket))
    keys = {"access_key_id": key_id, "secret_access_key": secret}
    before = everything(sandbox)
    aws.enable_iam_enforcement()          # the backup user's write-only policy: LIST it may
    try:
        result = preview(sandbox, proxy, keys)
    finally:
        aws.disable_iam_enforcement()
    out = ok(result).stdout
    # Nothing was written anywhere, and S3 was listed twice (the key checks, the month).
    assert everything(sandbox) == before
    assert s3_requests(proxy) == ["LIST", "LIST"]
    assert not os.path.exists(sandbox.logs) and not os.path.exists(sandbox.temp)

    month = f"{aab.utc_now():%Y-%m}"
    assert f"Backup scope: full (no complete full backup of the 2 current sources in {month} " \
           "(UTC))." in out
    assert "Key check: the backup would write one right before its first upload (the bucket " \
           f"holds none for location {sandbox.location} yet" in out
    for mount in tree.mounts:
        assert f"Source (mount directory) {mount} -> " in out
        assert f"Mirror directory: {os.path.join(sandbox.mirror, mount.lstrip('/'))}" in out
    files, size = files_and_bytes(tree)
    assert f"Selected: {files:,} file(s), {aab.exact_bytes(size)} in 2 source(s)." in out
    first, second = tree.mounts
    assert section(out, "Exclusions") == "\n".join([
        "== Exclusions: what each one removed from the selection",
        f"line 6, {first}/Documents/private/: 1 directory, holding 1 file(s), "
        + sizes(tree, first, "Documents/private/secret-plan.txt"),
        f"    {first}/Documents/private",
        f"line 7, {first}/Music/: 1 directory, holding 1 file(s), "
        + sizes(tree, first, "Music/song.flac"),
        f"    {first}/Music (listed on line 3)",
        "line 8, -*/: 2 directories, holding 2 file(s), "
        + sizes(tree, first, "Documents/-audio/song.mp3", "Documents/sub/-video/clip.mp4"),
        f"    {first}/Documents/-audio",
        f"    {first}/Documents/sub/-video",
        "line 9, cache/: 2 directories, holding 2 file(s), "
        + sizes(tree, second, "cache/blob.bin", "docs/cache/inner.bin"),
        f"    {second}/cache",
        f"    {second}/docs/cache",
        "line 11, ~WRL*.tmp: 2 file(s), "
        + sizes(tree, first, "Documents/~WRL1234.tmp", "Documents/sub/~WRL9.tmp"),
        f"    {first}/Documents/sub/~WRL9.tmp",
        f"    {first}/Documents/~WRL1234.tmp",
        f"line 12, {first}/Documents/passwords.kdbx: 1 file(s), "
        + sizes(tree, first, "Documents/passwords.kdbx"),
        f"    {first}/Documents/passwords.kdbx", ""])
    assert f"stored in {month} (this month's listing): 0 volume(s), 0 B, and 0 STANDARD " \
           "object(s), 0 B: $0.00 a month" in out

    # The backup it previewed: every selected file archived, in no more bytes, volumes and
    # PUT requests than told.
    proxy.reset_counters()
    ok(sandbox.backup(env=sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url)))
    (stamp,) = {n.full for n in sandbox.object_names()}
    assert archived_files(sandbox, stamp) == files
    count, stored = volumes_in_bucket(sandbox)
    assert size < stored <= upload_bound(out)
    assert f"in at most {count} volume(s)" in out
    puts = [r for r in proxy.requests() if ".zip." in (r["key"] or "")]
    assert {r["kind"] for r in puts} == {"PutObject"}
    assert f"its upload: at most {len(puts)} PUT request(s)" in out
    again = ok(preview(sandbox)).stdout
    assert f"stored in {month} (this month's listing): {count} volume(s), " \
           f"{aab.exact_bytes(stored)}, and 4 STANDARD object(s)" in again


def test_after_a_backup_the_incremental_is_counted_exactly(sandbox, proxy):
    tree = sandbox.sample()
    first, second = tree.mounts
    ok(sandbox.backup())
    (full,) = {n.full for n in sandbox.object_names()}
    file_times_pass()
    write_file(os.path.join(first, "Documents", "report.txt"), b"rewritten tonight\n")
    write_file(os.path.join(first, "Documents", "sub", "deep", "new.txt"), b"new " * 1000)
    write_file(os.path.join(second, "docs", "readme.md"), b"second source, changed\n")
    write_file(os.path.join(first, "Documents", "~WRL5.tmp"), b"excluded, changed or not")
    os.remove(os.path.join(first, "Documents", "notes with space.md"))
    changed = len(b"rewritten tonight\n") + 4000 + len(b"second source, changed\n")
    before = everything(sandbox)
    proxy.reset_counters()

    out = ok(preview(sandbox, proxy)).stdout
    assert everything(sandbox) == before
    assert s3_requests(proxy) == ["LIST", "LIST"]
    assert (f"Backup scope: incremental, based on the full backup {aab.describe_stamp(full)}; "
            f"files changed since {aab.describe_stamp(full)}.") in out
    assert f"Change detection: compared with the local catalogue of the backup " \
           f"{aab.describe_stamp(full)}" in out
    assert "An incremental backup would archive 2 file(s), 4.0 KB (4,018 bytes); 1 path(s) " \
           "gone since the local catalogue." in section(out, f"Source 1 of 2: {first}")
    assert "An incremental backup would archive 1 file(s), 23 B; 0 path(s) gone since the " \
           "local catalogue." in section(out, f"Source 2 of 2: {second}")
    assert f"An incremental backup would archive 3 file(s), {aab.exact_bytes(changed)}." in out
    assert "line 11, ~WRL*.tmp: 3 file(s)" in out

    ok(sandbox.backup())
    incremental = max(n.incremental for n in sandbox.object_names() if n.incremental)
    assert archived_files(sandbox, incremental) == 3
    assert volumes_in_bucket(sandbox, incremental)[1] <= upload_bound(out)


def test_an_unchanged_source_uploads_no_volume(sandbox, proxy):
    sandbox.single_source({"a.txt": b"a", "b/c.txt": b"c"})
    ok(sandbox.backup())
    proxy.reset_counters()
    out = ok(preview(sandbox, proxy)).stdout
    assert "An incremental backup would archive 0 file(s), 0 B; 0 path(s) gone" in out
    assert "Upload: at most 0 B in at most 0 volume(s)" in out
    assert "No file changed: the backup would upload no volume" in out
    assert s3_requests(proxy) == ["LIST", "LIST"]


def test_exclusions_are_counted_by_line_with_a_few_examples(sandbox, proxy):
    files = {f"logs/{n}.tmp": b"x" * n for n in range(1, 6)}
    files.update({"keep.txt": b"kept", "build/out.o": b"o" * 10, "src/build/x.o": b"oo",
                  "src/main.c": b"int main;", "notes.bak": b"bak"})
    mount = sandbox.single_source(files)
    sandbox.write_instructions("\n".join([
        f"{mount}/", "", "build/", f"{mount}/nothing-here/", "", "*.tmp", "*.t?p",
        "*.exe", f"{mount}/notes.bak"]) + "\n")
    before = everything(sandbox)
    # A local backup alone: no S3 part, and not one request.
    result = preview(sandbox, proxy, {"destinations": "local"})
    out = ok(result).stdout
    assert everything(sandbox) == before and s3_requests(proxy) == []
    assert section(out, "Exclusions") == "\n".join([
        "== Exclusions: what each one removed from the selection",
        "line 3, build/: 2 directories, holding 2 file(s), 12 B",
        f"    {mount}/build",
        f"    {mount}/src/build",
        f"line 4, {mount}/nothing-here/: nothing (it does not exist)",
        "line 6, *.tmp: 5 file(s), 15 B",
        f"    {mount}/logs/1.tmp",
        f"    {mount}/logs/2.tmp",
        f"    {mount}/logs/3.tmp",
        "    ... and 2 more",
        "line 7, *.t?p: nothing",           # what it matches, line 6 took first
        "line 8, *.exe: nothing",
        f"line 9, {mount}/notes.bak: 1 file(s), 3 B",
        f"    {mount}/notes.bak", ""])
    assert "Selected: 2 file(s), 13 B in 1 source(s)." in out
    assert "Upload" not in out and "s3://" not in out


def test_a_missing_instruction_file_is_exit_3_and_touches_nothing(sandbox, proxy):
    sandbox.single_source({"a.txt": b"a"})
    os.remove(sandbox.instructions)
    before = everything(sandbox)
    result = preview(sandbox, proxy)
    assert result.returncode == aab.EXIT_INSTRUCTIONS == 3, result.stdout + result.stderr
    assert f"the instruction file {sandbox.instructions} does not exist" in result.stderr
    assert everything(sandbox) == before and s3_requests(proxy) == []


def test_wrong_arguments_are_refused_as_a_backup_refuses_them(sandbox):
    sandbox.single_source({"a.txt": b"a"})
    result = sandbox.run(sandbox.backup_args(PREVIEW, {"destinations": "AWS|tape"}))
    assert result.returncode == aab.EXIT_USAGE, result.stdout + result.stderr
    assert "argument 13 (destination types (local, AWS, local|AWS))" in result.stderr
    assert "preview-backup" in result.stderr
    named = sandbox.run([PREVIEW, "--instruction-file", sandbox.instructions,
                         "--destinations", "local", "--mirror-root", sandbox.mirror,
                         "--log-dir", sandbox.logs, "--location", sandbox.location],
                        env=sandbox.env())
    assert "Selected: 1 file(s), 1 B in 1 source(s)." in ok(named).stdout
    assert "Named form: default" in ok(sandbox.run([PREVIEW, "--help"])).stdout


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_s3_is_said_and_the_local_part_still_shown(sandbox):
    tree = sandbox.sample()
    before = everything(sandbox)
    result = preview(sandbox, env=sandbox.env(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}"))
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    out = result.stdout
    assert "AWS S3 cannot be queried (" in out
    assert "Not told without the listing: whether the backup would be full or incremental" \
        in out
    files, size = files_and_bytes(tree)
    assert f"Selected: {files:,} file(s), {aab.format_bytes(size)} ({size:,} bytes)" in out
    assert "line 8, -*/: 2 directories" in out
    assert upload_bound(out) > size and "this month's listing" not in out
    assert everything(sandbox) == before


def test_keys_that_cannot_list_are_named(sandbox, proxy, aws):
    sandbox.single_source({"a.txt": b"a"})
    key_id, secret = aws.create_user_with_policy(f"put-only-{sandbox.location}", {
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{sandbox.bucket}/*"}]})
    aws.enable_iam_enforcement()
    try:
        result = preview(sandbox, proxy, {"access_key_id": key_id,
                                          "secret_access_key": secret})
    finally:
        aws.disable_iam_enforcement()
    assert result.returncode == aab.EXIT_FAILURE, result.stdout + result.stderr
    assert "AWS refused ListObjectsV2 (access denied): the credentials of arguments 19 and " \
           "20 lack the permission s3:ListBucket" in result.stdout
    assert "Selected: 1 file(s)" in result.stdout
    assert set(s3_requests(proxy)) == {"LIST"}


def test_a_wrong_key_is_exit_9_with_the_key_checks_message(sandbox, proxy):
    sandbox.single_source({"a.txt": b"a"})
    ok(sandbox.backup())
    (check,) = sandbox.keychecks()
    proxy.reset_counters()
    result = preview(sandbox, proxy, {"key": "Not the key of this chain at all"})
    assert result.returncode == aab.EXIT_WRONG_KEY == 9, result.stdout + result.stderr
    assert f"does not match the key check s3://{sandbox.bucket}/{check.key}" in result.stdout
    assert "Upload: nothing (the archive key is refused, see above)." in result.stdout
    assert s3_requests(proxy) == ["LIST", "LIST"]


def test_no_secret_reaches_the_terminal(sandbox):
    sandbox.single_source({"a.txt": b"a"})
    key = "A key nobody may see 123"
    result = ok(preview(sandbox, changes={"key": key}))
    for secret in (key, SECRET, ACCESS_KEY_ID):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("level, how", [
    ("0", "stored as they are (compression level 0, AAM_COMPRESSION_LEVEL)"),
    ("5", "compression level 5 (AAM_COMPRESSION_LEVEL) makes it smaller")])
def test_the_upload_says_how_the_compression_level_bears_on_it(sandbox, level, how):
    sandbox.single_source({"a.txt": b"a" * 1000})
    out = ok(sandbox.run(sandbox.backup_args(PREVIEW),
                         env=sandbox.env(AAM_COMPRESSION_LEVEL=level))).stdout
    assert how in out


# -- a pending backup (its journal): continued or given up, as the backup decides --------

def journal_file(sandbox):
    """The pending backup's journal: its bytes and times, and whether SQLite left a
    rollback journal beside it (a write would)."""
    path = aab.journal_path(sandbox.state_dir, sandbox.bucket, sandbox.location)
    st = os.stat(path)
    with open(path, "rb") as handle:
        return handle.read(), st.st_mtime_ns, os.path.exists(path + "-journal")


def volume_bytes(sandbox, keys):
    sizes = {o["Key"]: o["Size"] for o in sandbox.objects()}
    return sum(sizes[key] for key in keys)


def test_a_pending_backup_is_previewed_as_the_next_run_continues_it(sandbox, proxy):
    """A backup killed after its second piece leaves a journal.  The preview says that the
    next run continues it, with the pieces it keeps, and counts only what they do not hold;
    it reads the journal without changing it and only lists the bucket.  The next run then
    continues as told, in no more bytes and volumes."""
    pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    (stamp,) = {aab.ObjectName.parse(key).full for key in volume_puts(proxy)}
    kept = [key for key in volume_puts(proxy) if aab.ObjectName.parse(key).piece in (1, 2)]
    journal, before = journal_file(sandbox), everything(sandbox)
    proxy.reset_counters()

    out = ok(sandbox.run(sandbox.backup_args(PREVIEW), env=env)).stdout
    assert journal_file(sandbox) == journal and not journal[2]
    assert everything(sandbox) == before
    assert s3_requests(proxy) == ["LIST", "LIST"]            # no PUT, nothing but LIST
    assert (f"Pending: a backup would continue the pending full backup "
            f"{aab.describe_stamp(stamp)}: 2 piece(s) "
            f"({aab.format_bytes(volume_bytes(sandbox, kept))}) already in S3, 0 source(s) "
            "done; it would archive only what no kept piece holds.") in out
    # pieces 1 and 2 hold the empty directory and file00..file03: the rest is archived
    rest = 6 * SIZE + len(b"small notes\n")
    assert (f"The continued backup would archive 7 file(s), {aab.exact_bytes(rest)}; 4 "
            "file(s) are in its kept pieces.") in out
    assert "are in S3 already: not counted here" in out

    proxy.reset_counters()
    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert (f"Backup scope: continuing the full backup {aab.describe_stamp(stamp)}"
            in result.stdout and "2 piece(s)" in result.stdout)
    sent = volume_puts(proxy)
    assert sent and not set(sent) & set(kept)
    assert rest < volume_bytes(sandbox, sent) <= upload_bound(out)
    told = int(re.search(r"in at most (\d+) volume\(s\)", out)[1])
    assert len(sent) <= told
    assert not os.path.exists(aab.journal_path(sandbox.state_dir, sandbox.bucket,
                                               sandbox.location))


def test_a_pending_incremental_a_forced_full_gives_up_is_previewed_so(sandbox, proxy):
    """Argument 21 asks for a full backup while an incremental is pending: the preview says
    the backup gives it up and why, names its volumes as unused, and decides the full
    backup; the journal stays as it was until the real run gives it up so."""
    _mount, env = pending_incremental(sandbox, proxy)
    (pending,) = {aab.ObjectName.parse(key).incremental for key in volume_puts(proxy)
                  if aab.ObjectName.parse(key).incremental}
    journal, before = journal_file(sandbox), everything(sandbox)
    proxy.reset_counters()

    forced = {"force_full": "yes"}
    out = ok(sandbox.run(sandbox.backup_args(PREVIEW, forced), env=env)).stdout
    assert journal_file(sandbox) == journal and everything(sandbox) == before
    assert set(s3_requests(proxy)) == {"LIST"}
    assert (f"Pending: a backup would give up the pending incremental backup "
            f"{aab.describe_stamp(pending)}: argument 21 asks for a full backup, and it is "
            "an incremental.") in out
    assert "Backup scope: full (forced by argument 21)" in out
    unused = [o for o in sandbox.objects() if (n := aab.ObjectName.parse(o["Key"]))
              and n.incremental == pending and n.volume is not None]
    assert unused and all(f"  {o['Key']} ({o['Size']:,} bytes)" in out for o in unused)

    result = ok(sandbox.run(sandbox.backup_args(changes=forced), env=env))
    assert "is not continued: argument 21 asks for a full backup, and it is an " \
           "incremental" in result.stdout
    assert "Backup scope: full (forced by argument 21)" in result.stdout


def test_a_piece_the_backup_would_not_keep_is_counted_again(sandbox, proxy):
    """A volume of the first kept piece has gone from the bucket: the backup forgets that
    piece and archives its files again; so does the preview, without dropping it from the
    journal, and the next run keeps one piece as told."""
    pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    (lost,) = [key for key in volume_puts(proxy) if aab.ObjectName.parse(key).piece == 1
               and key.endswith(".zip.001")]
    sandbox.s3().delete_object(Bucket=sandbox.bucket, Key=lost)
    journal = journal_file(sandbox)

    out = ok(sandbox.run(sandbox.backup_args(PREVIEW), env=env)).stdout
    assert journal_file(sandbox) == journal
    assert f"{lost} is missing from the bucket; its files are archived again." in out
    assert "Pending: a backup would continue the pending full backup " in out
    assert " 1 piece(s) (" in out
    rest = 8 * SIZE + len(b"small notes\n")
    assert (f"The continued backup would archive 9 file(s), {aab.exact_bytes(rest)}; 2 "
            "file(s) are in its kept pieces.") in out

    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert f"{lost} is missing from the bucket" in result.stdout
    assert "1 piece(s)" in result.stdout


def cut_off_transaction(path):
    """A process killed (SIGKILL) while SQLite wrote the journal: the file holds part of a
    transaction, and its rollback journal is beside it, as after a power cut."""
    code = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1])\n"
        "db.execute('PRAGMA cache_size = 1')         # pages go to the file at once\n"
        "db.execute('BEGIN')\n"
        "db.execute(\"UPDATE piece SET state = 'failed'\")\n"
        "db.executemany('INSERT INTO orphan VALUES (?, 0)',\n"
        "               (('lost%06d' % n + 'x' * 400,) for n in range(5000)))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, path])
    assert killed.returncode == -signal.SIGKILL
    assert os.path.getsize(path + "-journal") > 0


def test_a_journal_cut_off_mid_transaction_is_read_as_the_backup_rolls_it_back(sandbox,
                                                                              proxy):
    """A read-only connection cannot roll back a transaction that a kill cut off; the
    preview reads a rolled-back copy, says what the backup will find after its own
    rollback, and leaves the journal and its rollback journal as they were."""
    pieced_source(sandbox)
    env = env_through(sandbox, proxy)
    crash_at(sandbox, env, "piece-done:2")
    path = aab.journal_path(sandbox.state_dir, sandbox.bucket, sandbox.location)
    cut_off_transaction(path)
    files = {name: open(os.path.join(sandbox.state_dir, name), "rb").read()
             for name in os.listdir(sandbox.state_dir)}
    temporary = os.path.join(sandbox.root, "tmp")     # the preview's own temporary dir
    os.mkdir(temporary)

    out = ok(sandbox.run(sandbox.backup_args(PREVIEW), env=dict(env, TMPDIR=temporary))).stdout
    assert {name: open(os.path.join(sandbox.state_dir, name), "rb").read()
            for name in os.listdir(sandbox.state_dir)} == files
    assert os.listdir(temporary) == []                               # the copy is gone
    assert "Pending: a backup would continue the pending full backup " in out
    assert " 2 piece(s) (" in out and "4 file(s) are in its kept pieces" in out

    result = ok(sandbox.run(sandbox.backup_args(), env=env))
    assert "Backup scope: continuing the full backup" in result.stdout
    assert "2 piece(s)" in result.stdout


def test_a_damaged_journal_is_left_as_it_is_and_the_backup_removes_it(sandbox, proxy):
    sandbox.single_source({"a.txt": b"a"})
    path = aab.journal_path(sandbox.state_dir, sandbox.bucket, sandbox.location)
    os.makedirs(sandbox.state_dir, exist_ok=True)
    write_file(path, b"not an SQLite file, whatever wrote it")
    out = ok(preview(sandbox, proxy)).stdout
    assert f"Warning: the journal {path} cannot be read (" in out
    assert "a backup could not continue the backup it records; it would remove the " \
           "journal" in out
    assert "Backup scope: full (no complete full backup" in out
    assert open(path, "rb").read() == b"not an SQLite file, whatever wrote it"
    result = ok(sandbox.backup())
    assert f"Warning: the journal {path} cannot be read (" in result.stdout
    assert "the journal is removed" in result.stdout
    assert not os.path.exists(path)
