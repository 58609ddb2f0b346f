"""Ahead-of-time compilation of every kernel variant for real GPUs, on a machine without one.

`launch_variants(arch)` runs the ops over every option combination they accept (fp32 and bf16, bias, old and
reference log-probs, importance weights, bias correction, every surrogate, token- and sequence-level ratios,
entropy gradient, logit soft cap, every per-row statistic, full and partial row chunks, chunks of whole sequences
and the log-prob pre-pass, aligned and odd vocabulary sizes) under `capture_launches(arch)`, so the launchers
choose tiles and flags exactly as on a GPU of that tile family, and returns the distinct launches: kernel, argument
specialization (Triton's own binder, so integer and pointer alignment attributes are those of a real launch),
constexprs and launch options. Variants are what the launchers really launch, never a list kept by hand: a new flag
or kernel shows up by itself.
`compile_variant` compiles one with `triton.compile` for sm_80, sm_90a or sm_100a, with the ptxas of the triton
wheel, and reads registers, spill bytes and shared memory from the ptxas log and the tensor-core instruction from
the SASS (`cuobjdump`). `problems` states the health rules.

Kernels must be real `JITFunction`s: run in a process without TRITON_INTERPRET. `python -m rarl_kernels.aot`
prints the table (one row per kernel x architecture x dtype) and exits 1 when a rule is broken; `--json PATH`
writes one record per variant and architecture. This mirrors `JITFunction.run` of triton 3.9 (the pinned version).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget

from rarl_kernels._utils import Launch, capture_launches, interpreting
from rarl_kernels.fused_grpo import fused_linear_grpo_loss
from rarl_kernels.grpo_loss import grpo_loss
from rarl_kernels.linear_logprobs import STATISTICS, fused_linear_logprob_stats, fused_linear_logprobs

ARCHS = (80, 90, 100)  # tile families; triton names the targets sm_80, sm_90a (wgmma), sm_100a (tcgen05)
# Largest shared memory one block may use. The 80 family also runs on sm_86/89 and sm_120 (99 KB), not only on
# the A100 (163 KB), so its tiles must fit the smaller limit.
SMEM_LIMIT = {80: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
# SASS mnemonics of each family's tensor-core matrix multiply: mma.sync, wgmma, tcgen05.
TENSOR_CORE_OP = {80: re.compile(r"HMMA"), 90: re.compile(r"HGMMA"), 100: re.compile(r"UTC\w*MMA")}

# Small shapes (N, H, V) with the alignment pattern of the real ones: H a multiple of 16 (2048, 3584), V one too
# (151936) or not (an odd vocabulary). N spans two row chunks, the second partial (40 rows).
SHAPES = {"aligned": (168, 128, 1008), "odd-vocab": (168, 128, 1000)}
ROWS_PER_CHUNK = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (loss_type, importance_sampling_level) beyond the token-level clipped surrogate of the full option product.
LOSS_VARIANTS = (("cispo", "token"), ("sapo", "token"), ("vespo", "token"), ("grpo", "sequence"), ("luspo", "sequence"))


def target_name(arch: int) -> str:
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One distinct launch: what `triton.compile` needs, plus which op dtypes produced it."""

    kernel: str
    launch: Launch
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    dtypes: tuple[str, ...]

    @property
    def dtype(self) -> str:
        """bf16 when any pointer operand is bf16 (its dots run on tensor cores), else fp32."""
        return "bf16" if "*bf16" in self.signature.values() else "fp32"

    def _constexpr_args(self) -> Iterator[tuple[str, object]]:
        names = self.launch.kernel.arg_names
        return ((names[i], v) for (i,), v in sorted(self.constexprs.items()))

    def flags(self) -> str:
        """The constexpr switches that select code paths, e.g. HAS_BIAS=1,ACCUMULATE=0."""
        return ",".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in self._constexpr_args()
                        if n.isupper() and not n.startswith("BLOCK") and n != "GROUP_M")  # fmt: skip

    def tiles(self) -> str:
        blocks = [f"{n}={v}" for n, v in self._constexpr_args() if n.startswith("BLOCK")]
        return ",".join([*blocks, f"warps={self.options['num_warps']}", f"stages={self.options['num_stages']}"])

    def operands(self) -> str:
        """Pointer dtypes and unit strides (a transposed operand shows as its other stride = 1)."""
        out = []
        for name, kind in self.signature.items():
            if kind.startswith("*"):
                out.append(f"{name}={kind[1:]}")
        out += [f"{n}=1" for n, v in self._constexpr_args() if not n.isupper() and v == 1]
        return ",".join(out)


