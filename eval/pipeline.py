"""What ``knn_eval.py`` and ``linear_probe.py`` run: check every input, extract (or reuse) features, evaluate,
write results. Runs as one process or under torchrun (extraction on every rank, evaluation on rank 0).

Order of work, so bad input fails before anything expensive: options, shards (exist, labelled, sizes as
their index records), model (loads, is a ViT with a class token, the asked-for architecture, takes the data's
channels), result folder (writable); then one read of the shards (content digests and sample counts, against
the index; memoised) and k against the training set; then features; then the evaluator.
"""

import hashlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from . import distributed
from .data import ClassMap, Split, align_classes, check_disjoint, check_k, open_split, set_label_limits, verify_split
from .errors import EvalError
from .features import FeatureFile, FeatureSpec, feature_fn, get_features
from .knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_classify
from .linear import DEFAULT_BASE_LR, DEFAULT_BATCH, DEFAULT_EPOCHS, SWEEP_BASE_LRS, probe_augmented, probe_cached
from .results import log_scalars, result_dir, tb_dir, writable_dir, write_result
from .source import check_blocks, check_channels, data_settings, list_exports, load_model, looks_like_path


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_specs(checkpoint: str, all_exports: bool) -> List[str]:
    """The checkpoint itself, or with ``all_exports`` every per-epoch teacher export of the run folder."""
    if not all_exports:
        return [str(checkpoint)]
    exports = list_exports(Path(checkpoint))
    if not exports:
        raise EvalError(
            f'--all-exports: no {checkpoint}/export/teacher-XXXXXXXX.safetensors (is {checkpoint} a '
            'run folder of a run that finished an epoch?)'
        )
    return [str(p) for p in exports]


