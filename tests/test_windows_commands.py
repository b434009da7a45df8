"""The Windows branch: ShadowSpawn, Robocopy and 7z.exe command lines, pinned to the originals.

ShadowSpawn and Robocopy cannot run on the Linux CI (7z.exe and python.exe run
under Wine in test_wine.py).  The golden tests below compare what
WindowsPlatform generates for the original design's test case 1 instruction
file with text written out by hand from the original program's tested command
lines; every deviation from the original text is named next to the expected text.

Stand-ins, each saying what it emulates:
- OriginalMachine: the file system of the original Windows machine (NTFS drive c:,
  and ShadowSpawn's q: showing one mount directory), case-insensitive, laid
  out in a temporary directory.  Only path resolution is replaced.
- shadowspawn_parse / msvcrt_split: how ShadowSpawn 0.2 splits its own
  command line and how python.exe (MSVCRT) splits the command ShadowSpawn
  launches, to check that the child receives exactly its 15 arguments.
- fake_shadowspawn_run: what ShadowSpawn.exe and the child write into
  shadow_copy_command_output.txt, for the parent's marker checks.
"""

import os
import types

import pytest

import aam_auto_backup as aab
from conftest import file_times_pass
from test_instructions import TEST_CASE_1

PROGRAM_DIR = "C:\\Users\\Allen\\Documents\\AAM Auto Backup"
PROGRAM = PROGRAM_DIR + "\\aam_auto_backup.py"
PYTHON = "C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python38\\python.exe"
SEVEN_ZIP = PROGRAM_DIR + "\\7z.exe"
MIRROR_ROOT = "F:\\backup\\main"
WORK = "c:\\temp\\main-work-computer20201216_170302.225333"
START = "20201216 170302.225333"

# The original machine's disk, as the original example implies it ('/' ends a
# directory).  Real Windows spells Desktop and
# Documents with capitals, the instruction file does not.
ORIGINAL_DISK = [
    "c/Users/Allen/AAM posting/stock linked files/posting.docx",
    "c/Users/Allen/AAM posting/other/",
    "c/Users/Allen/Desktop/",
    "c/Users/Allen/Documents/folder1/folder1-1/",
    "c/Users/Allen/Documents/folder1/folder1-2/a.txt",
    "c/Users/Allen/Documents/folder1/folder1-2/~WRL3620.tmp",
    "c/Users/Allen/Documents/folder1/folder1-3/",
    "c/Users/Allen/Documents/folder1/folder1-4/",
    "c/Users/Allen/Documents/folder1/notes.txt",
    "c/Users/Allen/Documents/folder2/folder2-1/",
    "c/Users/Allen/Documents/folder2/folder2-1-1/",
    "c/Users/Allen/Documents/folder3/",
    "c/Users/Allen/Documents/folder4/",
    "c/Users/Allen/Documents/report.docx",
    "c/Users/Allen/NTUSER.DAT",
    "c/temp/test/",
    "c/temp/test2/media.mp4",
    "c/temp/main-work-computer20201216_170302.225333/",
    "c/temp/aam_auto_backup.lock",
]


class OriginalMachine(aab.WindowsPlatform):
    """Stand-in: the original Windows disk in a temporary directory (see the module doc).

    Drive letters map to directories; names are looked up case-insensitively,
    as NTFS does.  The console code page is the original machine's, 437.
    """

    def __init__(self, drives):
        self.drives = dict(drives)

    def shadow_mount(self, mount):
        """ShadowSpawn's part: show the mount directory at q:."""
        self.drives["q:"] = self.long_path(mount)

    def long_path(self, path):
        host = self.drives[path[:2].lower()]
        for name in filter(None, path[3:].split("\\")):
            names = os.listdir(host) if os.path.isdir(host) else []
            host = os.path.join(host, next((n for n in names if n.lower() == name.lower()),
                                           name))
        return host

    def console_code_page(self):
        return 437


def build_disk(root, entries):
    for entry in entries:
        path = os.path.join(root, *entry.rstrip("/").split("/"))
        if entry.endswith("/"):
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write(entry)


@pytest.fixture
def machine(tmp_path):
    build_disk(str(tmp_path / "disk"), ORIGINAL_DISK)
    return OriginalMachine({"c:": str(tmp_path / "disk" / "c")})


def original_plan(machine):
    instructions = aab.parse_instructions(TEST_CASE_1, "instructions.txt", machine)
    return aab.plan_backup(instructions, machine, [WORK, MIRROR_ROOT])


def child_plan(machine, source, tmp_path):
    """The parent writes shadow_copy_instruction.txt, the child reads it back on q:."""
    machine.shadow_mount(source.mount)
    path = str(tmp_path / aab.PLAN_FILE)
    aab.write_source_plan(path, source, "q:\\", machine)
    return aab.read_source_plan(path, "q:\\", machine)


def settings():
    return aab.Settings(volume_size=aab.DEFAULT_VOLUME_SIZE,
                        piece_size=aab.DEFAULT_PIECE_SIZE, compression_level=5,
                        temp_root="c:\\temp", seven_zip=SEVEN_ZIP, lock_file="",
                        region="us-east-1", ses_region="us-east-1", restore_tier="Bulk",
                        restore_poll_seconds=1800, state_dir="c:\\state")


def windows_child_args(mount, scope=aab.Scope.FULL, latest=None):
    stamp = aab.parse_arg_stamp(latest) if latest else None
    return aab.child_arguments(
        operation="regular-backup", agent=aab.CHILD_AGENT, latest_full=stamp,
        latest_incremental=stamp, start=aab.parse_arg_stamp(START), mount=mount,
        drive_letter="q", destinations=frozenset({"local", "AWS"}), mirror_root=MIRROR_ROOT,
        keep=False, key="env:" + aab.CHILD_KEY_VARIABLE, location="main-work-computer",
        work_dir=WORK, force_full=False, scope=scope)


def shadowspawn_line(machine, mount, **kwargs):
    argv = windows_child_args(mount, **kwargs).to_argv()
    return machine.child_command(PYTHON, PROGRAM, argv, mount, "q")


def work(name):
    return WORK + "\\" + name


def seven_zip_lines(machine, piece=1):
    """A piece's 7-Zip lines: its volumes into archives\\<n>, its files from pieces\\<n>.lst."""
    argv = aab.seven_zip_add_argv(settings(), work(f"archives\\{piece}\\backup.zip"),
                                  work(f"pieces\\{piece}.lst"), "-p", machine)
    return aab.archive_commands(machine, argv, aab.CHILD_KEY_VARIABLE)


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


# -- golden: the original test case 1 ------------------------------------------

def test_original_test_case_1_has_two_mounts(machine):
    plan = original_plan(machine)
    assert [s.mount for s in plan.sources] == ["c:\\temp", "c:\\users\\allen"]


# The original program's tested ShadowSpawn line:
#   ShadowSpawn.exe "c:\\temp" q: "C:\\...\\python.exe" AAM_auto_backup.py
#   regular-backup ShadowSpawn " " " " "20201216 170302.225333" "c:\\temp" "q"
#   "local | AWS" "F:\\backup\\main" "False" "1234abcd1234abcd" "main-work-computer"
#   "c:\\temp\\main-work-computer20201216_170302.225333" "no" > "shadow_copy_command_output.txt"
# Differences, each deliberate: ShadowSpawn.exe and the program by full path, quoted;
# "-X" "utf8" (the child writes UTF-8, whatever the code page); the key as env:NAME (never
# on a command line); the
# 15th argument (scope, added 12/21/2020); destination types as the shared code spells
# them; single backslashes (the original's doubled ones came from a Python string); and no
# '> file': the parent passes the output file as ShadowSpawn's standard output.
GOLDEN_SHADOWSPAWN_TEMP = (
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\ShadowSpawn.exe" "c:\\temp" q: '
    '"C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python38\\python.exe" "-X" "utf8" '
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\aam_auto_backup.py" '
    'regular-backup ShadowSpawn " " " " "20201216 170302.225333" "c:\\temp" "q" '
    '"AWS|local" "F:\\backup\\main" "False" "env:AAM_CHILD_ENCRYPTION_KEY" '
    '"main-work-computer" "c:\\temp\\main-work-computer20201216_170302.225333" "no" '
    '"full-backup"')
GOLDEN_SHADOWSPAWN_USERS = (
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\ShadowSpawn.exe" "c:\\users\\allen" q: '
    '"C:\\Users\\Allen\\AppData\\Local\\Programs\\Python\\Python38\\python.exe" "-X" "utf8" '
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\aam_auto_backup.py" '
    'regular-backup ShadowSpawn "20201221 134337.851361" "20201221 134337.851361" '
    '"20201216 170302.225333" "c:\\users\\allen" "q" "AWS|local" "F:\\backup\\main" "False" '
    '"env:AAM_CHILD_ENCRYPTION_KEY" "main-work-computer" '
    '"c:\\temp\\main-work-computer20201216_170302.225333" "no" "incremental-backup"')


def test_golden_shadowspawn_command_lines(machine):
    temp, users = original_plan(machine).sources
    assert shadowspawn_line(machine, temp.mount) == GOLDEN_SHADOWSPAWN_TEMP
    assert shadowspawn_line(machine, users.mount, scope=aab.Scope.INCREMENTAL,
                            latest="20201221 134337.851361") == GOLDEN_SHADOWSPAWN_USERS


