"""``rarl-fast report RUN_DIRS...``: finished evaluations side by side, shaped like the paper's tables.

Each RUN_DIR is an ``ablate`` root (its ``ablation.json`` lists the variants in order), or any run folder: its
``eval/*.jsonl`` and its subfolders' (the demo's root, a ``train`` or ``sft`` run). Every evaluation is scored
again from its responses with its run's ``config.yaml`` (task, 1-image metric, value range), so rows from
several runs and benchmarks meet in one table: a row per model or variant, a column per task and N images.
A row name is the evaluation's name, prefixed by its RUN_DIR's where two would share a cell.

Written to ``--out`` (default: the first RUN_DIR): ``report.md`` (the table, the paired differences, notes),
``report.csv`` (the table), ``differences.csv`` and ``report.png``. The differences are each of our rows against
``--against`` (default ``rarl``), per cell, with the jackknife standard error over the shared test groups
(:mod:`rarl_fast.compare`). With ``--paper`` the paper's published rows for the benchmarks and model sizes of our
runs (:mod:`rarl_fast.paper`) are added, labelled as the paper's, and each of our rows with a published row of the
same variant gets its difference to it (no standard error: the paper gives none).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rarl_fast.metrics import MetricResult, column_title, evaluate_answers, results_csv, results_markdown, table_columns

__all__ = ["Evaluation", "collect_evaluations", "write_report"]


@dataclass
class Evaluation:
    """One model's evaluation on one task: its responses and how to score them."""

    name: str
    path: Path
    task: str
    """The column key (``age``, ``synthetic:shapes``)."""
    benchmark: str
    """``data.task`` of the run's config (the key of the paper's rows)."""
    size: str | None
    """The model's parameter count (``3B``) when its name tells it."""
    metric: str
    value_min: float
    value_max: float
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, name: str, path: Path, cfg: Any) -> Evaluation:
        """The evaluation file ``path`` of a run whose config is ``cfg``."""
        from rarl_fast.evaluate import task_name
        from rarl_fast.paper import model_size

        return cls(
            name=name, path=path, task=task_name(cfg), benchmark=cfg.data.task,
            size=model_size(cfg.model.name_or_path), metric=cfg.data.resolved("metric"),
            value_min=float(cfg.data.resolved("value_min")), value_max=float(cfg.data.resolved("value_max")),
            rows=_read_jsonl(path),
        )  # fmt: skip

    def cells(self) -> dict[int, MetricResult]:
        """The table cell of each N (as ``rarl-fast eval`` computes it)."""
        out = {}
        for n in sorted({int(r["n"]) for r in self.rows}):
            sel = [r for r in self.rows if int(r["n"]) == n]
            out[n] = evaluate_answers(
                [r["response"] for r in sel], [r["truth"] for r in sel],
                metric=self.metric, value_min=self.value_min, value_max=self.value_max,
            )  # fmt: skip
        return out

    def cell_metric(self, n: int) -> str:
        return self.metric if n == 1 else "kendall_tau"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a JSON line") from None
    if not rows:
        raise ValueError(f"{path}: no evaluation lines")
    return rows


def _config_of(path: Path, run_dir: Path) -> Any:
    from rarl_fast.config_loader import load_config

    for candidate in (path.parent.parent / "config.yaml", run_dir / "config.yaml"):
        if candidate.is_file():
            return load_config(candidate)
    raise FileNotFoundError(f"{path}: no config.yaml in its run folder {path.parent.parent} or in {run_dir}")


