"""Two directories that would share one S3 name stop the run; a short archive key is
warned about and never shown.  The CLI as a subprocess, the moto server over HTTP."""

import os
import shutil
import uuid

import pytest

from conftest import SECRET


@pytest.fixture
def colliding_directories():
    """/aam-test-…-x/b-c and /aam-test-…-x-b/c: both map to the S3 name -aam-test-…-x-b-c.

    They must share nothing but '/' to be two mount directories, so they are made at
    the top of the filesystem, which needs root (CI runs the suite as root).
    """
    if os.geteuid() != 0:
        pytest.skip("making two top-level directories needs root (CI runs as root)")
    stem = f"/aam-test-{uuid.uuid4().hex[:8]}-x"
    first, second = f"{stem}/b-c", f"{stem}-b/c"
    for directory in (first, second):
        os.makedirs(directory)
        with open(os.path.join(directory, "file.txt"), "w") as handle:
            handle.write(directory)
    try:
        yield first, second, stem.replace("/", "-") + "-b-c"
    finally:
        shutil.rmtree(stem)
        shutil.rmtree(stem + "-b")


def test_colliding_source_names_stop_before_any_upload(sandbox, proxy, colliding_directories):
    first, second, name = colliding_directories
    sandbox.write_instructions(f"{first}/\n{second}/\n")
    result = sandbox.backup(env=sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url))
    assert result.returncode == 3, result.stdout + result.stderr
    assert (f"The directories {first} and {second} would share the S3 name {name}, so a "
            "restore could not tell their backups apart; nothing was backed up. List one of "
            "them through its parent directory instead") in result.stdout
    s3_requests = {k for k in proxy.counters()["by_kind"] if not k.startswith("ses")}
    assert s3_requests == set()
    assert sandbox.objects() == [] and not os.path.exists(sandbox.mirror)
    assert sandbox.emails()[-1]["subject"].startswith("FAILURE, ")


def test_a_short_key_is_warned_about_and_never_shown(sandbox):
    sandbox.sample()
    short = "Sh0rt-key-42!"                                   # 13 characters
    result = sandbox.backup({"key": short})
    assert result.returncode == 0, result.stdout + result.stderr
    warning = "WARNING: the archive key (argument 16) is shorter than 20 characters."
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert warning in result.stdout and warning in log
    outputs = [result.stdout, result.stderr, log] + [m["subject"] + (m["body"] or "")
                                                     for m in sandbox.emails()]
    for secret in (short, SECRET):
        assert not any(secret in text for text in outputs)


def test_a_key_of_20_characters_gets_no_warning(sandbox):
    sandbox.sample()
    result = sandbox.backup({"send_email": "False", "key": "twenty-characters-ok"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING: the archive key" not in result.stdout
