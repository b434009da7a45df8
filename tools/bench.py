#!/usr/bin/env python3
"""Benchmark AAM Auto Backup against restic, duplicity and plain 7-Zip.

Generates a reproducible tree (by default 10,000 files, about 0.5 GB: half
compressible text, half random bytes, 200 B to 200 KB each), starts a local
S3 endpoint (moto server behind a counting proxy, tools/local_aws.py) and
measures, for each tool, four scenarios on the same tree:

    full         the first (full) backup
    incr-1%      an incremental after 1% of the files were rewritten
    incr-none    an incremental with nothing changed
    restore      restoring the latest state (full + incrementals)

Each run is one process tree, measured from outside:

    wall         elapsed time
    cpu          user + system time of the whole tree (RUSAGE_CHILDREN delta:
                 every descendant is waited for by its parent)
    peak RSS     the largest sum of the resident set sizes of the process and
                 all its descendants, sampled every 50 ms from /proc (pages
                 shared between processes count once per process)
    uploaded     request bytes (bodies, as framed on the wire) that reached
                 the S3 endpoint, counted by the proxy
    requests     S3 requests (LIST requests in brackets)

The tools:

    aam          aam_auto_backup.py regular-backup, destination AWS only,
                 one-step-aws-data-restoration for the restore ("n/a" while
                 restoration is not implemented)
    7zip         plain `7zz a -tzip -mem=AES256` with the same switches,
                 level and volume size (the archiver's own speed, our floor;
                 nothing is uploaded); the incremental archives exactly the
                 changed files
    restic       its S3 backend on the same endpoint (s3:http://.../bucket)
    duplicity    its boto3 S3 backend on the same endpoint

Secrets reach restic and duplicity through environment variables and 7-Zip
through standard input, never the command line.  The table's last column is
AAM's wall time divided by that tool's (below 1: AAM is faster).  The
machine is shared and noisy: quote ratios from one run, not absolute times.

    tools/bench.py                              # default tree, all tools
    tools/bench.py --files 100000               # 100,000 files (same 50 KB mean size)
    tools/bench.py --total-bytes 5G             # 5 GB
    tools/bench.py --tools aam,7zip --files 50 --total-bytes 1M   # tiny (CI)
    tools/bench.py compression                  # 7-Zip level against size and time

Installing restic and duplicity (Debian): tools/setup.sh --bench.
"""

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROGRAM = os.path.join(REPO, "aam_auto_backup.py")
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import aam_auto_backup as aam  # noqa: E402
from local_aws import FaultProxy, LocalAws  # noqa: E402

TOOLS = ("aam", "7zip", "restic", "duplicity")
SCENARIOS = ("full", "incr-1%", "incr-none", "restore")
# The local S3 endpoint stands in for a remote service: on a 2-core machine it must
# not take CPU from the tool being measured, so it runs at the lowest priority.
ENDPOINT_NICENESS = 19
MIN_SIZE, MAX_SIZE = 200, 200_000
ARCHIVE_KEY = "bench archive key, not a secret 42!"
ACCESS_KEY_ID, SECRET_KEY = "testing", "testing"
LOCATION = "benchpc"
DEFAULT_VOLUME_SIZE = 64 * 1024 * 1024
SAMPLE_SECONDS = 0.05


# ---------------------------------------------------------------- the tree

