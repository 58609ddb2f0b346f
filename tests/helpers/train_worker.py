"""Run the trainer in a subprocess (plain python or `accelerate launch`) for the trainer tests.

    python tests/helpers/train_worker.py OUT_DIR [--resume] [--eval] [key.sub=value ...]

Writes OUT_DIR/rank<r>_groups.json (the group keys this rank trained on, per step), OUT_DIR/rank<r>_params.json
(per parameter: whether it is a DTensor, the elements this rank holds and the whole tensor's; whether the input and
output embeddings are one parameter; whether gradient checkpointing is on; the classes of the FSDP2 units) and, on
the main process, OUT_DIR/final.pt (the policy's whole state dict, gathered when sharded) and OUT_DIR/world.json.
The run folder gets the final ``model/`` the way ``rarl-fast train`` writes it; ``--eval`` then evaluates that
folder the way ``rarl-fast eval`` does, under the same launch (``eval/final.jsonl`` in the run folder).
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
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import rarl_fast.runtime as runtime
    from rarl_fast.cli import _leave_process_group
    from rarl_fast.commands import run_eval, save_final, with_model
    from rarl_fast.config_loader import load_config
    from rarl_fast.train import train

    out = Path(sys.argv[1])
    flags = {"--resume", "--eval"}
    overrides = [a for a in sys.argv[2:] if a not in flags]
    seen: list[list[list[str]]] = []
    original = runtime.Runtime.my_groups

    def recording_share(self, items):
        mine = original(self, items)
        seen.append([list(g.key) for g in mine])
        return mine

    runtime.Runtime.my_groups = recording_share
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml", overrides)
    rt = train(cfg, resume="--resume" in sys.argv)
    save_final(rt, rt.run_dir / "model")
    rank = rt.acc.process_index
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}_groups.json").write_text(json.dumps(seen))
    params = {
        name: {"dtensor": isinstance(p, DTensor), "local": (p.to_local() if isinstance(p, DTensor) else p).numel(),
               "whole": p.numel()}
        for name, p in rt.policy.named_parameters()
    }  # fmt: skip
    tied = rt.hf_model.get_output_embeddings().weight is rt.hf_model.get_input_embeddings().weight
    checkpointing = rt.hf_model.is_gradient_checkpointing
    units = [type(m).__name__ for m in rt.policy.modules() if isinstance(m, FSDPModule)]
    (out / f"rank{rank}_params.json").write_text(
        json.dumps({"params": params, "tied": tied, "gradient_checkpointing": checkpointing, "units": units})
    )
    state = rt.full_weights()  # gathered on the main process when sharded (all processes take part)
    if rt.acc.is_main_process:
        if state is None:
            state = {k: v.detach().cpu().clone() for k, v in rt.hf_model.state_dict().items()}
        torch.save(state, out / "final.pt")
        (out / "world.json").write_text(json.dumps({"world_size": rt.acc.num_processes}))
    rt.acc.wait_for_everyone()
    if "--eval" in sys.argv:
        run_eval(with_model(cfg, rt.run_dir / "model"), "final", run_dir=rt.run_dir)
    _leave_process_group()  # as the CLI does: a rank that exits with the gloo group alive can abort


if __name__ == "__main__":
    main()
