"""One branch of the demo (RARL, or as many SFT steps as RARL takes) from a given warm start, then its evaluation.

    python bench/results/demo_cpu/branch.py WARM_START_DIR OUT_DIR rarl|sft [key.sub=value ...]

Runs alone or under `accelerate launch` (2 CPU processes, as the demo); the frozen-vision rows of probes.md come
from it with `model.freeze_vision=true`. Prints the evaluation as {N: (metric, failure rate)}.
"""

import sys
import time
from pathlib import Path

from rarl_fast.commands import run_eval, run_rarl, run_sft, with_model
from rarl_fast.config import load_config

ROOT = Path(__file__).resolve().parents[3]

if __name__ == "__main__":
    warm, out_dir, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["logging.progress_bar=false", *sys.argv[4:]])
    t0 = time.time()
    if what == "rarl":
        model = run_rarl(with_model(cfg, warm), run_dir=out_dir / "rarl")
    else:
        steps = sum(s.steps for s in (cfg.stage1, cfg.stage2) if s.enabled)
        model = run_sft(with_model(cfg, warm), steps=steps, run_dir=out_dir / "sft_continued")
    res = run_eval(with_model(cfg, model), what, run_dir=model.parent)
    cells = {n: (round(c.value, 4), round(c.failure_rate, 4)) for n, c in res.items()}
    print(f"[branch] {what}: {round(time.time() - t0)} s, {cells}", flush=True)
