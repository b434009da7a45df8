#!/usr/bin/env python3
"""A real local AWS endpoint (moto server) and a fault-injecting HTTP proxy.

Tests, the demo command and the benchmark use this module to talk to S3,
SES and IAM over real HTTP without touching AWS.  Nothing here reads the
user's AWS configuration: the server and every client use dummy
credentials and an explicit region.

Library use::

    import sys; sys.path.insert(0, "<repo>/tools")
    from local_aws import LocalAws, FaultProxy

    with LocalAws() as aws:
        aws.create_bucket("backups")
        aws.verify_ses_identity("backup@example.com")
        s3 = aws.client("s3")
        ...
        print(aws.sent_emails())

    with LocalAws() as aws, FaultProxy(aws.endpoint_url) as proxy:
        s3 = aws.client("s3", endpoint_url=proxy.endpoint_url)
        ...
        print(proxy.counters())
        proxy.wait_for(lambda c: c["by_kind"].get("UploadPart", 0) >= 1, 60)  # a part is up
        proxy.fail_after(3)          # 4th and later requests get HTTP 500
        proxy.plant_first("PutObject", "_yes_")   # that key exists when it arrives
        proxy.limit_upload(5_000_000)   # request bodies of all connections: 5 MB/s in sum

IAM enforcement (moto only checks policies once it is switched on)::

    key, secret = aws.create_user_with_policy("backup", backup_policy("b"))
    aws.enable_iam_enforcement()     # dummy credentials stop working now
    s3 = aws.client("s3", key, secret)

Glacier Deep Archive: objects put with StorageClass DEEP_ARCHIVE refuse
get_object (InvalidObjectState) until restored.  Restores finish at once
by default; ``set_restore_progression(n)`` keeps each one "in progress"
for n look-ups (head_object/get_object) of the key first, and a repeated
restore_object meanwhile gets 409 RestoreAlreadyInProgress as on S3.  The
server runs as ``python -c SERVER_BOOTSTRAP``: moto.server plus small
fixes to moto 5.2.1 that make this simulation faithful (see below).

Command line (docs/development.md, "A local endpoint instead of AWS")::

    python tools/local_aws.py serve [--port P] [--region R] [--bucket B] [--sender ADDR]
                                    [--recipient ADDR] [--iam --keys-file FILE]
                                    [--upload-limit RATE]
    python tools/local_aws.py emails [--endpoint URL]

serve prints ``AWS_ENDPOINT_URL=...`` and the credentials to use, and serves until
Ctrl-C.  With --iam it sets the endpoint up as tools/aws_setup.py sets up AWS
(the bucket, its policy, the backup and restore users with their policies, SES),
writes the users' keys and the region to FILE as aws_setup.py does, makes an
administrator for ``aws_setup.py --check``, and switches IAM enforcement on, so
that each key can do exactly what it can in AWS.  With --upload-limit (e.g. 20Mbit,
2.5M: the forms of AAM_UPLOAD_LIMIT) the endpoint printed is a FaultProxy whose
request bodies pass at that rate in sum: a slow uplink in front of the server.
emails prints the e-mails the endpoint has caught (SES accepts them but sends none).
"""

import argparse
import contextlib
import email
import email.policy
import http.client
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter

import boto3
import botocore.session

import aws_setup
from aws_setup import backup_user_policy, restore_user_policy

DEFAULT_REGION = "us-east-1"
DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"
RESTORE_MODEL = "s3::keyrestore"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

