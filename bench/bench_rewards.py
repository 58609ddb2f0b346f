"""Reward scoring throughput: `rarl_fast.rewards.score` vs a straightforward per-response implementation.

4096 responses (512 prompts x G = 8) ranking 8 images each, a deterministic mix of valid, partially
valid and malformed answers over three tasks. The baseline follows docs/method.md sections 2-3 one response
at a time with `json` and `scipy.stats.kendalltau`; both must agree on every component to 1e-9 before
anything is timed. Prints responses/s and the ratio, and appends a row to bench/results/rewards.csv
(or $RARL_BENCH_OUT).

    python bench/bench_rewards.py [--groups 512] [--group-size 8] [--images 8] [--repeats 5] [--threads 1] [--no-csv]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from _results import append_csv, git_commit, results_dir
from scipy.stats import kendalltau

from rarl_fast.rewards import parse_responses, score

FIELDS = ("total", "format", "regression", "length", "consistency", "accuracy", "ranking")
REWARD = {"alpha": 0.5, "beta": 0.5, "lam": 0.2}
TASKS = [
    ("age", 10.0, lambda r, n: [float(v) for v in r.sample(range(117), n)]),
    ("count", 2.0, lambda r, n: [float(v) for v in r.sample(range(51), n)]),
    ("aesthetics", 1.0, lambda r, n: [v / 100 for v in r.sample(range(100, 1001), n)]),
]


# ---------------------------------------------------------------- the per-response baseline

_FRAME = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_NUM = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def baseline_parse(text: str):
    """(format_ok, [(id, value), ...]) for one response, docs/method.md section 2."""
    if len(text) > 8192:
        return False, []
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if text.count(tag) != 1:
            return False, []
    m = _FRAME.match(text)
    if m is None:
        return False, []
    answer = m.group(2).strip()
    try:
        data = json.loads(answer)
    except Exception:
        try:
            data = json.loads(answer.replace("'", '"'))
        except Exception:
            return False, []
    if not isinstance(data, list) or len(data) > 64:
        return False, []
    elements = []
    for item in data:
        if not isinstance(item, dict):
            continue
        i, v = item.get("image_id"), item.get("value")
        if isinstance(i, bool) or not isinstance(i, int | float):
            continue
        if isinstance(i, float) and not i.is_integer():
            continue
        if isinstance(v, str):
            if _NUM.fullmatch(v) is None:
                continue
        elif isinstance(v, bool) or not isinstance(v, int | float):
            continue
        try:
            v = float(v)
        except OverflowError:
            continue
        if math.isfinite(v):
            elements.append((int(i), v))
    return True, elements


def _tau(x, y) -> float:
    t = kendalltau(x, y).statistic
    return 0.0 if math.isnan(t) else float(t)


def baseline_score(text: str, truth: list[float], delta: float, alpha: float, beta: float, lam: float):
    """All components of one response, docs/method.md section 3, with scipy's Kendall tau."""
    ok, elements = baseline_parse(text)
    out = dict.fromkeys(FIELDS, 0.0)
    if not ok:
        return out
    n, m = len(truth), len(elements)
    present, seen = [], set()
    for i, v in elements:
        if 1 <= i <= n and i not in seen:
            seen.add(i)
            present.append((i, v))
    reg = sum(max(0.0, 1.0 - (v - truth[i - 1]) ** 2 / delta**2) for i, v in present) / n
    out["format"], out["regression"] = 1.0, reg
    if n >= 2:
        out["length"] = 1.0 if m == n and len(present) == n else 0.0
        out["consistency"] = (_tau(list(range(m)), [v for _, v in elements]) + 1) / 2 if m >= 2 else 0.0
        k = len(present)
        acc = (_tau(list(range(k)), [truth[i - 1] for i, _ in present]) + 1) / 2 * k / n if k >= 2 else 0.0
        out["accuracy"] = acc
        out["ranking"] = (out["length"] + out["consistency"] + out["accuracy"]) / 3
        a, b = alpha, beta
    else:
        a, b = alpha + beta, 0.0
    out["total"] = lam + (1 - lam) * (a * reg + b * out["ranking"])
    return out


# ---------------------------------------------------------------- workload


def _think(r: random.Random, n: int) -> str:
    parts = [
        f"Image {i} looks like about {r.randint(1, 90)} given the {r.choice(['lighting', 'face', 'scene'])}."
        for i in range(1, n + 1)
    ]
    return " ".join(parts) + " Sorting them in ascending order."


def _dump(pairs, r: random.Random, quote: str = '"', as_str: bool = False) -> str:
    items = [{"image_id": i, "value": (str(v) if as_str else v)} for i, v in pairs]
    return json.dumps(items).replace('"', quote)


