"""The Markdown documentation: links resolve, nothing points outside the repository, README is short.

Checked in every Markdown file of the repository's root and of `docs/`:

- every relative link (inline `[text](target)`, image or reference definition) names a file or
  directory that exists inside the repository, and every `#anchor` names a heading of the
  target file, slugged as GitHub does;
- nothing points outside the repository: a `../` path (linked or written in the text) must
  resolve inside it, every `*.md` file named in the text must exist in it, and there are no
  citations of the product requirements document ("PRD") or of tracker issue numbers, which
  a reader of the repository cannot open;
- README.md, the front door, stays under 20,000 bytes.

External links (`https:`, `mailto:`, ...) are not fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 20_000

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
INLINE_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
UP_PATH = re.compile(r"(?<![\w./-])(?:\.\./)+[\w.-][\w./-]*")
MD_NAME = re.compile(r"(?<![\w./-])(?:\.{1,2}/)*[\w-][\w./-]*\.md\b")
PLANNING = re.compile(r"\bPRD\b|\bissues? #?\d+\b", re.I)


def markdown_files() -> list[Path]:
    return sorted([*ROOT.glob("*.md"), *ROOT.glob("docs/**/*.md")])


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text a reader sees as prose: fenced blocks and code spans blanked out."""
    return CODE_SPAN.sub("``", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for m in INLINE_LINK.finditer(body)] + [
        m.group(1) for m in REFERENCE_DEF.finditer(body)
    ]


def inside_repo(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def link_problems(doc: Path) -> list[str]:
    problems = []
    for target in links(doc.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        if path_part.startswith("/"):
            problems.append(f"{target}: use a relative link")
            continue
        dest = (doc.parent / path_part) if path_part else doc
        if not inside_repo(dest):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {rel(dest)}")
    return problems


def outside_references(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    problems = []
    outside = {path for path in UP_PATH.findall(text) if not inside_repo(doc.parent / path)}
    problems += [f"{path}: a path outside the repository" for path in sorted(outside)]
    for name in MD_NAME.findall(text):
        if name in outside or (doc.parent / name).is_file() or (ROOT / name).is_file():
            continue
        problems.append(f"{name}: not a Markdown file of the repository")
    for match in PLANNING.finditer(prose(text)):
        line = text.count("\n", 0, match.start()) + 1
        problems.append(f"line {line}: {match.group(0)!r} cites a document outside the repository")
    return problems


DOCS = markdown_files()


def test_the_documents_are_found() -> None:
    names = {rel(p) for p in DOCS}
    assert {"README.md", "CONTRIBUTING.md", "docs/architecture.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_relative_links_and_anchors_resolve(doc: Path) -> None:
    assert link_problems(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_nothing_points_outside_the_repository(doc: Path) -> None:
    assert outside_references(doc) == []


def test_readme_stays_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail to docs/"


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Quick start", "quick-start"),
        (
            "HTTP/2 against HTTP/1.1 on the same listener",
            "http2-against-http11-on-the-same-listener",
        ),
        (
            "Upstream connection reuse (no cross-client pool)",
            "upstream-connection-reuse-no-cross-client-pool",
        ),
        ("`block_global`", "block_global"),
        (
            "Policy notes: IP ACL, rate limiting, security headers",
            "policy-notes-ip-acl-rate-limiting-security-headers",
        ),
        ("What is not closed, and why", "what-is-not-closed-and-why"),
        ("See [the cache](cache.md)", "see-the-cache"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_duplicate_headings_are_numbered(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text("# A\n\n## Notes\n\n```sh\n# not a heading\n```\n\n## Notes\n")
    assert anchors(doc) == {"a", "notes", "notes-1"}


def test_the_checks_catch_what_they_are_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Front\n\n[ok](docs/a.md#title) [ok](#front) [web](https://example.com/x.md)\n"
        "[gone](docs/b.md) [anchor](docs/a.md#nope) [up](../shared/plan.md) `[no](link.md)`\n"
        "See `../shared/notes.md`, performance-notes.md and PRD §4.4 (issue 11).\n"
    )
    assert link_problems(doc) == [
        "docs/b.md: no such file",
        "docs/a.md#nope: no heading with anchor #nope in docs/a.md",
        "../shared/plan.md: leaves the repository",
    ]
    assert outside_references(doc) == [
        "../shared/notes.md: a path outside the repository",
        "../shared/plan.md: a path outside the repository",
        "docs/b.md: not a Markdown file of the repository",
        "link.md: not a Markdown file of the repository",
        "performance-notes.md: not a Markdown file of the repository",
        "line 5: 'PRD' cites a document outside the repository",
        "line 5: 'issue 11' cites a document outside the repository",
    ]
