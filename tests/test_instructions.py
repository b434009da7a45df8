"""The instruction file: parsing, errors naming the line, mount directories, exclusions."""

import os

import pytest

import aam_auto_backup as aab

POSIX = aab.PosixPlatform()
WINDOWS = aab.WindowsPlatform()

# The original design's test case 1 instruction file, with the two trailing
# spaces of every line that its document carries.
TEST_CASE_1 = (
    "c:\\users\\allen\\documents\\folder1\\folder1-2\\  \n"
    "c:\\users\\allen\\documents\\folder1\\folder1-4\\  \n"
    "c:\\users\\allen\\documents\\folder2\\  \n"
    "c:\\users\\allen\\documents\\folder2\\folder2-1\\  \n"
    "c:\\users\\allen\\documents\\folder2\\folder2-1-1\\  \n"
    "c:\\users\\allen\\documents\\folder3\\  \n"
    "C:\\Users\\Allen\\AAM posting\\stock linked files\\  \n"
    "c:\\temp\\test\\  \n"
    "c:\\temp\\test2\\  \n"
    "  \n"
    "c:\\users\\allen\\documents\\folder3\\  \n"
    "  \n"
    "~WRL*.tmp\n"
)

EXAMPLE_SET = [
    "c:\\users\\allen\\documents\\folder1\\folder1-2\\",
    "c:\\users\\allen\\documents\\folder1\\folder1-4\\",
    "c:\\users\\allen\\documents\\folder2\\",
    "c:\\users\\allen\\documents\\folder2\\folder2-1\\",
    "c:\\users\\allen\\documents\\folder2\\folder2-1-1\\",
    "c:\\users\\allen\\documents\\folder3\\",
    "c:\\temp\\test\\",
    "c:\\temp\\test2\\",
]


def parse(text, platform=POSIX):
    return aab.parse_instructions(text, "instructions.txt", platform)


def mounts(paths, platform):
    return aab.compute_mounts([platform.normalize(p) for p in paths], platform)


# -- the original design's examples ---------------------------------------------

def test_original_test_case_1_parses():
    parsed = parse(TEST_CASE_1, WINDOWS)
    assert len(parsed.backup_dirs) == 9
    assert parsed.backup_dirs[6] == ("C:\\Users\\Allen\\AAM posting\\stock linked files", 7)
    assert [(e.text, e.line, e.is_path) for e in parsed.excluded_dirs] == [
        ("c:\\users\\allen\\documents\\folder3", 11, True)]
    assert [(e.text, e.line, e.is_path) for e in parsed.excluded_files] == [
        ("~WRL*.tmp", 13, False)]


def test_original_example_set_mounts():
    # the common parents: -> c:\temp and c:\users\allen\documents
    assert mounts(EXAMPLE_SET, WINDOWS) == ["c:\\temp", "c:\\users\\allen\\documents"]


def test_original_example_set_with_aam_posting_shares_only_c_users_allen():
    paths = EXAMPLE_SET + ["c:\\users\\allen\\AAM_posting"]
    assert mounts(paths, WINDOWS) == ["c:\\temp", "c:\\users\\allen"]


def test_original_test_case_1_mounts_compare_case_insensitively():
    parsed = parse(TEST_CASE_1, WINDOWS)
    dirs = [p for p, _line in parsed.backup_dirs]
    assert aab.compute_mounts(dirs, WINDOWS) == ["c:\\temp", "c:\\users\\allen"]


def test_directories_sharing_only_the_root_are_separate_mounts():
    assert mounts(["/home/ann/docs/", "/srv/data"], POSIX) == ["/home/ann/docs", "/srv/data"]
    assert mounts(["c:\\a\\b", "d:\\a\\b"], WINDOWS) == ["c:\\a\\b", "d:\\a\\b"]


def test_a_single_directory_is_its_own_mount_and_the_root_stays_the_root():
    assert mounts(["/home/ann/docs/"], POSIX) == ["/home/ann/docs"]
    assert mounts(["/", "/home/ann"], POSIX) == ["/"]


def test_source_names():
    assert WINDOWS.source_name("c:\\users\\allen\\documents") == "c--users-allen-documents"
    assert POSIX.source_name("/home/ann/docs") == "-home-ann-docs"
    assert POSIX.source_name("/home/ann/my_docs") == "-home-ann-my_docs"


# -- the format ---------------------------------------------------------------

def test_empty_exclusion_blocks():
    only_dirs = parse("/a/\n")
    assert [p for p, _n in only_dirs.backup_dirs] == ["/a"]
    assert only_dirs.excluded_dirs == [] and only_dirs.excluded_files == []
    no_dir_block = parse("/a/\n\n\n\n*.tmp\n")
    assert no_dir_block.excluded_dirs == []
    assert [e.text for e in no_dir_block.excluded_files] == ["*.tmp"]
    no_file_block = parse("/a/\n\ncache/\n\n")
    assert [e.text for e in no_file_block.excluded_dirs] == ["cache"]


def test_bom_crlf_and_comments():
    text = "\ufeff# my backup\r\n/a/\r\n/b c/\r\n\r\n# build output\r\nbuild/\r\n\r\n#*#\r\n"
    parsed = parse(text)
    assert [p for p, _n in parsed.backup_dirs] == ["/a", "/b c"]
    assert [e.text for e in parsed.excluded_dirs] == ["build"]
    # '#*#' is a name pattern (emacs autosave files), not a comment
    assert [e.text for e in parsed.excluded_files] == ["#*#"]


