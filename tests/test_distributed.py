"""Training across processes on the CPU (gloo) under `accelerate launch`: DDP, FSDP2 (sharded by
rarl_fast.sharding, launched with the shipped configs/accelerate/fsdp2.yaml) and a two-launch multi-node run each
train the tiny VLM (tied embeddings, RMO firing) exactly like one process; sharded checkpoints resume after
kill -9 and pass over torn ones; the gathered model/ reloads and evaluates like the one-process model."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rarl_fast.checkpoint import (
    CheckpointError,
    ShardedState,
    checkpoint_problem,
    complete_checkpoints,
    resume_checkpoint,
)
from rarl_fast.config_loader import load_config
from rarl_fast.tracking import read_metrics
from tests.test_train import ROOT, _finish, _worker, tiny_overrides

ACCELERATE = Path(sys.executable).parent / "accelerate"
FSDP2_YAML = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
# lr 1e-4 and adam_eps 1e-6: AdamW turns gradient entries that are zero up to rounding into full-size steps; a
# smaller step and eps keep the summation-order noise of 2 processes (about 1e-7 relative) from being amplified.
# With a padded-token budget each rank plans its micro-batches from its own lengths; the ranks then agree on the
# largest count (Runtime.micro_batches), which FSDP2's per-micro-batch collectives need as much as DDP does.
SAME = {
    "rollout.prompts_per_step": 4,
    "checkpoint.save_every": 0,
    "optim.micro_batch_tokens": 500,
    "stage1.lr": 1e-4,
    "stage2.lr": 1e-4,
    "optim.adam_eps": 1e-6,
}
# a sharded checkpoint after every step and the held-out eval (decoding with the gathered policy) every 2 steps:
# resume-safe keys that leave the training as it is
SHARDED_RUN = {**SAME, "checkpoint.save_every": 1, "logging.eval_every": 2}


def _launch(*args: str, port: int, config: Path | None = None) -> list[str]:
    """`accelerate launch` of CPU processes (ACCELERATE_USE_CPU is set by `_worker`)."""
    if not ACCELERATE.is_file():
        pytest.fail("accelerate's launcher is not installed beside this python")
    conf = ["--config_file", str(config)] if config else ["--multi_gpu", "--num_machines", "1"]
    return [str(ACCELERATE), "launch", *conf, *args, "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]  # fmt: skip


def _kill_9_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it, all at once (nothing when it has ended: its pid is no longer
    ours)."""
    import psutil

    if proc.poll() is not None:
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for p in [*parent.children(recursive=True), parent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)


def _finish_all(*procs: subprocess.Popen, timeout: float = 800) -> list[str]:
    """The output of each process, which must succeed; on a failure or a timeout every process still running is
    killed with its ranks, so that none outlives the test."""
    try:
        return [_finish(p, timeout=timeout) for p in procs]
    except BaseException:
        for p in procs:
            _kill_9_tree(p)
        raise


