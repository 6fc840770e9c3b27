"""Exact resume of the SFT stage: SIGTERM -> checkpoint -> exit 3 -> --resume auto gives the same
per-step losses as an uninterrupted run; kill -9 while a checkpoint is written loses nothing; a
checkpoint damaged after it was written is found (files.json) and skipped; a full disk stops the
run with one message and the previous checkpoint intact."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, pipeline_env, run_pipeline, small_shards, training_recipe, write_recipe
from pipeline.checkpoint import FAULT_ENV
from pipeline.metrics import read_metrics

pytestmark = pytest.mark.integration

STEPS = 8


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return small_shards(tmp_path_factory.mktemp("resume_data"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, manifest):
    """Losses of an uninterrupted run of STEPS steps."""
    root = tmp_path_factory.mktemp("straight")
    recipe = write_recipe(root / "recipe.yaml", training_recipe(root / "run", manifest, max_steps=STEPS))
    result = run_pipeline("run", str(recipe))
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(root / "run")


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir / "sft" / "metrics.jsonl")}


def run_until_signalled(recipe, run_dir, after_step: int, sig=signal.SIGTERM,
                        whole_group: bool = False) -> subprocess.CompletedProcess:
    """Start `run`, send ``sig`` once ``after_step`` steps are logged, wait for it to exit. With
    ``whole_group`` the signal goes to every process of the run (its loader workers too), as SLURM
    signals every process of a job step."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(recipe)], cwd=REPO_ROOT,
                               env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=whole_group)
    deadline = time.monotonic() + 300
    while max(losses(run_dir), default=0) < after_step:
        assert process.poll() is None, f"run ended before the signal: {process.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("sig, resume, whole_group", [(signal.SIGTERM, "auto", False), (signal.SIGUSR1, "step_2", False),
                                                      (signal.SIGTERM, "auto", True)],
                         ids=["SIGTERM-resume-auto", "SIGUSR1-resume-older-path", "SIGTERM-to-every-process-and-worker"])
def test_a_signal_checkpoints_and_resume_reproduces_every_loss(tmp_path, manifest, straight, sig, resume, whole_group):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "sft" / "checkpoints"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    stopped = run_until_signalled(recipe, run_dir, after_step=3, sig=sig, whole_group=whole_group)
    assert stopped.returncode == 3, stopped.stderr[-4000:]
    # two loader workers got the signal too: they leave it to the rank (no dead worker, one log line)
    assert "DataLoader worker" not in stopped.stderr
    assert stopped.stderr.count(f"{sig.name} received") == 1, stopped.stderr[-4000:]
    stopped_at = int((checkpoints / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < STEPS, "the signal must stop the run before its end (slow machine?)"
    assert not (run_dir / "sft" / "COMPLETE").exists()
    assert f"{sig.name} received: checkpointing at the next step boundary" in stopped.stderr

    refused = run_pipeline("run", str(recipe))
    assert refused.returncode == 2 and "pass --resume auto" in refused.stderr

    # auto: the newest checkpoint; a path: an older one, and the newer ones are set aside
    resume_from = checkpoints / f"step_{stopped_at}" if resume == "auto" else checkpoints / resume
    resumed = run_pipeline("run", str(recipe), "--resume", resume if resume == "auto" else str(resume_from))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {resume_from} at step {int(resume_from.name[5:])}" in resumed.stderr
    if resume != "auto":
        abandoned = [p for p in checkpoints.parent.iterdir() if p.name.startswith("checkpoints.abandoned-")]
        assert len(abandoned) == 1 and (abandoned[0] / f"step_{stopped_at}" / "trainer_state.json").exists()
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], abs=1e-6, rel=0), f"step {step}"
    assert (run_dir / "sft" / "COMPLETE").exists()