# Runs moto's server with four fixes to moto 5.2.1.  (1) A freshly
# restored key reads as done (status None is "not in progress") until its
# manual transition first fires, and the ticks firing it count earlier
# look-ups of the key too: a first restore now starts IN_PROGRESS with a
# fresh count.  (2) A repeated restore of an in-progress key gets 200; S3
# answers 409 RestoreAlreadyInProgress.  (3) GET /moto-api/data.json fails
# with HTTP 500 while a multipart upload has parts, because evaluating a
# part's restore status looks up its (missing) bucket.  (4) A bucket policy
# is evaluated with the request's condition keys, as S3 does for its
# conditional-write enforcement: s3:if-none-match, s3:if-match and
# s3:ObjectCreationOperation, under the operators Null, Bool, StringEquals
# and StringNotEquals (another operator fails the request with HTTP 500, so
# a test cannot pass on a condition moto ignores); CreateMultipartUpload and
# CompleteMultipartUpload count as s3:PutObject.  moto ignored every
# condition, so such a policy denied each write; Principal is not compared.
# It also exits when its parent dies, so a killed test run leaves no
# server behind.
SERVER_BOOTSTRAP = """
import fnmatch
import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs, urlparse
from moto.iam.access_control import PermissionResult
from moto.moto_api._internal.managed_state_model import ManagedState
from moto.s3.exceptions import S3AccessDeniedError, S3ClientError
from moto.s3.models import FakeBucket, FakeKey, S3Backend
from moto.s3.responses import S3Response
from moto.server import main
from werkzeug.exceptions import HTTPException


class RestoreAlreadyInProgress(HTTPException):
    code = 409

    def get_body(self, environ=None, scope=None):
        return ('<?xml version="1.0" encoding="UTF-8"?>\\n<Error>'
                '<Code>RestoreAlreadyInProgress</Code>'
                '<Message>Object restore is already in progress</Message>'
                '</Error>')

    def get_headers(self, environ=None, scope=None):
        return [("Content-Type", "application/xml")]


_key_restore = FakeKey.restore
_backend_restore = S3Backend.restore_object


def key_restore(self, days):
    first = self._expiry is None
    _key_restore(self, days)
    if first:
        self._status, self._tick = "IN_PROGRESS", 0


def backend_restore(self, bucket_name, key_name, days, type_):
    key = self.get_bucket(bucket_name).keys.get(key_name)
    if isinstance(key, FakeKey) and key._expiry is not None:
        if key.status == "IN_PROGRESS":
            key._tick = max(0, key._tick - 1)  # refused: not a look-up
            raise RestoreAlreadyInProgress()
    return _backend_restore(self, bucket_name, key_name, days, type_)


def key_status(self):
    if self.bucket_name is None:  # a multipart part: no bucket, no events
        return ManagedState.status.fget(self)
    return _key_status.fget(self)


_key_status = FakeKey.status
_request = threading.local()      # the object request being answered, if any
_key_response = S3Response._key_response


def object_request(method, query, headers):
    # (IAM action, condition values) of an object request, or None.
    values = {"s3:if-none-match": headers.get("If-None-Match"),
              "s3:if-match": headers.get("If-Match")}
    if method == "PUT" and "partNumber" in query:
        return "s3:PutObject", dict(values, **{"s3:ObjectCreationOperation": "false"})
    if method == "PUT" and (not query or "x-amz-copy-source" in headers):
        return "s3:PutObject", dict(values, **{"s3:ObjectCreationOperation": "true"})
    if method == "POST" and ("uploads" in query or "uploadId" in query):
        creates = "uploadId" in query
        return "s3:PutObject", dict(values, **{
            "s3:ObjectCreationOperation": "true" if creates else "false"})
    if method in ("GET", "HEAD"):
        return "s3:GetObject", values
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in query
                else "s3:DeleteObject"), values
    return None


def condition_holds(operator, expected, value):
    expected = [str(e) for e in (expected if isinstance(expected, list) else [expected])]
    if operator == "Null":
        return (value is None) == (expected[0].lower() == "true")
    if operator == "Bool":
        return value is not None and value.lower() in [e.lower() for e in expected]
    if operator == "StringEquals":
        return value in expected
    if operator == "StringNotEquals":
        return value not in expected
    raise NotImplementedError(f"condition operator {operator} is not simulated")


def statement_applies(statement, action, resource, values):
    def matches(patterns, text):
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return any(fnmatch.fnmatchcase(text, p) for p in patterns)
    return (matches(statement.get("Action", []), action)
            and matches(statement.get("Resource", []), resource)
            and all(condition_holds(operator, expected, values.get(key))
                    for operator, pairs in statement.get("Condition", {}).items()
                    for key, expected in pairs.items()))


def bucket_permission(self, action, resource):
    if self.policy is None:
        return PermissionResult.NEUTRAL
    values = {}
    if getattr(_request, "current", None):
        action, values = _request.current
    statements = json.loads(self.policy.decode()).get("Statement", [])
    result = PermissionResult.NEUTRAL
    for statement in [statements] if isinstance(statements, dict) else statements:
        if statement_applies(statement, action, resource, values):
            if statement.get("Effect") == "Deny":
                return PermissionResult.DENIED
            result = PermissionResult.PERMITTED
    return result


def key_response(self, request, full_url):
    query = parse_qs(urlparse(full_url).query, keep_blank_values=True)
    _request.current = object_request(request.method, query, request.headers)
    try:
        bucket_name = self.parse_bucket_name_from_url(request, full_url)
        try:
            bucket = self.backend.get_bucket(bucket_name)
        except S3ClientError:
            bucket = None
        resource = f"arn:aws:s3:::{bucket_name}/{self.parse_key_name()}"
        if bucket and bucket.get_permission("", resource) == PermissionResult.DENIED:
            raise S3AccessDeniedError()      # with S3's XML body, not moto's bare 403
        return _key_response(self, request, full_url)
    finally:
        _request.current = None


def exit_with_parent(parent):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


FakeKey.status = property(key_status, _key_status.fset)
FakeKey.restore = key_restore
S3Backend.restore_object = backend_restore
FakeBucket.get_permission = bucket_permission
S3Response._key_response = key_response
threading.Thread(target=exit_with_parent, args=(os.getppid(),),
                 daemon=True).start()
main(sys.argv[1:])
"""


def free_port():
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_session = None
_session_lock = threading.Lock()


def _isolated_session():
    """One shared boto3 session: it caches service models between clients."""
    global _session
    with _session_lock:
        if _session is None:
            # (config key, env vars, default, conversion): no env, no user
            # files, so an odd AWS_PROFILE or ~/.aws/config cannot leak in.
            core = botocore.session.Session(session_vars={
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
            })
            _session = boto3.session.Session(botocore_session=core)
        return _session


def isolated_client(service, endpoint_url, region=DEFAULT_REGION,
                    access_key=DUMMY_ACCESS_KEY, secret_key=DUMMY_SECRET_KEY,
                    config=None):
    """Return a boto3 client that ignores ~/.aws, AWS_PROFILE and the like."""
    session = _isolated_session()
    with _session_lock:  # creating clients is not thread-safe
        return session.client(service, endpoint_url=endpoint_url,
                              region_name=region,
                              aws_access_key_id=access_key,
                              aws_secret_access_key=secret_key,
                              config=config)


