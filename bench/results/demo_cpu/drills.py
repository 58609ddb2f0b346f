"""Probe: SFT with text-only sorting drills in every step (a prototype, not a trainer feature yet).

    python bench/results/demo_cpu/drills.py WARM_START_DIR OUT_DIR STEPS DRILL_ROWS [key.sub=value ...]

Each SFT step of `rarl-fast sft` (configs/demo_cpu.yaml with `rmo.think=readings`) first adds the gradient of
DRILL_ROWS text-only rows: the demo's chat prompt for N in {2, 4, 8} without the images, the `readings` reasoning
of N distinct values in 0..9 appended to the prompt, the loss (token mean) on the sorted answer. Then the model is
evaluated on the demo's test groups. The drill rows of probes.md's seventh-session section come from it.
"""

import random
import sys
from pathlib import Path

import torch

import rarl_fast.sft as sft
from rarl_fast.commands import run_eval, run_sft, with_model
from rarl_fast.config import load_config
from rarl_fast.data.prompts import build_messages
from rarl_fast.rl.rmo import gt_answer

ROOT = Path(__file__).resolve().parents[3]


def drill_batch(rt, rows: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, attention mask and labels (-100 outside the answer) of `rows` drill rows, right-padded."""
    tok = rt.tokenizer
    prompts, answers = [], []
    for _ in range(rows):
        n = rng.choice([2, 4, 8])
        values = [float(v) for v in rng.sample(range(10), n)]
        messages = build_messages(n, "number of shapes", "an integer from 0 to 9")
        messages[1]["content"] = [p for p in messages[1]["content"] if p["type"] == "text"]
        chat = rt.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        think, answer = gt_answer(values, think="readings").split("</think>")
        prompts.append(tok(chat + think + "</think>", add_special_tokens=False)["input_ids"])
        answers.append(tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"])
    length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((rows, length), tok.pad_token_id)
    labels = torch.full((rows, length), -100)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, mask, labels


if __name__ == "__main__":
    warm, out_dir, steps, rows = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng, image_step, losses = random.Random(0), sft.sft_step, []

    def step_with_drills(rt, groups, lr):
        ids, mask, labels = (t.to(rt.device) for t in drill_batch(rt, rows, rng))
        loss = rt.hf_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            print(f"[drills] step {len(losses)}: drill loss {sum(losses[-20:]) / 20:.4f}", flush=True)
        return image_step(rt, groups, lr)

    sft.sft_step = step_with_drills
    overrides = ["logging.progress_bar=false", "rmo.think=readings", "rollout.max_new_tokens=200", *sys.argv[5:]]
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", overrides)
    model = run_sft(with_model(cfg, warm), steps=steps, run_dir=out_dir / "sft")
    res = run_eval(with_model(cfg, model), "drilled", run_dir=out_dir / "sft")
    print("[drills]", {n: (round(c.value, 3), round(c.failure_rate, 3)) for n, c in res.items()}, flush=True)
