"""The manual's example command lines run, so that they cannot drift from the program.

A fenced code block right after a marker line is an example:

    <!-- example: file PATH -->              the block is a settings file: written to PATH
    <!-- example: run -->                    each command must exit 0
    <!-- example: run with --dry-run -->     the same, with --dry-run added (a scheduler)
    <!-- example: run as administrator -->   tools/aws_setup.py, against an endpoint of its own
                                             with IAM enforced, with an administrator's keys

Each page's examples run in their order, against the local endpoint, after one backup of the
sample tree (so a page of restore examples has something to restore).  The example values
(paths, the bucket, the location, the addresses, the date) stand for the test's own; SUBSTITUTES
says which for which.  A command is `python3`/`.venv/bin/python` + a script of the checkout.
"""

import datetime as dt
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ACCESS_KEY_ID, KEY, PROGRAM, REPO, SECRET, SENDER, ok, write_file
from local_aws import LocalAws

PAGES = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs",
                                                                          "*.md")))
MARKER = re.compile(r"^\s*<!-- example: (file (?P<path>\S+)|run(?P<how>.*)) -->\s*$")
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def examples(path):
    """[(kind, detail, text)] of a page's marked code blocks, in order."""
    lines = open(path, encoding="utf-8").read().splitlines()
    found, index = [], 0
    while index < len(lines):
        match = MARKER.match(lines[index])
        index += 1
        if not match:
            continue
        fence = lines[index]
        assert fence.lstrip().startswith("```"), f"{path}: no code block after {match[0]}"
        indent = len(fence) - len(fence.lstrip())
        body = []
        index += 1
        while not lines[index].lstrip().startswith("```"):
            body.append(lines[index][indent:])
            index += 1
        kind = "file" if match["path"] else "run"
        found.append((kind, match["path"] or match["how"].strip(), "\n".join(body) + "\n"))
    return found


def commands(text):
    """The commands of a shell block: continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in text.replace("\\\n", " ").splitlines()
            if shlex.split(line, comments=True)]


class Page:
    """One page's examples, run in a sandbox."""

    def __init__(self, sandbox, tmp_path):
        self.sandbox, self.tmp = sandbox, tmp_path
        self.home = tmp_path / "home"
        (self.home / "aam").mkdir(parents=True)
        self.tree = sandbox.sample()
        mount = self.tree.first_mount
        today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        # the documented value -> the test's; longer ones first where one holds another
        self.substitutes = [
            ("~/aam-keys.env", str(self.home / "aam-keys.env")),
            ("~/aam-logs", sandbox.logs), ("~/", str(self.home) + "/"),
            ("/var/log/aam", sandbox.logs),
            ("/home/ann/backup-instructions.txt", sandbox.instructions),
            ("/home/ann/Documents/taxes/", os.path.join(mount, "Documents", "sub") + "/"),
            ("/home/ann/Documents/report.docx", os.path.join(mount, "Documents",
                                                            "report.txt")),
            ("/media/usb/", str(tmp_path / "usb") + "/"),
            ("aam-data-backup", sandbox.bucket), ("main-work-computer", sandbox.location),
            ("my-laptop", sandbox.location), ("backup@example.com", SENDER),
            ("me@example.com", sandbox.recipient), ("2026-11-15", today),
            ("/usr/bin/python3", sys.executable),
        ]
        self.env = sandbox.env(
            AAM_ENCRYPTION_KEY=KEY, AAM_BACKUP_ACCESS_KEY_ID=ACCESS_KEY_ID,
            AAM_BACKUP_SECRET_ACCESS_KEY=SECRET, AAM_RESTORE_ACCESS_KEY_ID=ACCESS_KEY_ID,
            AAM_RESTORE_SECRET_ACCESS_KEY=SECRET, AAM_RESTORE_POLL_SECONDS="1")
        ok(sandbox.backup({"send_email": "False"}))

    def substitute(self, text):
        for documented, ours in self.substitutes:
            text = text.replace(documented, ours)
        return text

    def argv(self, words):
        if words[0] in ("python3", ".venv/bin/python", "python"):
            words = words[1:]
        assert words[0].endswith(".py"), words
        script = PROGRAM if words[0] == "aam_auto_backup.py" else os.path.join(REPO, words[0])
        assert os.path.isfile(script), words[0]
        return [sys.executable, script] + words[1:]

    def run(self, how, text, aws):
        env = self.env
        if how == "as administrator":
            env = self.administrator_env(aws)
        elif not (self.home / "aam-keys.env").exists():
            # the keys file tools/aws_setup.py writes, for a page that does not make it
            (self.home / "aam-keys.env").write_text(
                f"AWS_REGION=us-east-1\nAAM_BACKUP_ACCESS_KEY_ID={ACCESS_KEY_ID}\n"
                f"AAM_BACKUP_SECRET_ACCESS_KEY={SECRET}\n")
        for words in commands(self.substitute(text)):
            argv = self.argv(words) + (["--dry-run"] if how == "with --dry-run" else [])
            result = subprocess.run(argv, env=env, capture_output=True, text=True,
                                    timeout=300, input="")
            assert result.returncode == 0, (shlex.join(words), result.stdout + result.stderr)
            if how == "with --dry-run":
                assert "Dry run: nothing is written" in result.stdout

    def administrator_env(self, aws):
        """tools/aws_setup.py on an endpoint of its own (its user names are fixed), with an
        administrator's keys and IAM enforced, as in an AWS account."""
        if not aws:
            aws.append(LocalAws().start())
            aws.append(aws[0].create_user_with_policy("admin", ADMIN_POLICY))
            aws[0].enable_iam_enforcement()
        server, admin = aws
        env = {k: v for k, v in self.env.items() if not k.startswith(("AWS_", "AAM_"))}
        return dict(env, AWS_ENDPOINT_URL=server.endpoint_url, AWS_ACCESS_KEY_ID=admin[0],
                    AWS_SECRET_ACCESS_KEY=admin[1], AWS_CONFIG_FILE=os.devnull,
                    AWS_SHARED_CREDENTIALS_FILE=os.devnull)


@pytest.mark.parametrize("path", [p for p in PAGES if examples(p)],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_the_examples_of_the_page_run(sandbox, tmp_path, path):
    page = Page(sandbox, tmp_path)
    own_aws = []
    try:
        for kind, detail, text in examples(path):
            if kind == "file":
                write_file(page.substitute(detail), page.substitute(text).encode())
            else:
                page.run(detail, text, own_aws)
    finally:
        if own_aws:
            own_aws[0].stop()


def test_the_readme_and_reference_examples_cover_both_forms_of_every_kind():
    """What the manual shows first runs: a settings file, a named and a positional backup,
    restore and browse."""
    shown = {os.path.basename(p): "".join(text for _kind, _detail, text in examples(p))
             for p in PAGES}
    assert "regular-backup --settings" in shown["README.md"]
    assert "regular-backup user " in shown["README.md"]
    assert "one-step-aws-data-restoration \\\n  --settings" in shown["README.md"]
    assert "browse-aws-backups --key" in shown["reference.md"]
    assert "--restore-point 2026-11-15 --selection" in shown["README.md"]
    readme = open(PAGES[0], encoding="utf-8").read()
    daily_use = readme[readme.index("## Daily use"):readme.index("## Restore")]
    assert daily_use.index("--settings") < daily_use.index("regular-backup user ")