def _dummy_aws_env(region):
    """The parent environment without AWS settings, plus dummy ones."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "MOTO_PORT"}
    env.update({
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    })
    return env


# ---------------------------------------------------------------- policies

def backup_policy(bucket, allow_abort=True):
    """docs/aws-setup.md's write-only policy for the backup user (tools/aws_setup.py makes it)."""
    return backup_user_policy(bucket, allow_abort)


def restore_policy(bucket):
    """docs/aws-setup.md's read/restore policy for the restore user (tools/aws_setup.py
    makes it)."""
    return restore_user_policy(bucket)


# ---------------------------------------------------------------- moto server

class LocalAws:
    """moto's server mode in a child process, plus test helpers."""

    def __init__(self, region=DEFAULT_REGION, port=None, niceness=0):
        self.region = region
        self._port = port
        # The benchmark runs the server at a low priority: it stands in for a remote
        # service, which does not take CPU from the tools being measured (see
        # _lower_priority for why a nice value alone is not enough).
        self._niceness = niceness
        self._process = None
        self._log_path = None

    # -- life cycle

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def endpoint_url(self):
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self):
        return self._port

    @property
    def server_pid(self):
        """The server's process id (the benchmark measures its CPU time)."""
        return self._process.pid if self._process else None

    def start(self):
        """Start the server; on a taken port, retry with another."""
        attempts = 1 if self._port else 3
        for _ in range(attempts):
            port = self._port or free_port()
            if self._try_start(port):
                self._port = port
                return self
        log = self._log_tail()
        self._remove_log()
        raise RuntimeError(f"moto server did not start:\n{log}")

    def _try_start(self, port):
        self._remove_log()
        log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log",
                                          delete=False)
        self._log_path = log.name
        self._process = subprocess.Popen(
            [sys.executable, "-c", SERVER_BOOTSTRAP, "-H", "127.0.0.1",
             "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=_dummy_aws_env(self.region),
            preexec_fn=self._lower_priority if self._niceness else None)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            if self._answers(port) and self._listens(port):
                return True
            time.sleep(0.1)
        self._kill()
        return False

    def _lower_priority(self):
        """In the server's process before exec: its own session at the niceness.

        With the kernel's autogroup scheduling (sched(7), on by default in most
        desktop and server kernels) a nice value only orders processes of one
        session; each session gets an equal share of the CPU. A tool that starts
        its work in a session of its own (AAM's child and its 7-Zip do) would
        then share the cores half and half with a server niced in the bench's
        session. So the server gets its own session, and that session's autogroup
        the same niceness.
        """
        os.setsid()
        os.nice(self._niceness)
        try:
            with open("/proc/self/autogroup", "w", encoding="ascii") as handle:
                handle.write(str(self._niceness))
        except OSError:
            pass            # no autogroup scheduling in this kernel: nice is enough

    def _listens(self, port):
        """Whether the server that answered on port is ours: another one (a second test
        session's, given the same free port) may answer before ours has failed to bind
        it, and would be stopped under us.  Read from /proc where there is one."""
        if not os.path.isdir("/proc/self/fd"):
            return True
        wanted = f"0100007F:{port:04X}"
        inodes = set()
        with contextlib.suppress(OSError), open("/proc/net/tcp", encoding="ascii") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if fields[1] == wanted and fields[3] == "0A":       # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
        fd_dir = f"/proc/{self._process.pid}/fd"
        with contextlib.suppress(OSError):
            return any(os.readlink(os.path.join(fd_dir, fd)) in inodes
                       for fd in os.listdir(fd_dir))
        return False

    @staticmethod
    def _answers(port):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/moto-api/data.json")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def _log_tail(self, chars=2000):
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:]
        except (OSError, TypeError):
            return ""

    def stop(self):
        self._kill()
        self._remove_log()

    def _remove_log(self):
        if self._log_path:
            try:
                os.unlink(self._log_path)
            except OSError:
                pass
            self._log_path = None

    def _kill(self):
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    # -- clients

    def client(self, service, access_key=None, secret_key=None,
               endpoint_url=None, config=None):
        """A boto3 client for this endpoint (or a proxy in front of it)."""
        return isolated_client(
            service, endpoint_url or self.endpoint_url, self.region,
            access_key or DUMMY_ACCESS_KEY, secret_key or DUMMY_SECRET_KEY,
            config)

    def env(self, access_key=None, secret_key=None, endpoint_url=None):
        """Environment variables that point an AWS SDK/CLI at this server."""
        env = _dummy_aws_env(self.region)
        env["AWS_ACCESS_KEY_ID"] = access_key or DUMMY_ACCESS_KEY
        env["AWS_SECRET_ACCESS_KEY"] = secret_key or DUMMY_SECRET_KEY
        env["AWS_ENDPOINT_URL"] = endpoint_url or self.endpoint_url
        return env

    # -- moto's own HTTP API

    def _moto_api(self, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        try:
            if body is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=body.encode())
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise RuntimeError(
                f"{path}: HTTP {response.status} {data[:200]!r}")
        return data

    def reset(self):
        """Forget all AWS state; IAM enforcement off; immediate restores."""
        self._moto_api("/moto-api/reset", "")
        self.disable_iam_enforcement()
        self.set_restore_immediate()

    def model_data(self):
        """moto's internal state as JSON (GET /moto-api/data.json)."""
        return json.loads(self._moto_api("/moto-api/data.json"))

    # -- S3 and SES set-up

    def create_bucket(self, name):
        kwargs = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {
                "LocationConstraint": self.region}
        self.client("s3").create_bucket(**kwargs)

    def verify_ses_identity(self, address):
        """moto rejects SES sends from senders that were not verified."""
        self.client("ses").verify_email_identity(EmailAddress=address)

    def sent_emails(self):
        """Every message SES accepted (see sent_emails below)."""
        return sent_emails(self.model_data())

    # -- IAM

    def create_user_with_policy(self, user_name, policy_document,
                                managed=False):
        """Create an IAM user with the policy; return (key id, secret).

        Must run before enable_iam_enforcement(): it uses the dummy root.
        """
        iam = self.client("iam")
        iam.create_user(UserName=user_name)
        document = json.dumps(policy_document)
        if managed:
            arn = iam.create_policy(PolicyName=f"{user_name}-policy",
                                    PolicyDocument=document)["Policy"]["Arn"]
            iam.attach_user_policy(UserName=user_name, PolicyArn=arn)
        else:
            iam.put_user_policy(UserName=user_name,
                                PolicyName=f"{user_name}-policy",
                                PolicyDocument=document)
        key = iam.create_access_key(UserName=user_name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def enable_iam_enforcement(self, free_requests=0):
        """Check signatures and policies on all but the next free_requests.

        moto's reset-auth takes a bare number as body, not JSON.
        """
        self._moto_api("/moto-api/reset-auth", str(free_requests))

    def disable_iam_enforcement(self):
        self._moto_api("/moto-api/reset-auth", "inf")

    @contextlib.contextmanager
    def iam_enforced(self):
        """IAM enforcement on inside the with block, off again however it ends."""
        self.enable_iam_enforcement()
        try:
            yield self
        finally:
            self.disable_iam_enforcement()

    # -- Glacier restore simulation

    def set_restore_progression(self, checks):
        """Keep each restore in progress for `checks` look-ups of the key.

        A look-up is any head_object or get_object of it; the next one
        after that sees the restore done.
        """
        # moto ticks a key twice per request on it and moves its state on
        # the first look-up that finds tick >= times.
        self._set_restore_transition({"progression": "manual",
                                      "times": 2 * checks + 1})

    def set_restore_immediate(self):
        self._set_restore_transition({"progression": "immediate"})

    def _set_restore_transition(self, transition):
        body = json.dumps({"model_name": RESTORE_MODEL,
                           "transition": transition})
        self._moto_api("/moto-api/state-manager/set-transition", body)


def sent_emails(model_data):
    """Every message SES accepted, from moto's state: SendEmail ones, then raw ones.

    Each group is in sending order (moto keeps no timestamps).  Each
    message is a dict: source, destinations (all addresses), to, subject,
    body, raw.  moto keeps only one body per SendEmail: the Html part if
    there is one, else the Text part.  For SendRawEmail, body is the
    text/plain part (or the first text part) and raw the whole message.
    """
    ses = model_data.get("ses", {})
    messages = [_simple_message(m) for m in ses.get("Message", [])]
    messages += [_raw_message(m) for m in ses.get("RawMessage", [])]
    return messages


def _flat_destinations(destinations):
    if isinstance(destinations, dict):
        addresses = [a for group in destinations.values() for a in group]
    else:
        addresses = list(destinations or [])
    return list(dict.fromkeys(addresses))  # moto may list one twice


def _simple_message(message):
    destinations = message.get("destinations") or {}
    return {
        "source": message.get("source"),
        "destinations": _flat_destinations(destinations),
        "to": list(destinations.get("ToAddresses", [])),
        "subject": message.get("subject"),
        "body": message.get("body"),
        "raw": None,
    }


def _raw_message(message):
    raw = message.get("raw_data") or ""
    parsed = email.message_from_string(raw, policy=email.policy.default)
    part = parsed.get_body(preferencelist=("plain", "html"))
    return {
        "source": message.get("source"),
        "destinations": _flat_destinations(message.get("destinations")),
        "to": [str(a) for a in parsed.get_all("To", [])],
        "subject": parsed.get("Subject"),
        "body": part.get_content() if part is not None else None,
        "raw": raw,
    }


# ---------------------------------------------------------------- proxy

# Not forwarded: they describe one hop, and the proxy frames bodies itself.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "te",
               "trailer", "upgrade", "expect"}
