"""Backend selection, environment defaults, bf16 fallback, SLURM/torchrun parsing, engine pieces."""

import dataclasses
import logging
import math

import pytest
import torch

import backends
from backends.deepspeed_engine import EngineSettings, warmup_then_decay, deepspeed_config, parameter_groups
from backends.distributed import expand_nodelist, read_launch_env
from backends.spec import BackendUnavailable

import fake_torch_npu

pytestmark = pytest.mark.unit


def row(name, reason=None, bf16=(True, "dev")):
    return dataclasses.replace(backends.CPU, name=name, probe=lambda: reason, bf16_check=lambda rank: bf16)


def test_auto_takes_the_first_usable_in_npu_cuda_cpu_order_and_says_why(caplog):
    table = {"npu": row("npu", "torch_npu not importable: boom"), "cuda": row("cuda"), "cpu": row("cpu")}
    with caplog.at_level(logging.INFO, logger="backends"):
        assert backends.select("auto", table).name == "cuda"
    assert "cuda selected automatically" in caplog.text and "torch_npu not importable: boom" in caplog.text


def test_asking_for_an_unavailable_backend_is_an_error_not_a_cpu_run():
    table = {"npu": row("npu", "no NPU visible"), "cuda": row("cuda", "no GPU"), "cpu": row("cpu")}
    with pytest.raises(BackendUnavailable, match="'npu' was requested but cannot run here: no NPU visible"):
        backends.select("npu", table)
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        backends.select("tpu", table)


def test_on_this_machine_auto_is_cpu_and_npu_explains_itself():
    assert backends.select("auto").name in {"cpu", "cuda"}
    if backends.NPU.probe() is not None:
        with pytest.raises(BackendUnavailable, match="torch_npu not importable"):
            backends.select("npu")


def test_fake_torch_npu_is_selected_and_set_up(monkeypatch):
    calls = fake_torch_npu.install(monkeypatch)
    chosen = backends.select("auto")
    assert chosen is backends.NPU
    assert calls.compile_modes == [False] and calls.config.allow_internal_format is False
    assert chosen.dist_backend == "hccl" and chosen.visible_devices_env == "ASCEND_RT_VISIBLE_DEVICES"
    # (torch.device("npu") itself only exists once the real torch_npu registered the device type.)


def test_bf16_falls_back_to_fp16_naming_the_device(monkeypatch, caplog):
    fake_torch_npu.install(monkeypatch, device_name="Ascend910A", bf16=False)
    with caplog.at_level(logging.WARNING):
        assert backends.NPU.resolve_dtype("bf16") == torch.float16
    assert "bf16 is not supported on Ascend910A" in caplog.text
    old_gpu = row("cuda", bf16=(False, "Tesla V100-SXM2-32GB"))
    with caplog.at_level(logging.WARNING):
        assert old_gpu.resolve_dtype("bf16") == torch.float16
    assert "Tesla V100-SXM2-32GB" in caplog.text
    assert backends.CPU.resolve_dtype("bf16") == torch.bfloat16
    assert backends.CPU.resolve_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        backends.CPU.resolve_dtype("fp8")


def test_env_defaults_never_override_the_user():
    environ = {"HCCL_CONNECT_TIMEOUT": "7200"}
    applied = backends.NPU.apply_env_defaults(environ)
    assert environ["HCCL_CONNECT_TIMEOUT"] == "7200" and "HCCL_CONNECT_TIMEOUT" not in applied
    assert environ["HCCL_EXEC_TIMEOUT"] == "2100" and environ["TASK_QUEUE_ENABLE"] == "2"
    assert environ["DS_ACCELERATOR"] == "npu"
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    backends.CUDA.apply_env_defaults(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                       "DS_ACCELERATOR": "cuda"}
    with pytest.raises(BackendUnavailable, match="DS_ACCELERATOR=cuda is set, but the selected backend is 'npu'"):
        backends.NPU.apply_env_defaults({"DS_ACCELERATOR": "cuda"})


def test_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],login2") == ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_slurm_variables_without_torchrun():
    environ = {"SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_NODEID": "1",
               "SLURM_TASKS_PER_NODE": "8(x4)", "SLURM_JOB_NODELIST": "ascend[003-006]", "SLURM_JOB_ID": "4242"}
    context = read_launch_env(environ)
    assert (context.rank, context.world_size, context.local_rank, context.local_world_size) == (13, 32, 5, 8)
    assert context.master_addr == "ascend003" and context.master_port == 20000 + 4242 and context.launcher == "slurm"


def test_torchrun_variables_win_over_slurm():
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
               "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    context = read_launch_env(environ)
    assert (context.rank, context.world_size, context.master_addr, context.master_port, context.launcher) == (
        1, 2, "10.0.0.1", 1234, "torchrun")
    with pytest.raises(ValueError, match="LOCAL_RANK is not set"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert read_launch_env({}).launcher == "single"


def test_parameter_groups_skip_frozen_and_exempt_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # bias, norm weight + bias, last bias
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        parameter_groups(model, 0.0)


def test_cosine_decay_after_warmup():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    scheduler = warmup_then_decay(optimizer, warmup_steps=3, total_steps=13)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([2e-5 / 3, 2 * 2e-5 / 3, 2e-5])
    assert lrs[3] == pytest.approx(2e-5) and lrs[8] == pytest.approx(2e-5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs == sorted(lrs[:3]) + sorted(lrs[3:], reverse=True)


def test_linear_schedule_decays_in_a_straight_line():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_then_decay(optimizer, warmup_steps=2, total_steps=12, min_lr_ratio=0.1, schedule="linear")
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0] + [0.1 + 0.9 * (1 - k / 10) for k in range(10)])
    with pytest.raises(ValueError, match="lr schedule must be one of"):
        warmup_then_decay(optimizer, 1, 2, schedule="step")


def test_deepspeed_config_follows_the_settings():
    settings = EngineSettings(zero_stage=3, micro_batch_size=2, gradient_accumulation_steps=4, gradient_clipping=0.5)
    config = deepspeed_config(settings, torch.bfloat16)
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5 and "fp16" not in config
    assert deepspeed_config(EngineSettings(zero_stage=2), torch.float16)["fp16"]["enabled"] is True
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO stage 2 or 3"):
        EngineSettings(zero_stage=0, offload_optimizer=True).validate()


def test_stop_signals_wait_while_deepspeed_may_compile_and_spare_the_compiler():
    """SLURM's time-limit USR1 reaches every process of the step, a JIT compiler's too: inside
    stop_signals_held a child (standing in for the compiler) survives it, and this process still
    gets it (by the end of the build at the latest)."""
    import os
    import signal
    import subprocess
    import sys

    from backends.deepspeed_engine import stop_signals_held

    got = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: got.append(number))
    try:
        with stop_signals_held():
            compiler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
            os.kill(compiler.pid, signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert compiler.wait(timeout=30) == 0  # not killed by the signal
        assert got == [signal.SIGUSR1]
        outside = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
        os.kill(outside.pid, signal.SIGUSR1)
        assert outside.wait(timeout=30) == -signal.SIGUSR1  # what a compiler met without the block
    finally:
        signal.signal(signal.SIGUSR1, previous)
