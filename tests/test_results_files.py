"""Every results file that README.md and docs/ cite exists, names its device, and names the commit it measured
(in the file, or in benchmarks/results/PROVENANCE.md for files that predate commit recording)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import ROOT


RESULTS = ROOT / "benchmarks" / "results"
CITED = re.compile(r"(?:benchmarks/)?results/([A-Za-z0-9_.-]+\.json)")
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]


def cited_files() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for page in PAGES:
        for name in CITED.findall(page.read_text()):
            cited.setdefault(name, []).append(str(page.relative_to(ROOT)))
    return cited


def test_the_docs_cite_results_files():
    assert "multitask_step_h200.json" in cited_files()


@pytest.mark.parametrize("name", sorted(cited_files()))
def test_a_cited_results_file_exists_and_records_its_device_and_commit(name):
    path = RESULTS / name
    assert path.is_file(), f"{name}, cited by {cited_files()[name]}, is not in benchmarks/results/"
    report = json.loads(path.read_text())
    provenance = (RESULTS / "PROVENANCE.md").read_text()
    listed = f"| `{name}` |" in provenance  # a row of PROVENANCE.md: the measured tree and the machine
    assert report.get("device") or report.get("device_name") or listed, f"{name} names no device"
    assert report.get("git_commit") or listed, f"{name} records no git_commit and PROVENANCE.md does not list it"
