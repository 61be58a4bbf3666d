"""``pretrain.py`` as the suite runs it: one process each (nccl on CUDA, gloo on CPU), a log file, the
per-iteration losses from its log.jsonl, a SIGTERM once it reaches an iteration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from skipssl_common.artefacts import RunSummary

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / 'configs'


def child_env(threads: int) -> Dict[str, str]:
    """This environment without any launcher's variables (each run is its own one-process world, on a free
    port), the checkout first on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('SLURM_', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_', 'TORCHELASTIC'))
    }
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    return env


class PretrainRun:
    def __init__(self, name: str, config: str, overrides: List[str], work: Path, env: Dict[str, str]):
        self.name, self.env = name, env
        self.dir = Path(work) / name
        self.log = Path(work) / f'{name}.log'
        self.cmd = [
            sys.executable,
            'pretrain.py',
            '--config',
            str(CONFIG_DIR / config),
            *overrides,
            f'experiment.output_dir={self.dir}',
        ]
        self.proc: Optional[subprocess.Popen] = None
        self.seconds = 0.0
        self._t0 = 0.0

    def start(self) -> 'PretrainRun':
        self._t0 = time.perf_counter()
        with open(self.log, 'a') as log:
            log.write(f'$ {" ".join(self.cmd)}\n')
            log.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait(self) -> RunSummary:
        """Waits; raises with the log's end if the run failed; returns its summary.json."""
        rc = self.proc.wait()
        self.seconds += time.perf_counter() - self._t0
        if rc != 0:
            raise RuntimeError(f"pretrain.py run '{self.name}' exited with status {rc}:\n{self.log_tail()}")
        return self.summary()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors='replace')[-chars:] if self.log.exists() else ''

    def summary(self) -> RunSummary:
        return RunSummary.read(self.dir)

    def records(self) -> List[Dict]:
        path = self.dir / 'log.jsonl'
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def losses(self) -> Dict[int, float]:
        """Logged loss per iteration; a resumed run re-logs iterations after its checkpoint: the last wins."""
        return {int(r['iteration']): r['train/loss'] for r in self.records() if 'train/loss' in r}

    def last_scalar(self, key: str) -> Optional[float]:
        values = [r[key] for r in self.records() if key in r]
        return values[-1] if values else None

    def sigterm_after(self, iteration: int, poll: float = 0.05) -> int:
        """SIGTERM once the log shows ``iteration``; returns the iteration seen then. Raises if the run ends
        first (then nothing was interrupted and a resume check would prove nothing)."""
        while self.proc.poll() is None:
            done = max(self.losses(), default=0)
            if done >= iteration:
                self.proc.send_signal(signal.SIGTERM)
                return done
            time.sleep(poll)
        raise RuntimeError(
            f"run '{self.name}' ended (status {self.proc.returncode}) before iteration {iteration}, "
            f'so it could not be interrupted:\n{self.log_tail()}'
        )


def compare_losses(reference: Dict[int, float], resumed: Dict[int, float], stopped_at: int) -> Dict:
    """The resumed run's losses against the uninterrupted run's.

    Iterations up to ``stopped_at`` ran in both processes from the same start with nothing in between: their
    difference is the platform's run-to-run noise (non-deterministic GPU kernels: atomics in attention
    backward, cuBLAS/cuDNN algorithm choice). The rule: if that noise is exactly zero the resumed iterations
    must be bit-identical too; otherwise each resumed iteration must lie within 10x the largest relative
    noise seen before the stop, and never further than 2e-3 relative (about bf16's rounding step, 2^-9)
    unless the noise itself is larger. A resume that lost the data position, an RNG state, the optimizer's
    moments, the teacher or the centre shifts the loss by far more than that at the first resumed step.
    """
    if sorted(reference) != sorted(resumed):
        raise RuntimeError(f'iterations differ: uninterrupted {sorted(reference)}, resumed {sorted(resumed)}')

    def rel(i):
        return abs(resumed[i] - reference[i]) / max(abs(reference[i]), 1e-12)

    before = [rel(i) for i in reference if i <= stopped_at]
    after = [rel(i) for i in reference if i > stopped_at]
    noise = max(before, default=0.0)
    tolerance = 0.0 if noise == 0.0 else max(10 * noise, 2e-3)
    worst = max(after, default=0.0)
    return {
        'iterations': len(reference),
        'stopped_at': stopped_at,
        'bit_identical': all(resumed[i] == reference[i] for i in reference),
        'max_rel_diff_before_stop': noise,
        'max_rel_diff_after_resume': worst,
        'first_resumed_rel_diff': after[0] if after else None,
        'tolerance': tolerance,
        'ok': worst <= tolerance and bool(after),
    }
