"""Benchmark the fused lm_head + GRPO loss against torch eager, torch.compile and Liger's chunked loss.

Providers: torch (eager: materialized logits), torch.compile (of the same function), liger
(LigerFusedLinearGRPOLoss), trl (TRL 1.16's chunked log-prob kernel, `trl.kernels.ChunkedLogProbFunction` with the
vocabulary tile its fused lm-head uses, then the per-token GRPO loss in torch as `GRPOTrainer._compute_loss` forms
it), verl (verl 0.9.1's torch backend, `FusedLinearForPPO`, read from the wheel `make trainers` downloads, then the
same torch loss), ours (FusedLinearGRPOLoss: Triton on CUDA, chunked torch on CPU), and matmul (hidden @ weight^T
alone, the cuBLAS/MKL roofline of the same run). trl asks its kernel for the log-probs only (TRL's trainer also
asks for the entropy); verl's backend computes the entropy whatever is asked, as it does in verl. Modes: forward
(the loss call with inputs requiring grad; the fused losses compute their gradients there), backward
(loss.backward() after an untimed forward, graph retained), full (both).

Time: `triton.testing.do_bench` (median) on CUDA; on CPU a timed loop (warmup, median of --reps).
Peak memory, mode full, extra over what was allocated before the call: `torch.cuda.max_memory_allocated`
on CUDA; on CPU the peak of live bytes allocated inside the call, from the CPU allocator's alloc/free
events recorded by `torch.profiler` (profile_memory=True) — exact for tensors, blind to non-torch memory.
TFLOP/s (mode full): FLOPs the provider actually executes / time: 6*N*H*V for torch, compile and ours
(logits + two gradient GEMMs), 8*N*H*V for Liger, TRL and verl (they recompute the logits in the backward).

Usage: python bench/bench_kernels.py [--device cpu|cuda] [--shape cpu|qwen2.5-vl-3b|qwen2.5-vl-7b ...]
       [--providers torch,compile,liger,trl,verl,ours] [--modes forward,backward,full] [--quick]
Rows go to bench/results/kernels.csv.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _results import ROOT, append_csv, device_label, git_commit, results_dir

from rarl_kernels import FusedLinearGRPOLoss
from rarl_kernels.reference import fused_linear_logprobs_ref, grpo_loss_ref

# name: (B, T, H, V, dtype); N = B * T tokens.
SHAPES = {
    "toy": (2, 64, 64, 2000, torch.float32),  # gpu_check.sh --dry-run: seconds on a CPU
    "cpu": (8, 512, 256, 32000, torch.float32),
    "qwen2.5-vl-3b": (16, 1024, 2048, 151936, torch.bfloat16),
    "qwen2.5-vl-7b": (16, 1024, 3584, 151936, torch.bfloat16),
}
GEMMS = {"torch": 6, "compile": 6, "ours": 6, "liger": 8, "trl": 8, "verl": 8, "matmul": 2}  # x N*H*V, mode full
BETA, LOSS_TYPE = 0.04, "dapo"


def make_inputs(B, T, H, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(B, T, H, generator=g) / 4).to(device, dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.1).long().to(device)
    adv = torch.randn(B, generator=g).to(device)
    typical = -torch.log(torch.tensor(float(V)))  # logp of a near-uniform policy
    old = (typical + 0.1 * torch.randn(B, T, generator=g)).to(device)
    ref = (typical + 0.1 * torch.randn(B, T, generator=g)).to(device)
    return h, w, dict(y=y, mask=mask, adv=adv, old=old, ref=ref)


def eager_loss(h, w, y, mask, adv, old, ref):
    logp = fused_linear_logprobs_ref(h, w, y)
    return grpo_loss_ref(logp, old, ref, adv, mask, beta=BETA, loss_type=LOSS_TYPE)[0]


class Unavailable(Exception):
    """A provider whose library is not installed or fetched here."""


def trl_loss_fn():
    """TRL 1.16: its chunked log-prob kernel as its fused lm-head calls it, then the per-token loss in torch."""
    try:
        import trl.trainer.utils as trl_utils
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as err:
        raise Unavailable(f"TRL 1.15+ is not installed ({err})") from err

    def trl_loss(h, w, y, mask, adv, old, ref):
        logp = ChunkedLogProbFunction.apply(h.reshape(-1, h.shape[-1]), w, None, y.reshape(-1), 1.0,
                                            trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
        return grpo_loss_ref(logp.view(y.shape), old, ref, adv, mask, beta=BETA, loss_type=LOSS_TYPE)[0]

    return trl_loss


def verl_loss_fn():
    """verl 0.9.1's torch backend (its module file from the downloaded wheel), then the per-token loss in torch."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import trainer_releases

    wheel = trainer_releases.wheel("verl", "0.9.1")
    if wheel is None:
        raise Unavailable(f"verl 0.9.1 {trainer_releases.MISSING}")
    with trainer_releases.packages_from_wheel(wheel, ("verl", "verl.utils", "verl.utils.experimental")):
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
    verl = FusedLinearForPPO(impl_backend="torch")

    def verl_loss(h, w, y, mask, adv, old, ref):
        logp, _ = verl(h, w, y, temperature=1.0)
        return grpo_loss_ref(logp, old, ref, adv, mask, beta=BETA, loss_type=LOSS_TYPE)[0]

    return verl_loss


def make_providers(names, device, *, required=True):
    """name -> loss function of (h, w, y, mask, adv, old, ref). A trainer provider that is not available here stops
    the run when `required`, else is left out with a line saying so."""
    out = {}
    for name in names:
        try:
            out[name] = make_provider(name, device)
        except Unavailable as err:
            if required:
                raise SystemExit(f"provider {name}: {err}") from err
            print(f"provider {name} left out: {err}")
    return out


