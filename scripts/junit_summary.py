"""Counts of pytest JUnit XML reports: `N passed, N failed, N skipped` for one file, or `total: ...` for several
(`--total`); used by scripts/test_matrix.sh to print one summary per transformers version and a closing total."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> tuple[int, int, int]:
    """(passed, failed, skipped) of one JUnit XML report; errors count as failures."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return total - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    total = argv[:1] == ["--total"]
    paths = argv[1:] if total else argv
    passed = failed = skipped = 0
    for path in paths:
        p, f, s = counts(path)
        passed, failed, skipped = passed + p, failed + f, skipped + s
    print(f"{'total: ' if total else ''}{passed} passed, {failed} failed, {skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
