#!/usr/bin/env python3
"""Create, or check, what AAM Auto Backup needs in AWS, in one region.

    python3 tools/aws_setup.py --region eu-west-1 --bucket aam-data-backup \\
        --sender backup@example.com --recipient me@example.com \\
        --keys-file ~/aam-keys.env [--expire-days 181]
    python3 tools/aws_setup.py --check --region eu-west-1 --bucket aam-data-backup \\
        --sender backup@example.com --recipient me@example.com --keys-file ~/aam-keys.env

Run it with an administrator's AWS credentials (boto3's usual sources:
AWS_PROFILE or --profile, ~/.aws, environment variables).  It creates what is
missing and leaves what is right alone, so a second run changes nothing:

- the bucket, with public access blocked and a lifecycle rule that aborts
  incomplete multipart uploads after 7 days (and, with --expire-days N,
  one that deletes objects after N days);
- the bucket policy that denies any write without `If-None-Match: *`, so no
  key can replace an existing object;
- the IAM users `aam-backup` and `aam-restore` with exactly the policies of
  docs/aws-setup.md, and an access key each; a new key's secret is shown once (AWS
  never shows it again), or written to the owner-only --keys-file;
- the SES sender verification and, while the account is in the SES sandbox,
  the recipient's.

--check changes nothing: it reports what is missing or different, then proves
with real calls that the backup keys can put and list but cannot read, delete or
replace an object, and that the restore keys can list, read and restore but
cannot write or delete.  The keys come from --keys-file or from the variables
AAM_BACKUP_ACCESS_KEY_ID, AAM_BACKUP_SECRET_ACCESS_KEY, AAM_RESTORE_ACCESS_KEY_ID
and AAM_RESTORE_SECRET_ACCESS_KEY.  Exit code 0: everything is in place (and,
with --check, proven); 1: something is not; 2: wrong arguments.
"""

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import uuid

import boto3
from botocore.exceptions import BotoCoreError, ClientError

BACKUP_USER = "aam-backup"
RESTORE_USER = "aam-restore"
USER_POLICY_NAME = "aam-auto-backup"
DENY_REPLACING_SID = "AamDenyWritesThatCouldReplaceAnObject"
ABORT_RULE_ID = "aam-abort-incomplete-multipart-uploads"
EXPIRE_RULE_ID = "aam-expire-old-backups"
ABORT_AFTER_DAYS = 7
DEEP_ARCHIVE_MINIMUM_DAYS = 180      # Deep Archive bills every object this long
SES_SANDBOX_QUOTA = 200              # messages a day: the SES sandbox's fixed quota
PROBE_PREFIX = "aam-setup-check-"    # no backup or restore reads objects named so
PROBE_BODY = b"AAM Auto Backup set-up check; deleted at once.\n"
KEY_VARIABLES = {
    "backup": ("AAM_BACKUP_ACCESS_KEY_ID", "AAM_BACKUP_SECRET_ACCESS_KEY"),
    "restore": ("AAM_RESTORE_ACCESS_KEY_ID", "AAM_RESTORE_SECRET_ACCESS_KEY"),
}


class SetupError(Exception):
    """Stops the run: something this tool cannot fix or work around."""


# ---------------------------------------------------------------- policies

def _user_policy(bucket, object_actions):
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": object_actions,
             "Resource": f"arn:aws:s3:::{bucket}/*"},
            {"Effect": "Allow", "Action": "s3:ListBucket",
             "Resource": f"arn:aws:s3:::{bucket}"},
            {"Effect": "Allow", "Action": ["ses:SendEmail", "ses:SendRawEmail"],
             "Resource": "*"},
        ],
    }


def backup_user_policy(bucket, allow_abort=True):
    """Write-only: add objects, list them, send the report; never read or delete.

    AbortMultipartUpload lets a failed upload clean up its parts; it cannot
    touch a finished object.
    """
    actions = ["s3:PutObject"] + (["s3:AbortMultipartUpload"] if allow_abort else [])
    return _user_policy(bucket, actions)


