"""`python -m oqvl.train.launch --nodes N --nproc-per-node G -- {pretrain,sft} ARGS...`

Starts `python -m oqvl.train ARGS` under torchrun on N nodes with G processes each (world size
N x G), replacing this process (os.execvp) so that signals reach torchrun directly:

- N = 1: `torchrun --standalone --nproc-per-node G`, a rendezvous of its own on this machine.
- N > 1: inside a SLURM allocation of exactly N nodes, `srun` starts one torchrun agent per node;
  the agents meet in a c10d rendezvous on the allocation's first host (port --port, default
  $OQVL_RDZV_PORT or 29500) under the job id. Outside SLURM it stops with a one-line error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEFAULT_PORT = 29500
PORT_ENV = "OQVL_RDZV_PORT"


class LaunchError(ValueError):
    pass


def torchrun(nodes: int, nproc: int, train_args: list[str], endpoint: str | None = None,
             rdzv_id: str | None = None, python: str = sys.executable) -> list[str]:
    """The torchrun command of one node's agent: standalone for one node, else a c10d rendezvous
    of `nodes` agents at endpoint (HOST:PORT) under rdzv_id."""
    if nodes == 1:
        where = ["--standalone", "--nproc-per-node", str(nproc)]
    else:
        where = ["--nnodes", str(nodes), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id]
    return [python, "-m", "torch.distributed.run", *where, "-m", "oqvl.train", *train_args]


def srun(nodes: int) -> list[str]:
    """One task (a torchrun agent) per node; one failed node ends the others rather than leaving
    them waiting in a collective."""
    return ["srun", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1"]


def slurm_hostnames(nodelist: str) -> list[str]:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def command(nodes: int, nproc: int, train_args: list[str], env: dict, port: int = DEFAULT_PORT,
            hostnames=None, python: str = sys.executable) -> list[str]:
    """The command to exec for `nodes` x `nproc` processes, given the environment (SLURM's);
    hostnames(nodelist) expands a SLURM node list (default: scontrol)."""
    if nodes < 1 or nproc < 1:
        raise LaunchError(f"--nodes and --nproc-per-node must be at least 1, got {nodes} and {nproc}")
    if nodes == 1:
        return torchrun(1, nproc, train_args, python=python)
    if not env.get("SLURM_JOB_ID") or not env.get("SLURM_JOB_NODELIST"):
        raise LaunchError(f"--nodes {nodes}: training on several nodes runs inside a SLURM allocation "
                          f"(SLURM_JOB_ID and SLURM_JOB_NODELIST are not set); on one machine set train.nodes: 1")
    allocated = env.get("SLURM_JOB_NUM_NODES")
    if allocated != str(nodes):
        raise LaunchError(f"--nodes {nodes}, but the SLURM allocation has {allocated} node(s) "
                          f"(SLURM_JOB_NUM_NODES); set train.nodes to it or allocate {nodes} nodes")
    head = (hostnames or slurm_hostnames)(env["SLURM_JOB_NODELIST"])[0]
    return srun(nodes) + torchrun(nodes, nproc, train_args, f"{head}:{port}", env["SLURM_JOB_ID"], python)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # the trainer's arguments follow --
    ap = argparse.ArgumentParser(prog="python -m oqvl.train.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1, help="nodes (one torchrun agent each)")
    ap.add_argument("--nproc-per-node", type=int, required=True, help="processes per node (one per GPU)")
    ap.add_argument("--port", type=int, default=int(os.environ.get(PORT_ENV, DEFAULT_PORT)),
                    help=f"rendezvous port on the first node (default ${PORT_ENV} or {DEFAULT_PORT})")
    args = ap.parse_args(argv[:split])
    try:
        cmd = command(args.nodes, args.nproc_per_node, argv[split + 1:], dict(os.environ), args.port)
    except (LaunchError, subprocess.CalledProcessError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    sys.stdout.flush()  # exec drops what is still buffered
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
