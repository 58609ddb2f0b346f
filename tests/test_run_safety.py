"""Runs that never lose work, on the tiny VLM (CPU): a run folder belongs to one run, a run that trained nothing
fails, ``--resume`` keeps the checkpoint's config, a damaged checkpoint falls back to the previous one, and images
that cannot be read are skipped in training; plus the one-line errors of the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rarl_fast.config_loader import load_config
from rarl_fast.tracking import read_metrics
from tests.test_train import ROOT, _run_inprocess, _weights, tiny_overrides

DEMO = ROOT / "configs" / "demo_cpu.yaml"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(tiny_dir: Path, out: Path, *, resume: bool = False, overwrite: bool = False,
           allow_config_change: bool = False, **extra: object):  # fmt: skip
    from rarl_fast.train import train

    cfg = load_config(DEMO, tiny_overrides(tiny_dir, out, **extra))
    return train(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    from rarl_fast.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _last_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


# ----------------------------------------------------------------------------------------------------------
# 1. A run folder belongs to one run
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_second_train_into_a_run_folder_keeps_the_old_run(tiny_vlm_dir, tmp_path):
    from rarl_fast.run_folder import RunFolderError

    keep = {"checkpoint.keep_last": 2}
    _run_inprocess(tiny_vlm_dir, tmp_path, **keep)  # 2 + 2 steps: checkpoints 3 and 4 kept
    run = tmp_path / "run"
    before = _snapshot(run)
    assert {"checkpoint-0000003/COMPLETE", "checkpoint-0000004/COMPLETE", "metrics.jsonl"} <= set(before)

    shorter = {**keep, "stage1.steps": 1, "stage2.steps": 1, "stage2.lr": 5e-4}
    with pytest.raises(RunFolderError, match=r"run folder .*run holds a previous run \(checkpoint-0000003") as err:
        _train(tiny_vlm_dir, tmp_path, **shorter)
    assert all(word in str(err.value) for word in ("--resume", "run_name", "--overwrite"))
    assert _snapshot(run) == before  # nothing written, nothing deleted

    _train(tiny_vlm_dir, tmp_path, overwrite=True, **shorter)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before  # the old run, whole, beside the new one
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-0000001", "checkpoint-0000002"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert "lr: 0.0005" in (run / "config.yaml").read_text()


class _Writer:
    """Stands in for the accelerator, the model and the processor of ``save_checkpoint``: each writes one file."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "optimizer.bin").write_bytes(b"state")

    def save_pretrained(self, path: Path, **kw) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / f"{type(self).__name__}.txt").write_text("weights")


