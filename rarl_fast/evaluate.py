"""``rarl-fast eval``: greedy answers on the fixed test groups for each N, the paper-shaped table, every response.

Ranks split the test groups round robin and the answers are gathered back in order, so the table is the same
for any number of processes. A test group with an image that cannot be loaded is left out of the metrics and the
responses, with a warning that counts them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rarl_fast.rl.splice import completion_texts
from rarl_fast.rollout.lifecycle import awake

__all__ = ["evaluate", "generate_answers", "held_out_eval", "periodic_eval", "task_name", "write_table"]

log = logging.getLogger(__name__)


def task_name(cfg: Any) -> str:
    """The task's column title in the results table (``synthetic:<task>`` for the synthetic benchmark)."""
    return f"synthetic:{cfg.data.synthetic_task}" if cfg.data.task == "synthetic" else cfg.data.task


def generate_answers(rt: Any, groups: list[Any], *, batch_size: int) -> list[str | None]:
    """Greedy completion text for each group, None for a group with an image that cannot be loaded (all ranks call
    this; every rank gets the full list)."""
    from accelerate.utils import gather_object

    from rarl_fast.data import collate, readable

    mine = rt.my_share(groups)
    texts: list[str | None] = []
    params = rt.generation_params(seed=None, greedy=True)
    with rt.whole_policy(), awake(rt.engine, version=None, weights=rt.hf_model.named_parameters):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i : i + batch_size]
            usable = [readable(g, rt.cache) for g in chunk]
            answers: list[str] = []
            if any(usable):
                batch = collate(rt.processor, [g for g, ok in zip(chunk, usable) if ok], rt.cache).to(rt.device)
                with torch.no_grad(), rt.acc.autocast():
                    ro = rt.engine.generate(batch, 1, params)
                answers = completion_texts(ro, rt.tokenizer)
            given = iter(answers)
            texts.extend(next(given) if ok else None for ok in usable)
    world = rt.acc.num_processes
    if world == 1:
        return texts
    gathered = gather_object([(rt.acc.process_index, texts)])
    by_rank = dict(gathered)
    out: list[str | None] = [""] * len(groups)
    for r, part in by_rank.items():
        out[r::world] = part
    return out


def evaluate(rt: Any, name: str, *, out_dir: str | Path | None = None) -> dict[int, Any]:
    """Metric cell per N on the fixed test groups; writes ``<out_dir>/<name>.jsonl`` with every response."""
    out_dir = Path(out_dir or rt.run_dir / "eval")
    cells: dict[int, Any] = {}
    records = []
    for n, groups in sorted(rt.test_groups.items()):
        cell, groups, answers = _cell(rt, groups, n)
        if cell is not None:
            cells[n] = cell
            records += _records(name, n, groups, answers)
    _write_records(rt, out_dir / f"{name}.jsonl", records)
    return cells


def _records(name: str, n: int, groups: list[Any], answers: list[str]) -> list[dict[str, Any]]:
    return [
        {"model": name, "n": n, "key": list(g.key), "truth": g.values, "response": a} for g, a in zip(groups, answers)
    ]


def _write_records(rt: Any, path: Path, records: list[dict[str, Any]]) -> None:
    if rt.acc.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        tmp.replace(path)


def _cell(rt: Any, groups: list[Any], n: int) -> tuple[Any, list[Any], list[str]]:
    """The metric cell of the greedy answers to ``groups`` (all of ``n`` images), the groups answered and their
    answers; groups with an unreadable image are left out (the cell is None when none is left)."""
    from rarl_fast.metrics import evaluate_answers

    task = rt.task
    answers = generate_answers(rt, groups, batch_size=rt.cfg.rollout.eval_batch_size) if groups else []
    kept = [(g, a) for g, a in zip(groups, answers) if a is not None]
    if len(kept) < len(groups):
        log.warning("N=%d: %d of %d test groups left out: unreadable images", n, len(groups) - len(kept), len(groups))
    if not kept:
        return None, [], []
    groups, answers = [g for g, _ in kept], [a for _, a in kept]
    cell = evaluate_answers(
        answers, [g.values for g in groups], metric=task.metric, value_min=task.value_min, value_max=task.value_max
    )
    return cell, groups, answers


def periodic_eval(rt: Any, groups_per_n: int, responses: str | Path | None = None) -> dict[str, float]:
    """The held-out eval during training: greedy answers to the first ``groups_per_n`` fixed test groups of each
    N (0: all of them), as flat metrics ``eval/n<N>/<metric>`` and ``eval/n<N>/fail`` (the failure rate) for the
    metrics log; every response goes to the JSONL file ``responses`` when given. All ranks call it (the groups
    are split across them like ``evaluate``)."""
    out: dict[str, float] = {}
    records = []
    for n, groups in sorted(rt.test_groups.items()):
        cell, groups, answers = _cell(rt, groups[:groups_per_n] if groups_per_n else groups, n)
        if cell is None:
            continue
        out[f"eval/n{n}/{cell.name}"] = cell.value
        out[f"eval/n{n}/fail"] = cell.failure_rate
        records += _records(Path(responses).stem if responses else "periodic", n, groups, answers)
    if responses is not None:
        _write_records(rt, Path(responses), records)
    return out


def held_out_eval(rt: Any, logger: Any) -> Callable[[int, str], None] | None:
    """``fn(global_step, stage_name)`` that runs the periodic held-out eval of ``train`` and ``sft``, logs it as its
    own metrics line (with the stage, so plots keep their stage marks) and keeps its responses in
    ``eval/periodic/<stage>-<step>.jsonl``; None when ``logging.eval_every`` is 0."""
    if not rt.cfg.logging.eval_every:
        return None
    from rarl_fast.tracking import STAGE_IDS

    def run(global_step: int, stage: str) -> None:
        path = rt.run_dir / "eval" / "periodic" / f"{stage}-{global_step:07d}.jsonl"
        metrics = periodic_eval(rt, rt.cfg.logging.eval_groups, path)
        logger.log(global_step, {**metrics, "stage": STAGE_IDS[stage]}, advance=0)

    return run


def write_table(results: dict[str, dict[str, dict[int, Any]]], out_dir: str | Path, group_sizes: list[int]) -> str:
    """``results.md`` and ``results.csv`` in ``out_dir``; returns the Markdown."""
    from rarl_fast.metrics import results_csv, results_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = results_markdown(results, group_sizes)
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.csv").write_text(results_csv(results, group_sizes))
    return md
