#!/usr/bin/env python
"""The whole pipeline on Fashion-MNIST, on this machine's CPUs, with the code paths a cluster run uses:

shards -> DINO pretraining of a small SkipAt-ViT and the same ViT without SkipAt (torchrun, 2 processes,
DeepSpeed, checkpoints, TensorBoard) -> faiss k-NN and linear probe of both teachers, of the same networks
at random initialisation and of raw pixels -> SkipAt-ViT-S/16 vs ViT-S/16 throughput at 224 px -> report.

python demo.py                 # everything; a re-run reuses finished stages
python demo.py --fresh         # start over (deletes runs/demo)
python demo.py --iterations 60 --out runs/demo-small   # a reduced budget (the end-to-end test)
python demo.py --seeds 3 --out runs/demo3                # both runs with seeds 0, 1, 2: the report's mean,
                                                         # standard deviation and confidence interval

Seed 0's runs are runs/demo/{skipat,vit} (the config's seed); seed s > 0 runs in runs/demo/{skipat,vit}-seed{s}.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from skipssl_common.artefacts import SUMMARY_FILE, RunSummary
from skipssl_common.distributed import free_port

ROOT = Path(__file__).resolve().parent
WORLD = 2  # pretraining processes
FMNIST = Path('/usr/share/datasets/fashion-mnist')
CONFIGS = {'skipat': ROOT / 'configs' / 'demo_fmnist_skipat.yaml', 'vit': ROOT / 'configs' / 'demo_fmnist_vit.yaml'}


class Demo:
    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.data = Path(args.data).resolve()
        self.logs = self.out / 'logs'
        self.start = time.perf_counter()
        self.python = sys.executable
        self.seeds = range(args.seeds)

    # -- output ---------------------------------------------------------------------------------------------
    def status(self, stage: str, msg: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f'[{elapsed / 60:5.1f} min] {stage:<22s} {msg}', flush=True)

    def run(self, stage: str, cmd, log_name: str, env=None, progress=None) -> None:
        """Run a stage's command, its output to a log file; one status line per progress event."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / log_name
        full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
        with open(log_path, 'w') as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                log.write(line)
                if progress:
                    msg = progress(line)
                    if msg:
                        self.status(stage, msg)
            proc.wait()
        if proc.returncode != 0:
            tail = ''.join(log_path.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f'demo: stage {stage} failed (exit {proc.returncode}); log {log_path}:\n{tail}')

    @staticmethod
    def run_name(name: str, seed: int) -> str:
        """The run folder's name: seed 0 (the configs' seed) keeps the single-seed demo's folders."""
        return name if seed == 0 else f'{name}-seed{seed}'

    # -- stages ---------------------------------------------------------------------------------------------
    def shards(self) -> None:
        from skipssl.data.make_shards import write_shards
        from skipssl.data.sources import open_source

        if not (FMNIST / 'train-images-idx3-ubyte.gz').exists():
            raise SystemExit(
                f'demo: Fashion-MNIST is not in {FMNIST}: install the Debian package '
                'dataset-fashion-mnist (scripts/setup.sh does it when run as root)'
            )
        for split, prefix in (('train', 'train'), ('test', 'test')):
            index = self.data / f'{prefix}-index.json'
            if index.is_file():
                self.status('shards', f'{prefix}: reusing {index}')
                continue
            t = time.perf_counter()
            info = write_shards(
                open_source('fashion-mnist', FMNIST, split), self.data, prefix, workers=2, progress=False
            )
            self.status(
                'shards',
                f'{prefix}: {info["num_samples"]} images in {len(info["shards"])} shards '
                f'({time.perf_counter() - t:.0f} s)',
            )

    def pretrain(self, name: str, seed: int) -> None:
        run = self.run_name(name, seed)
        run_dir = self.out / run
        if (run_dir / SUMMARY_FILE).is_file() and RunSummary.read(run_dir).finished:
            self.status(f'pretrain {run}', f'reusing finished run {run_dir}')
            return
        from skipssl.config import load_config
        from skipssl.train.plan import make_plan

        overrides = [f'experiment.output_dir={run_dir}', f'data.train_shards={self.data / "train-index.json"}']
        if seed != 0:  # seed 0 is the configs' own: its command line stays the single-seed demo's
            overrides.append(f'experiment.seed={seed}')
        if self.args.iterations:
            # the same schedule shape in fewer iterations: 4 epochs of iterations/4 global batches
            per_epoch = max(self.args.iterations // 4, 1)
            batch = make_plan(load_config(CONFIGS[name], overrides), WORLD).global_batch
            overrides += [
                f'data.samples_per_epoch={per_epoch * batch}',
                'train.log_every=5',
                f'train.checkpoint_every={per_epoch}',
            ]
        total = make_plan(load_config(CONFIGS[name], overrides), WORLD).total_iterations
        cmd = [
            self.python,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node',
            str(WORLD),
            '--master_addr',
            '127.0.0.1',
            '--master_port',
            str(free_port()),
            'pretrain.py',
            '--config',
            str(CONFIGS[name]),
            *overrides,
        ]
        records = JsonlTail(run_dir / 'log.jsonl')

        def progress(_line: str):
            # the run's own log.jsonl, not its console lines; one status line per tenth of the budget
            msgs = [
                f'iteration {r["iteration"]}/{total}  loss {r["train/loss"]:.4f}  {r["perf/images_per_s"]:.1f} img/s'
                for r in records.new()
                if 'train/loss' in r and (r['iteration'] % max(total // 10, 1) == 0 or r['iteration'] == total)
            ]
            return msgs[-1] if msgs else None

        self.status(f'pretrain {run}', 'torchrun, 2 processes, DeepSpeed (gloo, fp32)')
        self.run(f'pretrain {run}', cmd, f'pretrain-{run}.log', env={'OMP_NUM_THREADS': '1'}, progress=progress)
        s = RunSummary.read(run_dir)
        self.status(
            f'pretrain {run}',
            f'done: {s.iterations} iterations, {s.images_seen} images, '
            f'{s.images_per_s:.0f} img/s, {s.device_hours:.3f} {s.device_hours_unit}',
        )

    def evaluate(self, name: str, seed: int) -> None:
        run = self.run_name(name, seed)
        run_dir = self.out / run
        # the first train shard (10,000 images) as the k-NN / linear-probe training set, the 10,000 test images
        # as queries: the prototype's protocol, and 6x less extraction than the full train split
        common = [
            '--train-shards',
            str(self.data / 'train-000000.tar'),
            '--test-shards',
            str(self.data / 'test-index.json'),
            '--dataset',
            'fashion-mnist-10k',
            '--run-dir',
            str(run_dir),
            '--num-workers',
            '0',
        ]
        spec = RunSummary.read(run_dir).model
        # seed 0: every per-epoch export (the k-NN-against-iterations curve); other seeds: the final teacher, the
        # figure the report's spread is over (each export costs a feature extraction of 20,000 images)
        teacher = ['--checkpoint', str(run_dir)] + (['--all-exports'] if seed == 0 else [])
        jobs = [('teacher', teacher)]
        if seed == 0:  # the baselines do not depend on the pretraining seed: evaluated once
            jobs.append(('random init', ['--checkpoint', spec['name'], '--model-kwargs', json.dumps(spec['kwargs'])]))
        # raw pixels, preprocessed as the run's own data (--run-dir): 28 px, 1 channel, its mean/std
        if name == 'vit' and seed == 0:
            jobs.append(('raw pixels', ['--checkpoint', 'pixels']))
        for what, model_args in jobs:
            self.status(f'k-NN {run}', what)
            self.run(
                f'k-NN {run}',
                [self.python, 'knn_eval.py', *model_args, *common],
                f'knn-{run}-{what.replace(" ", "-")}.log',
            )
            if what != 'raw pixels':
                # the linear probe takes --all-exports too; the demo probes the final teacher only, for time
                linear_args = [a for a in model_args if a != '--all-exports']
                self.status(f'linear probe {run}', what)
                self.run(
                    f'linear probe {run}',
                    [self.python, 'linear_probe.py', *linear_args, *common],
                    f'linear-{run}-{what.replace(" ", "-")}.log',
                )

    def benchmark(self) -> None:
        out = self.out / 'bench' / 'backbone_infer_small_cpu.json'
        if out.is_file():
            self.status('benchmark', f'reusing {out}')
            return
        self.status('benchmark', 'SkipAt-ViT-S/16 vs ViT-S/16 at 224 px, fp32 inference on this CPU')
        self.run(
            'benchmark',
            [self.python, '-m', 'bench.backbone_throughput', '--out', str(out)],
            'benchmark.log',
            progress=lambda line: line.strip() if 'ratio' in line else None,
        )

    def report(self) -> None:
        report_dir = self.out / 'report'
        self.run(
            'report',
            [
                self.python,
                '-m',
                'skipssl_eval.report',
                *[str(self.out / self.run_name(name, seed)) for seed in self.seeds for name in ('skipat', 'vit')],
                '--out-dir',
                str(report_dir),
            ],
            'report.log',
        )
        md = next(report_dir.glob('*.md'))
        bench = json.loads((self.out / 'bench' / 'backbone_infer_small_cpu.json').read_text())
        r = bench['results'][0]
        print('\n' + md.read_text())
        print(
            f'Throughput at 224 px on this machine ({bench["device"]}, fp32 inference, batch {r["batch_size"]}): '
            f'ViT-S/16 {r["vit_img_per_s"]:.1f} img/s, SkipAt-ViT-S/16 {r["skipat_img_per_s"]:.1f} img/s, '
            f"{r['ratio_skipat_over_vit']:.3f}x. The demo's 28 px models have 16 tokens, where Phi costs about as "
            'much as the attention it replaces, so they show no speed-up; the saving grows with the token count.'
        )
        print(f'\nReport: {md} (plot and JSON beside it)\nTensorBoard: tensorboard --logdir {self.out}')

    def main(self) -> None:
        if self.args.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.shards()
        for seed in self.seeds:  # one seed's runs and evaluations finished before the next seed starts
            for name in ('skipat', 'vit'):
                self.pretrain(name, seed)
            for name in ('skipat', 'vit'):
                self.evaluate(name, seed)
        self.benchmark()
        self.report()
        self.status('total', f'{(time.perf_counter() - self.start) / 60:.1f} min wall time')


class JsonlTail:
    """The records appended to a JSON-lines file since the last call (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new(self) -> List[Dict]:
        if not self.path.is_file():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind('\n') + 1]
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/demo', help='runs, evaluations, report (default runs/demo)')
    p.add_argument('--data', default='data/fmnist', help='shard folder (default data/fmnist)')
    p.add_argument('--iterations', type=int, default=0, help="pretraining budget per run (default: the config's)")
    p.add_argument('--fresh', action='store_true', help="delete the demo's runs and start over (shards are kept)")
    p.add_argument(
        '--seeds', type=int, default=1, help='pretrain and evaluate both models with seeds 0..N-1 (default 1)'
    )
    args = p.parse_args(argv)
    if args.seeds < 1:
        print(f'demo.py: error: --seeds must be at least 1, got {args.seeds}', file=sys.stderr)
        return 2
    Demo(args).main()
    return 0


if __name__ == '__main__':
    sys.exit(main())
