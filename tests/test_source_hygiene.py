"""Code says why, not when: no issue-tracker references in the sources.

An issue number in a comment sends the reader to a tracker to learn what the
code could say itself, and it stops meaning anything once the tracker moves.
Checked: every .py file under cnnlib/, study/ and tests/, every file under
scripts/, and the Makefile.

An issue reference (N a number) is
- the word issue or issues followed by N, with or without a hash: "issue N", "Issue #N";
- a tracker word before #N: "PR #N", "bug #N", "fixes #N", "see #N"; or "gh-N";
- #N in brackets, the way commit titles cite a pull request;
- a bare #N after a space, quote or bracket, unless N has 3, 4, 6 or 8 digits
  (those are CSS colours such as #222 and #555555).
Not flagged: numbered comments ("# 1."), image ids ("train.npz#0"), hex colours.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ISSUE_REFERENCE = re.compile(
    r"\bissues?\s*#?\s*\d+"
    r"|\b(?:pr|pull request|bug|ticket|fix(?:es|ed)?|close[sd]?|resolve[sd]?|refs?|see)\s*#\d+"
    r"|\bgh-\d+"
    r"|\(#\d+\)"
    r"|(?<![\w#&/])#(?!(?:\d{3}|\d{4}|\d{6}|\d{8})\b)\d+\b",
    re.IGNORECASE)


def source_files() -> list[Path]:
    files = [p for folder in ("cnnlib", "study", "tests") for p in (ROOT / folder).rglob("*.py")]
    files += [p for p in (ROOT / "scripts").rglob("*") if p.is_file()]
    files.append(ROOT / "Makefile")
    return sorted(p for p in files if "__pycache__" not in p.parts)


def issue_references(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each line that cites an issue tracker."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if ISSUE_REFERENCE.search(line)]


# The examples are assembled from parts so that this file does not cite an issue itself.
ISSUE, HASH = "iss" + "ue", "#"


@pytest.mark.parametrize("line", [
    f"# the {ISSUE} 7 bench", f"# see {ISSUE.title()} {HASH}18", f"({ISSUE}s 16 and 17)", f"# {ISSUE}{HASH}4",
    f"# as in PR {HASH}12", f"# fixes {HASH}3", f"# ({HASH}40)", "# gh" + "-12", f"# see {HASH}7", f"# done in {HASH}9",
])
def test_the_pattern_finds_issue_references(line):
    assert issue_references(line), line


@pytest.mark.parametrize("line", [
    '"color": "#999"', "color: #222; }", 'COLOURS = {"default": "#1f77b4", "recipe": "#555555"}',
    "# 1. the first step", 'assert data.ids[0] == "train.npz#0"', "x = 12  # 12 epochs",
    "# label issues found by cleanlab", "url = 'http://host/page#12'",
])
def test_the_pattern_leaves_colours_numbered_comments_and_ids_alone(line):
    assert not issue_references(line), line


def test_no_source_file_cites_an_issue():
    found = [f"{path.relative_to(ROOT)}:{number}: {line}"
             for path in source_files() for number, line in issue_references(path.read_text(errors="replace"))]
    assert not found, "say why in the code, not which issue asked for it:\n" + "\n".join(found)
