"""Benchmark figures: a measurement, the table it prints, the files it writes.

Every suite reports :class:`Measurement` objects: a median over samples with its ratio to
a baseline measured in the same sitting (the machine is shared and noisy, so only
side-by-side ratios mean much). ``write_results`` writes ``<suite>.json`` and
``<suite>.md`` to ``benchmarks/results/`` (the latest run only; earlier runs are in git
history).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

__all__ = ["Echo", "Measurement", "machine_facts", "table", "write_results"]

Echo = Callable[[str], None]


@dataclass(kw_only=True)
class Measurement:
    """One benchmark figure: the median over its samples, and its ratio to a baseline."""

    name: str
    config: dict[str, Any]
    median: float
    min: float
    max: float
    unit: str
    samples: int
    baseline: str | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None

    @classmethod
    def of(
        cls, name: str, config: dict[str, Any], values: Sequence[float], unit: str
    ) -> Measurement:
        """Summarize ``values`` (at least one)."""
        if not values:
            raise ValueError(f"{name}: no samples")
        return cls(
            name=name,
            config=config,
            median=statistics.median(values),
            min=min(values),
            max=max(values),
            unit=unit,
            samples=len(values),
        )

    def against(self, baseline: Measurement, limit: float | None = None) -> Measurement:
        """Set the ratio to ``baseline`` (and whether it meets ``ratio <= limit``)."""
        self.baseline = baseline.name
        self.ratio = self.median / baseline.median if baseline.median else None
        if limit is not None and self.ratio is not None:
            self.target = f"<= {limit:g}x"
            self.met = self.ratio <= limit
        return self


def machine_facts() -> dict[str, Any]:
    """The machine and library versions a result came from (results are only comparable on one)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "flwr": version("flwr"),
        "opacus": version("opacus"),
        "load-average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _fmt(value: float, unit: str) -> str:
    if unit in {"AUC", "AUROC", "TPR"}:
        return f"{value:.3f}"
    if unit == "B":
        return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"
    if unit == "s" and value < 0.1:  # a GPU's steps: milliseconds, not "0.00 s"
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} {unit}"


def table(measurements: Sequence[Measurement]) -> str:
    """A Markdown table of the measurements."""
    rows = [
        "| measurement | median | min | max | n | vs. | ratio | target |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for m in measurements:
        ratio = f"{m.ratio:.2f}x" if m.ratio is not None else ""
        target = f"{m.target}: {'met' if m.met else 'MISSED'}" if m.target else ""
        rows.append(
            f"| {m.name} | {_fmt(m.median, m.unit)} | {_fmt(m.min, m.unit)} | "
            f"{_fmt(m.max, m.unit)} | {m.samples} | {m.baseline or ''} | {ratio} | {target} |"
        )
    return "\n".join(rows)


def write_results(
    measurements: Sequence[Measurement],
    out_dir: Path,
    suite: str = "perf",
    stamp: str | None = None,
    failures: Sequence[str] = (),
    facts: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write the JSON results and the Markdown table of one suite; returns both paths.

    The same ``stamp`` rewrites the same files (a run writes after each of its parts);
    ``failures`` names the parts that failed, and why. ``facts``: more about the machine
    (a ``device`` fact is named under the machine in the table's file).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    machine = {**machine_facts(), **(facts or {})}
    device = f"Device: {machine['device']}.\n\n" if machine.get("device") else ""
    data = {
        "created": stamp,
        "machine": machine,
        "entries": [asdict(m) for m in measurements],
        "failures": list(failures),
    }
    json_path = out_dir / f"{suite}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / f"{suite}.md"
    md_path.write_text(
        f"# fedfusion benchmark ({suite}), {stamp} UTC\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}; "
        f"torch {machine['torch']}, flwr {machine['flwr']}, opacus {machine['opacus']}.\n\n"
        f"{device}{table(measurements)}\n\n"
        + "".join(f"**FAILED** {failure}\n\n" for failure in failures)
        + f"Raw: `{json_path.name}`\n",
        encoding="utf-8",
    )
    return json_path, md_path
