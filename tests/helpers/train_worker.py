"""Run the trainer in a subprocess (plain python or `accelerate launch`) for the trainer tests.

    python tests/helpers/train_worker.py OUT_DIR [--resume] [key.sub=value ...]

Writes OUT_DIR/rank<r>_groups.json (the group keys this rank trained on, per step) and, on the main process,
OUT_DIR/final.pt (the policy's state dict) and OUT_DIR/world.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    import rarl_fast.runtime as runtime
    from rarl_fast.config_loader import load_config
    from rarl_fast.train import train

    out = Path(sys.argv[1])
    resume = "--resume" in sys.argv
    overrides = [a for a in sys.argv[2:] if a != "--resume"]
    seen: list[list[list[str]]] = []
    original = runtime.Runtime.my_groups

    def recording_share(self, items):
        mine = original(self, items)
        seen.append([list(g.key) for g in mine])
        return mine

    runtime.Runtime.my_groups = recording_share
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml", overrides)
    rt = train(cfg, resume=resume)
    rank = rt.acc.process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}_groups.json").write_text(json.dumps(seen))
    if rt.acc.is_main_process:
        state = {k: v.detach().cpu().clone() for k, v in rt.hf_model.state_dict().items()}
        torch.save(state, out / "final.pt")
        (out / "world.json").write_text(json.dumps({"world_size": rt.acc.num_processes}))
    rt.acc.wait_for_everyone()


if __name__ == "__main__":
    main()
