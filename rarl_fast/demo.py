"""The README's demo (``rarl-fast demo -c configs/demo_cpu.yaml``): SFT warm start, then RARL vs more SFT.

On the embedded synthetic benchmark with the tiny VLM, on 2 CPU cores:
1. evaluate the untrained model;
2. SFT warm start (``sft.steps``), evaluate;
3. from the warm start, SFT for as many extra steps as RARL takes (stage 1 + stage 2), evaluate;
4. from the warm start, RARL stage 1 then stage 2, evaluate;
then write the paper-shaped table (rows: untrained, SFT warm start, SFT continued, SFT + RARL), the curves
(PNG) and ``demo_summary.json`` (wall times, where everything is) into ``<output_dir>/<run_name>/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rarl_fast.config import Config, dump_config

__all__ = ["reward_rise", "run_demo"]


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


def run_demo(cfg: Config) -> dict[str, Any]:
    """Run the demo; returns the summary (also written as JSON)."""
    from rarl_fast.evaluate import task_name, write_table
    from rarl_fast.model import resolve_model_path
    from rarl_fast.pipeline import run_eval, run_rarl, run_sft, with_model
    from rarl_fast.plot import plot_run

    root = Path(cfg.output_dir) / cfg.run_name
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "config.yaml")
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        times[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {name}: {times[name]} s", flush=True)
        return out

    base = resolve_model_path(cfg.model.name_or_path, cfg.model.tiny_dir)
    rl_steps = sum(s.steps for s in (cfg.stage1, cfg.stage2) if s.enabled)
    results: dict[str, dict[str, dict[int, Any]]] = {}
    task = task_name(cfg)

    results["untrained"] = {
        task: timed("eval untrained", run_eval, with_model(cfg, base), "untrained", run_dir=root / "untrained")
    }
    warm = timed("sft warm start", run_sft, with_model(cfg, base), run_dir=root / "sft_warm")
    results["SFT warm start"] = {
        task: timed("eval warm start", run_eval, with_model(cfg, warm), "sft_warm", run_dir=root / "sft_warm")
    }
    more = timed("sft continued", run_sft, with_model(cfg, warm), steps=rl_steps, run_dir=root / "sft_continued")
    results[f"SFT warm start + {rl_steps} SFT steps"] = {
        task: timed(
            "eval sft continued", run_eval, with_model(cfg, more), "sft_continued", run_dir=root / "sft_continued"
        )
    }
    rarl = timed("rarl", run_rarl, with_model(cfg, warm), run_dir=root / "rarl")
    results[f"SFT warm start + RARL ({rl_steps} steps)"] = {
        task: timed("eval rarl", run_eval, with_model(cfg, rarl), "rarl", run_dir=root / "rarl")
    }
    from rarl_fast.tracking import read_metrics

    rise = reward_rise(read_metrics(root / "rarl"))
    table = write_table(results, root, cfg.data.group_sizes)
    curves = {name: str(plot_run(root / name)) for name in ("sft_warm", "sft_continued", "rarl")}
    times["total"] = round(time.perf_counter() - t_all, 1)
    summary = {
        "wall_seconds": times,
        "table": str(root / "results.md"),
        "curves": curves,
        "models": {"sft_warm": str(warm), "sft_continued": str(more), "rarl": str(rarl)},
        "reward_rise": {str(stage): r for stage, r in rise.items()},
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
    print(f"[demo] total {times['total']} s; table {root / 'results.md'}; curves {', '.join(curves.values())}")
    return summary
