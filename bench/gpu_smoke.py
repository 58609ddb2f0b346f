"""Smoke part of bench/gpu_check.sh: the tiny VLM end to end on the device (load, generate, train step).

Checks that the model path (dtype, attention choice, Liger patch) works on the lent GPU and records its
throughput at toy size; ``--device cpu`` runs the same on the CPU (gpu_check.sh --dry-run).
Writes ``gpu_smoke_<slug>.csv`` to $RARL_BENCH_OUT (default bench/results).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from _results import append_csv, device_label, git_commit, results_dir
from PIL import Image

from rarl_fast.data.prompts import build_messages
from rarl_fast.model import choose_attn_implementation, load_model, load_processor, make_tiny_vlm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # deliberate host sync: timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_vlm(Path(tmp) / "tiny")
        processor = load_processor(path)
        model = load_model(path, device=device)
        attn = choose_attn_implementation("auto", device)
        images = [Image.new("RGB", (112, 112), (40 * i, 90, 200 - 20 * i)) for i in range(4)]
        text = processor.apply_chat_template(
            build_messages(4, "age", "an integer from 0 to 116"), add_generation_prompt=True
        )
        enc = processor(text=[text] * args.samples, images=[images] * args.samples, return_tensors="pt", padding=True)
        enc = enc.to(device)

        model.eval()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=4, do_sample=True)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True)
            _sync(device)
            gen_s = time.perf_counter() - t0
        new_tokens = (out.shape[1] - enc["input_ids"].shape[1]) * args.samples

        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        batch = dict(enc)
        batch["labels"] = enc["input_ids"].clone()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        _sync(device)
        step_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")

    slug = os.environ.get("RARL_GPU_SLUG", device.type)
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "device": device_label(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        "torch": torch.__version__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn": attn,
        "gen_tokens_per_s": round(new_tokens / gen_s, 1),
        "train_step_ms": round(step_s * 1e3, 2),
        "train_loss": round(loss.item(), 4),
        "peak_mem_mib": round(peak, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in row.items()))
    append_csv(results_dir() / f"gpu_smoke_{slug}.csv", list(row), [row])


if __name__ == "__main__":
    main()
