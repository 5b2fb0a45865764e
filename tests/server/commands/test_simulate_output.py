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


def test_simulate_round_lines_show_elapsed_time_and_time_left():
    from server.commands.simulate import with_eta

    shown, times = [], iter([0.0, 10.0, 40.0, 70.0, 100.0])
    echo = with_eta(shown.append, rounds=3, clock=lambda: next(times))
    for line in ("  round 0/3 | x", "  round 1/3 (SecAgg+)", "  round 1/3 | y", "  round 2/3 | z"):
        echo(line)
    echo("  round 3/3 | w")
    assert shown[0].endswith("0:10 elapsed") and shown[1] == "  round 1/3 (SecAgg+)"
    assert shown[2].endswith("0:40 elapsed, about 1:00 left")  # 30 s a round, 2 to go
    assert shown[3].endswith("1:10 elapsed, about 0:30 left")
    assert shown[4].endswith("1:40 elapsed")
