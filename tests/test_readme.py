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