# The original batch file: "cd /D Q:", "robocopy ...", "7z ..."; its tested [success]
# form: cd /D q:, robocopy "q:" "<dest>" /e /unilog:"<log>", "<7z>" a ...
# Robocopy: robocopy "q:" "<dest, no trailing \>" /e /unilog:"<log>" /xd ... /xf ...
# 7-Zip full backup: "<7z>" a "<zip>" -v4000000000b -mcu=on -mem=AES256
# -p<key> @"<inclusion list>" -xr-@"<non-recursive list>" -xr@"<recursive list>".
# Added, each deliberate: @echo off and chcp 65001 (any path can be written; set back at
# the end); cd /D q:\ (the drive's root, whatever its remembered directory); programs by
# full path (cmd.exe would search the shadow drive first); /purge (keep is False); the
# scanned /xd and /xf entries (Robocopy has no relative exclusions); /xjd /r:2 /w:5 /np /tee; the success
# markers; the shared 7-Zip switches (-tzip -mx=5 -bb1 -bd -snl -scsUTF-8 -sccUTF-8 -y);
# and the key on 7z.exe's standard input instead of its command line (no other
# process can read it).  A backup is made in pieces, each a 7-Zip archive of its own, so
# the mirror has a batch file of its own and each piece one (the same form: cd /D, then
# 7z.exe with the key fed through cmd /v:on), and 7-Zip gets one list per piece naming
# each file, link and empty directory (a slice of the selection cannot be written as
# the original's directories with exclusion lists, which 7-Zip applied by recursing).
ROBOCOPY_STATUS = ("if errorlevel 8 (echo AAM Auto Backup: Robocopy failed with exit code "
                   "%ERRORLEVEL%.) else (echo AAM Auto Backup: Robocopy execution success.)")
# 7-Zip's exit code 1 (warnings: a file could not be read, or vanished) still leaves a
# valid archive, as on Linux: the check of the archive index reports each missing file.
SEVEN_ZIP_STATUS = ("if errorlevel 2 (echo AAM Auto Backup: 7-Zip failed with exit code "
                    "%ERRORLEVEL%.) else (echo AAM Auto Backup: 7-Zip execution success.)")
KEY_FEED = '"%ComSpec%" /d /v:on /c "echo(!AAM_CHILD_ENCRYPTION_KEY!&rem "| '
SEVEN_ZIP_PIECE_1 = (
    '"C:\\Users\\Allen\\Documents\\AAM Auto Backup\\7z.exe" a -tzip -mx=5 -mem=AES256 '
    '-mcu=on -p -v4000000000b -bb1 -bd -snl -scsUTF-8 -sccUTF-8 -y '
    '"c:\\temp\\main-work-computer20201216_170302.225333\\archives\\1\\backup.zip" '
    '@"c:\\temp\\main-work-computer20201216_170302.225333\\pieces\\1.lst"')
ROBOCOPY_USERS = (
    '"%SystemRoot%\\System32\\robocopy.exe" "q:" "F:\\backup\\main\\c\\users\\allen" /e /purge '
    '/unilog:"c:\\temp\\main-work-computer20201216_170302.225333\\robocopy_log.txt" '
    '/xd "q:\\Desktop" "q:\\AAM posting\\other" "q:\\Documents\\folder3" '
    '"q:\\Documents\\folder4" "q:\\Documents\\folder1\\folder1-1" '
    '"q:\\Documents\\folder1\\folder1-3" '
    '/xf "q:\\NTUSER.DAT" "q:\\Documents\\report.docx" "q:\\Documents\\folder1\\notes.txt" '
    '"~WRL*.tmp" /xjd /r:2 /w:5 /np /tee')
ROBOCOPY_TEMP = (
    '"%SystemRoot%\\System32\\robocopy.exe" "q:" "F:\\backup\\main\\c\\temp" /e /purge '
    '/unilog:"c:\\temp\\main-work-computer20201216_170302.225333\\robocopy_log.txt" '
    '/xd "q:\\main-work-computer20201216_170302.225333" '
    '/xf "q:\\aam_auto_backup.lock" "~WRL*.tmp" /xjd /r:2 /w:5 /np /tee')


def golden_batch_file(*commands):
    return "\r\n".join([
        "@echo off",
        "rem Generated by AAM Auto Backup for one source; deleted after the run.",
        '"%SystemRoot%\\System32\\chcp.com" 65001 >nul',
        "cd /D q:\\ || goto end",
        *commands,
        "echo AAM Auto Backup: backup batch file execution success.",
        ":end",
        '"%SystemRoot%\\System32\\chcp.com" 437 >nul',
    ]) + "\r\n"


def full_backup_batch_files(machine, source, tmp_path):
    """The mirror's batch file, then piece 1's."""
    plan = child_plan(machine, source, tmp_path)
    target = machine.mirror_directory(MIRROR_ROOT, source.mount)
    written = []
    for commands in ([aab.mirror_commands(machine, "q:\\", target, plan, False, WORK)],
                     [seven_zip_lines(machine)]):
        path = str(tmp_path / machine.script_name)
        machine.write_script(path, "q:\\", commands)
        written.append(read(path))
    return written


