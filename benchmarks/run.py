"""Run the benchmarks and write benchmarks/RESULTS.md: `python -m benchmarks.run [--quick] [--only a,b]`.

`--merge FILE` runs nothing and puts a result file measured elsewhere into RESULTS (benchmarks/gpu_check.py
writes one on a lent GPU machine); each of its figures carries its machine in its notes. The file's rows
replace all earlier rows of their benchmark, or, where it names `"replaces": {benchmark: [metric prefixes]}`
(one part of a benchmark, e.g. `bench_scaleout --part a`), only the earlier rows whose metric starts so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import pkgutil
import sys
import traceback
from pathlib import Path

from benchmarks.harness import Figure, machine_description

HERE = Path(__file__).parent


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def render(figures: list[Figure], failures: dict[str, str], quick: bool) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {machine_description()}"
        f"{' (quick mode)' if quick else ''}. Regenerate with `python -m benchmarks.run`; "
        "`--only NAME` replaces that benchmark's rows and keeps the others from their earlier runs.",
        "Every figure stands beside its baseline measured in the same run, except where the baseline reads "
        "*reference*: a number not measured here (the notebook's figures from other hardware, a configured "
        "budget). Values are medians of repeats.",
        "",
        "| benchmark | metric | value | baseline | ratio | goal | met | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        ratio = (
            "-"
            if f.ratio is None
            else f"{f.ratio:.2g}x"
            if abs(f.ratio) < 0.01
            else f"{f.ratio:.2f}x"
        )
        baseline = (
            "-"
            if f.baseline is None
            else f"{'*reference* ' if f.reference else ''}{_format(f.baseline)} ({f.baseline_name})"
        )
        met = {True: "yes", False: "**no**", None: "-"}[f.met]
        lines.append(
            f"| {f.benchmark} | {f.metric} | {_format(f.value)} {f.unit} | {baseline} | {ratio} | "
            f"{f.goal or '-'} | {met} | {f.notes} |"
        )
    for name, error in failures.items():
        lines.append(f"| {name} | (failed) | - | - | - | - | **no** | {error} |")
    return "\n".join(lines + _sections(figures)) + "\n"


def _sections(figures: list[Figure]) -> list[str]:
    """Extra tables of benchmarks whose module defines `markdown_section(figures) -> lines` (e.g. peers)."""
    lines: list[str] = []
    for name in dict.fromkeys(f.benchmark for f in figures):
        try:
            section = getattr(
                importlib.import_module(f"benchmarks.bench_{name}"), "markdown_section", None
            )
        except Exception:  # a module that no longer imports keeps its rows, without a section
            continue
        if section is not None:
            lines += section([f for f in figures if f.benchmark == name])
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--only", default="", help="comma-separated benchmark names (bench_<name>.py)"
    )
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--merge",
        type=Path,
        metavar="JSON",
        help="run nothing: put the figures of a result file written elsewhere (benchmarks/gpu_check.py "
        "on a lent GPU machine) into RESULTS, in place of that benchmark's earlier rows",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merged = json.loads(args.merge.read_text())
        figures = [Figure(**row) for row in merged["figures"]]
        store_and_render(
            figures,
            {},
            {f.benchmark for f in figures},
            args.output,
            args.quick,
            replaces=merged.get("replaces", {}),
        )
        return 0
    wanted = {name for name in args.only.split(",") if name}
    names = sorted(
        m.name[len("bench_") :]
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    )
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    for name in names:
        if wanted and name not in wanted:
            continue
        print(f"== benchmark {name}", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            results = module.run(quick=args.quick)
        except Exception as exc:  # a failed benchmark is reported, the others still run
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        for figure in results:
            print(
                json.dumps({k: v for k, v in figure.__dict__.items() if k != "extra"}), flush=True
            )
        figures.extend(results)
    ran = {f.benchmark for f in figures} | set(failures) | wanted
    store_and_render(figures, failures, ran, args.output, args.quick)
    return 1 if failures else 0


def store_and_render(
    figures: list[Figure],
    failures: dict[str, str],
    ran: set[str],
    output: Path,
    quick: bool,
    replaces: dict[str, list[str]] | None = None,
) -> None:
    """Replace the rows of the benchmarks in `ran` in RESULTS.json (of a benchmark in `replaces`, only
    those whose metric starts with one of its prefixes), keep the others, rewrite `output`."""
    replaces = replaces or {}

    def replaced(row: dict) -> bool:
        prefixes = replaces.get(row["benchmark"])
        return row["benchmark"] in ran and (
            prefixes is None or row["metric"].startswith(tuple(prefixes))
        )

    store = output.with_suffix(".json")
    previous = json.loads(store.read_text()) if store.exists() else {}
    kept = [Figure(**row) for row in previous.get("figures", []) if not replaced(row)]
    kept_failures = {k: v for k, v in previous.get("failures", {}).items() if k not in ran}
    figures = kept + figures
    failures = {**kept_failures, **failures}
    store.write_text(
        json.dumps({"figures": [f.__dict__ for f in figures], "failures": failures}, indent=1)
    )
    output.write_text(render(figures, failures, quick))
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
