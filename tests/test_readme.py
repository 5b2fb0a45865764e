"""The README is the user's entry point: keep it true to the code."""

import dataclasses
from pathlib import Path

from shared_model.config import HospitalConfig, RunConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make simulate" in first_block and "make test" in first_block


def test_every_run_setting_is_documented():
    for key in RunConfig().to_run_config():
        assert f"| `{key}` |" in README, key


def test_every_hospital_setting_is_documented():
    simulation_only = {"partition_id", "num_partitions"}  # set by Flower's simulation
    for field in dataclasses.fields(HospitalConfig):
        if field.name not in simulation_only:
            assert f"| `{field.name.replace('_', '-')}` |" in README, field.name


def test_the_fault_table_is_the_one_the_tests_produce():
    """`make fault-table` regenerates it from the tests' @pytest.mark.fault markers."""
    from tests.support.fault_table import BEGIN, END, render, scan

    rows = scan()
    assert len(rows) >= 30  # markers are found (a broken scan would find none)
    assert {r.kept for r in rows} and all(r.injected and r.outcome for r in rows)
    current = BEGIN + README.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert current == render(rows), "the README's fault table is stale: run `make fault-table`"


def test_the_table_of_what_a_hospital_sends_is_current():
    """`make doc-tables` regenerates it from client/app/outbound.py."""
    from tests.support.outbound_table import BEGIN, END, render

    current = BEGIN + README.split(BEGIN, 1)[1].split(END, 1)[0] + END
    assert current == render(), "the README's table is stale: run `make doc-tables`"