def test_golden_robocopy_command_lines(machine, tmp_path):
    temp, users = original_plan(machine).sources
    for source, expected in ((users, ROBOCOPY_USERS), (temp, ROBOCOPY_TEMP)):
        plan = child_plan(machine, source, tmp_path)
        target = machine.mirror_directory(MIRROR_ROOT, source.mount)
        assert aab.mirror_commands(machine, "q:\\", target, plan, False, WORK) == [
            expected, ROBOCOPY_STATUS]


def test_golden_robocopy_keeps_files_gone_from_the_source(machine, tmp_path):
    temp = original_plan(machine).sources[0]
    plan = child_plan(machine, temp, tmp_path)
    command = aab.mirror_commands(machine, "q:\\", "F:\\backup\\main\\c\\temp", plan, True,
                                      WORK)[0]
    assert command == ROBOCOPY_TEMP.replace(" /purge", "")


def test_golden_seven_zip_command_lines(machine):
    assert seven_zip_lines(machine) == [KEY_FEED + SEVEN_ZIP_PIECE_1, SEVEN_ZIP_STATUS]
    # Each piece: its own archive directory and list, the same switches.
    assert seven_zip_lines(machine, 12) == [
        KEY_FEED + SEVEN_ZIP_PIECE_1.replace("archives\\1\\", "archives\\12\\").replace(
            "pieces\\1.lst", "pieces\\12.lst"), SEVEN_ZIP_STATUS]


def test_golden_batch_files(machine, tmp_path):
    temp, users = original_plan(machine).sources
    for source, robocopy in ((users, ROBOCOPY_USERS), (temp, ROBOCOPY_TEMP)):
        assert full_backup_batch_files(machine, source, tmp_path) == [
            golden_batch_file(robocopy, ROBOCOPY_STATUS).encode("ascii"),
            golden_batch_file(KEY_FEED + SEVEN_ZIP_PIECE_1, SEVEN_ZIP_STATUS).encode("ascii")]


# The original list tests 1 and 2 gave 7-Zip the listed directories relative to the mount
# (a trailing '\'), the full-path exclusions made relative and the name patterns, and let it
# recurse.  A piece's list names instead what the selection holds: each file and link,
# and each empty directory (a trailing '\'), relative to the mount; the excluded ones
# (folder3, the ~WRL file, the work directory) are absent.
GOLDEN_LISTS = {
    "c:\\users\\allen": "AAM posting\\stock linked files\\posting.docx\n"
                         "documents\\folder1\\folder1-2\\a.txt\n"
                         "documents\\folder1\\folder1-4\\\n"
                         "documents\\folder2\\folder2-1\\\n"
                         "documents\\folder2\\folder2-1-1\\\n",
    "c:\\temp": "test\\\n"
                "test2\\media.mp4\n",
}


def test_golden_seven_zip_list_files(machine, tmp_path):
    for number, source in enumerate(original_plan(machine).sources):
        plan = child_plan(machine, source, tmp_path)
        child = windows_child_args(source.mount)
        child.work_dir = str(tmp_path / f"work{number}")
        os.mkdir(child.work_dir)
        _walk, _selected, lists = aab.record_selection(child, "q:\\", plan, machine, None)
        assert list(lists) == [1]
        assert read(os.path.join(child.work_dir, aab.PIECES_DIR, "1.lst")).decode("utf-8") \
            == GOLDEN_LISTS[source.mount]


def test_golden_incremental_list_holds_only_changed_files(machine, tmp_path):
    temp = original_plan(machine).sources[0]
    plan = child_plan(machine, temp, tmp_path)
    since = aab.utc_now()
    file_times_pass(since)
    with open(os.path.join(machine.long_path("q:\\test2"), "new clip.mp4"), "w") as handle:
        handle.write("recorded after the last backup")
    child = windows_child_args(temp.mount, scope=aab.Scope.INCREMENTAL)
    child.work_dir = str(tmp_path)
    aab.record_selection(child, "q:\\", plan, machine, since)
    assert read(os.path.join(tmp_path, aab.PIECES_DIR, "1.lst")) == b"test2\\new clip.mp4\n"


# -- what the quoting must survive --------------------------------------------