def test_kill_during_checkpoint_keeps_the_previous_one(tmp_path, manifest, straight):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=3))
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: "before_rename:6"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = run_dir / "sft" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3", "step_6.tmp"]
    state = json.loads((checkpoints / "step_3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 1

    resumed = run_pipeline("run", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "removing the incomplete checkpoint" in resumed.stderr
    after = losses(run_dir)
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([straight[s] for s in range(1, STEPS + 1)], abs=1e-6)
    # keep_last 3 of step_3, step_6, step_8 (the end); no partial directory left
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3", "step_6", "step_8"]


def test_resume_refuses_a_changed_recipe_but_allows_a_new_lr(tmp_path, manifest):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: "before_rename:4"}))
    assert killed.returncode == -signal.SIGKILL
    # the layout may change on resume (tests/dist/test_moving_run.py), the global batch may not
    other_batch = run_pipeline("run", str(recipe), "--resume", "auto", "sft.global_batch_size=2")
    assert other_batch.returncode == 2
    assert "different settings: sft.global_batch_size" in other_batch.stderr
    changed = run_pipeline("run", str(recipe), "--resume", "auto", "sft.weight_decay=0.1", "data.max_length=400")
    assert changed.returncode == 2
    assert "different settings: data.max_length, sft.weight_decay" in changed.stderr
    new_lr = run_pipeline("run", str(recipe), "--resume", "auto", "sft.lr=1e-4", "sft.max_steps=5")
    assert new_lr.returncode == 0, new_lr.stderr[-4000:]
    assert "resuming with changed sft.lr, sft.max_steps" in new_lr.stderr
    logged = read_metrics(run_dir / "sft" / "metrics.jsonl")
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert logged[2]["lr"] < 1e-4 and logged[1]["lr"] > 1e-3  # the new peak applies from the resumed step on


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit flipped in the middle: same size, only the sha256 can tell
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, file", [("truncated", "training_state/part_00000.pt"),
                                       ("bit-flipped", "rank_00000.pt")])