def make_response(r: random.Random, truth: list[float], delta: float) -> str:
    n = len(truth)
    noise = r.choice([0.0, 0.3, 0.8, 1.5]) * delta
    pred = [y + r.gauss(0.0, noise) if noise else y for y in truth]
    pred = [round(p) if delta >= 2 else round(p, 2) for p in pred]
    order = sorted(range(1, n + 1), key=lambda i: pred[i - 1])
    pairs = [(i, pred[i - 1]) for i in order]
    kind = r.random()
    think = _think(r, n)
    if kind < 0.45:  # valid
        return f"<think>{think}</think>\n<answer>{_dump(pairs, r)}</answer>"
    if kind < 0.60:  # valid, prompt-style single quotes or numeric strings
        body = _dump(pairs, r, r.choice(['"', "'"]), as_str=r.random() < 0.5)
        return f"<think>{think}</think> <answer>{body}</answer>"
    if kind < 0.80:  # partially valid
        pairs = list(pairs)
        damage = r.choice(["drop", "dup", "out", "nan", "junk", "shuffle"])
        if damage == "drop":
            del pairs[r.randrange(n) : r.randrange(n) + r.randint(1, 3)]
        elif damage == "dup":
            pairs.insert(r.randrange(n), (r.randint(1, n), r.randint(0, 100)))
        elif damage == "out":
            pairs.append((n + r.randint(1, 5), r.randint(0, 100)))
        elif damage == "shuffle":
            r.shuffle(pairs)
        body = _dump(pairs, r)
        if damage == "nan":
            body = body.replace(str(pairs[0][1]), "NaN", 1)
        elif damage == "junk":
            body = body.replace(f'"value": {pairs[-1][1]}', '"value": "about 30"', 1)
        return f"<think>{think}</think> <answer>{body}</answer>"
    fail = r.choice(["no_think", "truncated", "prose", "trailing", "dict", "long"])
    if fail == "no_think":
        return f"<answer>{_dump(pairs, r)}</answer>"
    if fail == "truncated":
        full = f"<think>{think}</think> <answer>{_dump(pairs, r)}</answer>"
        return full[: r.randrange(len(full) // 2, len(full) - 1)]
    if fail == "prose":
        return f"<think>{think}</think> <answer>Image 3 is the youngest, then image 1.</answer>"
    if fail == "trailing":
        return f"<think>{think}</think> <answer>{_dump(pairs, r)}</answer> I hope this helps!"
    if fail == "dict":
        return f"<think>{think}</think> <answer>{json.dumps(dict(pairs))}</answer>"
    return f"<think>{think * 60}</think> <answer>{_dump(pairs, r)}</answer>"


def make_workload(groups: int, group_size: int, images: int, seed: int):
    r = random.Random(seed)
    texts, truths, tolerances = [], [], []
    for _ in range(groups):
        _, delta, draw = r.choice(TASKS)
        truth = draw(r, images)
        for _ in range(group_size):
            texts.append(make_response(r, truth, delta))
            truths.append(truth)
            tolerances.append(delta)
    return texts, truths, tolerances


# ---------------------------------------------------------------- timing and reporting


def _best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the note below)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    # The tensors here are tiny ([4096, 8, 8] at most): on a small shared machine intra-op threads only
    # add contention (a parallel region waits for its slowest thread). The baseline is single-threaded too.
    torch.set_num_threads(args.threads)

    texts, truths, tols = make_workload(args.groups, args.group_size, args.images, args.seed)
    n = len(texts)
    warnings.simplefilter("ignore")  # scipy warns on constant inputs; those give NaN -> 0 by the spec

    def ours():
        return score(texts, truths, tolerance=tols, **REWARD)

    def baseline():
        return [baseline_score(t, y, d, **REWARD) for t, y, d in zip(texts, truths, tols)]

    got, ref = ours(), baseline()
    for name in FIELDS:
        want = torch.tensor([row[name] for row in ref], dtype=torch.float64)
        err = (getattr(got, name) - want).abs().max().item()
        assert err <= 1e-9, f"{name}: ours and the baseline differ by {err}"
    fmt = got.format.mean().item()
    full = got.length.mean().item()
    print(
        f"workload: {n} responses x {args.images} images, format ok {fmt:.1%}, complete lists {full:.1%}, "
        f"mean total {got.total.mean().item():.3f}; all components agree to 1e-9"
    )

    t_ours = _best_time(ours, args.repeats)
    t_parse = _best_time(lambda: parse_responses(texts), args.repeats)
    t_base = _best_time(baseline, args.baseline_repeats)
    ours_ps, base_ps = n / t_ours, n / t_base
    ratio = t_base / t_ours
    print(f"{'provider':<28}{'time (ms)':>12}{'responses/s':>14}")
    print(f"{'baseline (json + scipy)':<28}{t_base * 1e3:>12.1f}{base_ps:>14.0f}")
    print(f"{'ours (score)':<28}{t_ours * 1e3:>12.1f}{ours_ps:>14.0f}")
    print(f"{'  of which parse_responses':<28}{t_parse * 1e3:>12.1f}{n / t_parse:>14.0f}")
    print(f"ratio ours / baseline: {ratio:.1f}x")

    if not args.no_csv:
        row = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "machine": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "n_responses": n,
            "n_images": args.images,
            "ours_per_s": round(ours_ps, 1),
            "parse_per_s": round(n / t_parse, 1),
            "baseline_per_s": round(base_ps, 1),
            "ratio": round(ratio, 2),
        }
        path = append_csv(results_dir() / "rewards.csv", list(row), [row])
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