def restore_user_policy(bucket):
    """Read-only: list, thaw and download objects, send the report; never write or delete."""
    return _user_policy(bucket, ["s3:GetObject", "s3:RestoreObject"])


def deny_replacing_statement(bucket):
    """S3's conditional-write enforcement: a write that would replace an object is refused.

    Every object-creating request (PutObject, CompleteMultipartUpload,
    CopyObject) without If-None-Match is denied, for every key; with it, S3
    refuses a name that exists (412).  ObjectCreationOperation exempts the
    multipart steps that cannot carry the header (CreateMultipartUpload, UploadPart).
    """
    return {
        "Sid": DENY_REPLACING_SID,
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:PutObject",
        "Resource": f"arn:aws:s3:::{bucket}/*",
        "Condition": {"Null": {"s3:if-none-match": "true"},
                      "Bool": {"s3:ObjectCreationOperation": "true"}},
    }


def bucket_policy(bucket):
    return {"Version": "2012-10-17", "Statement": [deny_replacing_statement(bucket)]}


def canonical(document):
    """A policy document in one spelling ('s3:X' and ['s3:X'] mean the same), to compare."""
    if isinstance(document, list):
        return [canonical(item) for item in document]
    if not isinstance(document, dict):
        return document
    result = {}
    for key, value in document.items():
        if key.endswith(("Action", "Resource")):
            value = sorted([value] if isinstance(value, str) else value)
        result[key] = canonical(value)
    return result


def same_policy(first, second):
    return canonical(first) == canonical(second)


def _grants(document):
    """A policy as a set of (effect, action, resource, principal, condition) rows, one per
    action and resource, whichever statement or spelling holds them."""
    statements = document.get("Statement", []) if "Statement" in document else [document]
    statements = [statements] if isinstance(statements, dict) else statements
    rows = set()
    for statement in statements:
        actions = statement.get("Action", [])
        resources = statement.get("Resource", [])
        for action in [actions] if isinstance(actions, str) else actions:
            for resource in [resources] if isinstance(resources, str) else resources:
                rows.add((statement.get("Effect"), action, resource,
                          json.dumps(statement.get("Principal"), sort_keys=True),
                          json.dumps(canonical(statement.get("Condition")), sort_keys=True)))
    return rows


def policy_differences(current, wanted):
    """What the current policy lacks and what it has beyond the wanted one, by action and
    resource (e.g. 'missing Allow s3:PutObject on arn:aws:s3:::b/*')."""
    def describe(row):
        effect, action, resource, _principal, condition = row
        when = "" if condition == "null" else f" with condition {condition}"
        return f"{effect} {action} on {resource}{when}"
    have, want = _grants(current), _grants(wanted)
    return ([f"missing {describe(row)}" for row in sorted(want - have, key=str)]
            + [f"beyond docs/aws-setup.md: {describe(row)}"
               for row in sorted(have - want, key=str)])


# ---------------------------------------------------------------- report

class Report:
    """What the run found and did, printed as it goes."""

    def __init__(self):
        self.changes, self.problems, self.to_do = [], [], []

    def ok(self, text):
        print(f"  ok       {text}")

    def changed(self, text):
        self.changes.append(text)
        print(f"  made     {text}")

    def problem(self, text):
        self.problems.append(text)
        print(f"  PROBLEM  {text}")

    def later(self, text):
        self.to_do.append(text)
        print(f"  to do    {text}")


def http_status(problem):
    return problem.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def error_code(problem):
    return problem.response.get("Error", {}).get("Code", "")


def unless_missing(call, missing_code, default):
    """call()'s answer, or default when AWS answers that the thing does not exist."""
    try:
        return call()
    except ClientError as problem:
        if error_code(problem) != missing_code:
            raise
        return default


# ---------------------------------------------------------------- set-up steps

