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
