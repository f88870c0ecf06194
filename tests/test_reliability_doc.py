"""docs/reliability.md lists the faults tried by their tests' names: every name there is a test,
and every test of the fault suites is there."""

import re

from conftest import REPO

SUITES = ("test_faults.py", "test_bad_inputs.py", "test_bad_files.py")


def names_of_tests(path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.MULTILINE))


def test_reliability_doc_names_only_real_tests_and_every_fault_test():
    named = set(re.findall(r"`(test_\w+)`", (REPO / "docs" / "reliability.md").read_text()))
    every = set().union(*(names_of_tests(p) for p in (REPO / "tests").glob("test_*.py")))
    assert not named - every, f"docs/reliability.md names tests that do not exist: {sorted(named - every)}"
    suites = set().union(*(names_of_tests(REPO / "tests" / s) for s in SUITES))
    assert not suites - named, f"fault tests missing from docs/reliability.md: {sorted(suites - named)}"
