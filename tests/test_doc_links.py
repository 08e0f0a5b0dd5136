"""Every relative link of README.md and docs/*.md leads somewhere: the file exists and, with an
anchor, the page has that heading (GitHub's slug) or an `<a id>`. The README is short and the
reference lives in docs/ (issue 20, the newcomer's path), so links cross pages."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, numbered."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda span: span.group(0)[1:-1], heading).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)           # a link's text only
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for _, line in prose_lines(page.read_text()):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
        found.update(EXPLICIT_ANCHOR.findall(line))
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for number, line in prose_lines(page.read_text()):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):            # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}:{number}: {target}"
            shown = linked.relative_to(root) if linked.is_relative_to(root) else linked
            if not linked.exists():
                broken.append(f"{where} (no {shown})")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{where} (no heading or <a id> {anchor!r} in {shown})")
    return broken


def test_every_relative_link_of_the_readme_and_docs_resolves():
    broken = [link for page in PAGES for link in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_a_broken_link_and_a_missing_anchor_are_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Two `make` commands: here\n")
    page.write_text("[ok](other.md#two-make-commands-here) [top](#title) [gone](missing.md)\n"
                    "[no anchor](other.md#nowhere)\n```sh\n[in code](nowhere.md)\n```\n# Title\n")
    broken = broken_links(page, tmp_path)
    assert broken == ["page.md:1: missing.md (no missing.md)",
                      "page.md:2: other.md#nowhere (no heading or <a id> 'nowhere' in other.md)"], broken
