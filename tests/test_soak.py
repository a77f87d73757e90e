"""A short soak through bench/soak.py: a real server in a subprocess, mixed combinations streamed and not, an
adapter replaced, one corrupted and one deleted mid-run, disconnecting clients and malformed bodies. Every request
gets a documented outcome and every answer equals the one the same request gets alone."""

from __future__ import annotations

from bench import soak


def test_soak_loses_nothing_and_nothing_bleeds(capsys):
    code = soak.main(["--quick", "--seed", "3"])
    report = capsys.readouterr().out
    print(report)
    assert code == 0, report
    assert "BAD" not in report
    assert "    0  lost" in report