def _evaluation_files(run_dir: Path, missing: list[str]) -> list[tuple[str, Path]]:
    """(name, file) of every evaluation under ``run_dir``: an ``ablate`` manifest's variants first, in its order,
    then the other ``eval/*.jsonl`` of the folder and its subfolders by name."""
    from rarl_fast.ablation import MANIFEST

    found: list[tuple[str, Path]] = []
    if (run_dir / MANIFEST).is_file():
        for v in json.loads((run_dir / MANIFEST).read_text())["variants"]:
            path = run_dir / v["eval"]
            if path.is_file():
                found.append((v["name"], path))
            else:
                missing.append(f"{run_dir}: variant {v['name']} has no evaluation yet")
    listed = {p.resolve() for _, p in found}
    rest = sorted(run_dir.glob("eval/*.jsonl")) + sorted(run_dir.glob("*/eval/*.jsonl"))
    return found + [(p.stem, p) for p in rest if p.resolve() not in listed]


def collect_evaluations(run_dirs: Sequence[str | Path], missing: list[str] | None = None) -> list[Evaluation]:
    """Every evaluation under ``run_dirs`` in order; variants of an ``ablate`` root not evaluated yet are listed
    in ``missing``. Raises FileNotFoundError for a folder with none."""
    from rarl_fast.evaluate import task_name

    missing = [] if missing is None else missing
    out: list[Evaluation] = []
    taken: set[tuple[str, str]] = set()
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run folder")
        files = _evaluation_files(run_dir, missing)
        if not files:
            raise FileNotFoundError(f"{run_dir}: no evaluations (eval/*.jsonl) in it or its subfolders")
        for name, path in files:
            cfg = _config_of(path, run_dir)
            if (name, task_name(cfg)) in taken:
                name = f"{run_dir.name}/{name}"
            taken.add((name, task_name(cfg)))
            out.append(Evaluation.load(name, path, cfg))
    return out


def _paired(evals: list[Evaluation], against: str, notes: list[str]) -> list[dict[str, Any]]:
    """``against`` minus each other row, per cell they share, paired over the test groups."""
    from rarl_fast.compare import paired_cell_difference

    out = []
    for ref in (e for e in evals if e.name == against):
        for other in (e for e in evals if e.task == ref.task and e is not ref):
            for n in sorted({int(r["n"]) for r in ref.rows} & {int(r["n"]) for r in other.rows}):
                try:
                    d = paired_cell_difference(
                        ref.rows, other.rows, n, metric=ref.metric, value_min=ref.value_min, value_max=ref.value_max
                    )
                except ValueError as err:
                    notes.append(f"{ref.name} − {other.name}, {ref.task}: {err}")
                    continue
                out.append({"kind": "paired", "a": ref.name, "b": other.name, "task": ref.task, "n": n,
                            "metric": ref.cell_metric(n), "a_value": d["a"], "b_value": d["b"], "diff": d["diff"],
                            "se": d["se"], "groups": d["groups"]})  # fmt: skip
    return out


def _paper_rows(evals: list[Evaluation], results: dict, notes: list[str]) -> list[dict[str, Any]]:
    """Add the paper's rows for our benchmarks and sizes to ``results``; returns our-minus-paper differences (our
    row against the published row of the same variant, benchmark and size)."""
    from rarl_fast.metrics import TASK_TITLES
    from rarl_fast.paper import paper_rows

    diffs: list[dict[str, Any]] = []
    added: dict[tuple[str, str], Any] = {}
    for benchmark, size in dict.fromkeys((e.benchmark, e.size) for e in evals):
        task = next(e.task for e in evals if e.benchmark == benchmark)
        rows = paper_rows(benchmark, size)
        if not rows:
            notes.append(
                f"the paper has no transcribed rows for {TASK_TITLES.get(task, task)}{f' {size}' if size else ''}"
            )
        for r in rows:
            added[(f"paper: {r.label}", task)] = r
    for (key, task), r in added.items():
        results.setdefault(key, {})[task] = r.cells()
        notes.append(
            f"`{key}`: published, {TASK_TITLES.get(task, task)} from the paper's Table {r.table} (arXiv 2601.20585)"
        )
        for ours in evals:
            if ours.task != task or ours.name.split("/")[-1] != r.variant or ours.size not in (None, r.model):
                continue
            mine = results[ours.name][task]
            for n, cell in r.cells().items():
                if n in mine:
                    diffs.append({"kind": "paper", "a": ours.name, "b": key, "task": task, "n": n, "metric": cell.name,
                                  "a_value": mine[n].value, "b_value": cell.value, "diff": mine[n].value - cell.value,
                                  "se": None, "groups": None})  # fmt: skip
    return diffs


