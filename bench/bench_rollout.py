"""Rollout benchmark: our shared-prefix HF engine, eager and with its decode step compiled (``--compile``), vs
``model.generate(num_return_sequences=G)``, one run.

Fixed scenario (``--scenario bench``): a random-init Qwen2.5-VL of the same family as the test model but
larger (text: hidden 512, 12 layers, 4 heads / 2 KV heads, vocab 32000; vision: hidden 384, depth 8; the
proportions of transformer, lm_head and vision-tower work per token are kept closer to Qwen2.5-VL-3B's than a
shallow model with a 152k vocabulary would, whose CPU decode is all lm_head), B = 2
prompts, G = 8, 1 and 4 images of 448x448 per prompt (256 visual tokens each), 160 new tokens per completion
with EOS ignored (every provider decodes exactly 160 tokens). ``--scenario qwen2.5-vl-3b`` has Qwen2.5-VL-3B's
text and vision dimensions (``bench_step.py``'s) with the text depth cut to ``--layers``, random weights in
bf16 on CUDA, 128 new tokens: its ``ms/step`` is the time of one decode step at 3B width. ``--scenario toy``
is a seconds-long version for ``gpu_check.sh --dry-run``.

Each provider runs in its own subprocess so that peak memory (max RSS growth on CPU, ``max_memory_allocated``
on CUDA) is its own: a first call of 4 tokens (``first s``: warm-up, with the compile and CUDA-graph recording of
a compiled step), then a call with one new token (``prefill s``: images, pre-fill, first token) and the timed full call
(``wall s``); ``ms/step`` is (wall - prefill) / (new tokens - 1), one decode step for all B * G rows. Prints a
table with ratios to ``num_return_sequences``; appends rows to ``bench/results/rollout.csv`` (or
``$RARL_BENCH_OUT``).

    python bench/bench_rollout.py                                   # CPU, fixed scenario
    python bench/bench_rollout.py --images 4 --compile              # + the compiled decode step
    python bench/bench_rollout.py --device cuda --compile           # GPU part of gpu_check.sh
    python bench/bench_rollout.py --device cuda --scenario qwen2.5-vl-3b --layers 4 --compile
    python bench/bench_rollout.py --device cuda --backend sglang   # also SGLang's engine (sglang installed)

``--backend sglang`` adds a third provider, SGLang's offline engine through our backend (G seeded requests per
prompt after a prefix pre-fill, EOS ignored), on the same model and inputs. Its peak memory is not reported:
SGLang allocates in its own scheduler process (``mem_fraction_static`` of the GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

from _results import append_csv, device_label, git_commit, results_dir
from bench_step import MODELS, random_init_model

SCENARIOS = {
    "bench": dict(
        model=dict(hidden_size=512, num_layers=12, vision_depth=8, vision_hidden_size=384, vocab_size=32000),
        image_px=448,
        prompts=2,
        G=8,
        new_tokens=160,
    ),
    "qwen2.5-vl-3b": dict(model=MODELS["qwen2.5-vl-3b"], image_px=448, prompts=2, G=8, new_tokens=128, weights=False),
    "toy": dict(model=dict(), image_px=112, prompts=2, G=4, new_tokens=8),
}


def _images(n_images: int, prompts: int, px: int) -> list:
    from PIL import Image

    return [[Image.new("RGB", (px, px), (17 * i + 40 * p, 90, 160)) for i in range(n_images)] for p in range(prompts)]


def _build_inputs(processor, n_images: int, prompts: int, px: int):
    from rarl_fast.data.prompts import build_messages

    text = processor.apply_chat_template(
        build_messages(n_images, "age", "an integer from 0 to 116"), add_generation_prompt=True
    )
    images = _images(n_images, prompts, px)
    return processor(text=[text] * prompts, images=images, return_tensors="pt", padding=True)


def _load(model_dir: str, sc: dict, device: str):
    import torch

    from rarl_fast.model import load_model

    if sc.get("weights", True):
        return load_model(model_dir, device=device, trainable=False)
    model = random_init_model(model_dir, device, torch.bfloat16 if device == "cuda" else torch.float32)
    return model.eval().requires_grad_(False)


def _worker(model_dir: str, provider: str, compile_mode: str, n_images: int, sc: dict, device: str, queue) -> None:
    import torch

    from rarl_fast.model import load_processor
    from rarl_fast.rollout import GenerationParams, HFEngine

    if sc.get("threads"):
        torch.set_num_threads(sc["threads"])
    torch.manual_seed(0)
    px = sc["image_px"]
    processor = load_processor(model_dir, min_pixels=px * px, max_pixels=px * px)
    model = _load(model_dir, sc, device)
    enc = _build_inputs(processor, n_images, sc["prompts"], px).to(device)
    G = sc["G"]
    engine = HFEngine(model, processor.tokenizer, eos_token_ids=[], compile=compile_mode)  # EOS ignored
    if provider == "sglang":
        from rarl_fast.rollout.sglang import SGLangEngine

        engine = SGLangEngine(model_dir, processor.tokenizer, eos_token_ids=[], mem_fraction_static=0.3)
        enc["images"] = _images(n_images, sc["prompts"], px)

    def run(new: int) -> int:
        if provider in ("shared_prefix", "sglang"):
            ro = engine.generate(enc, G, GenerationParams(max_new_tokens=new, seed=0))
            return int(ro.completion_ids.numel())
        out = model.generate(
            **enc, do_sample=True, num_return_sequences=G, max_new_tokens=new, min_new_tokens=new, top_k=0, top_p=1.0
        )
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    def timed(new: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        generated = run(new)
        if device == "cuda":
            torch.cuda.synchronize()  # deliberate host sync: timing
        return time.perf_counter() - t0, generated

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    new = sc["new_tokens"]
    first, _ = timed(min(new, 4))  # warm-up: 3 steps compile, warm up and record a compiled step's CUDA graph
    prefill, _ = timed(1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall, generated = timed(new)
    if provider == "sglang":
        peak_mib = float("nan")  # SGLang allocates in its own scheduler process
    elif device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    prompt_tokens = int(enc["attention_mask"].sum()) * G  # prompt tokens served (per sample)
    queue.put(
        {
            "provider": provider,
            "compile": compile_mode,
            "images": n_images,
            "wall_s": wall,
            "prefill_s": prefill,
            "ms_per_step": 1000 * (wall - prefill) / (new - 1) if new > 1 else math.nan,
            "first_s": first,
            "prompt_tok_per_s": prompt_tokens / wall,
            "gen_tok_per_s": generated / wall,
            "peak_mib": peak_mib,
            "prompt_len": int(enc["input_ids"].shape[1]),
            "threads": torch.get_num_threads() if device == "cpu" else "",
        }
    )


def _measure(model_dir: str, provider: str, compile_mode: str, n_images: int, sc: dict, device: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(model_dir, provider, compile_mode, n_images, sc, device, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="bench")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--layers", type=int, default=4, help="text depth of the qwen2.5-vl-3b scenario")
    ap.add_argument(
        "--compile",
        nargs="?",
        const="auto",
        choices=["auto", "default", "reduce-overhead"],
        help="also the shared-prefix engine with rollout.compile=MODE (auto: reduce-overhead on CUDA, else default)",
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip num_return_sequences (slow at 3B dims)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 steadies figures on a shared machine)")
    ap.add_argument("--backend", choices=("hf", "sglang"), default="hf", help="sglang: also time SGLang's engine")
    args = ap.parse_args()
    if args.backend == "sglang" and args.device != "cuda":
        ap.error("--backend sglang needs --device cuda (SGLang's engine has no CPU build)")
    sc = dict(SCENARIOS[args.scenario])
    if args.threads:
        sc["threads"] = args.threads
    scenario = args.scenario
    if scenario == "qwen2.5-vl-3b":
        sc["model"] = {**sc["model"], "num_layers": args.layers}
        scenario += f"/L{args.layers}"
    providers = [] if args.no_baseline else [("num_return_sequences", "off")]
    providers.append(("shared_prefix", "off"))
    if args.compile:
        mode = args.compile if args.compile != "auto" else "reduce-overhead" if args.device == "cuda" else "default"
        providers.append(("shared_prefix", mode))
    if args.backend == "sglang":
        providers.append(("sglang", "off"))

    import torch

    from rarl_fast.model import make_tiny_vlm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(
            make_tiny_vlm(
                Path(tmp) / "m", max_pixels=sc["image_px"] ** 2, weights=sc.get("weights", True), **sc["model"]
            )
        )
        for n_images in args.images:
            measured = [_measure(model_dir, p, mode, n_images, sc, args.device) for p, mode in providers]
            base = measured[0]
            for r in measured:
                r["speedup"] = base["wall_s"] / r["wall_s"]
                r["mem_ratio"] = r["peak_mib"] / base["peak_mib"] if base["peak_mib"] else float("nan")
                rows.append(r)

    device_name = device_label(torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    print(f"rollout bench: scenario={scenario} {json.dumps(sc)} device={device_name}")
    print(f"speedup: {rows[0]['provider']}'s wall time / the provider's")
    cols = [("images", 6), ("provider", 22), ("compile", 15), ("wall s", 8), ("prefill s", 9), ("ms/step", 8),
            ("first s", 8), ("gen tok/s", 10), ("peak MiB", 9), ("speedup", 8)]  # fmt: skip
    print(" ".join(f"{name:>{width}}" for name, width in cols))
    for r in rows:
        print(
            f"{r['images']:>6} {r['provider']:>22} {r['compile']:>15} {r['wall_s']:>8.2f} {r['prefill_s']:>9.2f} "
            f"{r['ms_per_step']:>8.1f} {r['first_s']:>8.2f} {r['gen_tok_per_s']:>10.0f} {r['peak_mib']:>9.0f} "
            f"{r['speedup']:>7.2f}x"
        )
    commit = git_commit()
    fields = ["date", "commit", "device", "torch", "scenario", "images", "provider", "wall_s", "prompt_tok_per_s",
              "gen_tok_per_s", "peak_mib", "speedup", "compile", "prefill_s", "ms_per_step", "first_s",
              "threads"]  # fmt: skip
    path = append_csv(
        results_dir() / "rollout.csv",
        fields,
        (
            {
                "date": time.strftime("%Y-%m-%d"),
                "commit": commit,
                "device": device_name,
                "torch": torch.__version__,
                "scenario": scenario,
                **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()},
            }
            for r in rows
        ),
    )
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