def _final(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt")


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tied_vlm_dir(tmp_path_factory) -> Path:
    """The tiny VLM with tied input/output embeddings, as Qwen2.5-VL-3B has."""
    from rarl_fast.model import make_tiny_vlm

    return make_tiny_vlm(tmp_path_factory.mktemp("tied_vlm"), seed=0, text_overrides={"tie_word_embeddings": True})


@pytest.fixture(scope="module")
def one_process(tied_vlm_dir, tmp_path_factory) -> Path:
    """The one-process run every multi-process run is compared with: its worker output and run folder."""
    root = tmp_path_factory.mktemp("one_process")
    _finish_all(_worker(root / "out", tiny_overrides(tied_vlm_dir, root, **SAME), evaluate=True))
    return root


@pytest.fixture(scope="module")
def fsdp2_run(tied_vlm_dir, tmp_path_factory) -> Path:
    """2 processes sharded with FSDP2, launched with the shipped fsdp2.yaml (which also turns on
    cpu_ram_efficient_loading: transformers loads placeholders on rank 1, and rank 0's weights are broadcast, by
    the sharding for training and before the final model/'s evaluation under the same launch)."""
    root = tmp_path_factory.mktemp("fsdp2")
    launch = _launch("--num_processes", "2", port=29527, config=FSDP2_YAML)
    overrides = tiny_overrides(tied_vlm_dir, root, **SHARDED_RUN)
    _finish_all(_worker(root / "out", overrides, launch=launch, evaluate=True))
    return root


def _check_shared_global_batch(one: Path, two: Path) -> None:
    """Both ranks of ``two`` drew the same global batches as ``one`` and split them without overlap."""
    r0, r1 = (json.loads((two / f"rank{r}_groups.json").read_text()) for r in (0, 1))
    both = json.loads((one / "rank0_groups.json").read_text())
    assert len(r0) == len(r1) == len(both) == 4
    for a, b, whole in zip(r0, r1, both):
        keys_a, keys_b = {tuple(k) for k in a}, {tuple(k) for k in b}
        assert keys_a and keys_b and not keys_a & keys_b
        assert sorted(keys_a | keys_b) == sorted(tuple(k) for k in whole)


@pytest.mark.timeout(900)
def test_two_process_ddp_matches_one_process(one_process, tied_vlm_dir, tmp_path):
    launch = _launch("--num_processes", "2", port=29517)
    _finish_all(_worker(tmp_path / "out", tiny_overrides(tied_vlm_dir, tmp_path, **SAME), launch=launch))
    assert json.loads((tmp_path / "out" / "world.json").read_text())["world_size"] == 2
    _check_shared_global_batch(one_process / "out", tmp_path / "out")
    params = json.loads((tmp_path / "out" / "rank1_params.json").read_text())["params"]
    assert not any(p["dtensor"] for p in params.values())  # DDP: whole parameters on every rank
    worst = _worst(_final(one_process / "out"), _final(tmp_path / "out"))
    print("ddp worst weight difference", worst)
    assert worst <= 1e-5, worst


@pytest.mark.timeout(900)
def test_fsdp2_matches_one_process_and_shards(one_process, fsdp2_run):
    from rarl_fast.model import load_model

    out = fsdp2_run / "out"
    assert json.loads((out / "world.json").read_text())["world_size"] == 2
    _check_shared_global_batch(one_process / "out", out)
    ranks = [json.loads((out / f"rank{r}_params.json").read_text()) for r in (0, 1)]
    assert all(r["tied"] for r in ranks)  # lm_head and embed_tokens are still one (sharded) parameter
    # the root (embeddings, vision merger, final norm, lm_head) and each vision block and decoder layer of the tiny VLM
    units = ["FSDPPolicyModule", *["FSDPQwen2_5_VLVisionBlock"] * 2, *["FSDPQwen2_5_VLDecoderLayer"] * 2]
    assert all(r["units"] == units for r in ranks), ranks[0]["units"]
    assert not any(r["gradient_checkpointing"] for r in ranks)  # as model.gradient_checkpointing and fsdp2.yaml say
    for name, p in ranks[0]["params"].items():  # every parameter is a DTensor split across the 2 ranks
        q = ranks[1]["params"][name]
        assert p["dtensor"] and q["dtensor"] and p["local"] + q["local"] == p["whole"], name
    held = [sum(p["local"] for p in r["params"].values()) for r in ranks]
    whole = sum(p["whole"] for p in ranks[0]["params"].values())
    assert all(0.45 * whole <= h <= 0.55 * whole for h in held), (held, whole)
    logged = read_metrics(fsdp2_run / "run")
    rows = [r for r in logged if "reward/total" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["rmo/mutated"] > 0 for r in rows if r["stage"] == 2)  # RMO fired in every stage-2 step
    assert [r["step"] for r in logged if "eval/n2/fail" in r] == [0, 2, 4]
    one, two = _final(one_process / "out"), _final(out)
    worst = _worst(one, two)
    print("fsdp2 worst weight difference", worst)
    assert worst <= 1e-5, worst
    assert torch.equal(two["lm_head.weight"], two["model.language_model.embed_tokens.weight"])

    # the final model/ gathered on rank 0: a save_pretrained folder the loader reads, holding the trained weights
    model = load_model(fsdp2_run / "run" / "model", local_files_only=True, trainable=False)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert _worst({k: v for k, v in model.state_dict().items()}, two) == 0.0
    # ... and evaluates (2 processes, each answering half the test groups) like the one-process model (1 process)
    # (the same responses to the same test groups: the same metrics)
    answers = [
        [(a["n"], a["key"], a["truth"], a["response"]) for a in map(json.loads, (run / "eval" / "final.jsonl").open())]
        for run in (one_process / "run", fsdp2_run / "run")
    ]
    assert answers[0] == answers[1] and len(answers[0]) == 2 * 2


@pytest.mark.timeout(900)
def test_fsdp2_resume_after_kill_9_from_sharded_checkpoint(fsdp2_run, tied_vlm_dir, tmp_path):
    """kill -9 of every process mid-run, a torn sharded checkpoint newer than the last whole one, then --resume:
    the torn one is passed over and set aside, and the run ends on the uninterrupted run's weights."""
    run = tmp_path / "run"
    overrides = tiny_overrides(tied_vlm_dir, tmp_path, **SHARDED_RUN)
    launch = _launch("--num_processes", "2", port=29537, config=FSDP2_YAML)
    proc = _worker(tmp_path / "out", overrides, launch=launch)
    target = run / "checkpoint-0000002"  # the end of stage 1
    deadline = time.time() + 600
    try:
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        _kill_9_tree(proc)  # the launcher and both ranks (torchrun starts each rank in a session of its own)
    output = proc.communicate()[0]
    assert target.exists(), output[-4000:]
    done = complete_checkpoints(run)
    assert done and done[-1].name < "checkpoint-0000004" and (done[-1] / "sharded" / ".metadata").is_file()
    torn = run / "checkpoint-0000004"  # newest "complete" checkpoint, but rank 1's shard file is cut short
    shutil.rmtree(torn, ignore_errors=True)
    shutil.copytree(done[-1], torn)
    shard = torn / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    (log,) = _finish_all(_worker(tmp_path / "out", overrides, launch=launch, resume=True))
    assert "checkpoint-0000004 is unusable: sharded/__1_0.distcp has" in log
    assert (run / "checkpoint-0000004.unusable").is_dir() and (run / "checkpoint-0000004" / "sharded").is_dir()
    assert f"resumed from {done[-1]}" in log
    worst = _worst(_final(fsdp2_run / "out"), _final(tmp_path / "out"))
    print("fsdp2 resume worst weight difference", worst)
    assert worst <= 1e-6, worst
    assert [r["step"] for r in read_metrics(run) if "reward/total" in r] == [1, 2, 3, 4]


@pytest.mark.timeout(900)
def test_two_launch_multi_node_matches_one_process(one_process, tied_vlm_dir, tmp_path):
    """Two `accelerate launch` commands, one per "machine" (one CPU process each), meeting at 127.0.0.1: the
    multi-node launch of the README, sharded with FSDP2, on one machine whose run folder both share. The launch
    also sets two knobs of the accelerate FSDP config: activation checkpointing on, and the gathered parameters
    kept from forward to backward (fsdp_reshard_after_forward: false); neither changes the result."""
    overrides = tiny_overrides(tied_vlm_dir, tmp_path, **SAME)
    machines = ["--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    machines += ["--fsdp_activation_checkpointing", "true", "--fsdp_reshard_after_forward", "false"]
    launches = [_launch(*machines, "--machine_rank", str(rank), port=29547, config=FSDP2_YAML) for rank in (0, 1)]
    _finish_all(*[_worker(tmp_path / "out", overrides, launch=launch) for launch in launches])
    assert json.loads((tmp_path / "out" / "world.json").read_text())["world_size"] == 2
    _check_shared_global_batch(one_process / "out", tmp_path / "out")
    rank1 = json.loads((tmp_path / "out" / "rank1_params.json").read_text())
    assert all(p["dtensor"] for p in rank1["params"].values()) and rank1["gradient_checkpointing"]
    worst = _worst(_final(one_process / "out"), _final(tmp_path / "out"))
    print("multi-node worst weight difference", worst)
    assert worst <= 1e-5, worst


def test_sharded_checkpoint_checks(fsdp2_run, one_process, tmp_path):
    """The sharded index and the shard files it points at are checked without loading a tensor (also where the
    COMPLETE marker lists no sizes), and a checkpoint of the other layout is refused before any is set aside."""
    newest = complete_checkpoints(fsdp2_run / "run")[-1]
    assert checkpoint_problem(newest) is None
    copy = tmp_path / newest.name
    shutil.copytree(newest, copy)
    (copy / "COMPLETE").write_text("ok")  # a marker without sizes: only the sharded index can tell
    shard = copy / "sharded" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:100])
    assert checkpoint_problem(copy) == f"sharded/__0_0.distcp has 100 bytes, its index needs {len(data)}"
    shard.unlink()
    assert checkpoint_problem(copy) == "sharded/__0_0.distcp is missing"
    index = copy / "sharded" / ".metadata"
    index.write_bytes(b"")  # cut off before its first byte
    assert checkpoint_problem(copy) == "sharded/.metadata is not readable (EOFError)"

    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True)
    with pytest.raises(CheckpointError, match=r"holds sharded \(FSDP2\) state and this run is not sharded"):
        resume_checkpoint(acc, fsdp2_run / "run")
    one_run = one_process / "run"
    with pytest.raises(CheckpointError, match=r"unsharded \(DDP or one-process\) run and this run is sharded"):
        resume_checkpoint(acc, one_run, shards=ShardedState(module=None, optimizer=None))
    assert not list((fsdp2_run / "run").glob("*.unusable")) and not list(one_run.glob("*.unusable"))


