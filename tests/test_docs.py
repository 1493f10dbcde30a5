"""The documentation is self-contained and the README is a front door.

- Every relative link in every Markdown file (and notebook Markdown cell) resolves to a file inside the
  repository; in Markdown, a link to a heading (``page.md#anchor``) also names a heading that exists.
- Nothing a user gets (README, docs, code, configs, sweeps, notebooks, ...) cites files outside the
  repository (the project's private design notes or paper copies).
- The README has its sections, a table of contents that lists them, the install and test commands CI
  runs, and a method catalogue that lists every attack, defense and analysis option (and no other).
- A LICENSE ships.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: folders that hold no shipped file (build outputs, environments, run outputs); skipped when git is absent
UNSHIPPED = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "outputs", "multirun", "wandb", "wheels",
             "node_modules", ".ipynb_checkpoints"}
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".ipynb", ".sh", ".txt", ".cfg", ".ini", ".json", ""}
#: references to the project's notes outside the repository, which users do not have
OUTSIDE = ("../shared", "shared/DESIGN", "DESIGN.md", "shared/papers")
#: the README sections issue 23 asks for (heading text, case-insensitive)
REQUIRED_SECTIONS = ("Contents", "Quick start", "Scan a model you were given", "Use it from Python",
                     "Method catalogue")
CATALOGUE_GROUPS = ("attack", "defense", "analysis")


def repository_files() -> list[Path]:
    """The files the repository ships: what git tracks or would track (untracked, not ignored); without git,
    a walk that skips build and run outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout.decode()
        files = [REPO / name for name in listed.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in REPO.rglob("*") if not UNSHIPPED & set(p.relative_to(REPO).parts[:-1])
                 and not p.relative_to(REPO).parts[0].endswith(".egg-info")]
    return sorted(p for p in files if p.is_file())


FILES = repository_files()
MARKDOWN = [p for p in FILES if p.suffix == ".md"]


def without_code(text: str) -> str:
    """``text`` with fenced code blocks and inline code spans blanked (links there are examples, not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def markdown_of(path: Path) -> str:
    """The Markdown of a ``.md`` file, or of a notebook's Markdown cells."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
        return "\n\n".join("".join(c.get("source", "")) for c in cells if c.get("cell_type") == "markdown")
    return path.read_text(encoding="utf-8")


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)


def links(text: str) -> list[str]:
    body = without_code(text)
    return LINK.findall(body) + REFERENCE.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated one gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def broken_links(path: Path, check_anchors: bool = False) -> list[str]:
    """The relative links of ``path`` that escape the repository or name no file (with ``check_anchors``, or
    no heading of a Markdown file)."""
    problems = []
    for target in links(markdown_of(path)):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:: outside by design
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.is_relative_to(REPO):
            problems.append(f"{target}: points outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif check_anchors and anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {resolved.relative_to(REPO)}")
    return problems


def test_the_repository_has_markdown_to_check() -> None:
    assert README in FILES and len(MARKDOWN) >= 5


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix in (".md", ".ipynb")],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    assert broken_links(path, check_anchors=path.suffix == ".md") == []


def test_nothing_cites_files_outside_the_repository() -> None:
    shipped = [p for p in FILES if p.suffix in TEXT_SUFFIXES and p.relative_to(REPO).parts[0] != "tests"
               and p.stat().st_size < 2_000_000]
    found = []
    for path in shipped:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(REPO)}:{number}: {word}" for word in OUTSIDE if word in line]
    assert found == []


def sections(text: str, level: int) -> dict[str, str]:
    """Heading text -> body (code blocks included), for the headings of exactly ``level`` ``#``; a ``#`` line
    inside a code block is not a heading."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith(("```", "~~~")):
            fenced = not fenced
        heading = None if fenced else re.match(rf"^{'#' * level} (?!#)(.+)$", line)
        if heading:
            current = found.setdefault(heading.group(1).strip(), [])
        elif current is not None:
            if not fenced and level > 1 and re.match(rf"^#{{1,{level - 1}}} ", line):
                current = None  # a higher heading ends the section
            else:
                current.append(line)
    return {title: "\n".join(lines) for title, lines in found.items()}


def readme_sections() -> dict[str, str]:
    return sections(README.read_text(encoding="utf-8"), 2)


def test_readme_has_the_front_door_sections_and_a_table_of_contents_of_them() -> None:
    found = {title.lower(): body for title, body in readme_sections().items()}
    missing = [title for title in REQUIRED_SECTIONS if title.lower() not in found]
    assert missing == []
    listed = set(LINK.findall(found["contents"]))
    unlisted = [title for title in readme_sections() if title != "Contents" and f"#{slug(title)}" not in listed]
    assert unlisted == [], "README sections missing from its table of contents"


def test_readme_gives_the_commands_ci_runs() -> None:
    """The quick start installs the way .ci/run does and runs bdlab; the test command is the one CI runs."""
    text = README.read_text(encoding="utf-8")
    quick = {t.lower(): b for t, b in readme_sections().items()}["quick start"]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r'pip install (--\S+ )*-e "\.\[dev\]"', ci) and re.search(r"^python -m pytest$", ci, re.MULTILINE)
    code = "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL))
    assert 'pip install -e ".[dev]"' in code and "python -m pytest" in code
    assert "python -m bdlab.run" in quick and 'pip install -e ".[dev]"' in quick


def options(group: str) -> set[str]:
    return {p.stem for p in (REPO / "conf" / group).glob("*.yaml") if not p.stem.startswith("_")}


def catalogue_rows(group: str) -> list[list[str]]:
    """The table rows of the catalogue's subsection for ``group`` (the one whose heading names `group=`)."""
    catalogue = {t.lower(): b for t, b in readme_sections().items()}["method catalogue"]
    subsections = [body for title, body in sections(catalogue, 3).items() if f"`{group}=" in title]
    assert len(subsections) == 1, f"the catalogue needs one subsection whose heading names `{group}=`"
    rows = [line.strip().strip("|").split("|") for line in subsections[0].splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row] for row in rows]


@pytest.mark.parametrize("group", CATALOGUE_GROUPS)
def test_the_method_catalogue_lists_every_option_with_its_paper_category_and_figures(group: str) -> None:
    rows = catalogue_rows(group)
    listed = [row[0].strip("`") for row in rows]
    assert sorted(set(listed) - options(group)) == [], "catalogue rows naming no option"
    assert sorted(options(group) - set(listed)) == [], f"conf/{group} options missing from the README catalogue"
    assert len(listed) == len(set(listed))
    assert all(len(row) == 4 and all(row) for row in rows), "each row: option | paper | category | what it reports"


def test_a_license_ships() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c)" in text
