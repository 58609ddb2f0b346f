"""The kernels' health report until a GPU runs them: every variant compiled for sm_80, sm_90a and sm_100a.

Registers, spill bytes, shared memory and the tensor-core instruction of each kernel x architecture x dtype, read
from ptxas and the SASS of real compiles (`rarl_kernels.aot`; no GPU needed). Writes, replacing the previous
report, bench/results/kernel_report.md (the summary table) and bench/results/kernel_report.csv (one row per variant
and architecture). Exit status 1 when a variant breaks a rule (see `rarl_kernels.aot.problems`).

`--device cuda` is its twin on a GPU: the same option sweep runs for real, and the driver's registers, spill bytes
and shared memory of every variant it loaded are written to kernel_report_<gpu>.csv, with a summary beside the
ahead-of-time figures of the GPU's tile family (exit status 1 on a spill).

Usage: python bench/kernel_report.py [--arch 80 90 100] [--jobs N] [--device cuda]
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime
import itertools
import os
import sys
import time

import triton
from _results import device_label, git_commit, results_dir

from rarl_kernels import aot


def gpu_twin() -> int:
    """Run the option sweep on the GPU and report what the driver loaded, beside the ahead-of-time compile."""
    import torch

    from rarl_kernels import _utils

    device = torch.device("cuda")
    arch = _utils.gpu_arch(device)
    for (_, dtype), shape in itertools.product(aot.DTYPES.items(), aot.SHAPES.values()):
        for _ in aot.option_runs(dtype, shape, device="cuda"):
            pass
    torch.cuda.synchronize()
    rows = aot.loaded_kernels()
    name = device_label(torch.cuda.get_device_name(device))
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    path = results_dir() / f"kernel_report_{slug}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    predicted = {
        (r["kernel"], r["dtype"]): r for r in aot.summary_rows(aot.build_all((arch,), jobs=os.cpu_count() or 1))
    }
    print(f"{name} (tile family {arch}): driver figures of {len(rows)} loaded variants vs the ahead-of-time compile")
    print(f"{'kernel':34} {'dtype':5} {'variants':>8} {'regs':>5} {'aot regs':>8} {'spill B':>7} {'smem KiB':>8}")
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["dtype"])].append(r)
    for (kernel, dtype), rs in sorted(groups.items()):
        p = predicted.get((kernel, dtype), {})
        print(f"{kernel:34} {dtype:5} {len(rs):8d} {max(r['registers'] for r in rs):5d} "
              f"{p.get('max_registers', '-'):>8} {max(r['spill_bytes'] for r in rs):7d} "
              f"{max(r['shared'] for r in rs) / 1024:8.1f}")  # fmt: skip
    spills = [r for r in rows if r["spill_bytes"]]
    print(f"written to {path}; {len(spills)} variants spill")
    return 1 if spills else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(aot.ARCHS), choices=aot.ARCHS)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the twin on this GPU")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report.py compiles real kernels: unset TRITON_INTERPRET")
    if args.device == "cuda":
        return gpu_twin()
    t0 = time.perf_counter()
    builds = aot.build_all(tuple(args.arch), jobs=args.jobs)
    seconds = time.perf_counter() - t0
    out = results_dir()
    fields = [f.name for f in dataclasses.fields(aot.Build)] + ["problems"]
    with (out / "kernel_report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for b in builds:
            writer.writerow(dataclasses.asdict(b) | {"problems": "; ".join(aot.problems(b))})
    bad = [(b, p) for b in builds for p in aot.problems(b)]
    table = aot.markdown_table(aot.summary_rows(builds))
    header = (
        f"# Kernel compile report\n\n{datetime.date.today().isoformat()}, commit {git_commit()}, triton "
        f"{triton.__version__}: {len(builds)} builds ({len(args.arch)} architectures), {len(bad)} problems, "
        f"{seconds:.0f} s.\nOne row per kernel x architecture x dtype (bf16: a bf16 operand, its dots on tensor "
        "cores); registers, spill bytes (stores + loads) and shared memory are the worst over the row's variants.\n"
    )
    (out / "kernel_report.md").write_text(header + "\n" + table + "\n")
    print(table)
    for b, p in bad:
        print(f"FAIL {b.kernel} {aot.target_name(b.arch)} {b.dtype} [{b.flags}]: {p}")
    print(f"{len(builds)} builds, {len(bad)} problems, {seconds:.0f} s; written to {out}/kernel_report.{{md,csv}}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
