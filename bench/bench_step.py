"""One full RARL training step (rollout, reward, RMO, update): our fused kernels vs the same step with
``impl=torch`` (materialized logits) and with Liger's ``LigerFusedLinearGRPOLoss``, side by side in one run.

Models are random-init Qwen2.5-VL of named shapes, nothing downloaded:
- ``tiny``: the test model (hidden 128, 2 layers, vocab 512);
- ``qwen2.5-vl-3b`` / ``qwen2.5-vl-7b``: the real text and vision widths (hidden 2048 / 3584, vocab 151936 /
  152064, tied embeddings on 3B; vision 1280 wide, 14-px patches, 2x2 merge, 112-px attention windows) with
  the text depth cut to ``--layers`` (default 8) and the vision depth to ``--vision-layers`` window-attention
  blocks, a full-attention block after every 7 and at the end as in the real tower (default 28: the real 32
  blocks), so that fp32 master weights + AdamW fit one GPU (or a CPU); images are resized to
  ``--image-px`` squared (default 448: 256 visual tokens each). The printed header says which depths ran.

Every provider runs in its own subprocess (peak memory is its own) on identical rollouts (counter-based
seeds; EOS ignored so every completion has ``--new-tokens`` tokens): B prompts of the synthetic benchmark
with ``--images`` images each (cycled), G samples each, RMO on. Phases timed: rollout, reward (+ RMO +
advantages), update (reference log-probs, forward + backward, optimizer step), each with its own peak memory:
``max_memory_allocated`` on CUDA, the peak resident set (VmHWM, reset at the phase start) on a Linux CPU.
Rows appended to ``bench/results/step.csv``.

    python bench/bench_step.py --model tiny                       # CPU
    python bench/bench_step.py --model qwen2.5-vl-3b --device cuda --layers 4
    python bench/bench_step.py --model qwen2.5-vl-3b --layers 1 --vision-layers 1 --prompts 2 --images 1,4 \
        --G 2 --new-tokens 32 --providers ours,torch --reps 1   # one real-width step on a CPU
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

from _results import append_csv, device_label, git_commit, results_dir

MODELS = {
    "tiny": dict(),
    "qwen2.5-vl-3b": dict(
        hidden_size=2048,
        vision_depth=32,
        vision_hidden_size=1280,
        vocab_size=151936,
        text_overrides=dict(
            intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True
        ),
        vision_overrides=dict(
            intermediate_size=3420, num_heads=16, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]
        ),
    ),
    "qwen2.5-vl-7b": dict(
        hidden_size=3584,
        vision_depth=32,
        vision_hidden_size=1280,
        vocab_size=152064,
        text_overrides=dict(intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4),
        vision_overrides=dict(
            intermediate_size=3420, num_heads=16, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]
        ),
    ),
}


def vision_layout(window_blocks: int) -> dict:
    """Vision depth and full-attention block indexes for `window_blocks` window-attention blocks: a full-attention
    block after every 7 and at the end, as Qwen2.5-VL's 32 blocks (28 window, full at 7, 15, 23, 31)."""
    depth = window_blocks + math.ceil(window_blocks / 7)
    full = [i for i in range(depth) if (i + 1) % 8 == 0 or i == depth - 1]
    return dict(vision_depth=depth, fullatt_block_indexes=full)


def random_init_model(model_dir: str, device, dtype):
    """The model of a ``make_tiny_vlm(..., weights=False)`` folder, instantiated on ``device`` with random weights
    (3B widths: no weight file to write and read back)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device(device):
        return AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(model_dir), attn_implementation="sdpa", dtype=dtype
        )


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()  # deliberate host sync: phase timing


class PhasePeak:
    """Peak memory of one phase: CUDA's allocator peak, or on a CPU the process's peak resident set (Linux
    VmHWM, which writing 5 to /proc/self/clear_refs resets to the current RSS)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def mib(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 1024


def _loss_fn(provider: str, settings, counts):
    """(states, weight, advantages, logp_ref) -> loss, per provider."""
    import torch

    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=settings.beta_kl,
            compiled=torch.cuda.is_available(),
            use_ref_model=True,
            epsilon_low=settings.eps_low,
            epsilon_high=settings.eps_high,
            loss_type="dapo",
            max_completion_length=settings.max_completion_length,
            temperature=settings.temperature,
        )

        def run(states, weight, adv, logp_ref):
            loss, _ = liger(
                states.hidden,
                weight,
                states.labels,
                states.mask.long(),
                adv,
                ref_per_token_logps=logp_ref,
                num_items_in_batch=counts.tokens,
            )
            return loss

        return run
    from rarl_kernels import fused_linear_grpo_loss

    impl = "torch" if provider == "torch" else None

    def run(states, weight, adv, logp_ref):
        loss, _ = fused_linear_grpo_loss(
            states.hidden, weight, states.labels, states.mask, adv, logp_ref=logp_ref, beta=settings.beta_kl,
            eps_low=settings.eps_low, eps_high=settings.eps_high, loss_type="dapo", num_items_in_batch=counts.tokens,
            temperature=settings.temperature, impl=impl,
        )  # fmt: skip
        return loss

    return run