def make_provider(name, device):
    """The loss function of provider `name`."""
    if name == "torch":
        return eager_loss
    if name == "compile":
        return torch.compile(eager_loss)
    if name == "trl":
        return trl_loss_fn()
    if name == "verl":
        return verl_loss_fn()
    if name == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as err:
            raise Unavailable(f"Liger is not installed ({err})") from err
        module = LigerFusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE, compiled=device.type == "cuda")
    elif name == "ours":
        module = FusedLinearGRPOLoss(beta=BETA, loss_type=LOSS_TYPE)
    else:
        raise SystemExit(f"unknown provider {name!r}")
    return lambda h, w, y, mask, adv, old, ref: module(
        h, w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old
    )[0]


def timer(device, reps):
    if device.type == "cuda":
        import triton.testing

        return lambda fn, params: triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=params,
                                                          return_mode="median")  # fmt: skip

    def cpu_time(fn, params):
        fn()  # warmup
        times = []
        for _ in range(reps):
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def peak_extra_bytes(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    kineto = prof.profiler.kineto_results.events()
    events = sorted((e.start_ns(), e.nbytes()) for e in kineto if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def bench_shape(shape, providers, modes, device, reps):
    B, T, H, V, dtype = SHAPES[shape]
    N = B * T
    h, w, kw = make_inputs(B, T, H, V, dtype, device)
    params = [h, w]
    measure = timer(device, reps)
    rows = []
    h2 = h.detach().reshape(N, H)
    ms = measure(lambda: h2 @ w.detach().t(), [])
    rows.append(dict(shape=shape, provider="matmul", mode="forward", ms=ms, peak_mb=float("nan"),
                     tflops=GEMMS["matmul"] * N * H * V / ms / 1e9))  # fmt: skip
    for name, fn in providers.items():
        call = lambda fn=fn: fn(h, w, **kw)
        full = lambda call=call: call().backward()
        for mode in modes:
            if mode == "forward":
                t = measure(call, params)
            elif mode == "full":
                t = measure(full, params)
            else:
                loss = call()
                t = measure(lambda loss=loss: loss.backward(retain_graph=True), params)
                del loss
            peak = peak_extra_bytes(full, device) / 2**20 if mode == "full" else float("nan")
            tflops = GEMMS[name] * N * H * V / t / 1e9 if mode == "full" else float("nan")
            rows.append(dict(shape=shape, provider=name, mode=mode, ms=t, peak_mb=peak, tflops=tflops))
            for p in params:
                p.grad = None
    return rows


def write_csv(rows, device) -> Path:
    import triton

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                device=device_label(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
                torch=torch.__version__, triton=triton.__version__, commit=git_commit())  # fmt: skip
    fields = [*meta, "shape", "N", "H", "V", "dtype", "provider", "mode", "ms", "peak_mb", "tflops"]
    out = []
    for r in rows:
        B, T, H, V, dtype = SHAPES[r["shape"]]
        fmt = {"ms": f"{r['ms']:.3f}", "peak_mb": f"{r['peak_mb']:.1f}", "tflops": f"{r['tflops']:.3f}"}
        dt = str(dtype).removeprefix("torch.")
        out.append({**meta, **r, **fmt, "N": B * T, "H": H, "V": V, "dtype": dt})
    return append_csv(results_dir() / "kernels.csv", fields, out)


def print_table(rows):
    base = {(r["shape"], r["mode"]): r for r in rows if r["provider"] == "torch"}
    head = ("shape", "mode", "provider", "ms", "speedup", "peak MB", "mem/torch", "TFLOP/s")
    print("{:15} {:8} {:9} {:>10} {:>8} {:>10} {:>9} {:>8}".format(*head))
    for r in rows:
        b = base.get((r["shape"], r["mode"]))
        speed = b["ms"] / r["ms"] if b else float("nan")
        mem = r["peak_mb"] / b["peak_mb"] if b and b["peak_mb"] == b["peak_mb"] else float("nan")
        print(f"{r['shape']:15} {r['mode']:8} {r['provider']:9} {r['ms']:10.2f} {speed:7.2f}x {r['peak_mb']:10.1f} "
              f"{mem:9.3f} {r['tflops']:8.3f}")  # fmt: skip
    full = [r for r in rows if r["mode"] == "full"]
    for o in (r for r in full if r["provider"] == "ours"):
        for other in (r for r in full if r["shape"] == o["shape"] and r["provider"] not in ("ours", "matmul")):
            print(f"{o['shape']}: ours/{other['provider']}, forward+backward: time {o['ms'] / other['ms']:.2f}x, "
                  f"peak extra memory {o['peak_mb'] / other['peak_mb']:.3f}x")  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", nargs="+", default=None, choices=list(SHAPES))
    ap.add_argument("--providers", default=None, help="comma list of torch,compile,liger,trl,verl,ours")
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--reps", type=int, default=5, help="CPU timed repetitions (median)")
    ap.add_argument("--quick", action="store_true", help="CPU: 2 reps; CUDA: providers torch,liger,ours")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = args.shape or (["qwen2.5-vl-3b", "qwen2.5-vl-7b"] if cuda else ["cpu"])
    default_providers = "torch,compile,liger,trl,verl,ours" if cuda and not args.quick else "torch,liger,trl,verl,ours"
    providers = make_providers((args.providers or default_providers).split(","), device,
                               required=args.providers is not None)  # fmt: skip
    reps = 2 if args.quick else args.reps
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, providers, args.modes.split(","), device, reps)
    print_table(rows)
    if not args.no_csv:
        write_csv(rows, device)


if __name__ == "__main__":
    main()