def shadowspawn_parse(command_line):
    """Emulates ShadowSpawn 0.2's own parsing (candera/shadowspawn src/COptions.h).

    Words split at blanks outside double quotes; quotes stay in the word and a
    word must be quoted whole (issues #20, #24: "mismatched quotes", exit 2);
    a word starting with '-' is taken for a ShadowSpawn switch wherever it
    stands (issue #14).  Returns (source, device, the command it launches).
    """
    words, word, quoted = [], None, False
    for char in command_line:
        if char == " " and not quoted:
            if word is not None:
                words.append(word)
            word = None
            continue
        quoted = not quoted if char == '"' else quoted
        word = (word or "") + char
    words.append(word) if word is not None else None
    source = device = None
    command = []
    for word in words[1:]:
        inner = word[1:-1] if word.startswith('"') and word.endswith('"') else word
        if '"' in inner or quoted:
            raise ValueError(f"Command line contains mismatched quotes: {command_line}")
        if word.startswith("-") or (not command and word.startswith("/")):
            raise ValueError(f"Unrecognized switch: {word[1:]}")
        if source is None:
            source = word.replace('"', "")
        elif device is None:
            device = word
        else:
            command.append(word)
    return source, device, " ".join(command) + " "


def msvcrt_split(command_line):
    """Emulates how python.exe (the MSVC runtime) splits its command line into argv.

    2n backslashes before a quote give n and the quote delimits; 2n+1 give n and
    a literal quote; other backslashes are literal; "" inside quotes is a quote.
    """
    args, i, n = [], 0, len(command_line)
    while True:
        while i < n and command_line[i] in " \t":
            i += 1
        if i >= n:
            return args
        arg, quoted = [], False
        while i < n and (quoted or command_line[i] not in " \t"):
            char = command_line[i]
            if char == "\\":
                end = i
                while end < n and command_line[end] == "\\":
                    end += 1
                count = end - i
                if end < n and command_line[end] == '"':
                    arg.append("\\" * (count // 2) + ('"' if count % 2 else ""))
                    i = end + 1 if count % 2 else end
                else:
                    arg.append("\\" * count)
                    i = end
            elif char == '"':
                if quoted and command_line[i + 1:i + 2] == '"':
                    arg.append('"')
                    i += 2
                else:
                    quoted = not quoted
                    i += 1
            else:
                arg.append(char)
                i += 1
        args.append("".join(arg))


def test_the_child_receives_exactly_its_arguments_through_shadowspawn():
    windows = aab.WindowsPlatform()
    awkward = aab.child_arguments(
        operation="incremental-only-backup", agent=aab.CHILD_AGENT, latest_full=None,
        latest_incremental=None, start=aab.parse_arg_stamp(START), mount="c:\\",
        drive_letter="q", destinations=frozenset({"AWS"}), mirror_root="", keep=True,
        key="env:" + aab.CHILD_KEY_VARIABLE, location="a&b%PATH%^-x",
        work_dir="c:\\temp\\a&b%x\\", force_full=True, scope=aab.Scope.FULL)
    child = awkward.to_argv()
    line = windows.child_command("C:\\Program Files\\Python 3\\python.exe",
                                 "D:\\my tools\\-aam\\aam_auto_backup.py", child, "c:\\", "Q")
    source, device, command = shadowspawn_parse(line)
    assert (source, device) == ("c:\\\\", "q:")          # GetFullPathName makes it c:\
    assert msvcrt_split(command) == ["C:\\Program Files\\Python 3\\python.exe", "-X", "utf8",
                                     "D:\\my tools\\-aam\\aam_auto_backup.py"] + child
    assert line.startswith('"D:\\my tools\\-aam\\ShadowSpawn.exe" ')


def test_the_key_feed_is_refused_where_cmd_would_expand_it_early(monkeypatch):
    windows = aab.WindowsPlatform()
    assert windows.delayed_expansion_by_default() is False       # no registry here
    monkeypatch.setattr(windows, "delayed_expansion_by_default", lambda: True)
    with pytest.raises(aab.AamError, match="DelayedExpansion"):
        aab.archive_commands(windows, [SEVEN_ZIP, "a", "-p"], aab.CHILD_KEY_VARIABLE)


def test_a_double_quote_cannot_be_put_on_a_windows_command_line():
    with pytest.raises(aab.AamError, match="double quote"):
        aab.WindowsPlatform().quote('say "hi"')


def test_batch_quoting_doubles_percent_and_trailing_backslashes():
    windows = aab.WindowsPlatform()
    assert windows.quote("F:\\") == '"F:\\\\"'
    assert windows.bat_quote("c:\\100% sure") == '"c:\\100%% sure"'
    assert windows.echo_line("a & b | c <d> (e) ^ 5%") == \
        "echo(a ^& b ^| c ^<d^> ^(e^) ^^ 5%%"


def test_script_runs_under_cmd_without_autorun_or_delayed_expansion(monkeypatch):
    monkeypatch.setenv("ComSpec", "C:\\Windows\\system32\\cmd.exe")
    assert aab.WindowsPlatform().script_argv(WORK + "\\AAM_Auto_Backup_shadow_copy.bat") == (
        '"C:\\Windows\\system32\\cmd.exe" /d /e:on /v:off /s /c '
        '""c:\\temp\\main-work-computer20201216_170302.225333\\'
        'AAM_Auto_Backup_shadow_copy.bat""')


def test_batch_file_holds_any_path_in_utf8(tmp_path):
    machine = OriginalMachine({})
    path = str(tmp_path / "x.bat")
    machine.write_script(path, "q:\\", [["echo F:\\Sicherung\\M\u00fcller \u0395\u03bb"]])
    text = read(path)
    assert b'chcp.com" 65001 >nul\r\n' in text
    assert "echo F:\\Sicherung\\M\u00fcller \u0395\u03bb\r\n".encode("utf-8") in text
    assert text.endswith(b'chcp.com" 437 >nul\r\n')


# -- Robocopy exclusions ----------------------------------------------------------

def plan_on_q(listed, dir_patterns=(), file_patterns=(), excluded_dirs=()):
    return aab.SourcePlan(mount="q:\\", listed=list(listed),
                          excluded_dir_paths=list(excluded_dirs), excluded_file_paths=[],
                          dir_patterns=list(dir_patterns), file_patterns=list(file_patterns))


def test_scan_joins_names_to_parents_and_tests_ancestors_up_to_a_separator(tmp_path):
    build_disk(str(tmp_path / "q"), ["test/", "test2/x/keep.txt", "test2/y/", "loose.txt"])
    machine = OriginalMachine({"q:": str(tmp_path / "q")})
    dirs, files, problems = aab.scan_outside_listed(machine, "q:\\", plan_on_q(["TEST2\\X"]))
    assert (dirs, files, problems) == (["test", "test2\\y"], ["loose.txt"], [])


def test_scan_of_a_mount_listed_whole_excludes_nothing(tmp_path):
    build_disk(str(tmp_path / "q"), ["a/", "b.txt"])
    machine = OriginalMachine({"q:": str(tmp_path / "q")})
    assert aab.scan_outside_listed(machine, "q:\\", plan_on_q([""])) == ([], [], [])


def test_patterns_robocopy_cannot_take_become_exact_paths(tmp_path):
    build_disk(str(tmp_path / "q"), [
        "docs/work/-audio/song.mp3", "docs/work/sub/-video/clip.mp4", "docs/work/-notes.txt",
        "docs/work/docs-old/", "docs/other/", "docs/work/node_modules/"])
    machine = OriginalMachine({"q:": str(tmp_path / "q")})
    # '-*' would be read as a switch; 'doc*' matches 'docs', which leads to the listed
    # directory: both are replaced by what the selection excludes.
    plan = plan_on_q(["docs\\work"], dir_patterns=["-*", "doc*", "node_modules"],
                     file_patterns=["-*.txt", "*.tmp"])
    dirs, files, _problems = aab.robocopy_exclusions(machine, "q:\\", plan)
    assert dirs == ["q:\\docs\\other", "node_modules", "q:\\docs\\work\\-audio",
                    "q:\\docs\\work\\docs-old", "q:\\docs\\work\\sub\\-video"]
    assert files == ["*.tmp", "q:\\docs\\work\\-notes.txt"]


def test_an_over_long_robocopy_command_is_refused_with_a_reason(tmp_path):
    build_disk(str(tmp_path / "q"), ["listed/"] + [f"{'x' * 60}{n}/" for n in range(150)])
    machine = OriginalMachine({"q:": str(tmp_path / "q")})
    with pytest.raises(aab.AamError, match="over cmd.exe's limit of 8191"):
        aab.mirror_commands(machine, "q:\\", "F:\\m\\c\\x", plan_on_q(["listed"]), True, WORK)


# -- paths, times, output decoding -------------------------------------------

def test_a_300_character_path_gets_the_long_path_prefix():
    windows = aab.WindowsPlatform()
    deep = "q:\\" + "\\".join(["d" * 49] * 6) + "\\file.txt"
    assert len(deep) > 300
    assert windows.long_path(deep) == "\\\\?\\" + deep
    assert windows.long_path("F:/backup/" + "m" * 300) == "\\\\?\\F:\\backup\\" + "m" * 300
    assert windows.long_path("\\\\nas\\share\\" + "n" * 300) == \
        "\\\\?\\UNC\\nas\\share\\" + "n" * 300
    assert windows.long_path("\\\\?\\" + deep) == "\\\\?\\" + deep
    assert windows.long_path("q:\\short\\file.txt") == "q:\\short\\file.txt"


def test_incrementals_compare_creation_time_on_windows():
    windows = aab.WindowsPlatform()
    copied_in = types.SimpleNamespace(st_mtime=100.0, st_birthtime=500.0, st_ctime=50.0)
    assert windows.changed_time(copied_in) == 500.0
    # Python before 3.12 on Windows: st_ctime is the creation time.
    older_python = types.SimpleNamespace(st_mtime=100.0, st_ctime=400.0)
    assert windows.changed_time(older_python) == 400.0


def test_paths_compare_case_insensitively():
    windows = aab.WindowsPlatform()
    assert aab._relative("C:\\Users\\Allen\\AAM Posting\\X", "c:\\users\\allen", windows) == \
        "AAM Posting\\X"


# The original program failed here: 'utf-8' codec can't decode byte 0x9a ... then
# 'charmap' ... 0x81.  "Über"
# and "Müller" in code page 437 hold exactly those bytes.
CP437_OUTPUT = (
    "ShadowSpawn (c) 2011 Craig Andera. shadowspawn@wangdera.com\r\n"
    "Shadowing c:\\Users\\M\u00fcller at q:\r\n"
    "Launched command finished with exit code: 0.\r\n"
    "Datei \u00dcber \u00e4nderung \u2500\u2500 \u00a3\r\n").encode("cp437")


def test_output_file_in_code_page_437_is_read_without_error(tmp_path):
    assert b"\x9a" in CP437_OUTPUT and b"\x81" in CP437_OUTPUT
    windows = OriginalMachine({})
    child_line = "AAM Auto Backup: validation failure: Stra\u00dfe\\\u03b1.txt\r\n".encode()
    path = tmp_path / aab.OUTPUT_FILE
    path.write_bytes(CP437_OUTPUT + child_line)
    log = aab.RunLog(str(tmp_path / "logs"), "regular-backup", [], windows)
    log.append_output(str(path))
    log.close()
    with open(log.path, encoding="utf-8") as handle:
        text = handle.read()
    assert "Shadowing c:\\Users\\M\u00fcller at q:\n" in text
    assert "Datei \u00dcber \u00e4nderung \u2500\u2500 \u00a3\n" in text
    assert "validation failure: Stra\u00dfe\\\u03b1.txt\n" in text      # the child's UTF-8


def test_a_code_page_with_holes_never_fails_either():
    windows = aab.WindowsPlatform()
    windows.console_code_page = lambda: 1252      # 0x81 is undefined in cp1252
    assert windows.decode_output(b"caf\xe9 \x81") == "caf\u00e9 \ufffd"


def test_the_console_code_page_off_windows_is_437():
    assert aab.WindowsPlatform().console_code_page() == 437


# -- the parent's marker checks --------------------------------------------------

MARK_BATCH = "AAM Auto Backup: backup batch file execution success."
MARK_ROBOCOPY = "AAM Auto Backup: Robocopy execution success."
MARK_7ZIP = "AAM Auto Backup: 7-Zip execution success."
RESULT = 'AAM Auto Backup: result: {"files": 3, "failures": 0}'
ORIGINAL_MESSAGES = {
    MARK_BATCH: "No backup batch file execution success message. Aborting backup.",
    MARK_ROBOCOPY: "No Robocopy execution success message. Aborting backup.",
    MARK_7ZIP: "No 7z.exe execution success message. Aborting backup.",
}


def backup_run(tmp_path):
    platform = OriginalMachine({})
    args = aab.Arguments(aab.BACKUP_ARGS, [], dict(
        operation="regular-backup", agent="user", python=PYTHON, lock_poll=1, lock_wait=0,
        log_dir=str(tmp_path / "logs"), send_email=False, sender_name="", sender_address="",
        recipient="", instruction_file="", drive_letter="q",
        destinations=frozenset({"local", "AWS"}), mirror_root=MIRROR_ROOT, keep=False,
        key=aab.Secret("1234abcd1234abcd"), bucket="aam-data-backup",
        location="main-work-computer", access_key_id=aab.Secret(""),
        secret_access_key=aab.Secret(""), force_full=False, auto_force_full=True))
    run = aab.BackupRun(args, platform, settings(), PROGRAM)
    run.log = aab.RunLog(args.log_dir, args.operation, args.secrets, platform)
    run.start, run.scope = aab.parse_arg_stamp(START), aab.Scope.FULL
    run.stamp = run.base_full = run.start
    run.work_dir = str(tmp_path / "work")
    os.mkdir(run.work_dir)
    # the journal of this backup, as open_journal_for starts it (Linux paths: it is
    # only a file of the test)
    run.journal = aab.Journal.create(str(tmp_path / "journal.sqlite"), {
        "operation": args.operation, "scope": "full", "stamp": START, "full": START,
        "since": None, "sources": [["c--temp", "c:\\temp"]], "piece_size": 1,
        "volume_size": 1})
    return run


def stops(run, call):
    """True when call stops the run (SourceStopped), recorded as the run records it."""
    try:
        call()
    except aab.SourceStopped as stopped:
        run.record_stop(stopped)
        return True
    return False


def log_text(run):
    run.log.close()
    with open(run.log.path, encoding="utf-8") as handle:
        return handle.read()


def test_a_missing_batch_file_marker_stops_with_the_original_message(tmp_path):
    run = backup_run(tmp_path)
    assert stops(run, lambda: run.check_child_output([MARK_ROBOCOPY, MARK_7ZIP, RESULT], 0,
                                                     True))
    assert run.failures == [ORIGINAL_MESSAGES[MARK_BATCH]]
    assert "ERROR: " + ORIGINAL_MESSAGES[MARK_BATCH] in log_text(run)


@pytest.mark.parametrize("missing, part", [(MARK_ROBOCOPY, "mirror"), (MARK_7ZIP, "archive")])
def test_a_missing_robocopy_or_7zip_marker_is_that_part_failing(tmp_path, missing, part):
    # The other destination of the source still completes (back_up_source, below).
    run = backup_run(tmp_path)
    lines = [m for m in (MARK_ROBOCOPY, MARK_7ZIP, MARK_BATCH) if m != missing] + [RESULT]
    assert run.check_child_output(lines, 0, True) == {"files": 3, "failures": 0,
                                                      "failed": [part]}


def test_markers_are_checked_in_the_original_order(tmp_path):
    run = backup_run(tmp_path)
    assert stops(run, lambda: run.check_child_output([RESULT], 0, True))
    # every missing message, in the original order (batch file, Robocopy, 7z.exe), then the
    # critical error
    assert run.failures == [ORIGINAL_MESSAGES[MARK_BATCH], ORIGINAL_MESSAGES[MARK_ROBOCOPY],
                            ORIGINAL_MESSAGES[MARK_7ZIP]]
    log = log_text(run)
    positions = [log.index(ORIGINAL_MESSAGES[m]) for m in (MARK_BATCH, MARK_ROBOCOPY, MARK_7ZIP)]
    assert positions == sorted(positions)
    assert log.index("Critical error. ShadowSpawn.exe execution failure Aborting") > positions[-1]


def test_all_markers_present_give_the_childs_result(tmp_path):
    run = backup_run(tmp_path)
    assert run.check_child_output([MARK_ROBOCOPY, MARK_7ZIP, MARK_BATCH, RESULT], 0, True) == {
        "files": 3, "failures": 0, "failed": []}
    assert run.failures == []


def fake_shadowspawn_run(markers, seen):
    """Stand-in for running ShadowSpawn.exe: records its command line, then writes what
    ShadowSpawn (cp437) and the child (UTF-8) print into the output file."""
    def run_child_process(argv, output, while_running=None):
        seen.append(argv)
        with open(output, "wb") as handle:
            handle.write(CP437_OUTPUT)
            handle.write("".join(m + "\r\n" for m in markers + [RESULT]).encode("utf-8"))
        return 0
    return run_child_process


@pytest.mark.parametrize("missing", [MARK_BATCH, MARK_ROBOCOPY, MARK_7ZIP, None])
def test_the_parent_reads_a_cp437_output_file_and_checks_its_markers(tmp_path, missing):
    run = backup_run(tmp_path)
    seen = []
    run.run_child_process = fake_shadowspawn_run(
        [m for m in (MARK_ROBOCOPY, MARK_7ZIP, MARK_BATCH) if m != missing], seen)
    uploads = []
    run.upload_source = lambda *args: uploads.append(args[0])
    source = aab.SourcePlan(mount="c:\\temp", listed=["test", "test2"],
                            excluded_dir_paths=[], excluded_file_paths=[], dir_patterns=[],
                            file_patterns=["~WRL*.tmp"])
    plan = aab.BackupPlan(sources=[source], notes=[], listed=[])
    # Only a batch file that did not run to its end stops the run.
    assert stops(run, lambda: run.back_up_source(1, source, plan, ["c--temp"])) is (
        missing == MARK_BATCH)
    assert uploads == ([] if missing in (MARK_BATCH, MARK_7ZIP) else [source])
    # As the golden line, with this run's work directory and force full "yes" (a full run).
    assert seen == [GOLDEN_SHADOWSPAWN_TEMP.replace(WORK, run.work_dir).replace(
        '"no" "full-backup"', '"yes" "full-backup"')]
    # shadow_copy_instruction.txt names the listed directories on the shadow drive
    with open(os.path.join(run.work_dir, aab.PLAN_FILE), encoding="utf-8") as handle:
        assert handle.read() == "q:\\test\nq:\\test2\n\n\n\n~WRL*.tmp\n"
    text = log_text(run)
    assert "Datei \u00dcber \u00e4nderung" in text and "1234abcd1234abcd" not in text
    assert run.failures == {
        None: [], MARK_BATCH: [ORIGINAL_MESSAGES[MARK_BATCH]],
        MARK_ROBOCOPY: ["c:\\temp: the local mirror failed (no Robocopy execution success "
                        "message)"],
        MARK_7ZIP: ["c:\\temp: the archive for AWS S3 failed (no 7-Zip execution success "
                    "message); no completion indicator was written and nothing more is "
                    "uploaded in this run"]}[missing]
