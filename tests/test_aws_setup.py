"""tools/aws_setup.py against the moto server over HTTP, with IAM enforced.

The tool runs as a subprocess with an administrator's keys, as a user would run
it; what it made is then looked at, and used, with the keys it printed.
"""

import json
import os
import re
import stat
import subprocess
import sys
import uuid

import pytest
from botocore.exceptions import ClientError

from conftest import REPO

from aws_setup import (DENY_REPLACING_SID, USER_POLICY_NAME, backup_user_policy,
                       bucket_policy, deny_replacing_statement, restore_user_policy)

TOOL = os.path.join(REPO, "tools", "aws_setup.py")
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


class Account:
    """One test's names, the administrator's keys, and the tool's command line."""

    def __init__(self, aws, tmp_path):
        suffix = uuid.uuid4().hex[:8]
        self.aws = aws
        self.bucket = f"aam-setup-{suffix}"
        self.backup_user, self.restore_user = f"backup-{suffix}", f"restore-{suffix}"
        self.sender, self.recipient = f"s-{suffix}@example.com", f"r-{suffix}@example.com"
        self.keys_file = str(tmp_path / "aam-keys.env")
        self.admin = aws.create_user_with_policy(f"admin-{suffix}", ADMIN_POLICY)

    def run(self, *extra):
        argv = [sys.executable, TOOL, "--region", "us-east-1", "--bucket", self.bucket,
                "--sender", self.sender, "--recipient", self.recipient,
                "--backup-user", self.backup_user, "--restore-user", self.restore_user,
                "--keys-file", self.keys_file, *extra]
        return subprocess.run(argv, env=self.aws.env(*self.admin), capture_output=True,
                              text=True, timeout=120)

    def client(self, service, keys=None):
        return self.aws.client(service, *(keys or self.admin))

    def keys(self):
        values = dict(line.split("=", 1) for line in open(self.keys_file).read().splitlines()
                      if "=" in line and not line.startswith("#"))
        return {"backup": (values["AAM_BACKUP_ACCESS_KEY_ID"],
                           values["AAM_BACKUP_SECRET_ACCESS_KEY"]),
                "restore": (values["AAM_RESTORE_ACCESS_KEY_ID"],
                            values["AAM_RESTORE_SECRET_ACCESS_KEY"])}


@pytest.fixture
def account(aws, tmp_path):
    made = Account(aws, tmp_path)
    aws.enable_iam_enforcement()
    try:
        yield made
    finally:
        aws.disable_iam_enforcement()


@pytest.fixture
def set_up(account):
    first = account.run()
    assert first.returncode == 0, first.stdout + first.stderr
    return account, first


def http_status(excinfo):
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_it_creates_everything(set_up):
    account, first = set_up
    s3, iam = account.client("s3"), account.client("iam")
    assert "made     bucket" in first.stdout
    assert all(s3.get_public_access_block(Bucket=account.bucket)[
        "PublicAccessBlockConfiguration"].values())
    rules = s3.get_bucket_lifecycle_configuration(Bucket=account.bucket)["Rules"]
    assert [r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for r in rules] == [7]
    assert not any("Expiration" in r for r in rules)          # only on request
    policy = json.loads(s3.get_bucket_policy(Bucket=account.bucket)["Policy"])
    assert policy["Statement"] == [deny_replacing_statement(account.bucket)]
    for user, wanted in ((account.backup_user, backup_user_policy(account.bucket)),
                         (account.restore_user, restore_user_policy(account.bucket))):
        assert iam.get_user_policy(UserName=user, PolicyName=USER_POLICY_NAME)[
            "PolicyDocument"] == wanted
        assert len(iam.list_access_keys(UserName=user)["AccessKeyMetadata"]) == 1
    assert stat.S_IMODE(os.stat(account.keys_file).st_mode) == 0o600
    secrets = [secret for _key_id, secret in account.keys().values()]
    assert not any(secret in first.stdout + first.stderr for secret in secrets)
    verified = account.client("ses").get_identity_verification_attributes(
        Identities=[account.sender, account.recipient])["VerificationAttributes"]
    assert sorted(verified) == sorted([account.sender, account.recipient])


def test_a_second_run_changes_nothing_and_says_so(set_up):
    account, _first = set_up
    keys_before = open(account.keys_file).read()
    policy_before = account.client("s3").get_bucket_policy(Bucket=account.bucket)["Policy"]
    second = account.run()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Nothing changed: everything was already in place." in second.stdout
    assert "made " not in second.stdout
    assert open(account.keys_file).read() == keys_before
    assert account.client("s3").get_bucket_policy(Bucket=account.bucket)["Policy"] == \
        policy_before
    for user in (account.backup_user, account.restore_user):
        assert len(account.client("iam").list_access_keys(UserName=user)[
            "AccessKeyMetadata"]) == 1


