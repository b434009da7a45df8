"""Sample data for the demo and the tests: two sources, an instruction file, and
the list of what a correct backup holds, written out by hand.

The expected sets here are deliberately *not* computed with the program's own
selection code: they are the specification the tests check the program
against.

    tree = build_sample(first_root, second_root)
    tree.instruction_text     # the instruction file for these directories
    tree.expected             # {mount directory: {relative path: bytes or None}}

A value of None marks an (empty) directory that must exist after a restore.
"""

import os
import random

# Relative to <first root>/home/ann unless noted; True = backed up.
FIRST_TREE = [
    ("Documents/report.txt", b"quarterly report\n" * 40, True),
    ("Documents/notes with space.md", b"# notes\n", True),
    ("Documents/\u00fcn\u00efcode-\u0444\u0430\u0439\u043b.txt", "d\u00e9j\u00e0 vu\n".encode(),
     True),
    ("Documents/under_score_dir/file_1.txt", b"underscores are fine\n", True),
    ("Documents/-leading-dash.txt", b"a name that looks like an option\n", True),
    ("Documents/sub/deep/keep.txt", b"deep file\n", True),
    ("Documents/zero-bytes.txt", b"", True),
    ("Documents/private/secret-plan.txt", b"excluded by full path\n", False),
    ("Documents/-audio/song.mp3", b"excluded by the directory name -*\n", False),
    ("Documents/sub/-video/clip.mp4", b"excluded by -* deeper down\n", False),
    ("Documents/~WRL1234.tmp", b"word temp file\n", False),
    ("Documents/sub/~WRL9.tmp", b"word temp file\n", False),
    ("Documents/passwords.kdbx", b"excluded by full file path\n", False),
    ("Pictures/2024/beach.jpg", None, True),             # random bytes, see below
    ("Pictures/2023/old.jpg", b"not listed\n", False),   # sibling of a listed dir
    ("loose-in-mount-root.txt", b"not inside a listed directory\n", False),
    ("Downloads/big.iso", b"not listed\n", False),
    ("Music/song.flac", b"listed and excluded: exclusion wins\n", False),
]
FIRST_EMPTY_DIRS = ["Documents/empty-dir"]

# Relative to <second root>/srv/data.
SECOND_TREE = [
    ("db.sqlite", None, True),
    ("docs/readme.md", b"second source\n", True),
    ("cache/blob.bin", b"excluded by the directory name cache\n", False),
    ("docs/cache/inner.bin", b"excluded by the directory name cache\n", False),
]


class SampleTree:
    def __init__(self, first_root, second_root):
        self.first_mount = os.path.join(first_root, "home", "ann")
        self.second_mount = os.path.join(second_root, "srv", "data")
        self.expected = {self.first_mount: {}, self.second_mount: {}}
        self.excluded = {self.first_mount: {}, self.second_mount: {}}

    @property
    def instruction_text(self):
        a, b = self.first_mount, self.second_mount
        return "\n".join([
            f"{a}/Documents/",
            f"{a}/Pictures/2024/",
            f"{a}/Music/",
            f"{b}/",
            "",
            f"{a}/Documents/private/",
            f"{a}/Music/",
            "-*/",
            "cache/",
            "",
            "~WRL*.tmp",
            f"{a}/Documents/passwords.kdbx",
        ]) + "\n"

    @property
    def mounts(self):
        return [self.first_mount, self.second_mount]


def _random_bytes(number, size):
    return random.Random(number).randbytes(size)


def build_sample(first_root, second_root, picture_size=48_000):
    """Create the sample directories; return a SampleTree describing them."""
    tree = SampleTree(first_root, second_root)
    for mount, entries in ((tree.first_mount, FIRST_TREE), (tree.second_mount, SECOND_TREE)):
        for number, (rel, data, backed_up) in enumerate(entries):
            if data is None:
                data = _random_bytes(number + len(mount), picture_size)
            path = os.path.join(mount, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
            (tree.expected if backed_up else tree.excluded)[mount][rel] = data
    for rel in FIRST_EMPTY_DIRS:
        os.makedirs(os.path.join(tree.first_mount, rel), exist_ok=True)
        tree.expected[tree.first_mount][rel] = None
    return tree


def read_tree(root):
    """{relative path: bytes} of files and {relative dir: None} of empty dirs."""
    found = {}
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[os.path.normpath(os.path.join(rel_dir, name))] = handle.read()
        if not dirs and not files and rel_dir != ".":
            found[rel_dir] = None
    return found