def test_keep_last_never_deletes_a_checkpoint_of_a_later_step(tmp_path):
    from rarl_fast.checkpoint import complete_checkpoints, save_checkpoint

    w = _Writer()
    for step in (9, 1, 2, 3):  # 9: a later step than this lineage has reached (set aside runs, a fallback)
        save_checkpoint(w, tmp_path, step, model=w, processor=w, trainer_state={"global_step": step}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "checkpoint-0000002", "checkpoint-0000003", "checkpoint-0000009"
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 2. A run that trained nothing fails
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_run_without_a_finite_step_exits_non_zero(tiny_vlm_dir, tmp_path, capsys):
    # temperature 1e-300: every logit over T is infinite, every loss NaN; 1 + 1 steps, fewer than the limit in a row
    nan = {"rollout.temperature": 1e-300, "stage1.steps": 1, "stage2.steps": 1, "optim.max_nonfinite_steps": 10}
    code, out, err = _cli(["train", "--no-eval", "-c", str(DEMO), *tiny_overrides(tiny_vlm_dir, tmp_path, **nan)],
                          capsys)  # fmt: skip
    assert code == 1 and "results" not in out.lower()
    assert _last_error_line(err).startswith("rarl-fast: error: no optimizer step was taken: all 2 had a non-finite")

    # the count in a row goes on across the stage change: 2 in a row stop the run at stage 2's first step
    nan["optim.max_nonfinite_steps"] = 2
    code, _, err = _cli(["train", "--no-eval", "-c", str(DEMO), *tiny_overrides(tiny_vlm_dir, tmp_path / "b", **nan)],
                        capsys)  # fmt: skip
    assert code == 1 and "2 non-finite losses/gradients in a row at stage2 step 0" in _last_error_line(err)


def test_the_share_of_skipped_steps_is_limited():
    from rarl_fast.update import NonFiniteCounter, NonFiniteError

    counter = NonFiniteCounter(limit=5, max_fraction=0.5)
    for finite in (True, False, True, False):
        counter.record(finite, "step")
    counter.check_run()  # 2 of 4 skipped: at the limit, not past it
    counter.record(False, "step")
    with pytest.raises(NonFiniteError, match="3 of 5 optimizer steps were skipped"):
        counter.check_run()


# ----------------------------------------------------------------------------------------------------------
# 3. --resume keeps the checkpoint's config
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_resume_refuses_a_changed_config_unless_allowed(tiny_vlm_dir, tmp_path, capsys):
    from rarl_fast.resume import ResumeConfigError
    from rarl_fast.run_folder import RunFolderError

    short = {"stage1.steps": 1, "stage2.steps": 1}
    _train(tiny_vlm_dir, tmp_path, **short)
    run = tmp_path / "run"
    first = (run / "config.yaml").read_text()

    with pytest.raises(RunFolderError, match=r"--resume: no complete checkpoint in .*elsewhere"):
        _train(tiny_vlm_dir, tmp_path / "elsewhere", resume=True, **short)
    with pytest.raises(ResumeConfigError, match=r"in stage2\.lr \(0\.001 -> 0\.002\)") as err:
        _train(tiny_vlm_dir, tmp_path, resume=True, **short, **{"stage2.lr": 2e-3})
    assert "--allow-config-change" in str(err.value) and "checkpoint-0000002" in str(err.value)
    assert not list(run.glob("config.resume-*"))

    capsys.readouterr()
    _train(tiny_vlm_dir, tmp_path, resume=True, **short, **{"logging.log_every": 2})  # on the allow-list
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint-0000002'}: stage2 step 1 of 1, global step 2 of 2" in out
    assert "logging.log_every (1 -> 2)" in out
    assert "log_every: 2" in (run / "config.resume-0000002.yaml").read_text()

    _train(tiny_vlm_dir, tmp_path, resume=True, allow_config_change=True, **short, **{"stage2.lr": 2e-3})
    assert "lr: 0.002" in (run / "config.resume-0000002-1.yaml").read_text()  # every config it ran with is kept
    assert (run / "config.yaml").read_text() == first


# ----------------------------------------------------------------------------------------------------------
# 4. A damaged newest checkpoint falls back to the previous one
# ----------------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.timeout(400)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_vlm_dir, tmp_path, caplog):
    from rarl_fast.checkpoint import CheckpointError, checkpoint_problem

    three = {"stage1.steps": 1, "stage2.steps": 2}  # checkpoints 1, 2, 3; resuming from 2 trains step 3 again
    _train(tiny_vlm_dir, tmp_path / "base", **three)
    base = tmp_path / "base" / "run"

    def copy(name: str) -> Path:
        shutil.copytree(base, tmp_path / name / "run")
        return tmp_path / name / "run"

    shutil.rmtree(copy("reference") / "checkpoint-0000003")
    expected = _weights(_train(tiny_vlm_dir, tmp_path / "reference", resume=True, **three))

    damage = {  # name: (file, damage, what the check says when COMPLETE lists no sizes, as in older checkpoints)
        "optimizer": ("accelerate/optimizer.bin", _truncate, None),
        "weights": ("accelerate/model.safetensors", _truncate, "model.safetensors is damaged"),
        "state": ("trainer_state.json", lambda p: p.write_text("{}"), "has no int 'global_step'"),
    }
    for name, (rel, harm, unlisted) in damage.items():
        run = copy(name)
        harm(run / "checkpoint-0000003" / rel)
        assert "bytes" in checkpoint_problem(run / "checkpoint-0000003")  # the size COMPLETE lists
        if name != "optimizer":  # the optimizer's case resumes on the sizes; the others on the content checks
            (run / "checkpoint-0000003" / "COMPLETE").write_text("ok\n")
            assert unlisted in checkpoint_problem(run / "checkpoint-0000003")
        caplog.clear()
        got = _weights(_train(tiny_vlm_dir, tmp_path / name, resume=True, **three))
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
        assert any(rel in r.getMessage() and "checkpoint-0000003" in r.getMessage() for r in caplog.records), name
        assert (run / "checkpoint-0000003.unusable" / rel).is_file()  # set aside, not deleted

    run = copy("none")
    for ckpt in run.glob("checkpoint-*"):
        (ckpt / "trainer_state.json").write_text("not json")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*checkpoint-0000003: trainer_state\.json has"):
        _train(tiny_vlm_dir, tmp_path / "none", resume=True, **three)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{i:07d}" for i in (1, 2, 3)]  # as found


# ----------------------------------------------------------------------------------------------------------
# 5. Images that cannot be read are skipped in training, whatever the load-time check
# ----------------------------------------------------------------------------------------------------------


def _manifest(folder: Path) -> Path:
    """6 good images, 6 entries of a file that is no image, 2 of a 300 x 300 image (over a 50000-pixel limit)."""
    from PIL import Image

    folder.mkdir()
    lines = []
    for i in range(8):
        Image.new("RGB", (64, 48), (30 * i, 100, 200 - 20 * i)).save(folder / f"good{i}.png")
        lines.append({"image": f"good{i}.png", "value": i, "split": "train" if i < 6 else "test"})
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    lines += [{"id": f"broken{i}", "image": "broken.png", "value": 10 + i, "split": "train"} for i in range(6)]
    Image.new("RGB", (300, 300), "white").save(folder / "huge.png")
    lines += [{"id": f"huge{i}", "image": "huge.png", "value": 16 + i, "split": "train"} for i in range(2)]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.timeout(300)
def test_unreadable_images_are_skipped_in_training_whatever_the_check(tiny_vlm_dir, tmp_path):
    data = {
        "data.task": "jsonl", "data.root": str(_manifest(tmp_path / "data")), "data.rule": "brightness",
        "data.value_range": "a number from 0 to 20", "data.tolerance": 1.0, "data.check_images": "off",
        "data.max_image_pixels": 50_000, "data.group_sizes": "[1]", "sft.group_mix": "{1: 1.0}",
        "stage2.group_mix": "{1: 1.0}", "stage1.steps": 2, "stage2.steps": 2,
    }  # fmt: skip
    rt = _train(tiny_vlm_dir, tmp_path, **data)
    assert "broken_image" not in rt.task.report.skipped  # the check was off: the broken file got through loading
    rows = read_metrics(rt.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["data/skipped_groups"] for r in rows) >= 1  # drawn, skipped, replaced, counted
    assert set(rt.cache.failed.values()) <= {"broken_image", "oversized_image"}
    assert rt.cache.failed.get(str(tmp_path / "data" / "broken.png")) == "broken_image"


# ----------------------------------------------------------------------------------------------------------
# 7. One line per failure on the command line
# ----------------------------------------------------------------------------------------------------------


def test_command_line_failures_end_with_one_line(tiny_vlm_dir, tmp_path, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    code, _, err = _cli(["train", *tiny_overrides(tiny_vlm_dir, blocked)], capsys)
    assert code == 2 and _last_error_line(err).startswith(f"rarl-fast: error: cannot use run folder {blocked / 'run'}")
    assert "Traceback" not in err

    code, _, err = _cli(["eval", "--model", "/nonexistent", "data.num_test_groups=1"], capsys)
    assert (code, _last_error_line(err)) == (2, "rarl-fast: error: no model folder at /nonexistent (model.name_or_path "
                                                "or --model)")  # fmt: skip
    code, _, err = _cli(["--debug", "eval", "--model", "/nonexistent"], capsys)
    assert code == 2 and "Traceback" in err and _last_error_line(err).startswith("rarl-fast: error: no model folder")

    code, _, err = _cli(["config", "seed=-1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "config key 'seed' (command-line override 'seed=-1')" in err


@pytest.mark.timeout(300)
def test_ctrl_c_says_where_the_run_can_resume(tiny_vlm_dir, tmp_path, monkeypatch, capsys):
    import rarl_fast.train as train_mod

    original = train_mod.train_step

    def interrupted(rt, st):
        if st.name == "stage2":
            raise KeyboardInterrupt
        return original(rt, st)

    monkeypatch.setattr(train_mod, "train_step", interrupted)  # Ctrl-C as stage 2 starts, after checkpoint 2
    code, _, err = _cli(["train", "--no-eval", "-c", str(DEMO), *tiny_overrides(tiny_vlm_dir, tmp_path)], capsys)
    assert code == 130 and "Traceback" not in err
    expected = f"interrupted; resume from checkpoint-0000002 with --resume (run folder {tmp_path / 'run'})"
    assert _last_error_line(err) == f"rarl-fast: error: {expected}"