class Setup:
    """One run: creates (or, with --check, only inspects) each piece in turn."""

    def __init__(self, options, session):
        self.options, self.check = options, options.check
        self.s3 = session.client("s3", region_name=options.region)
        self.iam = session.client("iam", region_name=options.region)
        self.ses = session.client("ses", region_name=options.region)
        self.report = Report()
        self.new_keys = {}               # "backup"/"restore" -> (key id, secret)

    def fix(self, what, apply, difference="missing"):
        """A missing or different piece: a problem with --check (saying what is missing
        or different), otherwise made now."""
        if self.check:
            self.report.problem(f"{what}: {difference}")
            return False
        apply()
        self.report.changed(what)
        return True

    # -- the bucket
    def bucket(self):
        """Exists (or was made) in the chosen region: True; otherwise False."""
        name, region = self.options.bucket, self.options.region
        try:
            self.s3.head_bucket(Bucket=name)
        except ClientError as problem:
            if http_status(problem) != 404:
                raise SetupError(f"bucket {name}: HTTP {http_status(problem)}; it belongs "
                                 "to another account, or these credentials may not see it")
            return self.fix(f"bucket {name} in {region}", self.create_bucket)
        where = self.s3.get_bucket_location(Bucket=name).get("LocationConstraint")
        where = where or "us-east-1"
        if where != region:
            self.report.problem(f"bucket {name} is in {where}, not in {region}: use "
                                f"--region {where}, and the same region for the program")
        else:
            self.report.ok(f"bucket {name} in {region}")
        return True

    def create_bucket(self):
        arguments = {"Bucket": self.options.bucket}
        if self.options.region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {
                "LocationConstraint": self.options.region}
        self.s3.create_bucket(**arguments)

    def public_access_block(self):
        wanted = {k: True for k in ("BlockPublicAcls", "IgnorePublicAcls",
                                    "BlockPublicPolicy", "RestrictPublicBuckets")}
        current = unless_missing(lambda: self.s3.get_public_access_block(
            Bucket=self.options.bucket)["PublicAccessBlockConfiguration"],
            "NoSuchPublicAccessBlockConfiguration", {})
        if current == wanted:
            self.report.ok("public access blocked")
            return
        self.fix("public access blocked", lambda: self.s3.put_public_access_block(
            Bucket=self.options.bucket, PublicAccessBlockConfiguration=wanted))

    def lifecycle(self):
        rules = unless_missing(lambda: self.s3.get_bucket_lifecycle_configuration(
            Bucket=self.options.bucket)["Rules"], "NoSuchLifecycleConfiguration", [])
        wanted = {ABORT_RULE_ID: _rule(ABORT_RULE_ID, {"AbortIncompleteMultipartUpload": {
            "DaysAfterInitiation": ABORT_AFTER_DAYS}})}
        if self.options.expire_days:
            wanted[EXPIRE_RULE_ID] = _rule(EXPIRE_RULE_ID, {"Expiration": {
                "Days": self.options.expire_days}})
        current = {rule.get("ID"): rule for rule in rules}
        wrong = [rule_id for rule_id, rule in wanted.items()
                 if not _same_rule(current.get(rule_id), rule)]
        for rule_id in wanted:
            if rule_id not in wrong:
                self.report.ok(f"lifecycle rule {rule_id}")
        if EXPIRE_RULE_ID in current and EXPIRE_RULE_ID not in wanted:
            days = current[EXPIRE_RULE_ID].get("Expiration", {}).get("Days")
            self.report.ok(f"lifecycle rule {EXPIRE_RULE_ID} ({days} days) left as it is")
        if not wrong:
            return
        kept = [rule for rule in rules if rule.get("ID") not in wanted]
        self.fix(f"lifecycle rule(s) {', '.join(wrong)}",
                 lambda: self.s3.put_bucket_lifecycle_configuration(
                     Bucket=self.options.bucket,
                     LifecycleConfiguration={"Rules": kept + list(wanted.values())}))

    def policy(self):
        bucket = self.options.bucket
        document = json.loads(unless_missing(
            lambda: self.s3.get_bucket_policy(Bucket=bucket)["Policy"], "NoSuchBucketPolicy",
            '{"Version": "2012-10-17", "Statement": []}'))
        statements = document.get("Statement", [])
        statements = [statements] if isinstance(statements, dict) else statements
        ours = [s for s in statements if s.get("Sid") == DENY_REPLACING_SID]
        wanted = deny_replacing_statement(bucket)
        what = "bucket policy statement denying writes without If-None-Match: *"
        if len(ours) == 1 and same_policy(ours[0], wanted):
            self.report.ok(what)
            return
        if not ours:
            difference = f"missing (no statement {DENY_REPLACING_SID})"
        elif len(ours) > 1:
            difference = f"{len(ours)} statements {DENY_REPLACING_SID}, not one"
        else:
            found = policy_differences(ours[0], wanted)
            difference = "; ".join(found) if found else "different (Sid or Principal)"
        others = [s for s in statements if s.get("Sid") != DENY_REPLACING_SID]
        document["Statement"] = others + [wanted]
        self.fix(what, lambda: self.s3.put_bucket_policy(Bucket=bucket,
                                                        Policy=json.dumps(document)),
                 difference)

    # -- the IAM users
    def user(self, role, name, policy):
        if unless_missing(lambda: self.iam.get_user(UserName=name), "NoSuchEntity", None):
            self.report.ok(f"IAM user {name}")
        elif not self.fix(f"IAM user {name}", lambda: self.iam.create_user(UserName=name)):
            return
        self.user_policy(name, policy)
        self.other_permissions(name)
        self.access_key(role, name)

    def user_policy(self, name, policy):
        current = unless_missing(lambda: self.iam.get_user_policy(
            UserName=name, PolicyName=USER_POLICY_NAME)["PolicyDocument"], "NoSuchEntity", None)
        what = f"IAM user {name}: policy {USER_POLICY_NAME} exactly as in docs/aws-setup.md"
        if current is not None and same_policy(current, policy):
            self.report.ok(what)
            return
        difference = ("missing" if current is None else
                      "; ".join(policy_differences(current, policy)) or "different")
        self.fix(what, lambda: self.iam.put_user_policy(
            UserName=name, PolicyName=USER_POLICY_NAME, PolicyDocument=json.dumps(policy)),
            difference)

    def other_permissions(self, name):
        """Anything else granted to the user may widen what its keys can do."""
        others = [f"inline policy {p}" for p in self.iam.list_user_policies(
            UserName=name)["PolicyNames"] if p != USER_POLICY_NAME]
        others += [f"attached policy {p['PolicyName']}" for p in
                   self.iam.list_attached_user_policies(UserName=name)["AttachedPolicies"]]
        others += [f"group {g['GroupName']}" for g in
                   self.iam.list_groups_for_user(UserName=name)["Groups"]]
        if others:
            self.report.problem(f"IAM user {name} has more than its policy in docs/aws-setup.md: "
                                f"{', '.join(others)}; remove it (this tool does not)")

    def access_key(self, role, name):
        keys = self.iam.list_access_keys(UserName=name)["AccessKeyMetadata"]
        if keys:
            self.report.ok(f"IAM user {name}: {len(keys)} access key(s) (AWS shows a "
                           "secret only when the key is made)")
            return
        keys_file = self.options.keys_file
        if not self.check and keys_file and os.path.exists(keys_file):
            self.report.problem(f"IAM user {name} has no access key, and {keys_file} "
                                "exists: give --keys-file a new file name")
            return

        def make():
            made = self.iam.create_access_key(UserName=name)["AccessKey"]
            self.new_keys[role] = (made["AccessKeyId"], made["SecretAccessKey"])
        self.fix(f"IAM user {name}: access key", make)

    # -- SES
    def ses_identities(self):
        if not self.options.sender:
            self.report.ok("SES left alone: no --sender (e-mail reports off, send-email False)")
            return
        sandbox = self.ses.get_send_quota()["Max24HourSend"] <= SES_SANDBOX_QUOTA
        wanted = [("sender", self.options.sender)]
        if sandbox and self.options.recipient:
            wanted.append(("recipient", self.options.recipient))
        elif sandbox:
            self.report.later("the account is in the SES sandbox: give --recipient, "
                              "whose address must be verified too")
        addresses = [address for _role, address in wanted]
        found = self.ses.get_identity_verification_attributes(
            Identities=addresses)["VerificationAttributes"]
        region = self.options.region
        for role, address in wanted:
            status = found.get(address, {}).get("VerificationStatus")
            what = f"SES {role} {address}"
            if status == "Success":
                self.report.ok(f"{what} verified in {region}")
            elif status == "Pending" and self.check:
                self.report.problem(f"{what}: not verified yet in {region}: click the link "
                                    "in the e-mail AWS sent")
            elif status == "Pending":
                self.report.later(f"{what}: click the link in the e-mail AWS sent")
            elif self.check:
                state = status or "never requested"
                self.report.problem(f"{what}: not verified in {region} ({state}): run this "
                                    "without --check to request it")
            else:
                self.ses.verify_email_identity(EmailAddress=address)
                self.report.changed(f"{what}: verification requested in {region}")
                self.report.later(f"{what}: click the link in the e-mail AWS sent")


