"""A real one-node SLURM cluster on this machine, for the cluster tier (the `slurm` fixture): Debian's slurmctld, slurmd
and munge (installed with apt-get when missing), configured and started here without systemd,
every file under a temporary directory, the daemons stopped at the end.

The tier skips, with the reason, only where it cannot run: not root (the daemons and munge need
it), or the packages neither installed nor installable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "munged")


def _install() -> str | None:
    """None when every tool is there (installing the packages if needed), else why not."""
    if all(shutil.which(tool) for tool in TOOLS):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"SLURM is not installed and cannot be here (needs root and apt-get): {', '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-300:]}"
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    return f"installed {', '.join(PACKAGES)} but {missing} are still missing" if missing else None


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for item in sockets:
        item.bind(("127.0.0.1", 0))
    ports = [item.getsockname()[1] for item in sockets]
    for item in sockets:
        item.close()
    return ports


def _config(root: Path, host: str) -> str:
    controller_port, node_port = _free_ports(2)
    memory_mib = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 - 1024
    return "\n".join([
        "ClusterName=pipelinetest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        # cred_expire: the job credential's lifetime, which is also how long a requeued job waits before
        # it may start again (120 s by default); 30 s is ample for a step launch on one node.
        "AuthType=auth/munge", f"AuthInfo=socket={root}/munge/socket,cred_expire=30", "CredType=cred/munge",
        f"SlurmctldPort={controller_port}", f"SlurmdPort={node_port}",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd.log",
        # As the cluster: process tracking by parent pid, no task binding, cores as resources.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none", "SwitchType=switch/none",
        "ReturnToService=2", "JobRequeue=1", "KillWait=60", "MinJobAge=3600",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mib} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)}: {result.stderr}")
        return result

    def submit(self, script: Path, env: dict | None = None) -> str:
        result = subprocess.run(["sbatch", "--parsable", str(script)], env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} after {timeout} s"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = _install()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir()
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(_config(root, host))
    key = root / "munge" / "key"
    shutil.copy("/etc/munge/munge.key", key) if Path("/etc/munge/munge.key").exists() else key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    cluster = Cluster(root)
    munge = root / "munge"
    cluster.run("munged", "--force", f"--socket={munge / 'socket'}", f"--key-file={key}", f"--log-file={munge / 'log'}",
                f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}")
    try:
        cluster.run("slurmctld", "-f", str(root / "slurm.conf"))
        cluster.run("slurmd", "-f", str(root / "slurm.conf"))
        deadline = time.monotonic() + 60
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout:
            assert time.monotonic() < deadline, (root / "log" / "slurmctld.log").read_text()[-3000:]
            time.sleep(0.5)
        yield cluster
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = root / f"{daemon}.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False)
        subprocess.run(["munged", f"--socket={munge / 'socket'}", "--stop"], check=False, capture_output=True)
