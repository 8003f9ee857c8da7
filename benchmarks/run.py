"""Run every benchmark suite and write the table of ratios.

    python benchmarks/run.py [--no-readme] [PYTEST_ARGS...]

Runs ``pytest benchmarks/`` (every ``test_*.py`` there, including suites added later) with
pytest-benchmark's JSON output, then writes ``benchmarks/results/latest.json`` (every row and
the machine) and ``benchmarks/results/latest.md``, and puts the markdown table into
``benchmarks/README.md`` (unless ``--no-readme``). The library is the one nexabind would load:
``NEXABIND_LIB_PATH``, else the cache (``nexabind fetch``).

A suite adds rows through the ``rows`` fixture (benchmarks/conftest.py). A benchmark without
rows still gets one from pytest-benchmark's statistics (median time); within a pytest-benchmark
``group``, a benchmark whose ``extra_info["baseline"]`` is true is the one the others are
compared to.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
START, END = "<!-- table:start -->", "<!-- table:end -->"
SECTIONS = [
    "decode",
    "decode vs llama-cpp-python",
    "prefill",
    "CPU variants",
    "per-token cost in Python",
    "per-token instructions (valgrind)",
    "embeddings",
    "startup",
    "memory",
    "fetch",
]


def machine(libdir: Path | None) -> dict[str, Any]:
    """What the table was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "threads": int(os.environ.get("NEXABIND_BENCH_THREADS", "1")),
        "libdir": str(libdir) if libdir else None,
    }
    try:
        info["llama_cpp_python"] = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        info["llama_cpp_python"] = None
    if libdir is not None:
        for name in ("build-info.json", "nexabind-build.json"):
            f = libdir.parent / name
            if f.is_file():
                data = json.loads(f.read_text())
                info["llama_cpp_commit"] = data.get("commit") or data.get("llama_commit")
                break
    return info


def rows_from(bench_json: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row the suites recorded, plus one per benchmark that recorded none."""
    out: list[dict[str, Any]] = []
    plain: dict[str, list[dict[str, Any]]] = {}
    for b in bench_json.get("benchmarks", []):
        extra = b.get("extra_info", {})
        if extra.get("rows"):
            out.extend(extra["rows"])
        else:
            plain.setdefault(b.get("group") or b["name"], []).append(b)
    for group, benches in plain.items():
        base = next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
        for b in benches:
            med = b["stats"]["median"]
            out.append(
                {
                    "section": group,
                    "case": b.get("param") or "",
                    "contender": b["name"],
                    "value": med * 1e3,
                    "unit": "ms",
                    "baseline": base["name"] if base and base is not b else None,
                    "ratio": base["stats"]["median"] / med if base and base is not b else None,
                    "goal": None,
                    "met": None,
                    "note": f"{b['stats']['rounds']} rounds",
                }
            )
    return out


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or unit == "-":
        return ""
    if unit in ("tok/s", "texts/s"):
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if unit != "ratio" else f"{v:.3f}"


def markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        f"Measured {info['date_utc']} UTC on {info['cpu']} ({info['cores']} cores), "
        f"{info['os']}, Python {info['python']}, {info['threads']} thread(s); llama.cpp "
        f"{info.get('llama_cpp_commit') or '?'}, llama-cpp-python "
        f"{info.get('llama_cpp_python') or 'absent'}. Ratio: how many times faster (memory: "
        "smaller) than the baseline, the median of the per-round ratios of interleaved rounds.",
        "",
    ]
    first = {s: i for i, s in reversed(list(enumerate(r["section"] for r in rows)))}
    order = {s: i for i, s in enumerate(SECTIONS)}
    # Known sections in reading order, others after them; stable, so each suite's order stays.
    rows = sorted(rows, key=lambda r: (order.get(r["section"], len(order)), first[r["section"]]))
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines += [
                "",
                f"### {section}",
                "",
                "| case | contender | value | unit | vs | ratio | goal | note |",
                "|---|---|---:|---|---|---:|---|---|",
            ]
        goal = ""
        if r.get("goal") is not None:
            goal = f">= {r['goal']:.3g}x " + ("met" if r["met"] else "**missed**")
        lines.append(
            f"| {r['case']} | {r['contender']} | {fmt(r['value'], r['unit'])} | {r['unit']} | "
            f"{r.get('baseline') or ''} | {fmt(r.get('ratio'), 'ratio')} | {goal} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines).strip() + "\n"


def update_readme(table: str) -> None:
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Latest results\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table}{END}{tail}")


def main(argv: list[str]) -> int:
    readme = "--no-readme" not in argv
    args = [a for a in argv if a != "--no-readme"]
    try:
        from nexabind.loader import library_dir

        libdir: Path | None = library_dir()
    except Exception as e:  # the suites fail with the same message; say it up front
        print(f"run.py: {e}", file=sys.stderr)
        libdir = None
    from harness import lcpp_available

    missing = lcpp_available()
    if missing:
        print(f"run.py: {missing}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "pytest-benchmark.json"
    raw.unlink(missing_ok=True)
    env = dict(os.environ)
    if libdir is not None:
        env["NEXABIND_LIB_PATH"] = str(libdir)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={raw}",
        "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
        *args,
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd, env=env)
    if not raw.exists():
        print("run.py: no benchmark results were written", file=sys.stderr)
        return rc or 1
    rows = rows_from(json.loads(raw.read_text()))
    info = machine(libdir)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    table = markdown(rows, info)
    (RESULTS / "latest.md").write_text(table)
    if readme:
        update_readme(table)
    print(table)
    print(f"written: {RESULTS / 'latest.md'}, {RESULTS / 'latest.json'}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