def _rule(rule_id, action):
    return dict({"ID": rule_id, "Status": "Enabled", "Filter": {"Prefix": ""}}, **action)


def _same_rule(current, wanted):
    if current is None:
        return False
    whole_bucket = current.get("Filter", {}).get("Prefix", "") == "" and not any(
        k in current.get("Filter", {}) for k in ("Tag", "And", "ObjectSizeGreaterThan",
                                                  "ObjectSizeLessThan"))
    actions = {k: v for k, v in wanted.items() if k not in ("ID", "Status", "Filter")}
    return (whole_bucket and current.get("Status") == "Enabled"
            and all(current.get(k) == v for k, v in actions.items()))


# ---------------------------------------------------------------- the keys

def write_keys_file(path, new_keys, bucket, region):
    """The new keys in an owner-only file (never over an existing one), with the region
    the bucket and SES identities are in: AWS_REGION, which the program's AWS clients use
    (docs/reference.md, Environment variables)."""
    lines = [f"# AWS access keys for AAM Auto Backup (bucket {bucket}), made "
             f"{dt.datetime.now():%Y-%m-%d %H:%M} by tools/aws_setup.py",
             "# The region of the bucket and the SES sender: the program must use it too.",
             f"AWS_REGION={region}"]
    for role, (key_id, secret) in new_keys.items():
        names = KEY_VARIABLES[role]
        lines += [f"{names[0]}={key_id}", f"{names[1]}={secret}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def show_new_keys(options, new_keys):
    if not new_keys:
        return
    if options.keys_file:
        write_keys_file(options.keys_file, new_keys, options.bucket, options.region)
        print(f"\nThe new access key(s) and the region (AWS_REGION={options.region}) are in "
              f"{options.keys_file} (readable only by you). Keep the restore key offline, "
              "e.g. in a password manager.")
        return
    print("\nNew access key(s), shown this once (AWS never shows a secret again); "
          "store them now, the restore key offline, and use the region "
          f"AWS_REGION={options.region} for the program:")
    for role, (key_id, secret) in new_keys.items():
        names = KEY_VARIABLES[role]
        print(f"  {names[0]}={key_id}\n  {names[1]}={secret}")


def read_keys_file(path):
    """NAME=VALUE lines of a keys file ({} without one)."""
    values = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                name, sep, value = line.strip().partition("=")
                if sep and not name.startswith("#"):
                    values[name.strip()] = value.strip()
    return values


def read_keys(path):
    """{role: (key id, secret)} from --keys-file, else from the environment."""
    values = dict(os.environ, **read_keys_file(path))
    return {role: (values[names[0]], values[names[1]])
            for role, names in KEY_VARIABLES.items()
            if values.get(names[0]) and values.get(names[1])}


# ---------------------------------------------------------------- --check: real calls

class Proof:
    """Real calls with the backup and restore keys on two probe objects."""

    def __init__(self, setup, keys):
        self.setup, self.report = setup, setup.report
        self.bucket = setup.options.bucket
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        self.key = f"{PROBE_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}"
        self.deep_key = self.key + "-deep-archive"
        self.clients = {role: boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret).client(
                "s3", region_name=setup.options.region)
            for role, (key_id, secret) in keys.items()}

    def expect(self, what, call, refused=None):
        """One real call: it must work (refused None) or fail with HTTP `refused`."""
        try:
            call()
            outcome = None
        except ClientError as problem:
            outcome = problem
        if outcome is None and refused is None:
            self.report.ok(what)
        elif outcome is not None and http_status(outcome) == refused:
            self.report.ok(f"{what} (HTTP {refused} {error_code(outcome)})")
        elif outcome is None:
            self.report.problem(f"{what}: it worked, it must be refused (HTTP {refused})")
        elif http_status(outcome) == 200:        # answered, but not as it must be
            self.report.problem(f"{what}: {outcome.response['Error']['Message']}")
        else:
            self.report.problem(f"{what}: refused ({outcome})")

    def run(self):
        try:
            for role in ("backup", "restore"):
                if role not in self.clients:
                    names = " and ".join(KEY_VARIABLES[role])
                    self.report.problem(f"the {role} keys were not proven: give --keys-file "
                                        f"or set {names}")
                    continue
                if role == "restore":
                    self.put_missing_probes()
                (self.backup_keys if role == "backup" else self.restore_keys)(
                    self.clients[role])
        finally:
            for key in (self.key, self.deep_key):     # the administrator may delete
                with contextlib.suppress(ClientError):
                    self.setup.s3.delete_object(Bucket=self.bucket, Key=key)

    def backup_keys(self, s3):
        bucket, key = self.bucket, self.key
        self.expect("backup keys can put a new object", lambda: s3.put_object(
            Bucket=bucket, Key=key, Body=PROBE_BODY, IfNoneMatch="*"))
        self.expect("backup keys can put a Deep Archive object", lambda: s3.put_object(
            Bucket=bucket, Key=self.deep_key, Body=PROBE_BODY, IfNoneMatch="*",
            StorageClass="DEEP_ARCHIVE"))
        self.expect("backup keys can list", lambda: self.listed(s3))
        self.expect("backup keys cannot read", lambda: s3.get_object(
            Bucket=bucket, Key=key), 403)
        self.expect("backup keys cannot replace an object (If-None-Match: *)",
                    lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"x",
                                          IfNoneMatch="*"), 412)
        self.expect("backup keys cannot replace an object (plain PutObject)",
                    lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), 403)
        self.expect("backup keys cannot replace an object (multipart upload)",
                    lambda: self.multipart_over(s3, key), 403)
        self.expect("backup keys cannot delete", lambda: s3.delete_object(
            Bucket=bucket, Key=key), 403)

    def restore_keys(self, s3):
        bucket = self.bucket
        self.expect("restore keys can list", lambda: self.listed(s3))
        self.expect("restore keys can read", lambda: self.read_back(s3))
        self.expect("restore keys can restore from Deep Archive", lambda: s3.restore_object(
            Bucket=bucket, Key=self.deep_key,
            RestoreRequest={"Days": 1, "GlacierJobParameters": {"Tier": "Bulk"}}))
        self.expect("restore keys cannot write", lambda: s3.put_object(
            Bucket=bucket, Key=self.key + "-restore-write", Body=b"x", IfNoneMatch="*"), 403)
        self.expect("restore keys cannot delete", lambda: s3.delete_object(
            Bucket=bucket, Key=self.key), 403)

    def put_missing_probes(self):
        """The restore keys are proven on the probes the backup keys put; a probe that is
        not there (no backup keys given, a put refused, a delete that wrongly worked) is
        put with the administrator's keys, so that no backup-key problem is reported
        again as a restore-key one."""
        for key, storage in ((self.key, "STANDARD"), (self.deep_key, "DEEP_ARCHIVE")):
            try:
                self.setup.s3.head_object(Bucket=self.bucket, Key=key)
            except ClientError as problem:
                if http_status(problem) != 404:
                    raise
                self.setup.s3.put_object(Bucket=self.bucket, Key=key, Body=PROBE_BODY,
                                         IfNoneMatch="*", StorageClass=storage)

    def listed(self, s3):
        found = s3.list_objects_v2(Bucket=self.bucket, Prefix=self.key).get("Contents", [])
        if self.key not in [item["Key"] for item in found]:
            raise ClientError({"Error": {"Code": "NotListed",
                                         "Message": f"the listing lacks the probe {self.key}"},
                               "ResponseMetadata": {"HTTPStatusCode": 200}}, "ListObjectsV2")

    def read_back(self, s3):
        body = s3.get_object(Bucket=self.bucket, Key=self.key)["Body"].read()
        if body != PROBE_BODY:
            raise ClientError({"Error": {"Code": "Different",
                                         "Message": f"the probe {self.key} read back changed"},
                               "ResponseMetadata": {"HTTPStatusCode": 200}}, "GetObject")

    def multipart_over(self, s3, key):
        """A multipart upload completed over an existing name, without the header."""
        upload = s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            part = s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload,
                                  PartNumber=1, Body=b"x")
            s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload,
                MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        finally:
            with contextlib.suppress(ClientError):
                s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)


