"""The docs a newcomer follows work: every ``python -m medadapt …`` command shown in README.md and docs/ parses
against the code (a ``--print_config`` dry run, offline: nothing loads), and every relative link resolves, to
a file and, with ``#anchor``, to a heading in it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def commands(page: Path) -> list[str]:
    """``python -m medadapt`` commands of the page's bash blocks: continued lines (a trailing backslash, or a
    quote still open) joined."""
    found, block, buffer = [], False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block, buffer = not block and line.strip() in ("```bash", "```"), ""
            continue
        if not block:
            continue
        buffer = f"{buffer.removesuffix(chr(92))} {line.strip()}".strip() if buffer else line.strip()
        if buffer.endswith("\\") or not closed(buffer):
            continue
        if buffer.startswith("python -m medadapt "):
            found.append(buffer)
        buffer = ""
    return found


def closed(line: str) -> bool:
    try:
        without_comment(line)
    except ValueError:  # "No closing quotation": the command goes on on the next line
        return False
    return True


def without_comment(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


CASES = [(page.relative_to(REPO).as_posix(), line) for page in PAGES for line in commands(page)]


def test_the_docs_show_commands_for_every_method():
    shown = {without_comment(line)[3] for _, line in CASES}
    assert {"fit", "test", "index", "ask", "multistep", "study", "export", "compare"} <= shown
    assert len(CASES) >= 20


@pytest.mark.parametrize("page, line", CASES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(CASES)])
def test_every_documented_command_parses(page, line, capsys, monkeypatch):
    from medadapt.cli import main

    monkeypatch.chdir(REPO)  # the docs' config paths are relative to the checkout
    args = without_comment(line)[3:]
    with pytest.raises(SystemExit) as done:
        main([*args, "--print_config"])
    assert done.value.code in (0, None), f"{page}: `{line}` does not parse:\n{capsys.readouterr().err[-2000:]}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
            continue
        if anchor and file.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.MULTILINE)}
            if anchor not in headings:
                broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
