"""The progress line: percent of the bytes and an ETA for 7-Zip and for the upload, per
source and for the run, on a terminal only.

Real parts: the CLI under a pseudo-terminal (the pty module), real 7-Zip, the real child
pass, a real moto server over HTTP.  The terminal's bytes are read until the program
closes it (EOF), then taken apart at each carriage return and line end.
"""

import os
import random
import re

from conftest import PROGRAM, ok, run_on_terminal

COLUMNS = 250               # wide enough for the whole line of two sources
FILES, FILE_SIZE = 12, 500_000
# Several pieces of several volumes per source, and an upload slow enough (6 MB a
# source at 3 MB/s, at least 2 s) for the rate behind an ETA to be measured: the
# upload also paces 7-Zip, which pauses while two finished volumes wait.
SETTINGS = {"AAM_PIECE_SIZE": str(3 * FILE_SIZE), "AAM_VOLUME_SIZE": "700000",
            "AAM_UPLOAD_LIMIT": "3M"}
MEASURES = r"7-Zip (\d+)%(?: ETA ([\d:]+))?, upload (\d+)%(?: ETA ([\d:]+))?"
PROGRESS = re.compile(rf"Source (\d+) of (\d+): {MEASURES}"
                      rf"(?: \| run: (?:{MEASURES}|(\d+) of \d+ sources walked))?")


def two_sources(sandbox):
    """Two mounts of random (incompressible) files: 7-Zip stores them as they are."""
    rng = random.Random(28)
    mounts = [os.path.join(sandbox.root, "data", "ann"),
              os.path.join(sandbox.second_root, "bob")]
    for mount in mounts:
        os.makedirs(mount)
        for index in range(FILES):
            with open(os.path.join(mount, f"file{index:02d}.bin"), "wb") as handle:
                handle.write(rng.randbytes(FILE_SIZE))
    sandbox.write_instructions("".join(mount + "/\n" for mount in mounts))
    return mounts


def segments(terminal_text):
    """What the terminal showed between carriage returns and line ends, without the
    blanks that pad a shorter line over a longer one (empty ones left out)."""
    return [part.rstrip() for part in re.split(r"[\r\n]", terminal_text) if part.strip()]


def progress_lines(terminal_text):
    return [match for match in map(PROGRESS.fullmatch, segments(terminal_text)) if match]


def assert_rises_to_100(percents, what):
    assert percents, f"no {what} percent was shown"
    assert percents == sorted(percents), f"{what} went backwards: {percents}"
    assert percents[-1] == 100, f"{what} ended at {percents[-1]}%"


def test_a_terminal_shows_percent_and_eta_per_source_and_run(sandbox):
    two_sources(sandbox)
    status, shown = run_on_terminal(sandbox.backup_args(), sandbox.env(**SETTINGS), COLUMNS)
    log = open(sandbox.log_files()[-1], encoding="utf-8").read()
    assert status == 0, shown
    lines = progress_lines(shown)
    for source in (1, 2):
        own = [m for m in lines if m[1] == str(source)]
        assert_rises_to_100([int(m[3]) for m in own], f"source {source}'s 7-Zip")
        assert_rises_to_100([int(m[5]) for m in own], f"source {source}'s upload")
        assert any(m[4] for m in own), f"no 7-Zip ETA for source {source}"
        assert any(m[6] for m in own), f"no upload ETA for source {source}"
    assert all(m[2] == "2" for m in lines)
    # the run's total is known once the second source is walked
    assert all(m[11] == "1" for m in lines if m[1] == "1")
    run = [m for m in lines if m[7]]
    assert run and all(m[1] == "2" for m in run)
    assert_rises_to_100([int(m[7]) for m in run], "the run's 7-Zip")
    assert_rises_to_100([int(m[9]) for m in run], "the run's upload")
    assert any(m[8] for m in run) and any(m[10] for m in run), "no ETA for the run"
    # The lines the run prints are whole on the terminal, each one of the log's.
    log_lines = set(log.splitlines())
    printed = [s for s in segments(shown) if not PROGRESS.fullmatch(s)]
    assert printed and all(line in log_lines for line in printed), [
        line for line in printed if line not in log_lines]
    # The log file and the e-mail keep plain lines: no carriage return, no percent.
    assert "\r" not in log and not re.search(r"\d%|ETA", log)
    assert sandbox.emails() and not any(re.search(r"\d%|ETA|\r", str(e))
                                        for e in sandbox.emails())


def test_without_a_terminal_nothing_is_added(sandbox):
    """A scheduler's run (output to a pipe or a file) prints only the log's lines."""
    two_sources(sandbox)
    result = ok(sandbox.run(sandbox.backup_args(), env=sandbox.env(**SETTINGS)))
    log_lines = set(open(sandbox.log_files()[-1], encoding="utf-8").read().splitlines())
    assert result.stderr == ""
    assert "\r" not in result.stdout and not re.search(r"\d%|ETA", result.stdout)
    printed = result.stdout.splitlines()
    assert printed and all(line in log_lines for line in printed), [
        line for line in printed if line not in log_lines]


def test_the_documented_line_is_the_line_shown():
    """docs/backup.md's example of the line has the form the terminal test reads."""
    page = open(os.path.join(os.path.dirname(PROGRAM), "docs", "backup.md"),
                encoding="utf-8").read()
    examples = [line for line in page.splitlines() if line.startswith("Source ")]
    assert examples and all(PROGRESS.fullmatch(line) for line in examples)