def parse_size(text):
    """'500M', '5G', '1000000' -> bytes (powers of 1000, as disks are sold)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    factor = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match[2].lower()]
    return int(float(match[1]) * factor)


def size_exponent(files, total_bytes):
    """k such that sizes MIN + (MAX-MIN) * u**k (u uniform) average total/files."""
    mean = total_bytes / files
    mean = min(max(mean, MIN_SIZE + 1), (MIN_SIZE + MAX_SIZE) / 2)
    return (MAX_SIZE - MIN_SIZE) / (mean - MIN_SIZE) - 1


def text_corpus(rng, size=16 * 1024 * 1024):
    """Word-like text with a Zipf-ish vocabulary: compresses like prose (~3:1)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    words = rng.choices(vocabulary, weights, k=size // 5)
    for index in range(0, len(words), 12):
        words[index] += "\n" if rng.random() < 0.5 else ","
    return " ".join(words).encode()[:size]


class BenchTree:
    """files: {relative path: kind}; kind is 'text' or 'random'."""

    def __init__(self, root, files, total_bytes, seed):
        self.root = root
        self.count = files
        self.rng = random.Random(seed)
        self.exponent = size_exponent(files, total_bytes)
        self.corpus = text_corpus(random.Random(seed + 1))
        self.files = {}
        self.total_bytes = 0

    def generate(self):
        for index in range(self.count):
            kind = "text" if index % 2 == 0 else "random"
            relative = os.path.join(f"d{index // 100:04d}",
                                    f"f{index:06d}.{'txt' if kind == 'text' else 'bin'}")
            size = int(MIN_SIZE + (MAX_SIZE - MIN_SIZE) * self.rng.random() ** self.exponent)
            self.write(relative, kind, size)
            self.files[relative] = kind
            self.total_bytes += size
        return self

    def content(self, kind, size):
        if kind == "random":
            return self.rng.randbytes(size)
        start = self.rng.randrange(0, len(self.corpus) - size)
        return self.corpus[start:start + size]

    def write(self, relative, kind, size):
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(self.content(kind, size))

    def change(self, fraction):
        """Rewrite a fraction of the files (same kind and size); their paths."""
        chosen = self.rng.sample(sorted(self.files), max(1, int(self.count * fraction)))
        for relative in chosen:
            size = os.path.getsize(os.path.join(self.root, relative))
            self.write(relative, self.files[relative], size)
        return chosen


def compressed_tree(root, files, total_bytes, seed):
    """Mostly already-compressed data, like photos: 90% deflated text, 10% text."""
    rng = random.Random(seed)
    corpus = text_corpus(random.Random(seed + 1))
    exponent = size_exponent(files, total_bytes)
    for index in range(files):
        size = int(MIN_SIZE + (MAX_SIZE - MIN_SIZE) * rng.random() ** exponent)
        start = rng.randrange(0, len(corpus) - 4 * size)
        if index % 10:
            data = zlib.compress(corpus[start:start + 4 * size], 9)[:size]
            name = f"p{index:06d}.jpg"
        else:
            data, name = corpus[start:start + size], f"n{index:06d}.txt"
        path = os.path.join(root, f"d{index // 100:04d}", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


def tree_summary(root):
    count = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            count += 1
            size += os.lstat(os.path.join(directory, name)).st_size
    return count, size


# ---------------------------------------------------------------- measuring

def process_tree_rss(root_pid, page_size=os.sysconf("SC_PAGE_SIZE")):
    """Sum of the resident set sizes of root_pid and all its descendants (bytes)."""
    children, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
            with open(f"/proc/{name}/statm", "rb") as handle:
                resident = int(handle.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue        # the process ended meanwhile
        # the command name (field 2) may hold spaces: fields after its ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
        rss[int(name)] = resident * page_size
    total, pending = 0, [root_pid]
    while pending:
        pid = pending.pop()
        total += rss.get(pid, 0)
        pending.extend(children.get(pid, ()))
    return total


class TreeSampler(threading.Thread):
    """Samples the process tree's total RSS until stopped; keeps the peak."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak = pid, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, process_tree_rss(self.pid))
            self.done.wait(SAMPLE_SECONDS)

    def stop(self):
        self.done.set()
        self.join()


class Result:
    def __init__(self, wall=None, cpu=None, rss=None, uploaded=None, requests=None,
                 lists=None, status=0, note=""):
        self.wall, self.cpu, self.rss = wall, cpu, rss
        self.uploaded, self.requests, self.lists = uploaded, requests, lists
        self.status, self.note = status, note

    @classmethod
    def not_available(cls, note):
        return cls(status=None, note=note)

    @property
    def ok(self):
        return self.status == 0 and self.wall is not None

    def as_dict(self):
        return dict(vars(self))


def cpu_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(argv, env, output, proxy=None, cwd=None, stdin_text=None):
    """Run argv to its end; a Result with everything measured about its tree."""
    before = proxy.counters() if proxy else None
    cpu_before = cpu_of_children()
    started = time.perf_counter()
    with open(output, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                   stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL)
        sampler = TreeSampler(process.pid)
        sampler.start()
        if stdin_text:
            process.stdin.write(stdin_text.encode())
            process.stdin.close()
        status = process.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    # A run shorter than the sampling period may end before its first sample: its
    # peak is then unknown (None), not 0.  (wait4's ru_maxrss is no help: it counts
    # the forked copy of this Python process before exec.)
    result = Result(wall, cpu_of_children() - cpu_before, sampler.peak or None,
                    status=status)
    if proxy:
        after = proxy.counters()
        result.uploaded = after["bytes_received"] - before["bytes_received"]
        result.requests = after["requests"] - before["requests"]
        result.lists = (after["by_kind"].get("LIST", 0) - before["by_kind"].get("LIST", 0))
    if status != 0:
        result.note = f"exit code {status}, see {output}"
    return result


# ---------------------------------------------------------------- the tools

class Tool:
    name = ""

    def __init__(self, bench):
        self.bench = bench
        self.output = os.path.join(bench.work, f"{self.name}-output.txt")

    def available(self):
        return None     # or why not

    def restored_tree(self, target):
        """Where, under the restore target, the source tree comes back."""
        return target

    def prepare(self):
        pass

    def run(self, argv, env=None, **kwargs):
        return measure(argv, env or self.env(), self.output, **kwargs)

    def env(self):
        return dict(os.environ)

    def cleanup(self):
        pass


class AamTool(Tool):
    name = "aam"

    def env(self):
        bench = self.bench
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AAM_"))}
        env.update({
            "AWS_ENDPOINT_URL": bench.proxy.endpoint_url,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AAM_TEMP_ROOT": os.path.join(bench.work, "aam-temp"),
            "AAM_LOCK_FILE": os.path.join(bench.work, "aam.lock"),
            "AAM_VOLUME_SIZE": str(bench.volume_size),
            "AAM_COMPRESSION_LEVEL": str(bench.level),
            "AAM_RESTORE_POLL_SECONDS": "1",
            "BENCH_ARCHIVE_KEY": ARCHIVE_KEY,
            "BENCH_KEY_ID": ACCESS_KEY_ID,
            "BENCH_SECRET": SECRET_KEY,
        })
        return env

    def prepare(self):
        self.bench.aws.create_bucket(self.bucket)
        self.instructions = os.path.join(self.bench.work, "aam-instructions.txt")
        with open(self.instructions, "w", encoding="utf-8") as handle:
            handle.write(self.bench.source.rstrip("/") + "/\n\n\n")

    @property
    def bucket(self):
        return "bench-aam"

    def backup(self, _scenario):
        bench = self.bench
        argv = [sys.executable, PROGRAM, "regular-backup", "user", sys.executable, "1", "0",
                os.path.join(bench.work, "aam-logs"), "False", "Bench", "bench@example.com",
                "owner@example.com", self.instructions, "q", "AWS", "", "False",
                "env:BENCH_ARCHIVE_KEY", self.bucket, LOCATION, "env:BENCH_KEY_ID",
                "env:BENCH_SECRET", "no", "no"]
        return self.run(argv, proxy=self.bench.proxy)

    def restored_tree(self, target):
        # one numbered directory per source, beside restore-map.txt
        return os.path.join(target, "1")

    def restore(self, target):
        bench = self.bench
        argv = [sys.executable, PROGRAM, "one-step-aws-data-restoration",
                os.path.join(bench.work, "aam-logs"), "False", "Bench", "bench@example.com",
                "owner@example.com", "1", "env:BENCH_ARCHIVE_KEY", self.bucket, LOCATION,
                "env:BENCH_KEY_ID", "env:BENCH_SECRET", target]
        result = self.run(argv, proxy=self.bench.proxy)
        if not result.ok:
            return Result.not_available("restoration failed or is not implemented yet "
                                        f"({result.note})")
        return result


class SevenZipTool(Tool):
    name = "7zip"

    def available(self):
        return None if shutil.which(self.bench.seven_zip) else "7-Zip not found"

    def prepare(self):
        self.archives = os.path.join(self.bench.work, "7zip-archives")
        os.makedirs(self.archives)
        self.runs = 0

    def backup(self, scenario):
        bench = self.bench
        if scenario == "incr-none":
            return Result.not_available("nothing to archive")
        self.runs += 1
        target = os.path.join(self.archives, f"run{self.runs}")
        os.makedirs(target)
        if scenario == "full":
            sources = ["."]
        else:
            listing = os.path.join(bench.work, "7zip-changed.txt")
            with open(listing, "w", encoding="utf-8") as handle:
                handle.write("\n".join(bench.changed) + "\n")
            sources = ["@" + listing]
        argv = seven_zip_argv(bench.seven_zip, bench.level, bench.volume_size,
                              os.path.join(target, "backup.zip"), sources)
        return self.run(argv, cwd=bench.source, stdin_text=ARCHIVE_KEY + "\n")

    def restore(self, target):
        results = []
        for run in sorted(os.listdir(self.archives)):
            first = os.path.join(self.archives, run, "backup.zip.001")
            argv = [self.bench.seven_zip, "x", "-aoa", "-snl", "-bd", f"-o{target}",
                    first]
            # without -p, 7-Zip asks for the password on standard input
            results.append(self.run(argv, stdin_text=ARCHIVE_KEY + "\n"))
        return combine(results)

    def cleanup(self):
        shutil.rmtree(self.archives, ignore_errors=True)


def seven_zip_argv(seven_zip, level, volume_size, archive, sources):
    """The switches aam_auto_backup.py gives 7-Zip (seven_zip_add_argv)."""
    return [seven_zip, "a", "-tzip", f"-mx={level}", "-mem=AES256", "-mcu=on", "-p",
            f"-v{volume_size}b", "-bb1", "-bd", "-snl", "-sccUTF-8", "-y", archive] + sources


def combine(results):
    """Two runs one after the other, as one (peak RSS: the larger)."""
    if not all(r.ok for r in results):
        return next(r for r in results if not r.ok)
    total = Result(0.0, 0.0, None, status=0)
    for result in results:
        total.wall += result.wall
        total.cpu += result.cpu
        total.rss = max(total.rss or 0, result.rss or 0) or None
    return total


class ResticTool(Tool):
    name = "restic"

    def available(self):
        return None if shutil.which("restic") else "restic not installed"

    def env(self):
        bench = self.bench
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESTIC_"))}
        env.update({
            "RESTIC_REPOSITORY": f"s3:{bench.proxy.endpoint_url}/bench-restic",
            "RESTIC_PASSWORD": ARCHIVE_KEY,
            "RESTIC_CACHE_DIR": os.path.join(bench.work, "restic-cache"),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        return env

    def prepare(self):
        self.bench.aws.create_bucket("bench-restic")
        result = self.run(["restic", "init"])
        if not result.ok:
            raise RuntimeError(f"restic init failed: {result.note}")

    def backup(self, _scenario):
        return self.run(["restic", "backup", "--host", LOCATION, "--quiet", "."],
                        cwd=self.bench.source, proxy=self.bench.proxy)

    def restore(self, target):
        return self.run(["restic", "restore", "latest", "--host", LOCATION, "--target",
                         target], proxy=self.bench.proxy)


class DuplicityTool(Tool):
    name = "duplicity"

    def available(self):
        if not shutil.which("duplicity"):
            return "duplicity not installed"
        python = _shebang_python(shutil.which("duplicity"))
        probe = subprocess.run([python, "-c", "import boto3"], capture_output=True)
        return None if probe.returncode == 0 else f"boto3 missing for {python}"

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "PASSPHRASE": ARCHIVE_KEY,
            "GNUPGHOME": self.gnupg_home,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        })
        return env

    @property
    def gnupg_home(self):
        # gpg-agent's sockets live in GNUPGHOME, and a Unix socket path is limited to
        # 107 bytes: a deep work directory made gpg fail (exit 31), so use a short one.
        if not hasattr(self, "_gnupg_home"):
            self._gnupg_home = tempfile.mkdtemp(prefix="aam-gpg-", dir="/tmp")
        return self._gnupg_home

    def common(self):
        return ["--s3-endpoint-url", self.bench.proxy.endpoint_url,
                "--archive-dir", os.path.join(self.bench.work, "duplicity-cache"),
                "--name", "bench", "--no-print-statistics", "--verbosity", "warning"]

    def prepare(self):
        self.bench.aws.create_bucket("bench-duplicity")
        self.url = "boto3+s3://bench-duplicity/bench"

    def backup(self, scenario):
        action = "full" if scenario == "full" else "incremental"
        return self.run(["duplicity", action] + self.common() + [self.bench.source, self.url],
                        proxy=self.bench.proxy)

    def restore(self, target):
        return self.run(["duplicity", "restore"] + self.common() + [self.url, target],
                        proxy=self.bench.proxy)

    def cleanup(self):
        # gpg may have started an agent for this GNUPGHOME: stop exactly that one.
        with contextlib.suppress(OSError):
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env(),
                           capture_output=True, timeout=30)
        shutil.rmtree(self.gnupg_home, ignore_errors=True)


def _shebang_python(script):
    with open(script, "rb") as handle:
        first = handle.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else sys.executable


TOOL_CLASSES = {"aam": AamTool, "7zip": SevenZipTool, "restic": ResticTool,
                "duplicity": DuplicityTool}


# ---------------------------------------------------------------- the run

class Bench:
    def __init__(self, options):
        self.options = options
        self.work = tempfile.mkdtemp(prefix="aam-bench-", dir=options.work or "/var/tmp")
        self.source = os.path.join(self.work, "src", "data")
        self.volume_size = options.volume_size
        self.level = options.level
        self.seven_zip = aam.current_platform().find_seven_zip()
        self.changed = []
        self.aws = self.proxy = None

    def run(self):
        options = self.options
        say(f"Generating {options.files:,} files (~{options.total_bytes / 1e9:.2f} GB) in "
            f"{self.source} ...")
        tree = BenchTree(self.source, options.files, options.total_bytes,
                         options.seed).generate()
        say(f"  {len(tree.files):,} files, {tree.total_bytes / 1e6:,.1f} MB")
        results = {}
        with LocalAws(niceness=ENDPOINT_NICENESS) as aws, \
                FaultProxy(aws.endpoint_url) as proxy:
            self.aws, self.proxy = aws, proxy
            tools = self.tools()
            for scenario in SCENARIOS:
                if scenario == "incr-1%":
                    self.changed = tree.change(0.01)
                    say(f"Changed {len(self.changed)} files (1%).")
                for tool in tools.values():
                    results[(scenario, tool.name)] = self.run_one(tool, scenario)
            for tool in tools.values():
                tool.cleanup()
        scan = self.scan_time()
        return tree, results, tools, scan

    def tools(self):
        tools = {}
        for name in self.options.tools:
            tool = TOOL_CLASSES[name](self)
            why_not = tool.available()
            if why_not:
                say(f"Skipping {name}: {why_not}")
                continue
            tool.prepare()
            tools[name] = tool
        return tools

    def run_one(self, tool, scenario):
        say(f"{scenario:10} {tool.name:10} ...", end="")
        if scenario == "restore":
            target = os.path.join(self.work, f"restored-{tool.name}")
            result = tool.restore(target)
            if result.ok:
                result.note = self.check_restore(tool.restored_tree(target))
            shutil.rmtree(target, ignore_errors=True)
        else:
            result = tool.backup(scenario)
        say(f" {describe(result)}")
        return result

    def check_restore(self, target):
        """Every source file must come back (by count and size; paths differ per tool)."""
        want = tree_summary(self.source)
        got = tree_summary(target)
        return "" if got == want else f"restored {got}, expected {want}"

    def scan_time(self):
        """The incremental's scan on its own: the walk with nothing changed."""
        platform = aam.current_platform()
        instructions = aam.parse_instructions(self.source + "/\n\n\n", "bench", platform)
        source = aam.plan_backup(instructions, platform).sources[0]
        started = time.perf_counter()
        files = aam.TreeWalk(source.mount, source, platform, aam.utc_now()).files()
        return time.perf_counter() - started, len(files)


def say(text, end="\n"):
    print(text, end=end, flush=True)


def megabytes(rss):
    """Peak RSS in MB; '<1 sample' for a run too short to be sampled."""
    return "<1 sample" if rss is None else f"{rss / 1e6:.0f}"


def describe(result):
    if not result.ok:
        return f"n/a ({result.note})"
    text = f"{result.wall:.2f} s wall, {result.cpu:.2f} s CPU, {megabytes(result.rss)} MB RSS"
    if result.uploaded is not None:
        text += f", {result.uploaded / 1e6:.1f} MB up, {result.requests} requests"
    return text + (f" [{result.note}]" if result.note else "")


def table(results, tools):
    """One Markdown table; the last column is AAM's wall time over this tool's."""
    lines = ["| scenario | tool | wall s | CPU s | peak RSS MB | uploaded MB | "
             "S3 requests (LIST) | AAM ÷ tool (wall) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for scenario in SCENARIOS:
        ours = results.get((scenario, "aam"))
        for name in tools:
            result = results[(scenario, name)]
            if not result.ok:
                lines.append(f"| {scenario} | {name} | n/a | | | | | |")
                continue
            ratio = (f"{ours.wall / result.wall:.2f}" if ours is not None and ours.ok
                     else "n/a")
            uploaded = "" if result.uploaded is None else f"{result.uploaded / 1e6:.1f}"
            requests = "" if result.requests is None else f"{result.requests} ({result.lists})"
            lines.append(f"| {scenario} | {name} | {result.wall:.2f} | {result.cpu:.2f} | "
                         f"{megabytes(result.rss)} | {uploaded} | {requests} | {ratio} |")
    return "\n".join(lines)


def machine():
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for argv in (["7zz"], ["restic", "version"], ["duplicity", "--version"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            first = next((line for line in out.splitlines() if line.strip()), "")
            versions.append(first.strip()[:40])
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, Python "
            f"{sys.version.split()[0]}; " + "; ".join(versions))


# ---------------------------------------------------------------- compression levels

def compression_sweep(options):
    """7-Zip's size and time per level on the bench tree and on compressed data."""
    work = tempfile.mkdtemp(prefix="aam-bench-", dir=options.work or "/var/tmp")
    seven_zip = aam.current_platform().find_seven_zip()
    trees = {"bench tree": os.path.join(work, "mixed"),
             "compressed (photo-like)": os.path.join(work, "compressed")}
    say("Generating the trees ...")
    BenchTree(trees["bench tree"], options.files, options.total_bytes, options.seed).generate()
    compressed_tree(trees["compressed (photo-like)"], options.files, options.total_bytes,
                    options.seed)
    lines = ["| data | -mx | archive MB | size vs -mx5 | wall s | CPU s |",
             "|---|---:|---:|---:|---:|---:|"]
    output = os.path.join(work, "compression-output.txt")
    for label, root in trees.items():
        _count, size = tree_summary(root)
        rows = {}
        for level in options.levels:
            target = os.path.join(work, "archive")
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            argv = seven_zip_argv(seven_zip, level, options.volume_size,
                                  os.path.join(target, "backup.zip"), ["."])
            result = measure(argv, dict(os.environ), output, cwd=root,
                             stdin_text=ARCHIVE_KEY + "\n")
            archived = tree_summary(target)[1]
            rows[level] = (archived, result)
            say(f"{label}: -mx{level}: {archived / 1e6:.1f} MB of {size / 1e6:.1f} MB, "
                f"{describe(result)}")
        base = rows.get(5, next(iter(rows.values())))[0]
        for level, (archived, result) in rows.items():
            lines.append(f"| {label} | {level} | {archived / 1e6:.1f} | "
                         f"{100 * (archived / base - 1):+.1f}% | {result.wall:.2f} | "
                         f"{result.cpu:.2f} |")
    print("\n" + "\n".join(lines))
    print(f"\nMachine: {machine()}")
    if not options.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- command line

def parse_options(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark AAM Auto Backup against restic, duplicity and plain 7-Zip.")
    parser.add_argument("mode", nargs="?", default="compare", choices=("compare", "compression"),
                        help="compare (default): the four tools; compression: 7-Zip levels")
    parser.add_argument("--files", type=int, default=10_000, help="files in the tree")
    parser.add_argument("--total-bytes", type=parse_size,
                        help="tree size, e.g. 500M or 5G (default: 50 KB per file)")
    parser.add_argument("--volume-size", type=parse_size, default=DEFAULT_VOLUME_SIZE,
                        help="7-Zip volume size for AAM and plain 7-Zip (default 64 MiB: "
                             "the 0.5 GB tree in several volumes, as a real backup is)")
    parser.add_argument("--level", type=int, default=aam.DEFAULT_COMPRESSION_LEVEL,
                        help="7-Zip -mx level for AAM and plain 7-Zip (default: AAM's)")
    parser.add_argument("--levels", default="0,1,3,5,7,9",
                        help="compression mode: the levels to try")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated, from {','.join(TOOLS)}")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--work", help="where to make the work directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args(argv)
    if options.total_bytes is None:
        options.total_bytes = options.files * 50_000
    options.tools = [t.strip() for t in options.tools.split(",") if t.strip()]
    unknown = set(options.tools) - set(TOOLS)
    if unknown or "aam" not in options.tools:
        parser.error(f"--tools: unknown {sorted(unknown)}" if unknown
                     else "--tools must include aam")
    options.levels = [int(level) for level in options.levels.split(",")]
    return options


def main(argv=None):
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options.mode == "compression":
        return compression_sweep(options)
    bench = Bench(options)
    try:
        tree, results, tools, (scan_seconds, _found) = bench.run()
    finally:
        if not options.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    print()
    print(table(results, tools))
    print(f"\nTree: {len(tree.files):,} files, {tree.total_bytes / 1e6:,.1f} MB; volume size "
          f"{options.volume_size:,} bytes; -mx{options.level}.")
    print(f"Incremental scan alone (the walk, nothing changed): {scan_seconds:.3f} s "
          f"for {len(tree.files):,} files.")
    print(f"Machine: {machine()}")
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump({"tools": list(tools), "files": len(tree.files),
                       "bytes": tree.total_bytes,
                       "volume_size": options.volume_size, "level": options.level,
                       "scan_seconds": scan_seconds,
                       "results": {f"{s}/{t}": r.as_dict() for (s, t), r in results.items()}},
                      handle, indent=1)
    failed = [key for key, result in results.items()
              if result.status not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