def test_a_damaged_checkpoint_is_named_refused_as_a_path_and_skipped_by_resume_auto(tmp_path, manifest, straight,
                                                                                   how, file):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "sft" / "checkpoints"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    killed = run_pipeline("run", str(recipe), env=pipeline_env(**{FAULT_ENV: "before_rename:6"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    listed = json.loads((checkpoints / "step_4" / "files.json").read_text())["files"]
    assert file in listed and len(listed[file]["sha256"]) == 64 and "trainer_state.json" in listed
    damage(checkpoints / "step_4" / file, how)

    status = run_pipeline("status", str(run_dir), timeout=60)
    assert "step_2: verified" in status.stdout and f"step_4: damaged ({file} is " in status.stdout, status.stdout
    assert "step_6.tmp: partial" in status.stdout

    refused = run_pipeline("run", str(recipe), "--resume", str(checkpoints / "step_4"))
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert f"the checkpoint is damaged: {file} is" in refused.stderr and "step_2 checks out" in refused.stderr
    assert "Traceback" not in refused.stderr

    resumed = run_pipeline("run", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{checkpoints / 'step_4'} is damaged: {file} is" in resumed.stderr
    assert "resuming from step_2 instead, so steps 3 to 4 are trained again" in resumed.stderr
    assert f"resumed from {checkpoints / 'step_2'} at step 2" in resumed.stderr
    after = losses(run_dir)
    assert [after[s] for s in range(1, STEPS + 1)] == pytest.approx([straight[s] for s in range(1, STEPS + 1)], abs=1e-6)
    abandoned = [p for p in checkpoints.parent.iterdir() if p.name.startswith("checkpoints.abandoned-")]
    assert len(abandoned) == 1 and (abandoned[0] / "step_4" / file).exists()  # kept, never deleted


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs the test mounts (root only) and sizes: yields a function taking the size in bytes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def bytes_below(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sizes(tmp_path_factory, manifest):
    """(one checkpoint, everything else a short run writes) in bytes, from a run on a normal disk."""
    root = tmp_path_factory.mktemp("sizes")
    recipe = write_recipe(root / "recipe.yaml", training_recipe(root / "run", manifest, max_steps=2, save_every=2))
    assert run_pipeline("run", str(recipe)).returncode == 0
    checkpoint = bytes_below(root / "run" / "sft" / "checkpoints" / "step_2")
    return checkpoint, bytes_below(root / "run") - checkpoint


def test_no_room_for_the_next_checkpoint_stops_plainly_with_the_previous_one_latest(tmp_path, manifest, sizes,
                                                                                    small_disk):
    checkpoint, other = sizes
    disk = small_disk(other + checkpoint * 3 // 2 + (1 << 20))
    run_dir = disk / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    full = run_pipeline("run", str(recipe))
    assert full.returncode == 1, full.stderr[-4000:]
    assert "Traceback" not in full.stderr
    assert f"not enough space for checkpoint step_4 in {run_dir / 'sft' / 'checkpoints'}: the previous one (step_2) " \
           "takes" in full.stderr and "step_2 is intact and still `latest`" in full.stderr
    checkpoints = run_dir / "sft" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_2"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_2"]


def test_a_checkpoint_write_that_fills_the_disk_is_one_message_and_leaves_no_partial_directory(
        tmp_path, manifest, sizes, small_disk):
    checkpoint, other = sizes
    disk = small_disk(other + checkpoint // 2 + (1 << 20))
    run_dir = disk / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", training_recipe(run_dir, manifest, max_steps=STEPS, save_every=2))
    full = run_pipeline("run", str(recipe))
    assert full.returncode == 1, full.stderr[-4000:]
    assert "Traceback" not in full.stderr
    assert f"writing checkpoint step_2 in {run_dir / 'sft' / 'checkpoints'} failed (rank 0: " in full.stderr
    assert "The partial step_2.tmp was removed (the file system now has " in full.stderr
    assert "free); there is no earlier checkpoint" in full.stderr
    assert sorted(p.name for p in (run_dir / "sft" / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("how, verify", [("truncated", "size"), ("bit-flipped", "hash")])
def test_shards_made_elsewhere_are_checked_before_training(tmp_path, manifest, how, verify):
    """A tar of a data.manifest run that was truncated (or, with data.verify_shards: hash, altered)
    stops the run with the tar named, exit 2, before a step is trained."""
    shards = tmp_path / "shards"
    shutil.copytree(manifest.parent, shards)
    tar = sorted(shards.rglob("*.tar"))[0]
    damage(tar, how)
    recipe = training_recipe(tmp_path / "run", shards / "manifest.json", max_steps=2)
    recipe["data"]["verify_shards"] = verify
    result = run_pipeline("run", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert result.returncode == 2, result.stderr[-4000:]
    named = tar.relative_to(shards).as_posix()
    expected = f"{named} is {tar.stat().st_size} bytes, the manifest says" if how == "truncated" else f"{named} is corrupted"
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "sft" / "metrics.jsonl").exists() or not losses(tmp_path / "run")


def test_a_run_reading_its_shards_from_s3_stops_and_resumes_with_every_loss_of_the_run_from_disk(
        tmp_path, manifest, straight):
    """The same recipe with data.shard_root on an S3 bucket (moto's server on loopback; the shards'
    sizes asked of it at the start, their sha256 checked on the bytes read): SIGTERM, --resume auto,
    and every step's loss is the one the run reading the shards from disk had."""
    from shard_servers import s3_server

    run_dir = tmp_path / "run"
    alone = tmp_path / "manifest" / "manifest.json"  # no tar beside it: every byte comes from the bucket
    alone.parent.mkdir()
    shutil.copy(manifest, alone)
    recipe = training_recipe(run_dir, alone, max_steps=STEPS, save_every=2)
    recipe["data"].update(shard_root="s3://runs/resume/shards", verify_shards="hash", read_backoff_s=0.1)
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe)
    with s3_server(manifest.parent, "runs", "resume/shards"):
        stopped = run_until_signalled(recipe, run_dir, after_step=3)
        assert stopped.returncode == 3, stopped.stderr[-4000:]
        resumed = run_pipeline("run", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = losses(run_dir)
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert after[step] == pytest.approx(straight[step], abs=1e-6, rel=0), f"step {step}"