# ---------------------------------------------------------------- command line

def expire_days(text):
    days = int(text)
    if days <= DEEP_ARCHIVE_MINIMUM_DAYS:
        raise argparse.ArgumentTypeError(
            f"must be at least {DEEP_ARCHIVE_MINIMUM_DAYS + 1}: Deep Archive bills "
            f"{DEEP_ARCHIVE_MINIMUM_DAYS} days anyway, and a month's set must outlive "
            "its incrementals")
    return days


def parse_options(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See docs/aws-setup.md.")
    parser.add_argument("--region", required=True, help="e.g. eu-west-1; use the same "
                        "region (AWS_REGION) for the program")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--sender", help="the report's sender address (leave it out "
                        "for no e-mail reports)")
    parser.add_argument("--recipient", help="the report's recipient (verified too while "
                        "the account is in the SES sandbox)")
    parser.add_argument("--backup-user", default=BACKUP_USER)
    parser.add_argument("--restore-user", default=RESTORE_USER)
    parser.add_argument("--expire-days", type=expire_days, metavar="N",
                        help="also delete objects N (at least 181) days old")
    parser.add_argument("--keys-file", help="write new access keys to this new "
                        "owner-only file; with --check, read the keys from it")
    parser.add_argument("--profile", help="the administrator's AWS profile")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; report and prove with real calls")
    return parser.parse_args(argv)


