"""The README's demo (``rarl-fast demo -c configs/demo_cpu.yaml``): SFT warm start, then RARL vs more SFT.

On the embedded synthetic benchmark with the tiny VLM, on 2 CPU cores:
1. evaluate the untrained model;
2. SFT warm start (``sft.steps``), evaluate;
3. from the warm start, SFT for as many extra steps as RARL takes (stage 1 + stage 2), evaluate;
4. from the warm start, RARL stage 1 then stage 2, evaluate;
then write the paper-shaped table (rows: untrained, SFT warm start, SFT continued, SFT + RARL), the curves
(PNG) and ``demo_summary.json`` (wall times, where everything is) into ``<output_dir>/<run_name>/``.

On a CPU-only machine ``rarl-fast demo`` starts itself again under ``accelerate launch`` with one data-parallel
process per ``cpu_threads`` cores (:func:`demo_processes`, :func:`launch_command`): every step (SFT, RARL,
evaluation) then splits its groups over the processes, the same global batch as one process. Run under a
launcher of your own, or with ``--processes 1``, it runs as it is started; with a single process and two
cores' worth of threads spare, the continued-SFT branch trains in a second process beside RARL instead.

The root folder belongs to one demo (:func:`claim_demo_root`): run again into a root that holds an earlier demo's
runs or results, the demo stops with an error naming it; ``--overwrite`` renames the old root to
``<run_name>.replaced-<time>`` first (nothing is deleted), or a new ``run_name`` starts a demo beside it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rarl_fast.compare import paired_tau_gap
from rarl_fast.config import Config
from rarl_fast.config_loader import dump_config

if TYPE_CHECKING:
    from rarl_fast.ablation import Variant

__all__ = [
    "DEMO_ABLATIONS",
    "claim_demo_root",
    "demo_processes",
    "launch_command",
    "launched",
    "paired_tau_gap",
    "reward_rise",
    "run_demo",
]

BRANCHES = ("sft_warm", "sft_continued", "rarl")
"""The demo's training runs, each in its own folder under the root."""