def _worker(args: dict, provider: str, queue) -> None:
    import torch

    from rarl_fast.config_loader import config_from_dict
    from rarl_fast.data import build_train_groups, collate
    from rarl_fast.data.images import ImageCache
    from rarl_fast.data.samples import TaskData
    from rarl_fast.data.synthetic import load_synthetic
    from rarl_fast.model import load_processor
    from rarl_fast.policy import CompletionStates, LossSettings, StepCounts, completion_states
    from rarl_fast.rewards import score
    from rarl_fast.rl.advantages import group_advantages
    from rarl_fast.rl.rmo import mutate_responses
    from rarl_fast.rl.splice import completion_texts, splice_references
    from rarl_fast.rollout import GenerationParams, HFEngine
    from rarl_fast.train import rmo_settings
    from rarl_kernels import fused_linear_logprobs, fused_linear_logprobs_ref

    device = torch.device(args["device"])
    torch.manual_seed(0)
    processor = load_processor(args["model_dir"])  # its pixel bounds were saved with the model (--image-px)
    model = random_init_model(args["model_dir"], device, torch.float32)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train, _, report = load_synthetic("shapes", train_size=256, test_size=8, seed=0)
    task = TaskData(
        "synthetic:shapes", train, [], "number of shapes", "an integer from 0 to 9", 2.0, 0, 9, "accuracy", report
    )
    counts = args["images"]
    groups = build_train_groups(task, sorted(set(counts)), seed=0, groups_per_n=8)
    batch_groups = [groups[n][i] for i, n in enumerate(counts * (args["prompts"] // len(counts)))]
    cache = ImageCache.for_processor(processor)
    engine = HFEngine(model, processor.tokenizer, eos_token_ids=[])
    params = GenerationParams(max_new_tokens=args["new_tokens"], seed=0)
    cfg = config_from_dict({"rollout": {"max_new_tokens": args["new_tokens"]}, "rmo": {"p_mut": 1.0}})
    settings = LossSettings.from_config(cfg)
    rmo = rmo_settings(cfg, 0.5, 0.5, processor.tokenizer.eos_token)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    head = model.get_output_embeddings()
    impl = "torch" if provider == "torch" else None
    logprobs = fused_linear_logprobs_ref if provider == "torch" else fused_linear_logprobs

    peak = PhasePeak(device)

    def step() -> dict:
        mem = {}
        peak.reset()
        t0 = time.perf_counter()
        batch = collate(processor, batch_groups, cache).to(device)
        with torch.no_grad(), autocast:
            ro = engine.generate(batch, args["G"], params)
        _sync(device)
        t1 = time.perf_counter()
        mem["peak_rollout_mib"] = peak.mib()
        peak.reset()
        texts = completion_texts(ro, processor.tokenizer)
        G = args["G"]
        rb = score(
            texts, [g.values for g in batch_groups for _ in range(G)], tolerance=2.0, alpha=0.5, beta=0.5, lam=0.2
        )
        res = mutate_responses(
            rb.total.view(len(batch_groups), G), [g.values for g in batch_groups], rmo,
            seeds=list(range(len(batch_groups))), tolerance=2.0,
        )  # fmt: skip
        ro = splice_references(ro, res.mutated, res.ref_texts, processor.tokenizer)
        adv = group_advantages(res.rewards).reshape(-1).float().to(device)
        t2 = time.perf_counter()
        mem["peak_reward_mib"] = peak.mib()
        peak.reset()
        counts = StepCounts(tokens=int(ro.completion_mask.sum()), rows=ro.num_rows)
        loss_fn = _loss_fn(provider, settings, counts)
        mb = args["micro_batch"]
        for i in range(0, ro.num_rows, mb):
            part = ro.select(list(range(i, min(i + mb, ro.num_rows))))
            with autocast:
                with torch.no_grad():
                    ref_states = completion_states(model, part)
                    R, T, H = ref_states.hidden.shape
                    kw = {} if provider == "torch" else {"impl": impl}
                    logp_ref = logprobs(
                        ref_states.hidden.reshape(R * T, H), head.weight, part.completion_ids.reshape(-1), **kw
                    ).view(R, T)
                    del ref_states
                states: CompletionStates = completion_states(model, part)
                loss = loss_fn(states, head.weight, adv[i : i + mb], logp_ref)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        mem["peak_update_mib"] = peak.mib()
        tokens = int(ro.completion_mask.sum() + ro.prompt_mask.sum())
        return {
            **mem,
            "rollout_s": t1 - t0,
            "reward_rmo_s": t2 - t1,
            "update_s": t3 - t2,
            "step_s": t3 - t0,
            "tokens": tokens,
            "samples": ro.num_rows,
        }

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args["warmup"]:
        step()  # compilation, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [step() for _ in range(args["reps"])]
    r = {k: sum(x[k] for x in runs) / len(runs) for k in runs[0]}
    r.update({k: max(x[k] for x in runs) for k in runs[0] if k.startswith("peak_")})
    # whole run: the CUDA allocator's peak (phases included); on a CPU the max RSS growth over the base
    whole = (
        max(r["peak_rollout_mib"], r["peak_reward_mib"], r["peak_update_mib"])
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    queue.put(
        {
            "provider": provider,
            **r,
            "tokens_per_s": r["tokens"] / r["step_s"],
            "samples_per_s": r["samples"] / r["step_s"],
            "peak_mib": whole,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--providers", default="ours,torch,liger")
    ap.add_argument("--layers", type=int, default=8, help="text depth of the 3B/7B shapes")
    ap.add_argument(
        "--vision-layers",
        type=int,
        default=28,
        help="window-attention blocks of the 3B/7B vision tower (+ a full-attention block per 7)",
    )
    ap.add_argument("--image-px", type=int, default=None, help="image side in px (3B/7B default 448)")
    ap.add_argument("--images", default="1,2,4,8", help="images per prompt, cycled over the prompts")
    ap.add_argument("--prompts", type=int, default=4, help="B, a multiple of the --images list's length")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-warmup", action="store_true", help="time the first step (no warm-up step)")
    args = ap.parse_args()
    images = [int(n) for n in args.images.split(",")]
    if args.prompts % len(images):
        ap.error(f"--prompts {args.prompts} is not a multiple of the {len(images)} image counts in --images")
    image_px = args.image_px or (None if args.model == "tiny" else 448)

    import torch

    from rarl_fast.model import make_tiny_vlm

    spec = dict(MODELS[args.model])
    if args.model != "tiny":
        layout = vision_layout(args.vision_layers)
        spec.update(num_layers=args.layers, vision_depth=layout["vision_depth"])
        spec["vision_overrides"] = dict(spec["vision_overrides"], fullatt_block_indexes=layout["fullatt_block_indexes"])
        if image_px is not None:
            spec.update(min_pixels=image_px * image_px, max_pixels=image_px * image_px)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_vlm(Path(tmp) / "m", weights=args.model == "tiny", **spec)
        job = {"model_dir": str(model_dir), "device": args.device, "prompts": args.prompts, "G": args.G,
               "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "reps": args.reps,
               "images": images, "warmup": not args.no_warmup}  # fmt: skip
        ctx = mp.get_context("spawn")
        for provider in args.providers.split(","):
            queue = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(job, provider, queue))
            proc.start()
            rows.append(queue.get(timeout=3000))
            proc.join()
    base = next((r for r in rows if r["provider"] == "torch"), rows[0])
    dev = device_label(torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    depth = ""
    if args.model != "tiny":
        vision = vision_layout(args.vision_layers)
        depth = (f", text depth {args.layers}, vision depth {vision['vision_depth']} (full attention at "
                 f"{vision['fullatt_block_indexes']})")  # fmt: skip
    print(
        f"step bench: model={args.model}{depth} B={args.prompts} images={images} px={image_px or 'default'} "
        f"G={args.G} new_tokens={args.new_tokens} device={dev}"
    )
    cols = [
        ("provider", 8, "s"), ("step_s", 8, ".2f"), ("rollout_s", 9, ".2f"), ("reward_rmo_s", 12, ".3f"),
        ("update_s", 8, ".2f"), ("tokens_per_s", 12, ".0f"), ("samples_per_s", 13, ".2f"),
        ("peak_rollout_mib", 16, ".0f"), ("peak_reward_mib", 15, ".0f"), ("peak_update_mib", 15, ".0f"),
        ("peak_mib", 9, ".0f"),
    ]  # fmt: skip
    print(" ".join(f"{name:>{w}}" for name, w, _ in cols) + "  update vs torch")
    for r in rows:
        cells = " ".join(f"{r[name]:>{w}{fmt}}" for name, w, fmt in cols)
        print(f"{cells}  {base['update_s'] / r['update_s']:.2f}x")
    commit = git_commit()
    fields = ["date", "commit", "device", "torch", "model", "layers", "B", "G", "new_tokens", "provider", "step_s",
              "rollout_s", "reward_rmo_s", "update_s", "tokens_per_s", "samples_per_s", "peak_mib", "vision_layers",
              "images", "image_px", "peak_rollout_mib", "peak_reward_mib", "peak_update_mib"]  # fmt: skip
    out = append_csv(results_dir() / "step.csv", fields, (
        {"date": time.strftime("%Y-%m-%d"), "commit": commit, "device": dev, "torch": torch.__version__,
         "model": args.model, "layers": args.layers if args.model != "tiny" else 2, "B": args.prompts,
         "G": args.G, "new_tokens": args.new_tokens,
         "vision_layers": args.vision_layers if args.model != "tiny" else "", "images": args.images,
         "image_px": image_px or "", **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}
        for r in rows
    ))  # fmt: skip
    print(f"appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