def run(options, session=None):
    """Set up (or check) everything; session: the administrator's (default: boto3's
    usual sources, or --profile)."""
    session = session or boto3.session.Session(profile_name=options.profile)
    setup = Setup(options, session)
    print(f"{'Checking' if options.check else 'Setting up'} AWS for AAM Auto Backup in "
          f"{options.region}:")
    bucket_exists = setup.bucket()
    if bucket_exists:
        setup.public_access_block()
        setup.lifecycle()
        setup.policy()
    setup.user("backup", options.backup_user, backup_user_policy(options.bucket))
    setup.user("restore", options.restore_user, restore_user_policy(options.bucket))
    setup.ses_identities()
    if options.check:
        keys_region = read_keys_file(options.keys_file).get("AWS_REGION")
        if keys_region and keys_region != options.region:
            setup.report.problem(f"{options.keys_file} says AWS_REGION={keys_region}, not "
                                 f"{options.region}: the program would use another region")
    if options.check and bucket_exists:
        Proof(setup, read_keys(options.keys_file)).run()
    show_new_keys(options, setup.new_keys)
    return setup.report


def summary(options, report):
    if report.problems:
        print(f"\n{len(report.problems)} problem(s); "
              + ("nothing was changed." if options.check else "the rest is in place."))
        return 1
    if options.check:
        print("\nCheck passed: everything is in place and the keys can do exactly what "
              "they should.")
    elif report.changes:
        print(f"\n{len(report.changes)} change(s) made. Check with the same command and "
              "--check (a new key may take a minute to work).")
    else:
        print("\nNothing changed: everything was already in place.")
    return 0


def main(argv=None):
    options = parse_options(argv)
    try:
        report = run(options)
    except SetupError as problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 1
    except (BotoCoreError, ClientError) as problem:
        print(f"ERROR: AWS refused or could not be reached: {problem}", file=sys.stderr)
        return 1
    return summary(options, report)


if __name__ == "__main__":
    sys.exit(main())
