"""A roofline MODEL of the lm_head + GRPO loss (forward and backward) per provider: predicted, never measured.

Each provider is written as the kernels it launches for one loss call on N tokens (hidden H, vocabulary V, bf16
inputs, no bias), each with the FLOPs it executes and the HBM bytes it must move (every operand read once and every
result written once per kernel: no cache holds more than a tile). A kernel takes max(FLOPs / peak, bytes /
bandwidth) and a provider the sum over its kernels, on a device given by its data-sheet peaks. The figures are lower
bounds: real kernels reach 60-85 % of the peaks, and launch gaps, the per-token math on [N] vectors (a few MB) and
the caches are left out. What the model is for: which provider does less work, by how much, and where the time goes.

Providers (read from their code):
  ours   rarl_kernels.fused_linear_grpo_loss: per row chunk (rows = chunk budget / 4V) one logits GEMM that writes an
         fp32 z-buffer and per-tile softmax partials, the row merge, d-logits in place, two gradient GEMMs that read
         the fp32 buffer (grad_weight accumulated in fp32 across chunks): 3 GEMMs; the weight is read twice and the
         fp32 weight gradient read and written once per chunk.
  liger  liger-kernel 0.8.5 LigerFusedLinearGRPOLoss (chunk_size=1: one sequence of T=1024 rows per chunk; vocab
         sub-chunks of 4096): logits GEMM, elementwise softmax in torch, logits recomputed in the backward, the two
         gradient GEMMs in fp32 (`grad_logits @ weight_chunk.float()`: CUDA cores unless TF32 is allowed, which is
         off in torch by default; `liger-tf32` assumes it on), fp32 weight gradient per chunk added into bf16: 4 GEMMs.
  trl    TRL 1.16 ChunkedLogProbFunction (4096-token x 32768-vocab bf16 tiles in cuBLAS, Triton folds) + its torch
         per-token loss: logits GEMM, recomputed in the backward, d-logits in place, two gradient GEMMs accumulating
         in fp32 (`addmm(out_dtype=float32)`): 4 GEMMs.
  torch  eager (rarl_kernels.reference): materialized [N, V] logits, a float copy, log_softmax, and their backward;
         3 GEMMs.

Devices: dense (no sparsity) bf16 tensor-core and fp32 CUDA-core peaks and HBM bandwidth of the SXM parts, from the
vendors' data sheets:
  A100: NVIDIA A100 Tensor Core GPU data sheet (80 GB SXM): BF16 312 TFLOPS, FP32 19.5 TFLOPS, 2,039 GB/s.
  H100: NVIDIA H100 Tensor Core GPU data sheet (SXM): BF16 1,979 TFLOPS with sparsity -> 989.5 dense, FP32 67
        TFLOPS, 3.35 TB/s.
  H200: NVIDIA H200 Tensor Core GPU data sheet (SXM): BF16 1,979 with sparsity -> 989.5 dense, FP32 67 TFLOPS,
        4.8 TB/s.
  B200: NVIDIA HGX platform specifications (HGX B200, 8 GPUs): FP16/BF16 36 PFLOPS with sparsity, FP32 600 TFLOPS;
        DGX B200 data sheet: 64 TB/s HBM3e for 8 GPUs -> per GPU 2,250 dense BF16 TFLOPS, 75 FP32 TFLOPS, 8 TB/s.
  TF32 (for liger-tf32): half the dense BF16 peak on all four (the data sheets' TF32 tensor-core figures).

When bench/results/kernels.csv holds a row measured on one of these GPUs at the same shape (mode full), its time is
printed beside the prediction.

Usage: python bench/roofline.py [--shape N H V] [--device H100 ...] [--chunk-gib 1] [--sweep]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # CUDA cores
    hbm_gbs: float

    @property
    def tf32_tflops(self) -> float:
        return self.bf16_tflops / 2


DEVICES = {
    "A100": Device("A100", 312.0, 19.5, 2039.0),
    "H100": Device("H100", 989.5, 67.0, 3350.0),
    "H200": Device("H200", 989.5, 67.0, 4800.0),
    "B200": Device("B200", 2250.0, 75.0, 8000.0),
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """`count` launches of one kernel: FLOPs and HBM bytes per launch, and the unit its FLOPs run on."""

    name: str
    flops: float
    bytes: float
    unit: str = "bf16"  # "bf16" | "fp32" | "tf32"
    count: int = 1

    def seconds(self, d: Device) -> float:
        peak = {"bf16": d.bf16_tflops, "fp32": d.fp32_tflops, "tf32": d.tf32_tflops}[self.unit] * 1e12
        return self.count * max(self.flops / peak, self.bytes / (d.hbm_gbs * 1e9))


def _chunks(total: int, size: int) -> list[tuple[int, int]]:
    """(rows, how many chunks of that many rows) covering `total` rows in chunks of `size`."""
    full, rest = divmod(total, size)
    return [(size, full)] + ([(rest, 1)] if rest else [])


def ours(N: int, H: int, V: int, chunk_bytes: int, block_v: int = 128) -> list[Kernel]:
    """rarl_kernels' fused path at a [rows, V] fp32 buffer of `chunk_bytes` (rows a multiple of 128)."""
    rows = max(128, chunk_bytes // (4 * V) // 128 * 128)
    nvb = math.ceil(V / block_v)
    ks = []
    chunks = _chunks(N, rows)
    n_chunks = sum(c for _, c in chunks)
    for r, count in chunks:
        ks += [
            Kernel("logits + partials", 2 * r * H * V, 2 * V * H + 2 * r * H + 4 * r * V + 12 * r * nvb, count=count),
            Kernel("row merge + GRPO", 0, 12 * r * nvb + 40 * r, count=count),
            Kernel("d-logits in place", 0, 8 * r * V, count=count),
            Kernel("grad_hidden GEMM", 2 * r * H * V, 4 * r * V + 2 * V * H + 2 * r * H, count=count),
            Kernel("grad_weight GEMM (fp32 acc)", 2 * r * H * V, 4 * r * V + 2 * r * H + 8 * V * H, count=count),
        ]
    # the first chunk writes the fp32 weight gradient without reading it
    ks.append(Kernel("grad_weight: first chunk reads nothing", 0, -4 * V * H))
    ks.append(Kernel("grad_weight fp32 -> bf16", 0, 6 * V * H))
    ks.append(Kernel("backward: scale saved grads", 0, 4 * V * H + 4 * N * H))
    assert n_chunks >= 1
    return ks


def liger(N: int, H: int, V: int, T: int = 1024, tf32: bool = False) -> list[Kernel]:
    """liger-kernel 0.8.5 chunked GRPO loss, one sequence (T rows) per chunk, vocab sub-chunks of 4096."""
    unit = "tf32" if tf32 else "fp32"
    c, vc = T, 4096
    n_seq = N // T
    n_vc = math.ceil(V / vc)
    elems = c * vc
    per_vocab_chunk = [
        Kernel("fwd logits GEMM (bf16 out)", 2 * c * H * vc, 2 * vc * H + 2 * c * H + 2 * elems),
        # .float(), mul_(1/T), amax, sub, exp, sum: each reads its inputs and writes its output
        Kernel("fwd softmax passes", 0, (6 + 8 + 4 + 8 + 8 + 4) * elems),
        Kernel("bwd logits recomputed", 2 * c * H * vc, 2 * vc * H + 2 * c * H + 2 * elems),
        # .float(), mul_, sub, exp, (-g) * p, mul_(1/T)
        Kernel("bwd d-logits passes", 0, (6 + 8 + 8 + 8 + 8 + 8) * elems),
        Kernel("weight_chunk.float()", 0, 6 * vc * H),
        Kernel("grad_hidden GEMM (fp32)", 2 * c * H * vc, 4 * elems + 4 * vc * H + 4 * c * H, unit=unit),
        Kernel("grad_weight GEMM (fp32)", 2 * c * H * vc, 4 * elems + 4 * c * H + 4 * vc * H, unit=unit),
        Kernel("grad_weight add_ (fp32)", 0, 12 * vc * H),
    ]
    ks = [dataclasses.replace(k, count=n_seq * n_vc) for k in per_vocab_chunk]
    ks += [
        Kernel("per-chunk fp32 weight-gradient zeros", 0, 4 * V * H, count=n_seq),
        Kernel("per-chunk weight gradient -> bf16", 0, 6 * V * H, count=n_seq),
        Kernel("add into the bf16 weight gradient", 0, 6 * V * H, count=n_seq),
    ]
    return ks


def trl(N: int, H: int, V: int, token_chunk: int = 4096, vocab_chunk: int = 32768) -> list[Kernel]:
    """TRL 1.16 ChunkedLogProbFunction forward + backward (its per-token loss on [N] is negligible)."""
    ks = []
    for n, cn in _chunks(N, token_chunk):
        for vc, cv in _chunks(V, vocab_chunk):
            count, elems = cn * cv, n * vc
            ks += [
                Kernel("fwd tile GEMM (bf16 out)", 2 * n * H * vc, 2 * vc * H + 2 * n * H + 2 * elems, count=count),
                Kernel("fwd fold (Triton)", 0, 2 * elems, count=count),
                Kernel("bwd tile recomputed", 2 * n * H * vc, 2 * vc * H + 2 * n * H + 2 * elems, count=count),
                Kernel("bwd d-logits in place (Triton)", 0, 4 * elems, count=count),
                Kernel("grad_hidden addmm (fp32 acc)", 2 * n * H * vc, 2 * elems + 2 * vc * H + 8 * n * H, count=count),
                Kernel("grad_weight addmm (fp32 acc)", 2 * n * H * vc, 2 * elems + 2 * n * H + 8 * vc * H, count=count),
            ]
    ks += [Kernel("fp32 gradient zeros + casts to bf16", 0, 10 * V * H + 10 * N * H)]
    return ks


def torch_eager(N: int, H: int, V: int) -> list[Kernel]:
    """Eager autograd over materialized logits (rarl_kernels.reference)."""
    e = N * V
    return [
        Kernel("logits GEMM (bf16 out)", 2 * N * H * V, 2 * N * H + 2 * V * H + 2 * e),
        # .float(), / T, log_softmax; backward: zeros + scatter of the gather, log_softmax, / T, cast to bf16
        Kernel("elementwise passes over [N, V]", 0, (6 + 8 + 8 + 4 + 12 + 8 + 6) * e),
        Kernel("grad_hidden GEMM", 2 * N * H * V, 2 * e + 2 * V * H + 2 * N * H),
        Kernel("grad_weight GEMM", 2 * N * H * V, 2 * e + 2 * N * H + 2 * V * H),
    ]


def providers(N: int, H: int, V: int, chunk_bytes: int) -> dict[str, list[Kernel]]:
    return {
        "ours": ours(N, H, V, chunk_bytes),
        "liger": liger(N, H, V),
        "liger-tf32": liger(N, H, V, tf32=True),
        "trl": trl(N, H, V),
        "torch": torch_eager(N, H, V),
    }


def total(ks: list[Kernel], d: Device) -> tuple[float, float, float]:
    """(seconds, FLOPs, bytes) of a provider on a device."""
    return (sum(k.seconds(d) for k in ks), sum(k.flops * k.count for k in ks), sum(k.bytes * k.count for k in ks))


def measured_rows(N: int, H: int, V: int) -> dict[tuple[str, str], float]:
    """{(device key, provider): ms} from kernels.csv rows measured on a GPU of the table at this shape, mode full."""
    out: dict[tuple[str, str], float] = {}
    if not RESULTS.exists():
        return out
    with RESULTS.open() as f:
        for row in csv.DictReader(f):
            if row.get("mode") != "full" or (int(row["N"]), int(row["H"]), int(row["V"])) != (N, H, V):
                continue
            key = next((k for k in DEVICES if k in row.get("device", "")), None)
            if key is not None:
                out[(key, row["provider"])] = float(row["ms"])  # the latest row wins
    return out


def report(N: int, H: int, V: int, devices: list[str], chunk_bytes: int) -> str:
    lines = [f"ROOFLINE MODEL (predicted lower bounds, not measurements): N={N}, H={H}, V={V}, bf16, "
             f"our chunk budget {chunk_bytes / 2**30:g} GiB"]  # fmt: skip
    measured = measured_rows(N, H, V)
    provs = providers(N, H, V, chunk_bytes)
    for key in devices:
        d = DEVICES[key]
        ours_s = total(provs["ours"], d)[0]
        lines.append(f"\n{key}: {d.bf16_tflops:g} TFLOP/s bf16, {d.fp32_tflops:g} TFLOP/s fp32, {d.hbm_gbs:g} GB/s")
        lines.append(f"{'provider':11} {'TFLOP':>7} {'GB moved':>9} {'predicted ms':>13} {'it / ours':>10} "
                     f"{'measured ms':>12}")  # fmt: skip
        for name, ks in provs.items():
            s, flops, nbytes = total(ks, d)
            meas = measured.get((key, name.split("-")[0])) if name != "liger-tf32" else None
            lines.append(f"{name:11} {flops / 1e12:7.1f} {nbytes / 1e9:9.1f} {s * 1e3:13.1f} "
                         f"{s / ours_s:9.2f}x {'' if meas is None else f'{meas:.1f}':>12}")  # fmt: skip
        mm = 2 * N * H * V / (d.bf16_tflops * 1e12)
        meas = measured.get((key, "matmul"))
        lines.append(f"{'1 GEMM':11} {2 * N * H * V / 1e12:7.1f} {'':>9} {mm * 1e3:13.1f} {'':>10} "
                     f"{'' if meas is None else f'{meas:.1f}':>12}")  # fmt: skip
    lines.append(
        "\n'it / ours': the provider's predicted time over ours (above 1: ours is predicted faster). "
        "'1 GEMM': one [N, H] x [H, V] product at the bf16 peak, the unit the others are made of."
    )
    return "\n".join(lines)


def sweep(N: int, H: int, V: int, devices: list[str]) -> str:
    """Our predicted time against the chunk budget: the fp32 buffer trades memory for weight re-reads."""
    budgets = [2**28, 2**29, 2**30, 2**31, 2**32]
    head = "budget GiB  rows  " + "".join(f"{k + ' ms':>10}" for k in devices) + "   buffer + fp32 grad_weight GiB"
    lines = ["\nours: predicted time against the chunk budget (MODEL)", head]
    for b in budgets:
        rows = max(128, b // (4 * V) // 128 * 128)
        times = "".join(f"{total(ours(N, H, V, b), DEVICES[k])[0] * 1e3:10.1f}" for k in devices)
        held = (4 * rows * V + 4 * V * H) / 2**30
        lines.append(f"{b / 2**30:10g} {rows:5d}  {times}   {held:.2f}")
    return "\n".join(lines)


def breakdown(N: int, H: int, V: int, key: str, chunk_bytes: int) -> str:
    """Where each provider's predicted time goes on one device, by kernel."""
    d = DEVICES[key]
    lines = [f"\nwhere the predicted time goes on {key} (MODEL), ms"]
    for name, ks in providers(N, H, V, chunk_bytes).items():
        parts: dict[str, float] = {}
        for k in ks:
            parts[k.name] = parts.get(k.name, 0.0) + k.seconds(d) * 1e3
        lines.append(f"{name}: " + ", ".join(f"{n} {t:.1f}" for n, t in parts.items() if abs(t) >= 0.05))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, metavar=("N", "H", "V"), default=(16384, 2048, 151936))
    ap.add_argument("--device", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    ap.add_argument("--chunk-gib", type=float, default=1.0, help="our [rows, V] fp32 buffer budget")
    ap.add_argument("--sweep", action="store_true", help="also print our time against the chunk budget")
    ap.add_argument("--breakdown", action="store_true", help="also print each provider's time by kernel (H100)")
    args = ap.parse_args(argv)
    N, H, V = args.shape
    print(report(N, H, V, args.device, int(args.chunk_gib * 2**30)))
    if args.sweep:
        print(sweep(N, H, V, args.device))
    if args.breakdown:
        print(breakdown(N, H, V, "H100" if "H100" in args.device else args.device[0], int(args.chunk_gib * 2**30)))


if __name__ == "__main__":
    main()