COPY_CHUNK = 256 * 1024
LIST_PARAMS = {"list-type", "prefix", "delimiter", "max-keys", "marker",
               "start-after", "continuation-token", "encoding-type",
               "fetch-owner"}


def classify(method, path, headers):
    """A short name for a request: 'UploadPart', 'LIST', 'ses', ...

    S3 requests get an operation name (path-style URLs assumed); others
    the service they are signed for, plus X-Amz-Target's operation if any.
    """
    service = request_service(headers)
    if service not in (None, "s3"):
        target = headers.get("X-Amz-Target")
        return f"{service}:{target.split('.')[-1]}" if target else service
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    segments = [s for s in parsed.path.split("/") if s]
    if parsed.path.startswith("/moto-api"):
        return "moto-api"
    if not segments:
        return "ListBuckets" if method == "GET" else method
    if len(segments) == 1:
        return _bucket_kind(method, query)
    return _object_kind(method, query, headers)


def request_service(headers):
    """The service a request is signed for ("s3", "ses", ...), or None."""
    # "AWS4-HMAC-SHA256 Credential=KEY/DATE/REGION/SERVICE/aws4_request, ..."
    authorization = headers.get("Authorization") or ""
    credential = authorization.partition("Credential=")[2].split(",")[0]
    parts = credential.split("/")
    return parts[3] if len(parts) >= 5 else None


