"""The `capbus` command's one table formatter (capbus._cli.fmt), and `capbus bench` as a thin entry
point to the clone's bench/. No kernel: the tables are fed rows a hostile process could have
named (rich markup, very long names) and must print them as text, unwrapped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from capbus._cli import fmt, main, stats, top

ROOT = Path(__file__).resolve().parents[2]  # tests/tools/ -> the repository


def test_table_is_plain_aligned_text():
    since = time.mktime((2026, 1, 2, 13, 4, 5, 0, 0, -1))
    rows = [{"id": 1, "pid": 22, "name": None, "services": ["a", "b"], "since": since},
            {"id": 100, "pid": 3, "name": "", "services": [], "since": None}]
    text = fmt.table(rows, ("id", "pid", "name", "services", "since"))
    assert text == ("ID   PID  NAME  SERVICES  SINCE\n"
                    "1    22   -     a,b       13:04:05\n"
                    "100  3    -     -         -")
    assert fmt.table([], ("id", "name")) == "ID  NAME"


def test_names_from_processes_are_printed_as_they_are():
    """A service name that looks like rich markup is text, and a very long one is never wrapped
    or cut: one line per row."""
    hostile = ["[bold red]boom[/]", "[link=http://x]y[/link]", ":smile:", "x" * 500]
    rows = [{"name": n, "kind": "name"} for n in hostile]
    lines = fmt.table(rows, ("name", "kind")).splitlines()
    assert len(lines) == 1 + len(hostile)
    for line, name in zip(lines[1:], hostile, strict=True):
        assert line.startswith(name + " ") and line.endswith("name")
    assert all(line == line.rstrip() for line in lines)


def test_stats_and_top_show_hostile_names_as_text():
    chans = [{"service": "[red]svc", "server": 1, "client": 2, "index": 0, "sent": 3,
              "received": 3, "hist": [0] * stats.HIST_BUCKETS}]
    snap = stats.build([{"id": 1, "pid": 10, "name": "[b]p", "services": ["[red]svc"]},
                        {"id": 2, "pid": 11, "name": None, "services": []}],
                       [{"name": "[red]svc", "kind": "name", "id": 1}], chans, socket="/k", now=0.0)
    text = top.format_stats(snap, channels=True)
    assert "[red]svc" in text and "[b]p" in text
    screen = fmt.render_text(top.render_top(snap, stats.rates(None, snap), "name", "/k", width=200))
    assert "[red]svc" in screen and "[b]p" in screen


def test_capbus_bench_outside_a_clone_says_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "main.py").write_text("raise SystemExit('must not run')\n")
    assert main.main(["bench", "--quick"]) == 2  # a bench/ that is not capbus's is not run
    assert "make bench" in capsys.readouterr().err


def test_capbus_bench_in_the_clone_is_python_m_bench(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    # bench's own options and errors: a section it does not know is refused before any run
    assert main.main(["bench", "--quick", "--only", "nosuch"]) == 1
    assert "unknown bench sections ['nosuch']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main.main(["bench", "--help"])
    assert exc.value.code == 0 and "--only" in capsys.readouterr().out


def test_other_verbs_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(["ps", "--quick"])
    assert exc.value.code == 2 and "unrecognized arguments: --quick" in capsys.readouterr().err