def _diff_text(d: dict[str, Any]) -> str:
    scale, digits = (100, 2) if d["metric"] == "accuracy" else (1, 2 if d["metric"] == "mae" else 3)
    text = f"{scale * d['diff']:+.{digits}f}"
    if d["se"] is not None:
        text += f" ± {scale * d['se']:.{digits}f}" + (" *" if abs(d["diff"]) > 2 * d["se"] else "")
    return text


def _diff_markdown(diffs: list[dict[str, Any]], cols: list[tuple[str, int, str]]) -> str:
    pairs = list(dict.fromkeys((d["a"], d["b"]) for d in diffs))
    cell = {(d["a"], d["b"], d["task"], d["n"]): _diff_text(d) for d in diffs}
    lines = [
        "| " + " | ".join(["A − B", *(column_title(t, n, m) for t, n, m in cols)]) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|",
    ]
    for a, b in pairs:
        lines.append("| " + " | ".join([f"{a} − {b}", *(cell.get((a, b, t, n), "-") for t, n, _ in cols)]) + " |")
    return "\n".join(lines) + "\n"


def _differences_csv(diffs: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    keys = ["kind", "a", "b", "task", "n", "metric", "a_value", "b_value", "diff", "se", "groups"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys)
    for d in diffs:
        writer.writerow(["" if d[k] is None else d[k] for k in keys])
    return buf.getvalue()


def write_report(
    run_dirs: Sequence[str | Path], *, out: str | Path | None = None, paper: bool = False, against: str = "rarl"
) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv``, ``differences.csv`` and ``report.png`` into ``out`` (default: the first
    of ``run_dirs``); returns their paths, the Markdown and the differences."""
    from rarl_fast.plot import plot_results

    notes: list[str] = []
    evals = collect_evaluations(run_dirs, notes)
    results: dict[str, dict[str, dict[int, MetricResult]]] = {}
    for e in evals:
        results.setdefault(e.name, {})[e.task] = e.cells()
    ours = list(results)
    diffs = _paired(evals, against, notes)
    if not any(e.name == against for e in evals):
        notes.append(f"no row named {against!r}: no paired differences (choose one with --against)")
    if paper:
        diffs += _paper_rows(evals, results, notes)
    sizes = sorted({n for per_task in results.values() for cells in per_task.values() for n in cells})
    cols = table_columns(results, sizes)
    md = "# Results\n\n" + results_markdown(results, sizes)
    if any(d["kind"] == "paired" for d in diffs):
        md += (
            f"\n## {against} minus each row, paired over the test groups\n\n"
            "Difference ± jackknife standard error over the shared test groups (accuracy in percentage points);"
            " `*`: more than 2 SE from 0. Test-set noise only: seeds add their own.\n\n"
            + _diff_markdown([d for d in diffs if d["kind"] == "paired"], cols)
        )
    if any(d["kind"] == "paper" for d in diffs):
        md += "\n## Ours minus the paper's published row\n\n" + _diff_markdown(
            [d for d in diffs if d["kind"] == "paper"], cols
        )
    if notes:
        md += "\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes)
    out_dir = Path(out) if out is not None else Path(run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "report.csv",
        "differences": out_dir / "differences.csv",
        "figure": out_dir / "report.png",
    }
    paths["markdown"].write_text(md)
    paths["csv"].write_text(results_csv(results, sizes))
    paths["differences"].write_text(_differences_csv(diffs))
    plot_results(results, paths["figure"], published=[k for k in results if k not in ours])
    return {"paths": paths, "markdown": md, "differences": diffs, "rows": list(results)}
