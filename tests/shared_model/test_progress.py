"""Progress outside a terminal: a plain line per step, never a bar's control codes."""

from shared_model import progress as progress_module


def test_outside_a_terminal_progress_is_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress_module, "LINE_EVERY", 0.0)  # a line at every step
    with progress_module.progress(3, "rows") as advance:
        for _ in range(3):
            advance("checking", 1)
        advance("predicting", 3)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "checking: 1/3 rows",
        "checking: 2/3 rows",
        "checking: 3/3 rows",
        "predicting: 3/3 rows",
    ]


def test_a_quiet_log_gets_no_line_before_a_few_seconds(capsys):
    with progress_module.progress(1000) as advance:
        for _ in range(1000):
            advance("reading", 1)
    assert capsys.readouterr().err == ""  # finished in well under LINE_EVERY seconds


def test_in_a_terminal_nested_progress_shares_one_display(monkeypatch):
    """A benchmark part's bars go into the benchmark's display (rich allows only one)."""
    import io

    from rich.console import Console

    out = io.StringIO()
    monkeypatch.setattr(
        "rich.console.Console", lambda stderr=False: Console(file=out, force_terminal=True)
    )
    with progress_module.progress(2, "parts") as outer:
        with progress_module.progress(4, "trainings") as inner:
            inner("configurations and seeds", 4)
            assert len(progress_module._live[0].tasks) == 1
        outer("bench utility", 1)
        assert [t.description for t in progress_module._live[0].tasks] == ["bench utility"]
    assert progress_module._live == []
    assert "configurations and seeds" in out.getvalue()
