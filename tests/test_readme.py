"""The README's test command is the one CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ci-test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README lost its ci-test-command block"
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert block.group(1).strip() in ci_lines


# -- the README a user reads, and the docs it links ------------------------------------------------

MAX_README_LINES = 260
SECTIONS = (  # in this order
    "## What it gains",
    "## Install",
    "## Two commands",
    "## Using the backend",
    "## Warmup and offline artifacts",
    "## Recipes",
    "## Supported versions and hardware",
    "## Troubleshooting",
    "## Documentation",
)


def test_the_readme_is_short_has_every_section_in_order_and_no_history():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README has {len(lines)} lines (at most {MAX_README_LINES})"
    places = [readme.find(s + "\n") for s in SECTIONS]
    assert all(p >= 0 for p in places), [s for s, p in zip(SECTIONS, places) if p < 0]
    assert places == sorted(places), "README sections out of order"
    assert not re.search(r"(?i)\bissues? #?\d+", readme), "README names an issue number"
    assert not re.search(r"\bruns? [A-I]\b", readme), "README names a run letter"


def _markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_markdown_links_resolve():
    broken = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # links in code blocks are code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = target.split("#", 1)[0]
            if path and not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken
