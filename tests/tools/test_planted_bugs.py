"""tools/planted_bugs.py: every planted bug still applies to the source (a replacement that no
longer matches would be a bug the tool cannot plant), and a run restores the file it edited
whatever the test did."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import planted_bugs  # noqa: E402


def test_every_bug_applies_exactly_once_and_names_a_test():
    assert planted_bugs.main(["--check"]) == 0
    names = [b.name for b in planted_bugs.BUGS]
    assert len(names) == len(set(names))
    for b in planted_bugs.BUGS:
        path, _, test = b.test.partition("::")
        assert (ROOT / path).is_file() and f"def {test}(" in (ROOT / path).read_text(), b.test
        assert "1e-4" in b.new or b.name == "recompute_rng_not_restored", b.name


def test_a_run_restores_the_source_and_reports_what_failed(tmp_path, monkeypatch):
    target = tmp_path / "code.py"
    target.write_text("x = 1\n")
    test = tmp_path / "test_code.py"
    test.write_text(f"import runpy\n\ndef test_x():\n    assert runpy.run_path({str(target)!r})['x'] == 1, 'x moved'\n")
    monkeypatch.setattr(planted_bugs, "ROOT", tmp_path)
    bug = planted_bugs.Bug("x", "family", "x off", "code.py", "x = 1\n", "x = 1 + 1e-4\n", "test_code.py::test_x")
    row = planted_bugs.run(bug, timeout=60)
    assert row["caught"] and "x moved" in row["failure"], row
    assert target.read_text() == "x = 1\n"
    unchanged = planted_bugs.Bug("y", "family", "nothing", "code.py", "x = 1\n", "x = 1\n", "test_code.py::test_x")
    assert not planted_bugs.run(unchanged, timeout=60)["caught"]
    # --only reruns a bug and keeps the other bugs' rows of the last run, in the list's order
    out = tmp_path / "rows.jsonl"
    out.write_text('{"name": "y", "caught": true}\n{"name": "x", "caught": false}\n')
    monkeypatch.setattr(planted_bugs, "BUGS", [bug, unchanged])
    assert planted_bugs.main(["--only", "x", "--out", str(out)]) == 0
    assert [(r["name"], r["caught"]) for r in map(json.loads, out.read_text().splitlines())] == [
        ("x", True), ("y", True)]


def test_an_unknown_bug_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        planted_bugs.main(["--only", "nope"])
    assert e.value.code == 2 and "unknown bug(s) ['nope']" in capsys.readouterr().err