class _Job:
    """The checks and feature extraction both evaluators share."""

    def __init__(
        self,
        checkpoint: str,
        train_shards: str,
        test_shards: str,
        *,
        which: str = 'teacher',
        arch: Optional[str] = None,
        model_kwargs: Optional[Dict] = None,
        seed: int = 0,
        all_exports: bool = False,
        dataset: Optional[str] = None,
        run_dir: Optional[str] = None,
        out_dir: Optional[str] = None,
        cache_dir: Optional[str] = None,
        refresh: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        n_last_blocks: int = 4,
        precision: str = 'auto',
        device: str = 'auto',
        train_prefix: Optional[str] = None,
        test_prefix: Optional[str] = None,
        channels: Optional[int] = None,
        resize: Optional[int] = None,
        crop: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        allow_pipe_shards: bool = False,
    ):
        if which not in ('teacher', 'student'):
            raise EvalError(f'--which must be teacher or student, got {which!r}')
        if precision not in ('auto', 'fp32', 'bf16'):
            raise EvalError(f'--precision must be auto, fp32 or bf16, got {precision!r}')
        if batch_size < 1 or n_last_blocks < 1 or num_workers < 0:
            raise EvalError('--batch-size and --n-last-blocks must be positive, --num-workers >= 0')
        if run_dir is not None and not Path(run_dir).is_dir():
            raise EvalError(f'--run-dir {run_dir} is not a folder')
        if all_exports and not Path(checkpoint).is_dir():
            raise EvalError(f'--all-exports needs a run folder, got {checkpoint}')
        if not looks_like_path(str(checkpoint)) and run_dir is None and out_dir is None:
            raise EvalError(
                f'{checkpoint} is a model name (random init): say where results go with --run-dir RUN '
                '(the run this baseline belongs to) or --out-dir DIR'
            )
        self.opts = dict(which=which, arch=arch, model_kwargs=model_kwargs, seed=seed, run_dir=run_dir)
        self.overrides = dict(channels=channels, eval_resize=resize, eval_crop=crop, mean=mean, std=std)
        self.out_dir, self.cache_dir, self.refresh = out_dir, cache_dir, refresh
        self.batch_size, self.num_workers, self.n_last_blocks = batch_size, num_workers, n_last_blocks
        self.precision = precision
        self.allow_pipe = allow_pipe_shards
        self.train = open_split(train_shards, 'train', train_prefix, allow_pipe=allow_pipe_shards)
        self.test = open_split(test_shards, 'test', test_prefix, allow_pipe=allow_pipe_shards)
        self.val: Optional[Split] = None
        check_disjoint([self.train, self.test])
        self.classes = ClassMap(False, {})
        self.dataset = dataset or self.test.name
        self.specs = model_specs(checkpoint, all_exports)
        self.ranks = distributed.from_env(device)
        if self.precision == 'auto':
            self.precision = 'bf16' if self.ranks.device.type == 'cuda' else 'fp32'
        self._first = None

    def _load(self, spec: str):
        module, info = load_model(spec, **self.opts)
        data = data_settings(info, self.overrides)
        check_channels(module, info, data['channels'])
        check_blocks(module, info, self.n_last_blocks)
        results = writable_dir(result_dir(info, self.out_dir), 'result folder')
        return module, info, FeatureSpec.make(self.n_last_blocks, data, self.precision), results

    def _cache(self, results: Path) -> Path:
        return writable_dir(Path(self.cache_dir) if self.cache_dir else results / 'features', 'feature cache')

    def check(self) -> None:
        """Every model loaded and checked (a bad export at epoch 90 fails now, not after 89 extractions), then
        the data read once and verified: content digests and sample counts on every split."""
        check_disjoint(list(self.splits.values()))
        others = [split for role, split in self.splits.items() if role != 'train']
        self.classes = align_classes(self.train, others, say if self.ranks.main else lambda msg: None)
        self._first = self._load(self.specs[0])
        for spec in self.specs[1:]:
            self._load(spec)
        self.verify_data(self._cache(self._first[3]))

    @property
    def splits(self) -> Dict[str, Split]:
        return {'train': self.train, 'test': self.test, **({'val': self.val} if self.val is not None else {})}

    def verify_data(self, memo_dir: Path) -> None:
        """Rank 0 reads the shards, every rank gets the outcome (an error included: no rank is left waiting)."""
        outcome = None
        if self.ranks.main:
            try:
                for split in self.splits.values():
                    verify_split(split, memo_dir)
                check_disjoint(list(self.splits.values()))  # now by content too: a copy of the test shards
                outcome = {role: (s.digest, s.num_samples) for role, s in self.splits.items()}
            except EvalError as exn:
                outcome = str(exn)
        outcome = distributed.broadcast_object(outcome, self.ranks)
        if isinstance(outcome, str):
            raise EvalError(outcome)
        for role, split in self.splits.items():
            split.digest, split.num_samples = outcome[role]
        set_label_limits(self.train, list(self.splits.values()))

    def labels(self, role: str, features: FeatureFile) -> np.ndarray:
        """The labels of a split's features as training class indices (``ClassMap``)."""
        return self.classes.labels(role, features.labels)

    def data_digest(self) -> str:
        """What a result was computed on: the content of its train, test (and val) shards."""
        parts = '\n'.join(f'{role}:{s.digest}' for role, s in sorted(self.splits.items()))
        return hashlib.sha256(parts.encode()).hexdigest()

    def models(self):
        """(module, info, feature spec, results folder) per model, after ``check``."""
        if self._first is None:
            self.check()
        first, self._first = self._first, None
        for i, spec in enumerate(self.specs):
            (module, info, fspec, results), first = (first if i == 0 else self._load(spec)), None
            if module is not None:
                module.to(self.ranks.device)
            yield module, info, fspec, results

    def features(self, module, info, fspec, results, split: Split) -> Optional[FeatureFile]:
        return get_features(
            module,
            info,
            split,
            fspec,
            self._cache(results),
            self.ranks,
            self.batch_size,
            self.num_workers,
            self.refresh,
            say,
        )

    def extract_all(self, splits: Dict[str, Split]) -> List[tuple]:
        """(info, feature spec, results folder, {role: FeatureFile or None}) per model, every model's features
        extracted first: rank 0 then evaluates alone while the other ranks are already gone (no rank waits in
        a collective for minutes of k-NN or probe training)."""
        done = []
        for module, info, fspec, results in self.models():
            files = {role: self.features(module, info, fspec, results, split) for role, split in splits.items()}
            done.append((info, fspec, results, files))
            del module
            if self.ranks.device.type == 'cuda':
                torch.cuda.empty_cache()
        return done

    def close(self) -> None:
        self.ranks.close()