def test_check_passes_and_proves_each_permission_with_real_calls(set_up):
    account, _first = set_up
    check = account.run("--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Check passed" in check.stdout
    replace = "backup keys cannot replace an object"
    for proof in ("backup keys can put a new object", "backup keys can list",
                  "backup keys cannot read (HTTP 403", "backup keys cannot delete (HTTP 403",
                  f"{replace} (If-None-Match: *) (HTTP 412", f"{replace} (plain PutObject) "
                  "(HTTP 403", f"{replace} (multipart upload) (HTTP 403",
                  "restore keys can list", "restore keys can read",
                  "restore keys can restore from Deep Archive",
                  "restore keys cannot write (HTTP 403", "restore keys cannot delete (HTTP 403"):
        assert f"ok       {proof}" in check.stdout
    leftovers = account.client("s3").list_objects_v2(Bucket=account.bucket)
    assert leftovers["KeyCount"] == 0                        # the probes are deleted


def test_check_names_a_removed_bucket_policy(set_up):
    account, _first = set_up
    account.client("s3").delete_bucket_policy(Bucket=account.bucket)
    check = account.run("--check")
    assert check.returncode == 1, check.stdout
    assert ("PROBLEM  bucket policy statement denying writes without If-None-Match: *: "
            f"missing (no statement {DENY_REPLACING_SID})") in check.stdout
    assert ("PROBLEM  backup keys cannot replace an object (plain PutObject): it worked"
            in check.stdout)
    assert ("PROBLEM  backup keys cannot replace an object (multipart upload): it worked"
            in check.stdout)
    with pytest.raises(ClientError):                           # --check changed nothing
        account.client("s3").get_bucket_policy(Bucket=account.bucket)


def test_check_names_a_widened_user_policy(set_up):
    account, _first = set_up
    widened = backup_user_policy(account.bucket)
    widened["Statement"][0]["Action"] += ["s3:GetObject", "s3:DeleteObject"]
    account.client("iam").put_user_policy(UserName=account.backup_user,
                                          PolicyName=USER_POLICY_NAME,
                                          PolicyDocument=json.dumps(widened))
    check = account.run("--check")
    assert check.returncode == 1, check.stdout
    objects = f"arn:aws:s3:::{account.bucket}/*"
    assert (f"PROBLEM  IAM user {account.backup_user}: policy {USER_POLICY_NAME} exactly "
            f"as in docs/aws-setup.md: beyond docs/aws-setup.md: Allow s3:DeleteObject on "
            f"{objects}; beyond docs/aws-setup.md: Allow s3:GetObject on {objects}\n") \
        in check.stdout
    assert "PROBLEM  backup keys cannot read: it worked" in check.stdout
    assert "PROBLEM  backup keys cannot delete: it worked" in check.stdout


def test_check_names_a_policy_attached_besides_the_documented_one(set_up):
    account, _first = set_up
    iam = account.client("iam")
    arn = iam.create_policy(PolicyName=f"extra-{account.bucket}",
                            PolicyDocument=json.dumps(ADMIN_POLICY))["Policy"]["Arn"]
    iam.attach_user_policy(UserName=account.restore_user, PolicyArn=arn)
    check = account.run("--check")
    assert check.returncode == 1, check.stdout
    assert re.search(rf"PROBLEM  IAM user {account.restore_user} has more than its policy "
                     rf"in docs/aws-setup\.md: attached policy extra-{account.bucket}",
                     check.stdout)
    assert "PROBLEM  restore keys cannot write: it worked" in check.stdout


def test_the_backup_keys_it_made_cannot_read_or_delete(set_up):
    account, _first = set_up
    keys = account.keys()
    backup = account.client("s3", keys["backup"])
    backup.put_object(Bucket=account.bucket, Key="v.zip.001", Body=b"volume",
                      IfNoneMatch="*")
    for call in (lambda: backup.get_object(Bucket=account.bucket, Key="v.zip.001"),
                 lambda: backup.delete_object(Bucket=account.bucket, Key="v.zip.001"),
                 lambda: backup.put_object(Bucket=account.bucket, Key="v.zip.001",
                                           Body=b"replaced")):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert http_status(excinfo) == 403
    restore = account.client("s3", keys["restore"])
    assert restore.get_object(Bucket=account.bucket, Key="v.zip.001")["Body"].read() == \
        b"volume"


def test_check_without_keys_says_what_was_not_proven(set_up):
    account, _first = set_up
    os.remove(account.keys_file)
    check = account.run("--check", "--keys-file", "")
    assert check.returncode == 1, check.stdout
    assert ("PROBLEM  the backup keys were not proven: give --keys-file or set "
            "AAM_BACKUP_ACCESS_KEY_ID and AAM_BACKUP_SECRET_ACCESS_KEY") in check.stdout


def test_expiry_is_made_only_on_request_and_never_below_181_days(account):
    refused = account.run("--expire-days", "180")
    assert refused.returncode == 2
    assert "must be at least 181" in refused.stderr
    with pytest.raises(ClientError):
        account.client("s3").head_bucket(Bucket=account.bucket)   # nothing was made
    made = account.run("--expire-days", "400")
    assert made.returncode == 0, made.stdout + made.stderr
    rules = account.client("s3").get_bucket_lifecycle_configuration(
        Bucket=account.bucket)["Rules"]
    assert sorted(r.get("Expiration", {}).get("Days", 0) for r in rules) == [0, 400]


def test_a_bucket_in_another_region_is_named(account):
    account.client("s3").create_bucket(
        Bucket=account.bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    result = account.run()
    assert result.returncode == 1, result.stdout
    assert (f"PROBLEM  bucket {account.bucket} is in eu-west-1, not in us-east-1: use "
            "--region eu-west-1") in result.stdout


def test_the_aws_setup_page_holds_exactly_the_policies_the_tool_makes():
    text = open(os.path.join(REPO, "docs", "aws-setup.md"), encoding="utf-8").read()
    documents = [json.loads(block) for block in
                 re.findall(r"```json\n(.*?)```", text, re.DOTALL)]
    page_bucket_policy = next(d for d in documents if "Principal" in d["Statement"][0])
    assert page_bucket_policy == bucket_policy("aam-data-backup")
    assert page_bucket_policy["Statement"][0]["Sid"] == DENY_REPLACING_SID
    assert backup_user_policy("aam-data-backup") in documents
    assert restore_user_policy("aam-data-backup") in documents


def test_check_names_the_action_a_policy_lost(set_up):
    account, _first = set_up
    narrowed = restore_user_policy(account.bucket)
    narrowed["Statement"][0]["Action"] = ["s3:GetObject"]           # RestoreObject removed
    account.client("iam").put_user_policy(UserName=account.restore_user,
                                          PolicyName=USER_POLICY_NAME,
                                          PolicyDocument=json.dumps(narrowed))
    policy = account.client("s3").get_bucket_policy(Bucket=account.bucket)["Policy"]
    document = json.loads(policy)
    document["Statement"][0]["Condition"].pop("Bool")
    account.client("s3").put_bucket_policy(Bucket=account.bucket, Policy=json.dumps(document))
    check = account.run("--check")
    assert check.returncode == 1, check.stdout
    assert (f"PROBLEM  IAM user {account.restore_user}: policy {USER_POLICY_NAME} exactly as "
            f"in docs/aws-setup.md: missing Allow s3:RestoreObject on "
            f"arn:aws:s3:::{account.bucket}/*\n") in check.stdout
    assert re.search(r"PROBLEM  bucket policy statement denying writes without "
                     r"If-None-Match: \*: missing Deny s3:PutObject on .* with condition .*"
                     r"ObjectCreationOperation.*; beyond docs/aws-setup\.md: Deny "
                     r"s3:PutObject on .* with condition", check.stdout)
    assert "PROBLEM  restore keys can restore from Deep Archive: refused" in check.stdout


def test_check_of_an_unverified_sender_says_nothing_was_requested(set_up):
    account, _first = set_up
    unverified = f"never-{account.sender}"
    check = account.run("--check", "--sender", unverified)
    assert check.returncode == 1, check.stdout
    assert (f"PROBLEM  SES sender {unverified}: not verified in us-east-1 (never requested): "
            "run this without --check to request it") in check.stdout
    assert "requested in" not in check.stdout
    attributes = account.client("ses").get_identity_verification_attributes(
        Identities=[unverified])["VerificationAttributes"]
    assert attributes.get(unverified, {}).get("VerificationStatus") is None   # asked nothing


def test_check_with_only_the_restore_keys_proves_them_without_false_problems(set_up):
    account, _first = set_up
    lines = open(account.keys_file).read().splitlines()
    with open(account.keys_file, "w") as handle:
        handle.write("\n".join(l for l in lines if "BACKUP" not in l) + "\n")
    check = account.run("--check")
    assert check.returncode == 1, check.stdout
    problems = [line for line in check.stdout.splitlines() if "PROBLEM" in line]
    assert problems == ["  PROBLEM  the backup keys were not proven: give --keys-file or set "
                        "AAM_BACKUP_ACCESS_KEY_ID and AAM_BACKUP_SECRET_ACCESS_KEY"]
    for proof in ("restore keys can list", "restore keys can read",
                  "restore keys can restore from Deep Archive"):
        assert f"ok       {proof}" in check.stdout
    assert account.client("s3").list_objects_v2(Bucket=account.bucket)["KeyCount"] == 0


def test_the_keys_file_holds_the_region_and_check_compares_it(set_up):
    account, first = set_up
    text = open(account.keys_file).read()
    assert "\nAWS_REGION=us-east-1\n" in text
    assert "AWS_REGION=us-east-1" in first.stdout
    with open(account.keys_file, "w") as handle:
        handle.write(text.replace("AWS_REGION=us-east-1", "AWS_REGION=eu-west-1"))
    check = account.run("--check")
    assert check.returncode == 1
    assert (f"PROBLEM  {account.keys_file} says AWS_REGION=eu-west-1, not us-east-1: the "
            "program would use another region") in check.stdout