@dataclasses.dataclass
class Build:
    """Result of compiling one variant for one architecture."""

    kernel: str
    arch: int
    dtype: str
    flags: str
    tiles: str
    operands: str
    has_dot: bool = False
    ok: bool = False
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    tensor_core: str = ""
    seconds: float = 0.0


def option_runs(dtype: torch.dtype, shape: tuple[int, int, int], device: str = "cpu") -> Iterator[None]:
    """Run every op on `shape` in `dtype` over the product of its options, forward and backward, with the Triton
    kernels (a generator: one step per run, so that a caller can see which run made which launches)."""
    N, H, V = shape
    g = torch.Generator().manual_seed(0)
    B, T = 3, N // 3
    chunk = ROWS_PER_CHUNK * V * 4
    rand = lambda *s: torch.randn(*s, generator=g).to(device)
    leaf = lambda *s: rand(*s).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, device=device)
    per_tok = lambda: rand(B, T)
    for bias, old, ref, isw, corr in itertools.product((False, True), repeat=5):
        h, w, b = leaf(B, T, H), leaf(V, H), leaf(V) if bias else None
        loss, _ = fused_linear_grpo_loss(
            h, w, labels, mask, rand(B), bias=b, logp_old=per_tok() if old else None,
            logp_ref=per_tok() if ref else None, is_ratio=per_tok() if isw else None, bias_correction_kl=corr,
            chunk_bytes=chunk, impl="triton",
        )  # fmt: skip
        loss.backward()
        yield
    # every other surrogate and the sequence-level ratio, bare and with every per-token operand; then a chunk
    # smaller than one sequence (the log-prob pre-pass of sequence-level losses)
    for (loss_type, level), full in itertools.product(LOSS_VARIANTS, (False, True)):
        h, w = leaf(B, T, H), leaf(V, H)
        loss, _ = fused_linear_grpo_loss(
            h, w, labels, mask, rand(B), logp_old=per_tok(), logp_ref=per_tok() if full else None,
            is_ratio=per_tok().exp() if full else None, bias_correction_kl=full, loss_type=loss_type,
            importance_sampling_level=level, delta=1.5 if full else None, eps_high=4.0 if loss_type == "cispo" else 0.2,
            chunk_bytes=chunk, impl="triton",
        )  # fmt: skip
        loss.backward()
        yield
    h, w = leaf(B, T, H), leaf(V, H)
    loss, _ = fused_linear_grpo_loss(h, w, labels, mask, rand(B), logp_old=per_tok(),
                                     importance_sampling_level="sequence", chunk_bytes=T // 2 * V * 4,
                                     impl="triton")  # fmt: skip
    loss.backward()
    yield
    # reference log-probs from reference hidden states; a frozen lm_head (only the hidden states get a gradient)
    h, w = leaf(B, T, H), rand(V, H).to(dtype)
    loss, _ = fused_linear_grpo_loss(h, w, labels, mask, rand(B), ref_hidden=h.detach(),
                                     ref_weight=w, chunk_bytes=chunk, impl="triton")  # fmt: skip
    loss.backward()
    yield
    for bias, entropy in itertools.product((False, True), repeat=2):
        h, w, b = leaf(N, H), leaf(V, H), leaf(V) if bias else None
        out = fused_linear_logprobs(h, w, labels.reshape(-1)[:N], bias=b, return_entropy=entropy, chunk_bytes=chunk,
                                    impl="triton")  # fmt: skip
        (out[0].sum() + out[1].sum() if entropy else out.sum()).backward()
        yield
    # every per-row statistic, of soft-capped and scaled logits (what TRL's fused lm_head can ask for)
    h, w = leaf(N, H), leaf(V, H)
    out = fused_linear_logprob_stats(h, w, labels.reshape(-1)[:N], softcap=30.0, logit_scale=0.5, stats=STATISTICS,
                                     chunk_bytes=chunk, impl="triton")  # fmt: skip
    (out.logp.sum() + out.entropy.sum()).backward()
    yield
    for old, ref, isw, corr in itertools.product((False, True), repeat=4):
        logp = (rand(B, T) - 2).requires_grad_()
        adv = rand(B)
        loss, _ = grpo_loss(logp, per_tok() if old else None, per_tok() if ref else None, adv, mask,
                            is_ratio=per_tok() if isw else None, bias_correction_kl=corr, impl="triton")  # fmt: skip
        loss.backward()
        yield
    for (loss_type, level), full in itertools.product(LOSS_VARIANTS, (False, True)):
        logp = (rand(B, T) - 2).requires_grad_()
        loss, _ = grpo_loss(logp, per_tok(), per_tok() if full else None, rand(B), mask, loss_type=loss_type,
                            importance_sampling_level=level, is_ratio=per_tok().exp() if full else None,
                            bias_correction_kl=full, impl="triton")  # fmt: skip
        loss.backward()
        yield


