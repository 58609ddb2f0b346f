"""Greedy vs sampled answers of one model on the demo's N-image test groups: failure rate and mean tau.

    python bench/results/demo_cpu/sampled.py MODEL_DIR N SCRATCH_DIR

Greedy is one answer per group (as `rarl-fast eval`); sampled is 4 answers per group at the config's temperature
(1.0) with the engine's seeded sampling. The figures of probes.md are N = 4 (run with the package installed).
"""

import sys
from pathlib import Path

import torch

from rarl_fast.config import load_config
from rarl_fast.data import collate
from rarl_fast.metrics import group_kendall
from rarl_fast.rl.splice import completion_texts
from rarl_fast.runtime import build_runtime

ROOT = Path(__file__).resolve().parents[3]


def main(model: str, n: int, scratch: str, samples: int = 4) -> None:
    overrides = [f"model.name_or_path={model}", f"output_dir={scratch}", "run_name=sampled"]
    rt = build_runtime(load_config(ROOT / "configs" / "demo_cpu.yaml", overrides), train=False)
    groups = rt.test_groups[n]
    for greedy in (True, False):
        k = 1 if greedy else samples
        texts, truths = [], []
        for i in range(0, len(groups), 16):
            part = groups[i : i + 16]
            batch = collate(rt.processor, part, rt.cache).to(rt.device)
            with torch.no_grad():
                ro = rt.engine.generate(batch, k, rt.generation_params(seed=None if greedy else 7, greedy=greedy))
            texts += completion_texts(ro, rt.tokenizer)
            truths += [g.values for g in part for _ in range(k)]
        tau, failed = group_kendall(texts, truths)
        mode = "greedy" if greedy else f"{k} samples"
        print(f"N={n} {mode}: fail {float(failed.double().mean()):.3f}, tau {float(tau.mean()):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
