"""The manual's links cannot rot: README.md and docs/*.md point only at files and headings
that exist.

Every relative link in README.md and docs/*.md must name an existing file, and every
`#anchor` a heading of that file, spelled as GitHub makes a heading's anchor: the heading's
text in lower case, punctuation dropped, each space a '-', and '-1', '-2', ... after a
repeated one.  README's "Documentation" list links every docs page, and every page links
back to README.
"""

import glob
import os
import re

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")
PAGES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)     # https:, mailto:, ...


def prose_lines(path):
    """The lines of a Markdown file outside fenced code blocks (a '# ' there is a comment)."""
    in_code = False
    for line in open(path, encoding="utf-8"):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code:
            yield line.rstrip("\n")


def heading_anchor(text):
    """GitHub's anchor of a heading: its rendered text in lower case, every character that
    is not a letter, digit, '_', '-' or space dropped, and each space made a '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)      # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in prose_lines(path):
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            anchor = heading_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def relative_links(path):
    return [target for line in prose_lines(path) for target in LINK.findall(line)
            if not EXTERNAL.match(target)]


@pytest.mark.parametrize("heading, anchor", [
    ("Is a ratio ours or the endpoint's?", "is-a-ratio-ours-or-the-endpoints"),
    ("What --check proves", "what---check-proves"),
    ("One command: tools/aws_setup.py", "one-command-toolsaws_setuppy"),
    ("Restoration (13 arguments, then optionally a restore point and a selection)",
     "restoration-13-arguments-then-optionally-a-restore-point-and-a-selection"),
    ("The `--check` of **it**", "the---check-of-it"),
])
def test_anchors_are_spelled_as_github_spells_them(heading, anchor):
    assert heading_anchor(heading) == anchor


def test_a_repeated_heading_gets_a_numbered_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Notes\n\n```sh\n# Notes\n```\n\n## Notes\n", encoding="utf-8")
    assert anchors(str(page)) == {"notes", "notes-1"}


@pytest.mark.parametrize("path", [README] + PAGES, ids=os.path.basename)
def test_every_relative_link_names_an_existing_file_and_heading(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no file {os.path.relpath(linked, REPO)}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, f"{os.path.relpath(path, REPO)}: " + "; ".join(broken)


def test_the_readme_lists_every_docs_page_and_every_page_links_back():
    assert len(PAGES) >= 10, PAGES
    text = open(README, encoding="utf-8").read()
    documentation = text[text.index("\n## Documentation\n"):]
    listed = {os.path.normpath(os.path.join(REPO, target.partition("#")[0]))
              for target in LINK.findall(documentation)}
    assert set(PAGES) - listed == set(), "not in README's Documentation list"
    for page in PAGES:
        assert "../README.md" in relative_links(page), f"{page} does not link back to README"


# -- docs/reference.md's argument tables are the code's -----------------------------

REFERENCE = os.path.join(REPO, "docs", "reference.md")
TABLE_HEADINGS = {   # a heading of docs/reference.md -> the operation whose table it has
    "regular-backup, incremental-only-backup and preview-backup": "regular-backup",
    "Restoration": "one-step-aws-data-restoration",
    "browse-aws-backups": "browse-aws-backups",
    "drill-aws-backups": "drill-aws-backups",
    "The child pass": "ShadowSpawn",
}


def reference_tables():
    """{operation: [(first number, repeated?, name)]} from each '| # | name |' table."""
    tables, heading, rows = {}, None, None
    for line in prose_lines(REFERENCE):
        if line.startswith("### "):
            heading = next((op for start, op in TABLE_HEADINGS.items()
                            if line[4:].startswith(start)), None)
        elif line.startswith("| # | name |"):
            assert heading, f"a table of arguments under an unknown heading: {line}"
            rows = tables.setdefault(heading, [])
        elif rows is not None and line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if set(cells[0]) <= set("-"):
                continue
            number = re.match(r"\d+", cells[0])
            assert number and cells[1].startswith("`"), line
            rows.append((int(number.group()), "…" in cells[0], cells[1].strip("`")))
        else:
            rows = None
    return tables


def test_the_reference_argument_tables_are_the_codes():
    import aam_auto_backup as aab
    tables = reference_tables()
    assert set(tables) == set(TABLE_HEADINGS.values())
    documented = {id(aab.OPERATION_TABLES[operation]) for operation in tables}
    assert documented == {id(table) for table in aab.OPERATION_TABLES.values()}, \
        "an operation's argument table is not in docs/reference.md"
    for operation, rows in tables.items():
        table = aab.OPERATION_TABLES[operation]
        assert [(number, arg.repeated, arg.name) for number, arg in enumerate(table, 1)] \
            == rows, operation
