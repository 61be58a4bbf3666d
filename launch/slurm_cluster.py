"""A real SLURM cluster of one or more nodes on this machine, for tests and local submitit launches.

    python -m skipssl_launch.slurm_cluster up [--dir DIR] [--nodes N] [--cpus C]  # prints SLURM_CONF=DIR/slurm.conf
    python -m skipssl_launch.slurm_cluster status [--dir DIR]                     # exit 0 when up, 1 when down
    python -m skipssl_launch.slurm_cluster down [--dir DIR] [--clean]

Needs root and the Debian packages slurmctld slurmd slurm-client munge (SLURM 22.05), no systemd. Every
daemon runs from DIR with its own key, socket, state, pid and log files, so a system munged or SLURM
installation is never touched. Accounting is off: submitit's job.state reads UNKNOWN and sacct warns,
but results come back through submitit's pickles.

One node is `localhost` on SLURM's default ports (6817/6818). N > 1 nodes are n1..nN, one slurmd each
(`slurmd -N nI`, its own port), default folder /tmp/skipssl-slurm-nodes, controller port 16817: both kinds
of cluster can run side by side. `nI` resolves nowhere on the machine, yet a job's rendezvous uses the first
node name as MASTER_ADDR; so each slurmd runs in a private mount namespace whose /etc/hosts (DIR/hosts) adds
`127.0.0.1 n1 ... nN`, inherited by its job steps, and the machine's /etc/hosts is never touched.
"""

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path('/tmp/skipssl-slurm')
MULTI_NODE_DIR = Path('/tmp/skipssl-slurm-nodes')
PACKAGES = 'slurmctld slurmd slurm-client munge'
BINARIES = ('munged', 'slurmctld', 'slurmd', 'sinfo', 'sbatch', 'srun', 'scontrol', 'squeue', 'scancel')
# Several nodes also need a private mount namespace per slurmd (Debian's util-linux and mount, both essential).
MULTI_NODE_PACKAGES = 'util-linux mount'
MULTI_NODE_BINARIES = ('unshare', 'mount')
NODE = 'localhost'
# Ports of a cluster of several nodes: the controller's, then one per slurmd; off SLURM's defaults (6817/6818)
# that the one-node cluster uses, so both run at once (and below 20000, where jobs' rendezvous ports start).
MULTI_NODE_CTLD_PORT = 16817
# Jobs derive their rendezvous port from the job id (skipssl_launch.environment.rendezvous_port), and a fresh cluster
# numbers its jobs from FirstJobId: a different first id keeps concurrent jobs of both clusters off each other's port.
MULTI_NODE_FIRST_JOB_ID = 10000
HEALTHY_STATES = {'idle', 'mixed', 'allocated', 'completing'}


class SlurmClusterError(RuntimeError):
    """The cluster cannot be brought up (or down); the message says why and what to do."""


@dataclass(frozen=True)
class Cluster:
    """A cluster folder and its shape. `ctld_port` None: SLURM's default ports (6817, slurmd 6818)."""

    dir: Path
    nodes: int = 1
    ctld_port: int | None = None

    @property
    def node_names(self) -> tuple[str, ...]:
        return (NODE,) if self.nodes == 1 else tuple(f'n{i}' for i in range(1, self.nodes + 1))

    def slurmd_port(self, index: int) -> int | None:
        """The port of the slurmd of node number `index` (0-based), None for SLURM's default."""
        return None if self.ctld_port is None else self.ctld_port + 1 + index

    def slurmd_key(self, node: str) -> str:
        """The name of a slurmd's pid/log/out files: `slurmd` alone on one node (the layout of clusters started
        before N-node support, so those are still found and stopped), `slurmd.NODE` with several."""
        return 'slurmd' if self.nodes == 1 else f'slurmd.{node}'

    @property
    def daemons(self) -> tuple[str, ...]:
        """Daemon keys in stop order: the nodes first, the key server last (the others authenticate through it)."""
        return (*(self.slurmd_key(n) for n in self.node_names), 'slurmctld', 'munged')

    @property
    def conf(self) -> Path:
        return self.dir / 'slurm.conf'

    @property
    def env(self) -> dict:
        """What a client (sbatch, srun, submitit) needs in its environment."""
        return {'SLURM_CONF': str(self.conf)}

    def path(self, name: str) -> Path:
        return self.dir / name

    def pid_file(self, daemon: str) -> Path:
        return self.dir / f'{daemon}.pid'

    def log_file(self, daemon: str) -> Path:
        return self.dir / f'{daemon}.log'