DEMO_ABLATIONS = ("rarl", "stage1_only", "no_rmo", "reg_only")
"""``rarl-fast demo --ablations``: the variants (configs/ablations/) branched from the warm start: the full method,
its stage 1 alone, stage 2 without RMO, and the regression reward through both stages."""


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / torchrun (the launcher sets ``LOCAL_RANK``)."""
    return "LOCAL_RANK" in os.environ


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def demo_processes(cfg: Config) -> int:
    """Data-parallel processes for the demo on this machine: 1 with CUDA (one device), under a launcher, or with
    ``cpu_threads`` unset; else as many processes of ``cpu_threads`` threads as the cores hold, lowered until
    it divides ``rollout.prompts_per_step`` and ``sft.prompts_per_step`` (groups are the unit of parallelism)."""
    import torch

    if torch.cuda.is_available() or launched() or not cfg.cpu_threads:
        return 1
    n = max(1, _cores() // cfg.cpu_threads)
    sft_batch = cfg.sft.prompts_per_step or cfg.rollout.prompts_per_step  # None: SFT takes the rollout's
    while n > 1 and (cfg.rollout.prompts_per_step % n or sft_batch % n):
        n -= 1
    return n


def launch_command(processes: int, argv: list[str], *, port: int | None = None) -> list[str]:
    """``accelerate launch`` of ``python -m rarl_fast.cli <argv>`` with ``processes`` CPU processes (gloo)."""
    import socket
    import sys

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "rarl_fast.cli", *argv,
    ]  # fmt: skip


def reward_rise(rows: list[dict[str, Any]], *, key: str = "reward/total", frac: float = 0.2) -> dict[int, dict]:
    """Per RL stage: mean ``key`` over the first and the last ``frac`` of its steps, the standard error of their
    difference (independent steps) and ``rises`` = difference > 2 standard errors (the demo's acceptance test).

    ``rows`` are a run's metrics lines (``stage`` 1 or 2); a stage with fewer than 4 logged steps gets no verdict.
    """
    import statistics

    out: dict[int, dict] = {}
    for stage in sorted({int(r["stage"]) for r in rows if r.get("stage") and r.get(key) is not None}):
        vals = [float(r[key]) for r in sorted(rows, key=lambda r: r["step"]) if r.get("stage") == stage and key in r]
        k = max(2, round(frac * len(vals)))
        if len(vals) < 4:
            out[stage] = {"steps": len(vals), "rises": None}
            continue
        first, last = vals[:k], vals[-k:]
        se = (statistics.variance(first) / k + statistics.variance(last) / k) ** 0.5
        diff = statistics.fmean(last) - statistics.fmean(first)
        out[stage] = {
            "steps": len(vals),
            "window": k,
            "first": statistics.fmean(first),
            "last": statistics.fmean(last),
            "se": se,
            "rises": bool(diff > 2 * se),
        }
    return out


def _eval_rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    with (run_dir / "eval" / f"{name}.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _cells(cfg: Config, root: Path, name: str) -> dict[int, Any]:
    """The table cells of the evaluation ``root/<name>/eval/<name>.jsonl``."""
    from rarl_fast.report import Evaluation

    return Evaluation.load(name, root / name / "eval" / f"{name}.jsonl", cfg).cells()


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    """Processes of the current launch (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _timed(times: dict[str, float], name: str, fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    times[name] = round(time.perf_counter() - t0, 1)
    if _main_process():
        print(f"[demo] {name}: {times[name]} s", flush=True)
    return out


def _continued_sft(cfg: Config, warm: Path, steps: int, root: Path) -> tuple[Path, dict[int, Any], dict[str, float]]:
    """The baseline branch: ``steps`` more SFT steps from the warm start, then its evaluation."""
    from rarl_fast.commands import run_eval, run_sft, with_model

    times: dict[str, float] = {}
    more = _timed(times, "sft continued", run_sft, with_model(cfg, warm), steps=steps, run_dir=root / "sft_continued")
    res = _timed(
        times, "eval sft continued", run_eval, with_model(cfg, more), "sft_continued", run_dir=root / "sft_continued"
    )
    return more, res, times


def claim_demo_root(cfg: Config, *, overwrite: bool = False) -> None:
    """Take ``<output_dir>/<run_name>`` for a new demo: an earlier demo's training runs or results there stop it with
    :class:`~rarl_fast.run_folder.RunFolderError`, unless ``overwrite``, which renames the old root (main process)."""
    from rarl_fast.run_folder import RunFolderError, move_aside, run_contents

    root = Path(cfg.output_dir) / cfg.run_name
    held = [f"{name}/" for name in BRANCHES if run_contents(root / name)]
    held += [name for name in ("demo_summary.json", "results.md") if (root / name).is_file()]
    if not held:
        return
    if not overwrite:
        raise RunFolderError(
            f"demo folder {root} holds an earlier demo ({', '.join(held)}): set another run_name (run_name=...), "
            f"or pass --overwrite to move it aside to {root.name}.replaced-<time>"
        )
    if _main_process():
        print(f"[demo] moved the earlier demo in {root} to {move_aside(root)}", flush=True)


def _spare_cores(cfg: Config) -> bool:
    """True in a single-process run on a CPU-only machine with cores for two branches of ``cpu_threads`` each."""
    import torch

    if _world_size() > 1:
        return False  # the processes of a launch already share the cores
    return not torch.cuda.is_available() and bool(cfg.cpu_threads) and _cores() >= 2 * cfg.cpu_threads


def run_demo(cfg: Config, *, ablations: Sequence[Variant] = (), overwrite: bool = False) -> dict[str, Any]:
    """Run the demo; returns the summary (also written as JSON; ``{}`` on the other ranks of a launch). The root
    folder must be free of an earlier demo, or ``overwrite`` moves that aside (:func:`claim_demo_root`).

    Under ``accelerate launch`` every rank calls this and each step runs data-parallel. In a single process on
    a CPU machine with the cores for it, the continued-SFT baseline trains in a second process while RARL
    trains in this one (the two branches only share the warm start); elsewhere they run one after the other.

    ``ablations`` (``--ablations``: the variants of :data:`DEMO_ABLATIONS`, ``rarl`` among them) replace the RARL
    branch by :func:`~rarl_fast.ablation.run_ablation` from the warm start: one stage-1 run, then the stage 2 of
    RARL and of each variant from it; each gets a table row and its paired N >= 2 tau gap to RARL.
    """
    from rarl_fast.ablation import run_ablation, variant_config
    from rarl_fast.commands import run_eval, run_rarl, run_sft, with_model
    from rarl_fast.evaluate import task_name, write_table
    from rarl_fast.model import resolve_model_path
    from rarl_fast.plot import plot_run

    if ablations and "rarl" not in [v.name for v in ablations]:
        raise ValueError("the demo's ablations must include the full method, variant 'rarl'")

    root = Path(cfg.output_dir) / cfg.run_name
    claim_demo_root(cfg, overwrite=overwrite)
    main = _main_process()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, root / "config.yaml")
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    rl_steps = sum(s.steps for s in (cfg.stage1, cfg.stage2) if s.enabled)
    results: dict[str, dict[str, dict[int, Any]]] = {}
    task = task_name(cfg)

    # the first runtime builds the tiny VLM (main process first), so ranks never race to write it
    untrained = _timed(times, "eval untrained", run_eval, cfg, "untrained", run_dir=root / "untrained")
    base = resolve_model_path(cfg.model.name_or_path, cfg.model.tiny_dir, cfg.model.tiny_layers)
    results["untrained"] = {task: untrained}
    warm = _timed(times, "sft warm start", run_sft, with_model(cfg, base), run_dir=root / "sft_warm")
    warm_res = _timed(times, "eval warm start", run_eval, with_model(cfg, warm), "sft_warm", run_dir=root / "sft_warm")
    results["SFT warm start"] = {task: warm_res}

    def rarl_branch() -> tuple[Path, dict[int, Any]]:
        if ablations:
            manifest = _timed(times, "rarl and ablations", run_ablation, with_model(cfg, warm), ablations, root)
            times.update({f"ablation {k} (+ eval)": v for k, v in manifest["wall_seconds"].items()})
            return root / "rarl" / "model", _cells(cfg, root, "rarl")
        rarl = _timed(times, "rarl", run_rarl, with_model(cfg, warm), run_dir=root / "rarl")
        return rarl, _timed(times, "eval rarl", run_eval, with_model(cfg, rarl), "rarl", run_dir=root / "rarl")

    t_branches = time.perf_counter()
    parallel = _spare_cores(cfg)
    if parallel:
        quiet = with_model(cfg, None)
        quiet.logging.progress_bar = False  # one progress bar on the console: RARL's
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            baseline = pool.submit(_continued_sft, quiet, warm, rl_steps, root)
            rarl, rarl_res = rarl_branch()
            more, more_res, more_times = baseline.result()
    else:
        more, more_res, more_times = _continued_sft(cfg, warm, rl_steps, root)
        rarl, rarl_res = rarl_branch()
    times.update(more_times)
    branches = "branches (continued SFT | RARL)" if parallel else "branches (continued SFT, then RARL)"
    times[branches] = round(time.perf_counter() - t_branches, 1)
    if not main:
        return {}
    results[f"SFT warm start + {rl_steps} SFT steps"] = {task: more_res}
    results[f"SFT warm start + RARL ({rl_steps} steps)"] = {task: rarl_res}
    gaps: dict[str, dict[str, Any]] = {}
    for v in (v for v in ablations if v.name != "rarl"):
        vcfg = variant_config(cfg, v, root)
        steps = sum(s.steps for s in (vcfg.stage1, vcfg.stage2) if s.enabled) if v.train == "rarl" else vcfg.sft.steps
        results[f"SFT warm start + RARL {v.name} ({steps} steps)"] = {task: _cells(cfg, root, v.name)}
        gaps[v.name] = paired_tau_gap(_eval_rows(root / "rarl", "rarl"), _eval_rows(root / v.name, v.name))
    from rarl_fast.tracking import read_metrics

    rise = reward_rise(read_metrics(root / "rarl"))
    gap = paired_tau_gap(_eval_rows(root / "rarl", "rarl"), _eval_rows(root / "sft_continued", "sft_continued"))
    table = write_table(results, root, cfg.data.group_sizes)
    runs = [*BRANCHES] + [
        n
        for n in ("shared_stage1", *(v.name for v in ablations))
        if n != "rarl" and (root / n / "metrics.jsonl").is_file()
    ]
    curves = {name: str(plot_run(root / name)) for name in runs}
    times["total"] = round(time.perf_counter() - t_all, 1)
    summary = {
        "processes": _world_size(),
        "wall_seconds": times,
        "table": str(root / "results.md"),
        "curves": curves,
        "models": {"sft_warm": str(warm), "sft_continued": str(more), "rarl": str(rarl)},
        "reward_rise": {str(stage): r for stage, r in rise.items()},
        "rarl_vs_sft_continued": gap,  # a = RARL, b = continued SFT: mean of the N >= 2 tau columns, paired
        **{f"rarl_vs_{name}": g for name, g in gaps.items()},  # --ablations: a = RARL, b = the variant
        "results": {
            model: {
                str(n): {"metric": c.name, "value": c.value, "failure_rate": c.failure_rate}
                for n, c in cells[task].items()
            }
            for model, cells in results.items()
        },
    }
    (root / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    for stage, r in rise.items():
        if r["rises"] is not None:
            print(
                f"[demo] stage {stage} mean reward: first {r['window']} steps {r['first']:.3f}, last {r['window']} "
                f"{r['last']:.3f} (diff {r['last'] - r['first']:+.3f}, 2 SE = {2 * r['se']:.3f}): "
                + ("rises" if r["rises"] else "does NOT rise by more than 2 SE")
            )
    print(
        f"[demo] mean N>=2 tau: RARL {gap['a']:.3f} vs continued SFT {gap['b']:.3f} (diff {gap['diff']:+.3f}, "
        f"paired SE over the test groups {gap['se']:.3f}): RARL {gap['verdict']}"
    )
    for name, g in gaps.items():
        print(
            f"[demo] mean N>=2 tau: RARL {g['a']:.3f} vs {name} {g['b']:.3f} (diff {g['diff']:+.3f}, paired SE "
            f"{g['se']:.3f}): RARL {g['verdict']}"
        )
    print(f"[demo] total {times['total']} s; table {root / 'results.md'}; curves {', '.join(curves.values())}")
    return summary