def _bucket_kind(method, query):
    if method == "GET" and "uploads" in query:
        return "ListMultipartUploads"
    if method == "GET" and set(query) <= LIST_PARAMS:
        return "LIST"  # ListObjects or ListObjectsV2
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    names = {"PUT": "CreateBucket", "HEAD": "HeadBucket",
             "DELETE": "DeleteBucket"}
    if method in names and not query:
        return names[method]
    suffix = "?" + ",".join(sorted(query)) if query else ""
    return f"{method} bucket{suffix}"


def _object_kind(method, query, headers):
    if method == "PUT":
        if "partNumber" in query:
            return "UploadPart"
        if "x-amz-copy-source" in {k.lower() for k in headers.keys()}:
            return "CopyObject"
        return "PutObject" if not query else "PUT object?" + ",".join(
            sorted(query))
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "restore" in query:
            return "RestoreObject"
        return "POST object"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject"
    if method == "GET":
        return "ListParts" if "uploadId" in query else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    return f"{method} object"


class UploadThrottle:
    """A token bucket shared by every connection: request bodies pass at `rate` bytes
    per second in sum, like an uplink (a limit per connection would let parallel
    multipart parts together exceed it).

    Each caller reserves its bytes and sleeps until the bucket has paid for them, so
    that over any interval of t seconds at most BURST + rate * t bytes pass.
    """

    BURST = 64 * 1024

    def __init__(self, rate):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._tokens = float(self.BURST)
        self._stamp = time.monotonic()

    def take(self, size):
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.BURST, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= size
            debt = -self._tokens
        if debt > 0:
            time.sleep(debt / self.rate)


