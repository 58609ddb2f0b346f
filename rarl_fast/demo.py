"""The CPU demo as it stands today: a supervised warm start of the tiny VLM on rendered 1-image prompts.

It is the smallest real training that the project can run end to end: build (or reuse) the tiny Qwen2.5-VL,
render METHOD.md's prompts through its chat template, train on ground-truth answers, and score greedy answers
with the ranking-aware reward before and after. The trainer issue replaces it with the full two-stage run.
Its images (grey squares whose brightness level is the target) are a stand-in for the synthetic benchmark.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rarl_fast.config import Config, dump_config
from rarl_fast.data.prompts import build_messages
from rarl_fast.model import choose_dtype, load_model, load_processor, resolve_model_path

RULE = "brightness"
VALUE_RANGE = "an integer from 0 to 9"


@dataclass
class DemoSample:
    image: object  # PIL.Image
    value: int


def demo_samples(n: int, seed: int, size: int = 56) -> list[DemoSample]:
    """``n`` grey squares of brightness level 0..9 (value = level), deterministic by seed."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 10, (n,), generator=g).tolist()
    return [DemoSample(Image.new("RGB", (size, size), (25 * v + 12,) * 3), v) for v in levels]


def answer_text(value: int) -> str:
    """Ground-truth completion for one image, in METHOD.md's format."""
    return (
        f"<think>The brightness is level {value}.</think> <answer>"
        + json.dumps([{"image_id": 1, "value": value}])
        + "</answer>"
    )


def _encode(processor, samples: list[DemoSample], answers: list[str] | None):
    """Batch of prompts (and, for training, prompt + answer + <|im_end|>) with left padding; labels on answers."""
    prompt = processor.apply_chat_template(build_messages(1, RULE, VALUE_RANGE), add_generation_prompt=True)
    texts = [prompt] * len(samples) if answers is None else [prompt + a + "<|im_end|>" for a in answers]
    enc = processor(text=texts, images=[[s.image] for s in samples], return_tensors="pt", padding=True)
    if answers is not None:
        labels = torch.full_like(enc["input_ids"], -100)
        for i, a in enumerate(answers):
            n = len(processor.tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"])
            labels[i, -n:] = enc["input_ids"][i, -n:]
        enc["labels"] = labels
    return enc


@torch.no_grad()
def _greedy_scores(model, processor, samples: list[DemoSample], tolerance: float, max_new_tokens: int):
    from rarl_fast.rewards import score

    model.eval()
    enc = _encode(processor, samples, None).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    rb = score(texts, [[float(s.value)] for s in samples], tolerance=tolerance, alpha=1.0, beta=0.0, lam=0.2)
    model.train()
    return texts, rb


def run_demo(cfg: Config) -> Path:
    """Warm-start the tiny VLM for ``cfg.stage1.steps`` steps; prints loss and reward before/after; returns the
    folder of the saved model."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(cfg.model.name_or_path, cfg.model.tiny_dir)
    processor = load_processor(path, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    model = load_model(path, device=device, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    tolerance = 2.0
    train = demo_samples(512, cfg.seed)
    test = demo_samples(16, cfg.seed + 1)
    max_new = min(cfg.rollout.max_new_tokens, 48)

    texts, before = _greedy_scores(model, processor, test, tolerance, max_new)
    print(f"before: mean reward {before.total.mean():.3f}  format ok {before.format.mean():.2f}  e.g. {texts[0]!r}")

    stage = cfg.stage1
    if stage.steps < 1:
        raise ValueError("the demo trains stage1.steps steps: set stage1.steps >= 1")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=stage.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    warmup = max(1, int(cfg.optim.warmup_ratio * stage.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, stage.steps) / stage.steps))
    )
    batch = cfg.optim.micro_batch_size
    dtype = choose_dtype(cfg.model.dtype, device)
    t0 = time.perf_counter()
    for step in range(stage.steps):
        idx = [(step * batch + i) % len(train) for i in range(batch)]
        chunk = [train[i] for i in idx]
        enc = _encode(processor, chunk, [answer_text(s.value) for s in chunk]).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**enc).loss
        loss.backward()
        if cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, stage.steps // 10) == 0 or step == stage.steps - 1:
            print(f"step {step + 1:4d}/{stage.steps}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)")

    texts, after = _greedy_scores(model, processor, test, tolerance, max_new)
    print(f"after:  mean reward {after.total.mean():.3f}  format ok {after.format.mean():.2f}  e.g. {texts[0]!r}")
    out = run_dir / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (run_dir / "demo_result.json").write_text(
        json.dumps(
            {
                "steps": stage.steps,
                "reward_before": before.total.mean().item(),
                "reward_after": after.total.mean().item(),
                "format_after": after.format.mean().item(),
                "final_loss": loss.item(),
            },
            indent=2,
        )
    )
    print(f"saved {out}")
    return out
