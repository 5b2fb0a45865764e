"""What `fedfusion simulate` shows and leaves: round lines with time, runs/latest."""


def test_runs_latest_follows_the_newest_default_run(tmp_path):
    from server.commands.cli import _point_latest_at

    for name in ("20261201-000000", "20261202-000000"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        _point_latest_at(tmp_path / "runs" / name)
        assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / "runs" / name).resolve()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "20261201-000000",
        "20261202-000000",
        "latest",
    ]


def test_a_folder_named_latest_is_left_alone_with_a_note(tmp_path, capsys):
    from server.commands.cli import _point_latest_at

    (tmp_path / "runs" / "latest" / "kept").mkdir(parents=True)
    (tmp_path / "runs" / "20261201-000000").mkdir()
    _point_latest_at(tmp_path / "runs" / "20261201-000000")
    assert (tmp_path / "runs" / "latest" / "kept").is_dir()
    assert "is a folder, not the link" in capsys.readouterr().err


def _shown(lines: list[str], times: list[float], rounds: int = 3) -> list[str]:
    from server.commands.simulate import with_eta

    shown: list[str] = []
    clock = iter(times)
    echo = with_eta(shown.append, rounds=rounds, clock=lambda: next(clock))
    for line in lines:
        echo(line)
    return shown


def test_simulate_round_lines_show_elapsed_time_and_time_left():
    lines = ["  round 0/3 | x", "  round 1/3 | y", "  round 2/3 | z", "  round 3/3 | w"]
    shown = _shown(lines, [0.0, 10.0, 40.0, 70.0, 100.0])
    assert shown[0].endswith("0:10 elapsed")  # round 1 starts now
    assert shown[1].endswith("0:40 elapsed")  # the first round: one-off work, no estimate
    assert shown[2].endswith("1:10 elapsed, about 0:30 left")  # 30 s a round, 1 to go
    assert shown[3].endswith("1:40 elapsed")


def test_with_secagg_the_clock_starts_with_the_first_exchange():
    """Round 0's evaluation comes back with round 1's SecAgg+ exchange, after it began."""
    lines = ["  round 1/3 (SecAgg+)", "  round 0/3 | x", "  round 1/3 | y", "  round 2/3 (SecAgg+)"]
    shown = _shown(lines, [0.0, 5.0, 35.0, 35.0, 36.0])
    assert shown[0] == "  round 1/3 (SecAgg+)"  # a start line: no clock
    assert shown[1].endswith("0:35 elapsed")
    assert shown[2].endswith("0:35 elapsed")  # round 1 done: no estimate from it
    assert shown[3] == "  round 2/3 (SecAgg+)"


def test_a_resumed_run_is_timed_from_the_round_it_resumes_with():
    lines = ["  round 3/5 (SecAgg+)", "  round 3/5 | y", "  round 4/5 | z"]
    shown = _shown(lines, [0.0, 1.0, 21.0, 41.0], rounds=5)
    assert shown[1].endswith("0:21 elapsed")
    assert shown[2].endswith("0:41 elapsed, about 0:20 left")  # 20 s a round, 1 to go


def test_the_estimate_leaves_out_the_first_rounds_one_off_work():
    """Round 1 computes the frozen encoders' features (50 s); later rounds take 2 s."""
    lines = [f"  round {k}/15 | x" for k in range(5)]
    shown = _shown(lines, [0.0, 0.0, 50.0, 52.0, 54.0, 56.0], rounds=15)
    assert shown[1].endswith("0:50 elapsed")
    assert shown[2].endswith("0:52 elapsed, about 0:26 left")  # 2 s a round, 13 to go
    assert shown[4].endswith("0:56 elapsed, about 0:22 left")


def test_the_round_bar_counts_rounds_in_a_terminal(monkeypatch):
    """With a terminal, lines go above a rich bar that counts the finished rounds."""
    import io

    from rich.console import Console

    from server.commands import simulate

    out = io.StringIO()
    monkeypatch.setattr(simulate, "Console", lambda: Console(file=out, force_terminal=True))
    ticks = []
    with simulate.round_progress(print, 2, live=True) as show:
        show("round 0/2 | a")
        show("round 1/2 | b")
        ticks.append(out.getvalue())
    text = out.getvalue()
    assert "round 1/2 | b" in text and "rounds" in text and "1/2" in ticks[0]
