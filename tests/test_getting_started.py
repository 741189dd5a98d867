"""docs/index.md: every task has its command, and the doc-command test runs each one a CPU can run."""

import re

from tests.test_docs_commands import COMMANDS, NOT_ON_A_CPU, ROOT, doc_commands


def test_every_getting_started_command_is_run_by_the_doc_test():
    page = doc_commands(ROOT / "docs" / "index.md")
    run = {c for _, c in COMMANDS}
    assert len(page) >= 8 and set(page) <= run
    skipped = [c for c in page if any(re.search(p, c) for p, _ in NOT_ON_A_CPU)]
    text = (ROOT / "docs" / "index.md").read_text()
    gpu_section = text[text.index("## Run on a GPU or a cluster") :]
    assert all(c.split("  #")[0].strip() in gpu_section for c in skipped), skipped  # only the GPU / cluster ones


def test_the_readme_links_the_page_first():
    readme = (ROOT / "README.md").read_text()
    first_doc_link = re.search(r"\(docs/[\w/]+\.md\)|`docs/[\w/]+\.md`", readme).group(0)
    assert "docs/index.md" in first_doc_link and "docs/metrics.md" in readme