class FaultProxy:
    """A transparent, counting, fault-injecting reverse proxy (127.0.0.1).

    Point clients at proxy.endpoint_url.  Requests are forwarded byte for
    byte, the client's Host header included, so SigV4 signatures made for
    the proxy address still verify at moto.  Request bodies are streamed
    in their own framing (Content-Length, chunked, aws-chunked), so byte
    counts include that framing.  Each request opens its own connection
    to moto; clients may keep theirs alive.
    """

    def __init__(self, upstream_url, port=0):
        upstream = urllib.parse.urlsplit(upstream_url)
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port or 80
        self._lock = threading.Lock()
        self._counted = threading.Condition(self._lock)   # notified at each count
        self._responding = threading.Event()
        self._responding.set()
        self._answering = threading.Event()     # cleared by hold_answers
        self._answering.set()
        self._hold_kinds = None
        self._stall_services = None
        self._fail_after = None
        self._fail_status = 500
        self._fail_services = None
        self._seen_since_fault = 0
        self._delay = 0.0
        self._delay_kinds = None
        self._released = threading.Event()
        self._released.set()
        self._hold_kinds = None
        self._plant = None
        self._throttle = None
        self._connections = set()         # client sockets being served
        self._line_cuts = 0               # cut_connections calls so far
        self.reset_counters()
        self._server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = None

    @property
    def endpoint_url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def port(self):
        return self._server.server_address[1]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.close()

    def start(self):
        # A short poll interval makes close() quick.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        args=(0.05,), name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self):
        self._responding.set()  # let stalled handlers finish and drop out
        self._released.set()
        self._answering.set()
        self._server.shutdown()
        self._server.server_close()

    # -- faults

    def fail_after(self, n, status=500, services=None):
        """Forward the next n requests, answer all later ones with `status`.

        services: only requests signed for these (e.g. {"s3"}) count and
        fail; by default all do.  S3 and SES share one local endpoint, but
        in AWS they are separate hosts that fail separately.
        """
        with self._lock:
            self._fail_after = n
            self._fail_status = status
            self._fail_services = _service_set(services)
            self._seen_since_fault = 0

    def stop_responding(self, services=None):
        """Accept requests (to `services`, default all) but never answer."""
        with self._lock:
            self._stall_services = _service_set(services)
            self._responding.clear()

    def resume(self):
        """Answer again; requests stalled meanwhile are dropped unanswered."""
        self._responding.set()

    def hold_answers(self, kinds=None):
        """Forward requests (of these kinds, e.g. {"PutObject"}) whole, body and all, but
        hold back the endpoint's answer until release_answers(): an S3 slow to answer,
        for tests of what a client does once it has sent a request's last byte."""
        with self._lock:
            self._hold_kinds = _service_set(kinds)
            self._answering.clear()

    def release_answers(self):
        """Relay the answers held back, and the later ones at once."""
        self._answering.set()

    def _should_hold(self, kind):
        with self._lock:
            return not self._answering.is_set() and _in_services(kind, self._hold_kinds)

    def delay_requests(self, seconds, kinds=None):
        """Hold each request (of these kinds, e.g. {"PutObject"}) `seconds`
        before forwarding it: a slow uplink, for tests of what a backup
        does while its uploads lag behind."""
        with self._lock:
            self._delay = seconds
            self._delay_kinds = _service_set(kinds)

    def hold_requests(self, kinds):
        """Hold each request of these kinds (e.g. {"LIST"}) until release_requests():
        S3 answers late, exactly when the test has seen what it waits for.  Counted
        as "held" when it arrives."""
        with self._lock:
            self._hold_kinds = _service_set(kinds)
            self._released.clear()

    def release_requests(self):
        """Forward the held requests, and hold no more."""
        with self._lock:
            self._hold_kinds = None
        self._released.set()

    def _hold(self, kind):
        with self._lock:
            held = not self._released.is_set() and _in_services(kind, self._hold_kinds)
        if held:
            self._count("_held")
            self._released.wait()

    def plant_first(self, kind, key_contains, body=b"planted by FaultProxy"):
        """Another writer gets there first: before forwarding the first request of
        `kind` (e.g. "PutObject") whose object key contains key_contains, write
        `body` under that key (the bucket and key of the request)."""
        with self._lock:
            self._plant = (kind, key_contains, body)

    def _plant_before(self, kind, path):
        with self._lock:
            if self._plant is None or kind != self._plant[0]:
                return
            bucket, _, key = urllib.parse.unquote(
                urllib.parse.urlsplit(path).path).lstrip("/").partition("/")
            if self._plant[1] not in key:
                return
            body, self._plant = self._plant[2], None
        upstream = f"http://{self.upstream_host}:{self.upstream_port}"
        isolated_client("s3", upstream).put_object(Bucket=bucket, Key=key, Body=body,
                                                   IfNoneMatch="*")

    def limit_upload(self, bytes_per_second):
        """Let request bodies through at bytes_per_second in sum over all connections
        (None: no limit), as over a slow uplink; the client's sends back up behind it."""
        self._throttle = UploadThrottle(bytes_per_second) if bytes_per_second else None

    def cut_connections(self):
        """The line goes dead: every client connection open now is closed at once, a
        body in progress is neither forwarded nor counted further.  With a throttle,
        what the client had sent but the throttle had not let through (the sockets'
        buffers) is lost, as at a power cut, not delivered afterwards."""
        with self._lock:
            self._line_cuts += 1
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def clear_faults(self):
        with self._lock:
            self._fail_after = None
            self._delay = 0.0
        self.release_requests()
        self.resume()
        self.release_answers()

    def _delay_for(self, kind):
        with self._lock:
            if self._delay and _in_services(kind, self._delay_kinds):
                return self._delay
            return 0.0

    def _should_stall(self, service):
        with self._lock:
            return (not self._responding.is_set()
                    and _in_services(service, self._stall_services))

    def _should_fail(self, service):
        """None, or the HTTP status this request is to get."""
        with self._lock:
            if (self._fail_after is None
                    or not _in_services(service, self._fail_services)):
                return None
            self._seen_since_fault += 1
            if self._seen_since_fault > self._fail_after:
                return self._fail_status
            return None

    # -- counters

    def reset_counters(self):
        with self._lock:
            self._requests = 0
            self._by_method = Counter()
            self._by_kind = Counter()
            self._bytes_by_kind = Counter()
            self._bytes_received = 0
            self._bytes_sent = 0
            self._injected_failures = 0
            self._stalled = 0
            self._held = 0
            self._log = []

    def requests(self):
        """Each request since the counters were reset: {"method", "kind", "key"} (the
        object key of a path-style S3 URL, or None)."""
        with self._lock:
            return [{"method": method, "kind": kind, "key": _object_key(path)}
                    for method, kind, path in self._log]

    def counters(self):
        """A snapshot: requests, by_method, by_kind, bytes_received (request
        bodies as sent on the wire, counted as they arrive), bytes_sent (response
        bodies), bytes_received_by_kind, injected_failures, stalled, held (requests
        held by hold_requests, or answers held back by hold_answers); and
        open_connections, the client connections open now (not a count: reset_counters
        leaves it)."""
        with self._lock:
            return self._snapshot()

    def wait_for(self, condition, timeout):
        """Wait until condition(counters) holds, e.g. lambda c: c["stalled"] >= 1;
        False if it does not within timeout seconds."""
        with self._counted:
            return self._counted.wait_for(lambda: condition(self._snapshot()), timeout)

    def _snapshot(self):
        return {
            "requests": self._requests,
            "by_method": dict(self._by_method),
            "by_kind": dict(self._by_kind),
            "bytes_received": self._bytes_received,
            "bytes_sent": self._bytes_sent,
            "bytes_received_by_kind": dict(self._bytes_by_kind),
            "injected_failures": self._injected_failures,
            "stalled": self._stalled,
            "held": self._held,
            "open_connections": len(self._connections),
        }

    def _count_request(self, method, kind, path=""):
        with self._counted:
            self._log.append((method, kind, path))
            self._requests += 1
            self._by_method[method] += 1
            self._by_kind[kind] += 1
            self._counted.notify_all()

    def _count_bytes(self, kind, received=0, sent=0):
        with self._counted:
            self._bytes_received += received
            self._bytes_by_kind[kind] += received
            self._bytes_sent += sent
            self._counted.notify_all()

    def _count(self, name):
        with self._counted:
            setattr(self, name, getattr(self, name) + 1)
            self._counted.notify_all()


def _object_key(path):
    """'/bucket/some%20key?x' -> 'some key'; None for a bucket-level request."""
    parts = path.split("?", 1)[0].split("/", 2)
    return urllib.parse.unquote(parts[2]) if len(parts) == 3 and parts[2] else None


def _service_set(services):
    if isinstance(services, str):
        return {services}
    return None if services is None else set(services)


def _in_services(service, services):
    return services is None or service in services


def _error_xml(status):
    code = {500: "InternalError", 503: "ServiceUnavailable",
            403: "AccessDenied", 400: "BadRequest"}.get(status,
                                                        "InternalError")
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code>"
            f"<Message>Injected failure (HTTP {status}) by FaultProxy"
            f"</Message>"
            f"<RequestId>FAULTPROXY</RequestId></Error>").encode()


def _make_handler(proxy):
    class Handler(_ProxyHandler):
        pass
    Handler.proxy = proxy
    return Handler


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    proxy = None  # set per server by _make_handler
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue for clients

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        with self.proxy._counted:
            self.proxy._connections.add(self.connection)
            self.line = self.proxy._line_cuts     # a later cut ends this connection
            self.proxy._counted.notify_all()

    def finish(self):
        with self.proxy._counted:
            self.proxy._connections.discard(self.connection)
            self.proxy._counted.notify_all()
        super().finish()

    def do_request(self):
        kind = classify(self.command, self.path, self.headers)
        service = request_service(self.headers)
        self.proxy._count_request(self.command, kind, self.path)
        try:
            if self.proxy._should_stall(service):
                self._stall()
                return
            time.sleep(self.proxy._delay_for(kind))
            self.proxy._hold(kind)
            status = self.proxy._should_fail(service)
            if status is not None:
                self._answer_failure(kind, status)
            else:
                self.proxy._plant_before(kind, self.path)
                self._forward(kind)
        except (OSError, http.client.HTTPException):
            # Client or moto went away: drop the connection like S3 would.
            self.close_connection = True

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_request
    do_PATCH = do_OPTIONS = do_request

    # -- faults

    def _stall(self):
        self.proxy._count("_stalled")
        self.proxy._responding.wait()
        self.close_connection = True  # drop it: the client gave up long ago

    def _answer_failure(self, kind, status):
        for _ in self._body_chunks(kind):
            pass
        body = _error_xml(status)
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.proxy._count("_injected_failures")
        self.proxy._count_bytes(kind, sent=len(body))

    # -- forwarding

    def _forward(self, kind):
        upstream = http.client.HTTPConnection(
            self.proxy.upstream_host, self.proxy.upstream_port, timeout=300)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True,
                                skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_HEADERS:
                    upstream.putheader(name, value)
            upstream.endheaders()
            for chunk in self._body_chunks(kind):
                upstream.send(chunk)
            response = upstream.getresponse()
            if self.proxy._should_hold(kind):
                self.proxy._count("_held")
                self.proxy._answering.wait()
            sent = self._relay_response(response)
            self.proxy._count_bytes(kind, sent=sent)
        finally:
            upstream.close()

    def _body_chunks(self, kind):
        """Yield the request body as it came, framing bytes included, each chunk
        counted as it arrives (a wait on bytes_received sees a body in progress)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = self._raw_chunked_body()
        else:
            chunks = self._exactly(int(self.headers.get("Content-Length") or 0))
        for chunk in chunks:
            # Linux still returns what the socket had received before a shutdown
            if self.proxy._line_cuts != self.line:
                raise ConnectionError("the line was cut")
            self.proxy._count_bytes(kind, received=len(chunk))
            yield chunk

    def _pass_uplink(self, size):
        """Wait for the upload limit's leave to read size more bytes (if limited)."""
        throttle = self.proxy._throttle
        if throttle is not None:
            throttle.take(size)

    def _exactly(self, remaining):
        """Yield the next `remaining` bytes of the request, in copy-sized chunks."""
        while remaining > 0:
            self._pass_uplink(min(COPY_CHUNK, remaining))
            chunk = self.rfile.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            remaining -= len(chunk)
            yield chunk

    def _raw_chunked_body(self):
        while True:
            size_line = self.rfile.readline()
            if not size_line:
                raise ConnectionError("client closed mid-body")
            self._pass_uplink(len(size_line))
            yield size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            yield from self._exactly(size + 2)  # data plus CRLF
        while True:  # trailers end with an empty line
            line = self.rfile.readline()
            yield line
            if line in (b"\r\n", b"\n", b""):
                break

    def _relay_response(self, response):
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = (self.command == "HEAD" or response.status in (204, 304)
                   or 100 <= response.status < 200)
        for name, value in response.getheaders():
            if name.lower() in HOP_HEADERS | {"transfer-encoding"}:
                continue
            self.send_header(name, value)
        chunked = length is None and not no_body
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return 0
        return self._copy_body(response, chunked)

    def _copy_body(self, response, chunked):
        sent = 0
        while True:
            chunk = response.read(COPY_CHUNK)
            if not chunk:
                break
            sent += len(chunk)
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self.wfile.write(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        return sent


# ---------------------------------------------------------------- CLI

DEFAULT_PORT = 4566                # where the documented commands expect the endpoint
ADMIN_USER = "aam-local-admin"
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


class _EndpointSession:
    """What tools/aws_setup.py asks of a boto3 session, for this endpoint and its
    dummy root credentials (before IAM enforcement is on)."""

    def __init__(self, aws):
        self.aws = aws

    def client(self, service, region_name=None):
        return isolated_client(service, self.aws.endpoint_url, region_name or self.aws.region)


def set_up_as_aws_setup_does(aws, bucket, sender, recipient, keys_file):
    """tools/aws_setup.py's set-up on this endpoint (its users, policies and keys file),
    plus an administrator for --check; then IAM enforcement on.  Returns the
    administrator's (key id, secret)."""
    options = aws_setup.parse_options(
        ["--region", aws.region, "--bucket", bucket, "--keys-file", keys_file]
        + (["--sender", sender] if sender else [])
        + (["--recipient", recipient] if recipient else []))
    with contextlib.redirect_stdout(sys.stderr):       # its report, not the variables
        report = aws_setup.run(options, _EndpointSession(aws))
    if report.problems:
        raise RuntimeError("the set-up failed: " + "; ".join(report.problems))
    admin = aws.create_user_with_policy(ADMIN_USER, ADMIN_POLICY)
    aws.enable_iam_enforcement()
    return admin


def serve(port=None, region=DEFAULT_REGION, bucket=None, sender=None, recipient=None,
          keys_file=None, upload_limit=None):
    """upload_limit (bytes per second): serve through a FaultProxy limited to it, on port."""
    # SIGTERM, too, should stop the server cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalAws(region=region, port=None if upload_limit else port) as aws, \
            contextlib.ExitStack() as stack:
        endpoint = aws.endpoint_url
        if upload_limit:
            proxy = stack.enter_context(FaultProxy(aws.endpoint_url, port or 0))
            proxy.limit_upload(upload_limit)
            endpoint = proxy.endpoint_url
        if keys_file:
            key_id, secret = set_up_as_aws_setup_does(aws, bucket, sender, recipient,
                                                      keys_file)
        else:
            key_id, secret = DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY
            if bucket:
                aws.create_bucket(bucket)
            for address in (sender, recipient):
                if address:
                    aws.verify_ses_identity(address)
        print(f"AWS_ENDPOINT_URL={endpoint}")
        print(f"AWS_REGION={aws.region}")
        print(f"AWS_ACCESS_KEY_ID={key_id}")
        print(f"AWS_SECRET_ACCESS_KEY={secret}")
        if keys_file:
            print(f"# IAM is enforced. The keys above are an administrator's (for "
                  f"tools/aws_setup.py --check); the backup and restore users' keys and "
                  f"the region are in {keys_file}.")
        print(f"# E-mails caught: {sys.executable} {os.path.abspath(__file__)} emails "
              f"--endpoint {endpoint}", flush=True)
        try:
            while aws._process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


def print_emails(endpoint_url):
    """The e-mails a local endpoint caught, oldest first (as far as moto knows)."""
    parts = urllib.parse.urlsplit(endpoint_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("GET", "/moto-api/data.json")
        data = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    messages = sent_emails(data)
    for number, message in enumerate(messages, 1):
        print(f"--- e-mail {number} of {len(messages)}")
        print(f"From: {message['source']}")
        print(f"To: {', '.join(message['destinations'])}")
        print(f"Subject: {message['subject']}")
        print()
        print((message["body"] or "").rstrip("\n"))
    if not messages:
        print("No e-mail was sent.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run a local AWS endpoint")
    serve_cmd.add_argument("--port", type=int, default=DEFAULT_PORT,
                           help="default: %(default)s (0: a free port)")
    serve_cmd.add_argument("--region", default=DEFAULT_REGION,
                           help="the region of the bucket and SES (default: %(default)s)")
    serve_cmd.add_argument("--bucket", help="S3 bucket to create")
    serve_cmd.add_argument("--sender", help="SES sender address to verify")
    serve_cmd.add_argument("--recipient", help="SES recipient address to verify")
    serve_cmd.add_argument("--iam", action="store_true",
                           help="set up as tools/aws_setup.py does (needs --bucket and "
                                "--keys-file) and enforce IAM")
    serve_cmd.add_argument("--keys-file", help="with --iam: a new file for the backup and "
                                               "restore users' keys and the region")
    from option_types import rate      # the program's own reading of AAM_UPLOAD_LIMIT
    serve_cmd.add_argument("--upload-limit", type=rate, metavar="RATE",
                           help="request bodies in sum at most this rate, a slow uplink "
                                "(e.g. 20Mbit, 2.5M: the forms of AAM_UPLOAD_LIMIT)")
    emails_cmd = commands.add_parser("emails", help="print the e-mails the endpoint caught")
    emails_cmd.add_argument("--endpoint", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                            help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.command == "emails":
        try:
            print_emails(args.endpoint)
        except OSError as problem:
            print(f"error: no local endpoint answers at {args.endpoint}: {problem}",
                  file=sys.stderr)
            return 1
        return 0
    if args.iam and not (args.bucket and args.keys_file):
        parser.error("--iam needs --bucket and --keys-file")
    if args.keys_file and not args.iam:
        parser.error("--keys-file goes with --iam")
    if args.keys_file and os.path.exists(args.keys_file):
        parser.error(f"--keys-file {args.keys_file} exists: give a new file name")
    if importlib.util.find_spec("moto") is None:
        print("error: moto is not installed: run tools/setup.sh, or "
              ".venv/bin/pip install -r tests/requirements.txt", file=sys.stderr)
        return 2
    serve(args.port or None, args.region, args.bucket, args.sender, args.recipient,
          args.keys_file if args.iam else None, args.upload_limit)
    return 0



if __name__ == "__main__":
    sys.exit(main())