def _common_payload(job: _Job, info, fspec: FeatureSpec, files: Dict[str, FeatureFile]) -> Dict[str, Any]:
    return {
        'epoch': info.epoch,
        'iteration': info.iteration,
        'images_seen': info.images_seen,
        'train_shards': job.train.spec,
        'test_shards': job.test.spec,
        'data_digest': job.data_digest(),
        'shards': {
            role: {
                'spec': s.spec,
                'digest': s.digest,
                'num_samples': s.num_samples,
                'read': files[role].num if role in files else None,
            }
            for role, s in job.splits.items()
        },
        'features': {
            'n_last_blocks': fspec.n_last_blocks,
            'precision': fspec.precision,
            'files': {role: str(f.path) for role, f in files.items()},
            'extract_seconds': {role: float(f.meta.get('extract_seconds', 0)) for role, f in files.items()},
        },
        'data': {
            'channels': fspec.channels,
            'mean': list(fspec.mean),
            'std': list(fspec.std),
            'eval_resize': fspec.eval_resize,
            'eval_crop': fspec.eval_crop,
        },
        'world_size': job.ranks.world_size,
        'classes_matched_by': 'name' if job.classes.by_name else 'number',
    }


def run_knn(
    checkpoint: str,
    train_shards: str,
    test_shards: str,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    query_batch: int = 8192,
    faiss_gpu: str = 'auto',
    shortlist: float = 0,
    **options,
) -> List[Dict[str, Any]]:
    """DINO's weighted k-NN of each model on (train, test) shards; result dicts on rank 0 (empty elsewhere).
    ``shortlist`` > 1: the same neighbours through a bf16 shortlist re-scored exactly (eval/knn_shortlist.py)."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise EvalError(f'--k must be positive integers, got {ks}')
    if temperature <= 0:
        raise EvalError(f'--temperature must be positive, got {temperature}')
    if faiss_gpu not in ('auto', 'yes', 'no'):
        raise EvalError(f'--faiss-gpu must be auto, yes or no, got {faiss_gpu!r}')
    if shortlist and not shortlist > 1:
        raise EvalError(f'--shortlist must be 0 (exact search) or a multiple of k above 1, got {shortlist}')
    job = _Job(checkpoint, train_shards, test_shards, **options)
    out = []
    try:
        if job.train.num_samples is not None:  # the index's count: before the models load
            check_k(ks, job.train.num_samples, job.train.spec)
        job.check()
        check_k(ks, job.train.num_samples, job.train.spec)  # counted by the scan where there is no index
        prepared = job.extract_all({'train': job.train, 'test': job.test})
        for info, fspec, results, files in prepared if job.ranks.main else []:
            train, test = files['train'], files['test']
            check_k(ks, train.num, job.train.spec)
            say(f'[knn] {info.spec}: {train.num} train x {test.num} test, {train.knn_dim}-d, k {ks}')
            res = knn_classify(
                train.knn_rows(),
                job.labels('train', train),
                test.knn_rows(),
                job.labels('test', test),
                ks,
                temperature,
                max(train.num_classes, test.num_classes),
                query_batch,
                faiss_gpu,
                keep_predictions=False,
                progress=say,
                shortlist=shortlist,
            )
            payload = {**_common_payload(job, info, fspec, {'train': train, 'test': test}), **res.summary()}
            payload['feature_dim'] = train.knn_dim
            path = write_result(results, 'knn', info, job.dataset, job.data_digest(), payload)
            scalars = {
                **{f'top1_k{k}': v for k, v in res.top1.items()},
                **{f'top5_k{k}': v for k, v in res.top5.items()},
            }
            log_scalars(tb_dir(info, results), 'knn', job.dataset, scalars, info.iteration or 0)
            say(
                f'[knn] {info.spec}: '
                + ', '.join(f'k={k} top-1 {res.top1[k]:.2f} top-5 {res.top5[k]:.2f}' for k in res.ks)
                + f' -> {path}'
            )
            payload['_path'] = str(path)
            out.append(payload)
    finally:
        job.close()
    return out


def _load_all(job: _Job, role: str, ff: FeatureFile):
    return torch.from_numpy(ff.rows(0, ff.num)), torch.from_numpy(job.labels(role, ff))


def run_linear(
    checkpoint: str,
    train_shards: str,
    test_shards: str,
    *,
    lrs: Sequence[float] = (DEFAULT_BASE_LR,),
    sweep: bool = False,
    epochs: int = DEFAULT_EPOCHS,
    linear_batch_size: int = DEFAULT_BATCH,
    val_fraction: Optional[float] = None,
    val_shards: Optional[str] = None,
    augment: bool = False,
    **options,
) -> List[Dict[str, Any]]:
    """DINO's linear evaluation of each model; result dicts on rank 0 (empty elsewhere)."""
    lrs = list(SWEEP_BASE_LRS) if sweep else [float(v) for v in lrs]
    if not lrs or min(lrs) <= 0:
        raise EvalError(f'--lrs must be positive, got {lrs}')
    if epochs < 1 or linear_batch_size < 1:
        raise EvalError('--epochs and --linear-batch-size must be positive')
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise EvalError(f'--val-fraction must be in [0, 1), got {val_fraction}')
    if len(lrs) > 1 and augment and val_shards is None:
        raise EvalError(
            'a learning-rate sweep with --augment needs --val-shards (held-out labelled shards); the '
            'test set is never used to choose'
        )
    if len(lrs) > 1 and not augment and val_shards is None and val_fraction == 0:
        raise EvalError(
            'a learning-rate sweep needs --val-fraction > 0 or --val-shards: the lr is chosen on '
            'held-out training data, not on the test set'
        )
    job = _Job(checkpoint, train_shards, test_shards, **options)
    job.val = open_split(val_shards, 'val', allow_pipe=job.allow_pipe) if val_shards else None
    if augment and job.train.num_samples is None:
        raise EvalError(f'--augment needs a shard index with num_samples for {job.train.spec} (epoch length)')
    evaluator = 'linear_augment' if augment else 'linear'
    seed = options.get('seed', 0)
    splits = {role: split for role, split in job.splits.items() if role != 'train'}
    out = []

    def finish(info, fspec, results, files, res):
        payload = {**_common_payload(job, info, fspec, files), **res}
        path = write_result(results, evaluator, info, job.dataset, job.data_digest(), payload)
        scalars = {'top1': res['top1'], 'top5': res['top5']}
        if 'val_top1' in res:
            scalars['val_top1_best'] = max(res['val_top1'])
        log_scalars(tb_dir(info, results), evaluator, job.dataset, scalars, info.iteration or 0)
        say(
            f'[linear] {info.spec}: top-1 {res["top1"]:.2f} top-5 {res["top5"]:.2f} (lr {res["best_lr"]:g} x '
            f'batch/256) -> {path}'
        )
        payload['_path'] = str(path)
        out.append(payload)

    try:
        if not augment:  # every model's features first; then rank 0 trains the heads alone
            prepared = job.extract_all({**splits, 'train': job.train})
            for info, fspec, results, files in prepared if job.ranks.main else []:
                train_x, train_y = _load_all(job, 'train', files['train'])
                val = _load_all(job, 'val', files['val']) if 'val' in files else None
                num_classes = max(f.num_classes for f in files.values())
                say(f'[linear] {info.spec}: {len(train_x)} x {train_x.shape[1]} features, lrs {lrs}, {epochs} epochs')
                res = probe_cached(
                    train_x,
                    train_y,
                    *_load_all(job, 'test', files['test']),
                    num_classes,
                    lrs,
                    epochs,
                    linear_batch_size,
                    val_fraction,
                    seed,
                    job.ranks.device,
                    say,
                    val,
                )
                finish(info, fspec, results, files, res)
        else:  # every rank trains: augmented images through the frozen backbone, heads' gradients averaged
            for module, info, fspec, results in job.models():
                if module is None:
                    raise EvalError('--augment needs a backbone (not pixels)')
                files = {role: job.features(module, info, fspec, results, split) for role, split in splits.items()}
                main = job.ranks.main
                num_classes = max(f.num_classes for f in files.values()) if main else 0
                if job.train.classes:
                    num_classes = max(num_classes, len(job.train.classes))
                num_classes = distributed.broadcast_object(num_classes, job.ranks)  # one head shape everywhere
                fn, _ = feature_fn(module, fspec.n_last_blocks)
                res = probe_augmented(
                    module,
                    job.train.urls,
                    job.train.num_samples,
                    fn,
                    fspec,
                    _load_all(job, 'test', files['test']) if main else None,
                    num_classes,
                    job.ranks,
                    lrs,
                    epochs,
                    linear_batch_size,
                    _load_all(job, 'val', files['val']) if main and 'val' in files else None,
                    job.num_workers,
                    seed,
                    say,
                )
                if main:
                    finish(info, fspec, results, files, res)
    finally:
        job.close()
    return out
