"""oqvl.train.launch: the torchrun command for one node, or srun + torchrun in a SLURM allocation.

The commands are built without running anything; the two-agent training run is in test_train.py
(test_two_nodes_train_the_same_model).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from oqvl.train import launch

PY = "/env/bin/python"
ARGS = ["pretrain", "--out", "runs/r/pretrain"]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}


def hosts(nodelist):
    assert nodelist == "gpu[07-08]"
    return ["gpu07", "gpu08"]


def test_one_node_is_todays_standalone_torchrun():
    assert launch.command(1, 8, ARGS, env={}, python=PY) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8", "-m", "oqvl.train", *ARGS]
    # inside an allocation one node is still standalone: no srun, no rendezvous host
    assert launch.command(1, 8, ARGS, env=SLURM, python=PY)[:4] == [PY, "-m", "torch.distributed.run",
                                                                    "--standalone"]


def test_several_nodes_in_slurm_are_one_agent_per_node_meeting_on_the_first_host():
    assert launch.command(2, 8, ARGS, env=SLURM, hostnames=hosts, python=PY) == [
        "srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
        PY, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "4242",
        "-m", "oqvl.train", *ARGS]
    cmd = launch.command(2, 8, ARGS, env=SLURM, port=31000, hostnames=hosts, python=PY)
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "gpu07:31000"


def test_several_nodes_outside_slurm_or_in_another_allocation_are_refused():
    with pytest.raises(launch.LaunchError, match="--nodes 2: training on several nodes runs inside a SLURM"):
        launch.command(2, 8, ARGS, env={}, hostnames=hosts)
    with pytest.raises(launch.LaunchError, match="--nodes 4, but the SLURM allocation has 2 node"):
        launch.command(4, 8, ARGS, env=SLURM, hostnames=hosts)
    with pytest.raises(launch.LaunchError, match="at least 1"):
        launch.command(0, 8, ARGS, env={})


def test_the_cli_execs_the_command_with_the_port_from_the_env(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.os, "execvp", lambda file, argv: calls.append((file, argv)))
    monkeypatch.setattr(launch, "slurm_hostnames", hosts)
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(launch.PORT_ENV, "31001")
    launch.main(["--nodes", "2", "--nproc-per-node", "4", "--", *ARGS])
    (file, argv), = calls
    assert file == "srun" and argv[argv.index("--rdzv-endpoint") + 1] == "gpu07:31001"
    assert argv[-len(ARGS) - 2:] == ["-m", "oqvl.train", *ARGS]


def test_the_cli_error_is_one_line():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}  # no SLURM_*
    proc = subprocess.run([sys.executable, "-m", "oqvl.train.launch", "--nodes", "2", "--nproc-per-node", "1",
                           "--", *ARGS], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --nodes 2: training on several")