def test_sharding_plan_follows_the_config_and_the_launch(monkeypatch):
    """``distributed.strategy: auto`` shards exactly when accelerate was launched with an FSDP config, whose knobs
    then apply; what FSDP2 here does not do is refused in one line."""
    from rarl_fast.errors import UsageError
    from rarl_fast.sharding import ShardingPlan, sharding_plan

    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
                 "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_TRANSFORMER_CLS_TO_WRAP"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(None, [])
    assert sharding_plan(cfg, 8, "bf16") == ShardingPlan()  # auto without an FSDP launch: DDP
    fsdp2 = load_config(None, ["distributed.strategy=fsdp2"])
    assert sharding_plan(fsdp2, 8, "bf16") == ShardingPlan(sharded=True, bf16=True)
    assert sharding_plan(fsdp2, 1, "bf16") == ShardingPlan()  # one process: nothing to shard
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp2.yaml` exports
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "SHARD_GRAD_OP")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock")
    assert sharding_plan(cfg, 8, "no") == ShardingPlan(
        sharded=True,
        reshard_after_forward=False,
        activation_checkpointing=True,
        unit_classes=("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
    )
    assert sharding_plan(load_config(None, ["distributed.strategy=ddp"]), 8, "no") == ShardingPlan()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UsageError, match="set fsdp_version: 2"):
        sharding_plan(cfg, 8, "no")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(UsageError, match="fsdp_offload_params"):
        sharding_plan(cfg, 8, "no")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    with pytest.raises(UsageError, match="LoRA"):
        sharding_plan(load_config(None, ["model.lora.enabled=true"]), 8, "no")
