"""The README is the user's entry point: keep it true to the code."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make simulate" in first_block and "make test" in first_block


def test_the_recipes_use_commands_that_exist():
    """Every `fedfusion <command>` in the README is a registered command."""
    from typer.main import get_command

    from shared_model.cli import build_app

    known = set(get_command(build_app()).commands)  # type: ignore[attr-defined]
    used = set(re.findall(r"(?:bin/|`)fedfusion ([a-z][a-z-]+)", README))
    assert used and used <= known, used - known


def test_the_recipes_name_only_keys_the_code_parses():
    """Keys in the README's TOML blocks are real keys of their tables."""
    import dataclasses

    from client.node.config import ConnectionConfig
    from server.commands.config import ServerDeployConfig
    from shared_model.config import HospitalConfig, RunConfig

    tables = {
        "server": {f.name.replace("_", "-") for f in dataclasses.fields(ServerDeployConfig)},
        "hospital": {f.name.replace("_", "-") for f in dataclasses.fields(HospitalConfig)},
        "connection": {f.name.replace("_", "-") for f in dataclasses.fields(ConnectionConfig)},
        "run": set(RunConfig().to_run_config()),
    }
    checked = 0
    for block in re.findall(r"<<'?EOF'?\n(.*?)\nEOF", README, re.S):
        table = None
        for line in block.splitlines():
            if m := re.match(r"\[(\w+)\]", line):
                table = m.group(1)
            elif m := re.match(r"([\w.-]+)\s*=", line):
                assert table in tables and m.group(1) in tables[table], (table, m.group(1))
                checked += 1
    assert checked >= 10