@functools.cache
def _binder(kernel, arch: int):
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    return backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def _specialize(launch: Launch, arch: int) -> tuple[dict, dict, dict, dict]:
    """signature, constexprs, attrs, options of `launch` on the target, as `JITFunction.run` derives them."""
    backend, binder = _binder(launch.kernel, arch)
    bound, spec, opts = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, launch.kwargs, bound, spec, opts)
    return signature, constexprs, attrs, dataclasses.asdict(options)


def launch_variants(arch: int) -> list[Variant]:
    """Every distinct launch the ops make on a GPU of tile family `arch` (80, 90 or 100)."""
    if interpreting():
        raise RuntimeError("rarl_kernels.aot compiles real kernels: run it without TRITON_INTERPRET=1")
    seen: dict[str, Variant] = {}
    for (label, dtype), shape in itertools.product(DTYPES.items(), SHAPES.values()):
        with capture_launches(arch) as launches:
            collections.deque(option_runs(dtype, shape), maxlen=0)
        for launch in launches:
            sig, const, attrs, opts = _specialize(launch, arch)
            key = repr((launch.kernel.fn.__qualname__, sorted(sig.items()), sorted(const.items()),
                        sorted(attrs.items()), sorted(opts.items())))  # fmt: skip
            if key not in seen:
                seen[key] = Variant(launch.kernel.fn.__name__, launch, sig, const, attrs, opts, (label,))
            elif label not in seen[key].dtypes:
                seen[key] = dataclasses.replace(seen[key], dtypes=(*seen[key].dtypes, label))
    return list(seen.values())