# ---------------------------------------------------------------- prerequisites


def _search_path() -> str:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return os.pathsep.join([os.environ.get('PATH', ''), '/usr/local/sbin', '/usr/sbin', '/sbin'])


def missing_binaries(search_path: str | None = None, binaries: tuple[str, ...] = BINARIES) -> list[str]:
    path = _search_path() if search_path is None else search_path
    return [b for b in binaries if shutil.which(b, path=path) is None]


def unavailable_reason(search_path: str | None = None, nodes: int = 1) -> str | None:
    """Why a cluster of `nodes` nodes cannot run here (missing packages or not root), or None."""
    missing = missing_binaries(search_path)
    if missing:
        return (
            f'SLURM binaries not found: {", ".join(missing)}; install the Debian packages '
            f'`{PACKAGES}` (apt-get install -y {PACKAGES}, or bash scripts/setup.sh as root)'
        )
    missing = missing_binaries(search_path, MULTI_NODE_BINARIES) if nodes > 1 else []
    if missing:
        return (
            f'{", ".join(missing)} not found: a cluster of several nodes runs each slurmd in its own mount '
            f'namespace; install the Debian packages `{MULTI_NODE_PACKAGES}`'
        )
    if os.geteuid() != 0:
        return 'not root: the SLURM test cluster runs its daemons (munged, slurmctld, slurmd) as root'
    return None


def _binary(name: str) -> str:
    found = shutil.which(name, path=_search_path())
    if found is None:
        raise SlurmClusterError(unavailable_reason(nodes=2) or f'{name} not found')
    return found


# ---------------------------------------------------------------- processes


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:  # reap it if it is our own exited child, so a zombie does not count as alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _comm(pid: int) -> str | None:
    try:
        return Path(f'/proc/{pid}/comm').read_text().strip()
    except OSError:
        return None


