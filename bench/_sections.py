"""Rewrite one benchmark's section of ``docs/benchmarks.md`` and leave the others alone.

Owns the section markers, and the pieces of a section every benchmark shares
(the targets table, the plotting import). Each benchmark script owns one section, delimited by
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``, so several scripts can share the
file without one run erasing another's figures. The file keeps its ``# Benchmarks`` title; a
section not in the file yet is appended.

A section written before markers existed (a ``## Heading`` with no markers around it) is
replaced in place when ``heading`` names it: from that heading to the next ``## `` heading, the
next section marker, or the end of the file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

TITLE = "# Benchmarks"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def replace_section(text: str, name: str, body: str, heading: str | None = None) -> str:
    """``text`` with section ``name`` set to ``body`` (markdown starting with its ``## `` heading)."""
    start, end = markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    if not text.strip():
        return f"{TITLE}\n\n{block}\n"
    if not text.lstrip().startswith(TITLE + "\n"):
        text = f"{TITLE}\n\n{text.lstrip()}"
    begin = text.find(start)
    if begin >= 0:
        finish = text.find(end, begin)
        if finish < 0:
            raise ValueError(f"{start} has no matching {end}")
        return text[:begin] + block + text[finish + len(end):]
    if heading is not None:  # an unmarked section from before markers existed
        found = re.search(rf"^## {re.escape(heading)}[ \t]*$", text, re.MULTILINE)
        if found:
            after = re.compile(r"^(## |<!-- bench:[\w.-]+:start -->)", re.MULTILINE).search(text, found.end())
            stop = after.start() if after else len(text)
            tail = text[stop:]
            return text[: found.start()] + block + ("\n\n" + tail if tail else "\n")
    return text.rstrip("\n") + "\n\n" + block + "\n"


def write_section(path: Path, name: str, body: str, heading: str | None = None) -> None:
    """Replace (or append) section ``name`` of the markdown file at ``path``, creating the file if needed."""
    text = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, name, body, heading))


def save_run(name: str, results: dict[str, Any], *, doc: Path, chart_path: Path,
             chart: Callable[[dict[str, Any], Path], Any], document: Callable[[dict[str, Any]], str],
             results_path: Path | None) -> None:
    """Write a benchmark's outputs and say which: the raw figures to ``results_path`` (None when redrawing from
    them), the plot, and section ``name`` of the doc."""
    written = []
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        written.append(results_path)
    chart(results, chart_path)
    write_section(doc, name, document(results))
    root = doc.parent.parent
    print(f"wrote {', '.join(str(path.relative_to(root)) for path in [*written, chart_path])} and the {name} "
          f"section of {doc.relative_to(root)}")


def print_blocks(*blocks: str) -> None:
    """A benchmark's report on the terminal: each block (a table, the targets, the reading) after a blank line."""
    for block in blocks:
        print()
        print(block)


def bench_main(name: str, argv: list[str] | None, *, description: str, run: Callable[[Any], dict[str, Any] | None],
               config: Callable[[bool], Any], report: Callable[[dict[str, Any]], None], doc: Path,
               chart_path: Path, chart: Callable[[dict[str, Any], Path], Any],
               document: Callable[[dict[str, Any]], str], results_path: Path,
               extra: Callable[[Any], Any] | None = None) -> int:
    """The command line every section-writing benchmark shares: a full run writes the raw figures, the plot and
    section ``name``; ``--quick`` is a smoke run that writes nothing; ``--report`` redraws from the raw figures.
    ``run(config)`` returns None when it failed (``bench.layer.timed_run``). ``extra(parser)`` adds the
    benchmark's own flags and returns a function of the parsed arguments that handles them (an exit code), or None."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short smoke run that writes no file")
    parser.add_argument("--report", action="store_true",
                        help=f"measure nothing: rewrite the doc section and the plot from {results_path.name}")
    handle = extra(parser) if extra is not None else None
    args = parser.parse_args(argv)
    if handle is not None:
        code = handle(args)
        if code is not None:
            return code
    if args.report:
        save_run(name, json.loads(results_path.read_text()), doc=doc, chart_path=chart_path, chart=chart,
                 document=document, results_path=None)
        return 0
    results = run(config(args.quick))
    if results is None:
        return 1
    report(results)
    print(f"\ntook {results['seconds']} s")
    if not args.quick:
        save_run(name, results, doc=doc, chart_path=chart_path, chart=chart, document=document,
                 results_path=results_path)
    return 0


def targets_markdown(found: list[tuple[str, str, bool]], heading: str = "target") -> str:
    """A table of (target, measured, met) rows; a missed target stands out in bold."""
    lines = [f"| {heading} | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {measured} | {'met' if met else '**missed**'} |" for name, measured, met in found]
    return "\n".join(lines)


def pyplot() -> tuple[Any, Any]:
    """matplotlib's pyplot and ticker on the file-only Agg backend, or a clear error naming the fix."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("matplotlib is missing: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    return plt, ticker