_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_OP = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass_ops(cubin: bytes) -> collections.Counter[str]:
    """Instruction mnemonics (with modifiers) of a cubin, counted, from `cuobjdump -sass`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    return collections.Counter(_SASS_OP.findall(sass.stdout))


def compile_variant(v: Variant, arch: int) -> Build:
    """Compile `v` for `arch` and read its resources; a failure is recorded in `Build.error`, never raised."""
    from triton import knobs
    from triton.compiler import ASTSource

    build = Build(v.kernel, arch, v.dtype, v.flags(), v.tiles(), v.operands())
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        # every compile runs ptxas (no cache hit), which prints its log with the register and spill counts
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            source = ASTSource(v.launch.kernel, v.signature, v.constexprs, v.attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=v.options)
    except Exception as e:  # recorded per variant; `problems` reports it
        lines = str(e).strip().splitlines()
        build.error = f"{type(e).__name__}: {lines[0] if lines else ''}"
        return build
    build.seconds = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    usage, spill = _PTXAS_USAGE.search(text), _PTXAS_SPILL.search(text)
    if usage is None:
        build.error = "no register count in the ptxas log"
        return build
    build.registers = int(usage.group(1))
    build.spill_stores, build.spill_loads = (int(spill.group(1)), int(spill.group(2))) if spill else (0, 0)
    build.shared = compiled.metadata.shared
    build.has_dot = "tt.dot" in compiled.asm["ttir"]
    mma = sorted((n, op) for op, n in sass_ops(compiled.asm["cubin"]).items() if "MMA" in op.split(".")[0])
    build.tensor_core = mma[-1][1] if mma else ""  # the most frequent
    build.ok = True
    return build


def loaded_kernels() -> list[dict]:
    """After the ops ran on a GPU: what the driver reports for every kernel variant compiled in this process (the
    twin of `compile_variant`'s ahead-of-time figures): one dict per variant."""
    rows, seen = [], set()
    modules = [m for n, m in sorted(sys.modules.items()) if n.startswith("rarl_kernels.")]
    for module in modules:
        for kname, fn in sorted(vars(module).items()):
            if not (kname.endswith("_kernel") and isinstance(fn, triton.runtime.JITFunction)) or id(fn) in seen:
                continue
            seen.add(id(fn))
            for cache, *_ in fn.device_caches.values():
                for k in cache.values():
                    k._init_handles()  # loaded already when it ran; reads registers and spills from the driver
                    sig = getattr(k.src, "signature", {})
                    rows.append(dict(
                        kernel=kname, dtype="bf16" if "*bf16" in sig.values() else "fp32",
                        arch=k.metadata.target.arch, registers=k.n_regs, spill_bytes=k.n_spills,
                        shared=k.metadata.shared, num_warps=k.metadata.num_warps,
                    ))  # fmt: skip
    return rows


_VARIANTS: dict[int, list[Variant]] = {}  # filled before the worker processes fork, read by them


def _compile_task(task: tuple[int, int]) -> Build:
    arch, i = task
    return compile_variant(_VARIANTS[arch][i], arch)


def build_all(archs: tuple[int, ...] = ARCHS, jobs: int = 1, kernels: tuple[str, ...] = ()) -> list[Build]:
    """Compile every variant (of `kernels` only, when given) for every architecture in `archs`, on `jobs`
    processes."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    for arch in archs:
        _VARIANTS[arch] = [v for v in launch_variants(arch) if not kernels or v.kernel in kernels]
    tasks = [(arch, i) for arch in archs for i in range(len(_VARIANTS[arch]))]
    if jobs <= 1:
        return [_compile_task(t) for t in tasks]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_task, tasks, chunksize=1)


def problems(b: Build) -> list[str]:
    """What the health rules find wrong with one build (empty when it meets them): it compiles; no register spill
    in a bf16 variant or in a kernel without a dot; the family's tensor-core instruction in every bf16 kernel with
    a dot; shared memory within the family's per-block limit."""
    if not b.ok:
        return [f"does not compile: {b.error}"]
    out = []
    if (b.spill_stores or b.spill_loads) and (b.dtype == "bf16" or not b.has_dot):
        out.append(f"spills {b.spill_stores} B stores / {b.spill_loads} B loads")
    if b.has_dot and b.dtype == "bf16" and not TENSOR_CORE_OP[b.arch].match(b.tensor_core):
        out.append(f"no {TENSOR_CORE_OP[b.arch].pattern} instruction (found {b.tensor_core or 'none'})")
    if b.shared > SMEM_LIMIT[b.arch]:
        out.append(f"shared memory {b.shared} B > {SMEM_LIMIT[b.arch]} B")
    return out


def summary_rows(builds: list[Build]) -> list[dict]:
    """One row per kernel x architecture x dtype: variants, tiles, the worst registers / spills / shared memory
    over the variants, the tensor-core instructions seen, and whether every variant meets the rules."""
    groups: dict[tuple, list[Build]] = collections.defaultdict(list)
    for b in builds:
        groups[(b.kernel, b.arch, b.dtype)].append(b)
    rows = []
    for (kernel, arch, dtype), bs in sorted(groups.items()):
        rows.append(dict(
            kernel=kernel, arch=target_name(arch), dtype=dtype, variants=len(bs),
            tiles=" / ".join(sorted({b.tiles for b in bs})), max_registers=max(b.registers for b in bs),
            max_spill_bytes=max(b.spill_stores + b.spill_loads for b in bs),
            max_shared_kib=round(max(b.shared for b in bs) / 1024, 1),
            tensor_core=" ".join(sorted({b.tensor_core for b in bs if b.tensor_core})) or "-",
            ok="yes" if not any(problems(b) for b in bs) else "NO",
        ))  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--json", help="write one record per variant and architecture to this file")
    ap.add_argument("--kernel", nargs="+", default=[], help="compile only these kernels, e.g. _matmul_kernel")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    builds = build_all(tuple(args.arch), jobs=args.jobs, kernels=tuple(args.kernel))
    if not builds:
        raise SystemExit(f"no variant of {args.kernel}: the kernels are named like _matmul_kernel")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(b) | {"problems": problems(b)} for b in builds], f, indent=1)
    print(markdown_table(summary_rows(builds)))
    bad = [(b, p) for b in builds for p in problems(b)]
    for b, p in bad:
        print(f"FAIL {b.kernel} {target_name(b.arch)} {b.dtype} [{b.flags}] [{b.operands}]: {p}")
    print(f"{len(builds)} builds ({len(args.arch)} architectures), {len(bad)} problems, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