def _daemon_pid(cluster: Cluster, daemon: str) -> int | None:
    """The daemon's pid from its pid file if it still runs; a stale file's pid, reused by another program, is not."""
    pid = _read_pid(cluster.pid_file(daemon))
    if not _alive(pid):
        return None
    return pid if _comm(pid) == daemon.split('.')[0] else None


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it outlives `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
    raise SlurmClusterError(f'process {pid} survived SIGKILL')


def _spawn_detached(cmd: list[str], cluster: Cluster, daemon: str) -> int:
    """Start a foreground (-D) daemon in its own session, output to DIR/<daemon>.out."""
    env = {**os.environ, **cluster.env}
    with open(cluster.path(f'{daemon}.out'), 'ab') as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cluster.dir,
            start_new_session=True,
            close_fds=True,
        )
    cluster.pid_file(daemon).write_text(f'{proc.pid}\n')
    return proc.pid


def _wait_exec(pid: int, name: str, timeout: float = 10.0) -> None:
    """Wait until `pid` runs `name`: a daemon started through unshare and sh execs itself in the same process,
    and until it has, its pid file names a process that is not the daemon yet."""
    deadline = time.monotonic() + timeout
    while _comm(pid) != name:
        if not _alive(pid) or time.monotonic() > deadline:
            raise SlurmClusterError(f'{name} (pid {pid}) did not start')
        time.sleep(0.05)


def _slurmd_command(cluster: Cluster, node: str) -> list[str]:
    """`slurmd -D -N node`; with several nodes inside a private mount namespace whose /etc/hosts names them
    (its job steps inherit the namespace), so that they resolve there and nowhere else."""
    slurmd = [_binary('slurmd'), '-D', '-N', node]
    if cluster.nodes == 1:
        return slurmd
    script = f'mount --bind {shlex.quote(str(cluster.path("hosts")))} /etc/hosts && exec {shlex.join(slurmd)}'
    return [_binary('unshare'), '--mount', '--propagation', 'private', 'sh', '-c', script]


def _start_slurmd(cluster: Cluster, node: str) -> None:
    key = cluster.slurmd_key(node)
    _wait_exec(_spawn_detached(_slurmd_command(cluster, node), cluster, key), 'slurmd')


def _client(cluster: Cluster, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_binary(args[0]), *args[1:]],
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------- configuration


def _memory_mb() -> int:
    for line in Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemTotal:'):
            return int(line.split()[1]) // 1024
    return 1024


def _node_lines(cluster: Cluster, cpus: int, memory_mb: int) -> list[str]:
    """One NodeName line per node (each slurmd its own port when there are several) and the partition."""
    names = cluster.node_names
    lines = []
    for index, node in enumerate(names):
        port = cluster.slurmd_port(index)
        where = '' if port is None else f' NodeAddr=127.0.0.1 Port={port}'
        lines.append(f'NodeName={node}{where} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN')
    lines.append(f'PartitionName=debug Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP')
    return lines


def _multi_node_lines(cluster: Cluster) -> list[str]:
    """What a cluster of several nodes sets on top (beside its per-node files): the controller off the one-node
    cluster's port and job ids off its numbers."""
    if cluster.nodes == 1:
        return []
    return [f'SlurmctldPort={cluster.ctld_port}', f'FirstJobId={MULTI_NODE_FIRST_JOB_ID}']


def _slurm_conf(cluster: Cluster, cpus: int, memory_mb: int) -> str:
    d = cluster.dir
    # %n: SLURM puts the node name in, so the slurmds of several nodes keep apart (the files of cluster.slurmd_key)
    slurmd = 'slurmd' if cluster.nodes == 1 else 'slurmd.%n'
    lines = [
        'ClusterName=skipssl',
        f'SlurmctldHost={NODE}',
        'SlurmUser=root',
        'SlurmdUser=root',
        'AuthType=auth/munge',
        'CredType=cred/munge',
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        f'AuthInfo=socket={d}/munge.socket,cred_expire=5',
        f'StateSaveLocation={d}/state',
        f'SlurmdSpoolDir={d}/spool' + ('' if cluster.nodes == 1 else '/%n'),
        f'SlurmctldPidFile={cluster.pid_file("slurmctld")}',
        f'SlurmdPidFile={cluster.pid_file(slurmd)}',
        f'SlurmctldLogFile={cluster.log_file("slurmctld")}',
        f'SlurmdLogFile={cluster.log_file(slurmd)}',
        *_multi_node_lines(cluster),
        'SlurmctldDebug=info',
        'SlurmdDebug=info',
        'ProctrackType=proctrack/linuxproc',
        'TaskPlugin=task/none',
        'SelectType=select/cons_tres',
        'SelectTypeParameters=CR_Core',
        # Without these the main scheduler waits up to 60 s before starting a requeued job.
        'SchedulerType=sched/backfill',
        'SchedulerParameters=sched_interval=1,bf_interval=1',
        'MpiDefault=none',
        'MailProg=/bin/true',
        'ReturnToService=2',
        'JobRequeue=1',
        'AccountingStorageType=accounting_storage/none',
        'JobAcctGatherType=jobacct_gather/none',
        'JobCompType=jobcomp/none',
        'SlurmctldTimeout=10',
        'SlurmdTimeout=10',
        'MessageTimeout=5',
        # Tasks that ignore SIGTERM (submitit's do) are killed this soon after a requeue or cancel.
        'KillWait=2',
        'InactiveLimit=0',
        'MinJobAge=300',
        # The node's CPUs and memory are whatever we declare, even beyond the hardware (tests of N tasks).
        'SlurmdParameters=config_overrides',
        *_node_lines(cluster, cpus, memory_mb),
    ]
    return '\n'.join(lines) + '\n'


def _write_files(cluster: Cluster, cpus: int) -> None:
    # munged refuses group/other-writable directories and a key others can read.
    cluster.dir.mkdir(parents=True, exist_ok=True)
    cluster.dir.chmod(0o755)
    for sub in ('state', 'spool'):
        cluster.path(sub).mkdir(exist_ok=True)
    if cluster.nodes > 1:
        for node in cluster.node_names:
            cluster.path('spool').joinpath(node).mkdir(exist_ok=True)
        machine_hosts = Path('/etc/hosts').read_text()
        cluster.path('hosts').write_text(machine_hosts.rstrip('\n') + f'\n127.0.0.1 {" ".join(cluster.node_names)}\n')
    key = cluster.path('munge.key')
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster.conf.write_text(_slurm_conf(cluster, cpus, max(256, _memory_mb() * 9 // 10)))


# ---------------------------------------------------------------- up / down / status


def cluster_at(dir: Path | str) -> Cluster:
    """The cluster whose slurm.conf is in `dir` (its nodes and ports); one node when there is none yet."""
    dir = Path(dir).resolve()
    try:
        lines = (dir / 'slurm.conf').read_text().splitlines()
    except OSError:
        return Cluster(dir)
    nodes = sum(line.startswith('NodeName=') for line in lines)
    port = next((int(line.split('=', 1)[1]) for line in lines if line.startswith('SlurmctldPort=')), None)
    return Cluster(dir, max(nodes, 1), port)


def node_states(cluster: Cluster) -> dict[str, str] | None:
    """Each node's state as sinfo reports it ('idle', 'down', ...), None when the controller is unreachable."""
    if not cluster.conf.exists() or _daemon_pid(cluster, 'slurmctld') is None:
        return None
    try:
        out = _client(cluster, 'sinfo', '-h', '-N', '-o', '%N %T', timeout=5)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    # -N lists a node once per partition; the flags after the state (*: not responding, ...) are dropped
    return {node: state.rstrip('*~#!%$@^-') for node, state in (line.split() for line in out.stdout.splitlines())}


def node_state(cluster: Cluster) -> str | None:
    """The cluster's state in one word: 'idle' when every node is, else the first other node state; None when
    the controller is unreachable or does not list every node."""
    states = node_states(cluster)
    if states is None or set(states) != set(cluster.node_names):
        return None
    return next((s for s in states.values() if s != 'idle'), 'idle')


def is_up(dir: Path | str = DEFAULT_DIR) -> bool:
    cluster = cluster_at(dir)
    daemons_alive = all(_daemon_pid(cluster, d) is not None for d in cluster.daemons)
    return daemons_alive and node_state(cluster) in HEALTHY_STATES


def _log_tails(cluster: Cluster, lines: int = 15) -> str:
    parts = []
    for daemon in reversed(cluster.daemons):
        # A -D daemon's stdout repeats its log file; it matters only when the daemon died before opening it.
        log, out = cluster.log_file(daemon), cluster.path(f'{daemon}.out')
        path = log if log.exists() and log.stat().st_size else out
        if path.exists():
            tail = path.read_text(errors='replace').splitlines()[-lines:]
            parts.append(f'--- {path} (last {len(tail)} lines)\n' + '\n'.join(tail))
    text = '\n'.join(parts) or '(no logs written)'
    if 'Address already in use' in text:
        last = cluster.slurmd_port(cluster.nodes - 1)
        ports = '6817/6818' if cluster.ctld_port is None else f'{cluster.ctld_port}-{last}'
        text += (
            f'\nHint: ports {ports} are taken, most likely by another slurmctld/slurmd on this machine; '
            'stop it first (python -m skipssl_launch.slurm_cluster down --dir ITS_DIR).'
        )
    return text


def _start_munged(cluster: Cluster) -> None:
    # munged forks into the background once its socket accepts requests.
    cmd = [
        _binary('munged'),
        f'--key-file={cluster.path("munge.key")}',
        f'--socket={cluster.path("munge.socket")}',
        f'--pid-file={cluster.pid_file("munged")}',
        f'--log-file={cluster.log_file("munged")}',
        f'--seed-file={cluster.path("munged.seed")}',
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise SlurmClusterError(
            f'munged failed to start (exit {res.returncode}): {res.stderr.strip()}\n' + _log_tails(cluster)
        )


def _wait_idle(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        dead = [d for d in cluster.daemons if _daemon_pid(cluster, d) is None]
        if dead:
            raise SlurmClusterError(f'{", ".join(dead)} exited during start-up\n' + _log_tails(cluster))
        state = node_state(cluster)
        if state == 'idle':
            return
        time.sleep(0.3)
    raise SlurmClusterError(
        f'nodes {",".join(cluster.node_names)} not idle after {timeout:.0f} s '
        f'(sinfo state: {state})\n' + _log_tails(cluster)
    )


def up(
    dir: Path | str | None = None,
    cpus: int | None = None,
    timeout: float = 60.0,
    nodes: int = 1,
    ctld_port: int | None = None,
) -> Cluster:
    """Start munged, slurmctld and one slurmd per node from `dir` and wait until every node is idle.

    `dir` defaults to DEFAULT_DIR for one node, MULTI_NODE_DIR for several; `ctld_port` to SLURM's default for
    one node, MULTI_NODE_CTLD_PORT for several (the slurmds on the ports after it); `cpus` is per node.
    Idempotent: a healthy cluster of the same number of nodes in `dir` is left as it is (its CPU count too).
    """
    reason = unavailable_reason(nodes=nodes)
    if reason:
        raise SlurmClusterError(reason)
    if nodes < 1:
        raise SlurmClusterError(f'nodes must be at least 1, got {nodes}')
    dir = Path(dir or (DEFAULT_DIR if nodes == 1 else MULTI_NODE_DIR)).resolve()
    if is_up(dir) and cluster_at(dir).nodes == nodes:
        return cluster_at(dir)
    down(dir)  # leftovers of a crashed or half-started cluster (or one of another size)
    cluster = Cluster(dir, nodes, ctld_port or (None if nodes == 1 else MULTI_NODE_CTLD_PORT))
    _write_files(cluster, cpus or os.cpu_count() or 1)
    try:
        _start_munged(cluster)
        # -c: forget jobs of an earlier cluster in this dir; their log folders may be gone.
        _spawn_detached([_binary('slurmctld'), '-D', '-c'], cluster, 'slurmctld')
        for node in cluster.node_names:
            _start_slurmd(cluster, node)
        _wait_idle(cluster, timeout)
    except BaseException:
        down(cluster.dir)  # no half-started daemons; the logs stay for the error message's reader
        raise
    return cluster


def _cancel_all_jobs(cluster: Cluster) -> None:
    """Best effort: jobs left running would keep their slurmstepd processes alive after slurmd stops."""
    try:
        jobs = _client(cluster, 'squeue', '-h', '-o', '%A', timeout=5).stdout.split()
        if jobs:
            _client(cluster, 'scancel', *jobs, timeout=5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _client(cluster, 'squeue', '-h', timeout=5).stdout.strip():
                time.sleep(0.3)
    except (subprocess.TimeoutExpired, SlurmClusterError):
        pass


def down(dir: Path | str = DEFAULT_DIR, clean: bool = False) -> None:
    """Stop the daemons by their pid files; keep DIR (logs, config) unless `clean`."""
    cluster = cluster_at(dir)
    if _daemon_pid(cluster, 'slurmctld') is not None and cluster.conf.exists():
        _cancel_all_jobs(cluster)
    for daemon in cluster.daemons:
        pid = _daemon_pid(cluster, daemon)
        if pid is not None:
            _stop_pid(pid)
        cluster.pid_file(daemon).unlink(missing_ok=True)
    if clean:
        shutil.rmtree(cluster.dir, ignore_errors=True)


def status(dir: Path | str = DEFAULT_DIR) -> str:
    cluster = cluster_at(dir)
    daemons = ', '.join(f'{d} {"running" if _daemon_pid(cluster, d) else "stopped"}' for d in cluster.daemons)
    word = 'up' if is_up(cluster.dir) else 'down'
    states = node_states(cluster) or {}
    nodes = ', '.join(f'{n}: {states.get(n, "unreachable")}' for n in cluster.node_names)
    return f'{word}: {cluster.dir} (node {nodes}; {daemons})'


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m skipssl_launch.slurm_cluster', description=__doc__.split('\n')[0])
    parser.add_argument('command', choices=('up', 'down', 'status'))
    parser.add_argument(
        '--dir',
        type=Path,
        default=None,
        help=f'cluster folder (default {DEFAULT_DIR}; {MULTI_NODE_DIR} for up --nodes N > 1)',
    )
    parser.add_argument('--nodes', type=int, default=1, help='up: number of nodes (default 1)')
    parser.add_argument('--cpus', type=int, default=None, help='CPUs of each node (default: nproc)')
    parser.add_argument('--clean', action='store_true', help='down: also remove the cluster folder')
    parser.add_argument('--timeout', type=float, default=60.0, help='up: seconds to wait for an idle node')
    args = parser.parse_args(argv)
    if args.dir is None:
        args.dir = DEFAULT_DIR if args.nodes == 1 else MULTI_NODE_DIR
    try:
        if args.command == 'up':
            was_up = is_up(args.dir) and cluster_at(args.dir).nodes == args.nodes
            cluster = up(args.dir, cpus=args.cpus, timeout=args.timeout, nodes=args.nodes)
            print(f'[slurm_cluster] {"already up" if was_up else "up"}: {cluster.dir}', file=sys.stderr)
            print(f'export SLURM_CONF={cluster.conf}')
        elif args.command == 'down':
            down(args.dir, clean=args.clean)
            print(f'[slurm_cluster] down: {Path(args.dir).resolve()}', file=sys.stderr)
        else:
            line = status(args.dir)
            print(line)
            return 0 if line.startswith('up') else 1
    except SlurmClusterError as error:
        print(f'[slurm_cluster] error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