def test_names_with_spaces_unicode_underscore_and_leading_dash_parse():
    text = "/data/my files/\n/data/\u00e9t\u00e9_2024/\n/data/-raw/\n\n-*/\n\n-notes.txt\n"
    parsed = parse(text)
    assert [p for p, _n in parsed.backup_dirs] == [
        "/data/my files", "/data/\u00e9t\u00e9_2024", "/data/-raw"]
    assert [e.text for e in parsed.excluded_dirs] == ["-*"]
    assert [e.text for e in parsed.excluded_files] == ["-notes.txt"]


@pytest.mark.parametrize("text, line, fragment", [
    ("docs/\n", 1, "relative path"),
    ("/a/\nhome/ann/\n", 2, "relative path"),
    ("/a/*/docs/\n", 1, "wildcard"),
    ("/a/\n\n/a/b*/\n", 3, "wildcard in a full path"),
    ("/a/\n\n/a/b\n", 3, "must end with '/'"),
    ("/a/\n\ncache/\n\n/a/file.txt/\n", 5, "must not end with '/'"),
    ("/a/\n\nsub/dir/\n", 3, "relative path"),
    ("/a/\n\n\n*.tmp\n", 2, "2 empty lines"),
    ("/a/\n\nx/\n\ny\n\nz\n", 7, "fourth block"),
    ("/a/\n\n/a/b/\n\n/a/c/x?.txt\n", 5, "wildcard in a full path"),
])
def test_errors_name_the_line(text, line, fragment):
    with pytest.raises(aab.InstructionError) as error:
        parse(text)
    assert f"instructions.txt, line {line}:" in str(error.value)
    assert fragment in str(error.value)


def test_windows_errors_name_the_line():
    with pytest.raises(aab.InstructionError, match=r"line 3: .*must end with '\\\\'"):
        parse("c:\\a\\\n\nc:\\a\\b\n", WINDOWS)
    with pytest.raises(aab.InstructionError, match="line 1: .*relative path"):
        parse("users\\allen\\\n", WINDOWS)


def test_windows_names_cannot_hold_reserved_characters():
    with pytest.raises(aab.InstructionError, match=r"line 5: .*which a file name cannot"):
        parse('c:\\a\\\n\n\n\nsay"hi".txt\n', WINDOWS)
    with pytest.raises(aab.InstructionError, match=r"line 3: .*which a directory name cannot"):
        parse("c:\\a\\\n\na|b\\\n", WINDOWS)
    # the same names are fine on POSIX
    assert parse('/a/\n\n\n\nsay"hi".txt\n').excluded_files[0].text == 'say"hi".txt'


def test_an_empty_file_is_an_error():
    with pytest.raises(aab.InstructionError, match="no directory to back up"):
        parse("\n\n")


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(aab.InstructionError, match="argument 11: .* does not exist"):
        aab.read_instruction_file(str(tmp_path / "missing.txt"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"/a/\n/caf\xe9/\n")
    with pytest.raises(aab.InstructionError, match="line 2: the file is not UTF-8"):
        aab.read_instruction_file(str(latin1))


# -- the plan: exclusions inside mounts ---------------------------------------

def make_dirs(root, *paths):
    for path in paths:
        os.makedirs(os.path.join(root, path), exist_ok=True)


def test_listed_and_excluded_directory_is_not_backed_up(tmp_path):
    root = str(tmp_path)
    make_dirs(root, "docs/a", "docs/b", "docs/-proj")
    text = (f"{root}/docs/a/\n{root}/docs/b/\n{root}/docs/-proj/\n\n"
            f"{root}/docs/b/\n-*/\n\n")
    plan = aab.plan_backup(parse(text), POSIX)
    assert [(s.mount, s.listed) for s in plan.sources] == [(f"{root}/docs/a", [""])]
    assert any("docs/b is listed and excluded" in n for n in plan.notes)
    assert any("docs/-proj is listed and excluded" in n for n in plan.notes)


def test_plan_ignores_missing_and_covered_directories(tmp_path):
    root = str(tmp_path)
    make_dirs(root, "docs/sub", "pics")
    text = (f"{root}/docs/\n{root}/docs/sub/\n{root}/pics/\n{root}/gone/\n{root}/docs/\n\n"
            f"{root}/docs/nothing-here/\n\n")
    plan = aab.plan_backup(parse(text), POSIX)
    assert [(s.mount, s.listed) for s in plan.sources] == [(root, ["docs", "pics"])]
    notes = "\n".join(plan.notes)
    assert f"line 4: ignored, the directory {root}/gone does not exist" in notes
    assert f"{root}/docs/sub is inside {root}/docs" in notes
    assert "line 5:" in notes and "listed twice" in notes
    assert f"line 7: ignored, {root}/docs/nothing-here does not exist" in notes


def test_selection_applies_every_kind_of_exclusion(tmp_path):
    root = str(tmp_path)
    files = {
        "docs/a.txt": True, "docs/my_file 1.txt": True, "docs/-dash.txt": True,
        "docs/\u00e9t\u00e9.txt": True, "docs/~WRL1.tmp": False, "docs/x/~WRL2.tmp": False,
        "docs/-audio/s.mp3": False, "docs/x/-video/c.mp4": False, "docs/private/p.txt": False,
        "docs/secret.txt": False, "docs/x/secret.txt": True, "docs/x.tmp/keep.txt": True,
        "pics/2024/a.jpg": True, "pics/2023/b.jpg": False, "top.txt": False,
    }
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as handle:
            handle.write(rel)
    text = (f"{root}/docs/\n{root}/pics/2024/\n\n{root}/docs/private/\n-*/\n\n"
            f"~WRL*.tmp\n{root}/docs/secret.txt\n*.tmp\n")
    plan = aab.plan_backup(parse(text), POSIX)
    (source,) = plan.sources
    selected = {w.path for w in aab.TreeWalk(source.mount, source, POSIX).files()}
    # 'x.tmp' is a directory: file-name patterns do not exclude directories.
    assert selected == {rel for rel, kept in files.items() if kept}
