"""A real SLURM cluster on this machine for the tests: munged, slurmctld and one slurmd (the
machine's cores as one node), Debian's slurm-wlm and munge (.ci/run installs them).

    with LocalSlurm(tmp) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Its own config, state and logs live under the given folder and its daemons listen on free
loopback ports, so it never touches a slurm.conf of the machine's. Accounting: no slurmdbd, so
`sacct` has no job database; job completion records go to jobcomp.txt (`sacct --completion`
reads them), which the tests cross-check compute.csv against.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
PARTITION = "debug"


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count()
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[Path] = []

    def write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        mem = int(_memory_mb() * 0.8)
        self.ctld_port = _free_port()
        self.conf.write_text("\n".join([
            "ClusterName=oqvltest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "MpiDefault=none",
            "MinJobAge=3600",  # squeue keeps finished jobs long enough for Snakemake's status checks
            "KillWait=10",
            "SchedulerParameters=sched_interval=2",
            # Configless: slurmd fetches this config and keeps it where client commands on the node
            # look (/run/slurm/conf), since the jobstep plugin drops SLURM_CONF from a job's srun.
            "SlurmctldParameters=enable_configless",
            f"NodeName=oqvl0 NodeHostname={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=oqvl0 Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is running already
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self.write_conf()
        self._start_munge()
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["/usr/sbin/slurmd", "--conf-server", f"127.0.0.1:{self.ctld_port}", "-N", "oqvl0"],
                       check=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and out.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local SLURM node did not come up in {timeout:.0f} s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                         for p in (self.root / "slurmctld.log", self.root / "slurmd.log") if p.exists())

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env)
        for pidfile in (self.root / "slurmd.pid", self.root / "slurmctld.pid"):
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)

    def completions(self) -> list[dict]:
        """SLURM's own job completion records (jobcomp/filetxt), one dict per job."""
        if not self.jobcomp.exists():
            return []
        return [dict(f.split("=", 1) for f in line.split() if "=" in f)
                for line in self.jobcomp.read_text().splitlines() if line.strip()]

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
