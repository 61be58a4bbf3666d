"""The suite's stages. Each runs in a process of its own (``python -m bench.gpu_suite.stages NAME ...``, started
by bench.gpu_suite.runner) and puts its measurements into a Record as it goes."""

import argparse
import gc
import os
import platform
import sys
import tarfile
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List

from .pretrain_runs import PretrainRun, child_env, compare_losses
from .record import Record, read_json, write_json
from .sizes import MODES, Sizes


class Context:
    def __init__(self, sizes: Sizes, work: Path, results: Path, rec: Record):
        self.sizes, self.work, self.results, self.rec = sizes, work, results, rec
        self.data = work / 'data'

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path


NO_COMPILE = {'status': 'skipped', 'reason': 'CPU: inductor needs minutes and a C++ toolchain; compiled on CUDA'}


def _free_device_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- data ----------------------------------------------------------------------------------------------------
def prepare(ctx: Context) -> None:
    """Labelled synthetic JPEG shards, train and test, written here (nothing is carried but wheels)."""
    from .synthetic import make_datasets

    s = ctx.sizes
    t0 = time.perf_counter()
    folders = make_datasets(ctx.data, {'train': s.train_images, 'test': s.test_images}, s.image_size, s.workers)
    ctx.rec.put('shards', {k: str(v) for k, v in folders.items()})
    ctx.rec.put('images', {'train': s.train_images, 'test': s.test_images, 'size': list(s.image_size)})
    ctx.rec.put('bytes', sum(p.stat().st_size for p in ctx.data.rglob('*.tar')))
    ctx.rec.put('seconds', round(time.perf_counter() - t0, 2))


# -- (a) environment -------------------------------------------------------------------------------------------
def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> Dict:
    import subprocess

    try:
        out = subprocess.run(
            ['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm', '--format=csv,noheader'],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exn:
        return {'error': str(exn)}
    fields = [f.strip() for f in out.stdout.strip().split(',')]
    return (
        dict(zip(['name', 'driver', 'memory', 'max_sm_clock'], fields))
        if len(fields) == 4
        else {'raw': out.stdout + out.stderr}
    )


def env(ctx: Context) -> None:
    import torch

    from bench.backbone_throughput import device_name, pick_device
    from bench.train_step_throughput import peak_tflops
    from skipssl.models.throughput import synchronize

    device = pick_device(ctx.sizes.device)
    rec = ctx.rec
    rec.put('python', platform.python_version())
    rec.put('torch', torch.__version__)
    rec.put('cuda', torch.version.cuda)
    rec.put('cudnn', torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    rec.put(
        'packages',
        {
            n: _version(n)
            for n in (
                'torchvision',
                'timm',
                'deepspeed',
                'webdataset',
                'submitit',
                'faiss-cpu',
                'numpy',
                'safetensors',
                'pydantic',
                'triton',
            )
        },
    )
    rec.put('device', device_name(device))
    rec.put('cpu', device_name(torch.device('cpu')))
    rec.put('cpu_count', os.cpu_count())
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        rec.put(
            'gpu',
            {
                **_nvidia_smi(),
                'capability': f'{props.major}.{props.minor}',
                'multiprocessors': props.multi_processor_count,
                'memory_gib': props.total_memory / 2**30,
            },
        )
    peak = peak_tflops(device_name(device)) if device.type == 'cuda' else None
    rec.put('bf16_peak_tflops_for_mfu', peak)
    # a measured dense matmul next to the data-sheet peak: MFU is against the peak, this says what is reachable
    n = 8192 if device.type == 'cuda' else 512
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    synchronize(device)
    reps = 10 if device.type == 'cuda' else 2
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    rec.put('matmul', {'n': n, 'dtype': str(dtype), 'tflops': 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12})


# -- (b) the trainer -------------------------------------------------------------------------------------------
def _trainer_overrides(ctx: Context) -> List[str]:
    s = ctx.sizes
    return [
        *s.trainer_overrides,
        f'data.train_shards={ctx.data / "train"}',
        f'data.batch_size_per_rank={s.trainer_batch}',
        f'data.samples_per_epoch={s.trainer_batch * s.trainer_ipe}',
        f'train.epochs={s.trainer_epochs}',
        'optim.warmup_epochs=1',
        'loss.warmup_teacher_temp_epochs=1',
        'optim.freeze_last_layer_epochs=1',
        'train.log_every=1',
        'train.checkpoint_every=100000',
        'train.keep_checkpoints=10',
    ]


def _last_layer(blob: Dict) -> Dict:
    return {k: v for k, v in blob['student'].items() if 'last_layer' in k}


def _freeze_checks(ctx: Context, run: PretrainRun) -> Dict:
    """The head's last layer is frozen (lr 0) in the first epoch: between the checkpoints in the middle and
    at the end of that epoch it must not change by a bit, and by the last checkpoint it must have moved.
    (Against checkpoints, which hold exactly what the engine holds.) Under fp16 also the dynamic loss scaler's
    state."""
    import torch

    from skipssl import checkpoint as ckpt

    s = ctx.sizes
    checkpoints = dict(ckpt.list_checkpoints(run.dir / 'checkpoints'))
    mid, end, last = (checkpoints[i] for i in (s.trainer_ipe // 2, s.trainer_ipe, max(checkpoints)))
    mid_w, end_w, last_w = (_last_layer(ckpt.load_file(c / ckpt.MODEL_FILE)) for c in (mid, end, last))
    if not mid_w:
        raise RuntimeError('the student has no head.last_layer parameters to check')
    # our own file, just written: the full unpickler reads DeepSpeed's loss-scaler object as it is
    rank = torch.load(last / ckpt.rank_file(0), map_location='cpu', weights_only=False)
    opt = rank['optimizer'] if isinstance(rank['optimizer'], dict) else {}
    return {
        'checkpoints': sorted(checkpoints),
        'last_layer_unchanged_while_frozen': all(torch.equal(mid_w[k], end_w[k]) for k in mid_w),
        'last_layer_moved_after': any(not torch.equal(end_w[k], last_w[k]) for k in mid_w),
        'skipped_steps': rank['engine'].get('skipped_steps'),
        'loss_scale': getattr(opt.get('loss_scaler'), 'cur_scale', None),
        'dynamic_loss_scale': opt.get('dynamic_loss_scale'),
    }


def _run_summary(run: PretrainRun) -> Dict:
    """Its summary.json's figures (images/s over the whole loop, first iterations included) and the last
    logged interval's images/s (steady state)."""
    sm, losses = run.summary(), run.losses()
    its = sorted(losses)
    return {
        'iterations': sm.iterations,
        'finished': sm.finished,
        'stopped_by': sm.stopped_by,
        'images_per_s': sm.images_per_s,
        'last_interval_images_per_s': run.last_scalar('perf/images_per_s'),
        'wall_s': round(run.seconds, 1),
        'loss_first': losses[its[0]] if its else None,
        'loss_last': losses[its[-1]] if its else None,
    }


def trainer(ctx: Context) -> None:
    """pretrain.py: bf16 ZeRO-2 with device augmentation uninterrupted, the same run SIGTERMed and resumed,
    ZeRO-0 with torch.compile, fp16. Runs that do not depend on each other share the device at once: this
    stage checks behaviour, (c) and (d) measure speed."""
    s, rec = ctx.sizes, ctx.rec
    precision = 'bf16' if s.device == 'cuda' else 'fp32'
    work = ctx.folder('trainer')
    common = _trainer_overrides(ctx)
    env_ = child_env(threads=2 if s.device == 'cuda' else 1)
    zero2 = common + ['engine.zero_stage=2', f'engine.precision={precision}']
    mid_epoch = [f'train.checkpoint_every={s.trainer_ipe // 2}']  # for the last-layer freeze checks
    runs = {
        'zero2': PretrainRun('zero2', s.trainer_config, zero2, work, env_),
        'zero2_cut': PretrainRun('zero2_cut', s.trainer_config, zero2, work, env_),
        'zero0_compiled': PretrainRun(
            'zero0_compiled',
            s.trainer_config,
            common
            + mid_epoch
            + ['engine.zero_stage=0', f'engine.precision={precision}', f'model.compile={str(s.compile).lower()}'],
            work,
            env_,
        ),
    }
    if s.device == 'cuda':
        runs['fp16'] = PretrainRun(
            'fp16',
            s.trainer_config,
            # ZeRO 1: pretrain.py refuses fp16 at ZeRO 0 (DeepSpeed's ZeRO-0 fp16
            # optimizer does not scale the loss)
            common + mid_epoch + ['engine.zero_stage=1', 'engine.precision=fp16'],
            work,
            env_,
        )
    else:
        # the suite checks fp16's dynamic loss scaling on the GPU; a CPU dry run leaves it out (and many CPUs have no
        # fp16 kernels: skipssl.train.engine.precision_unsupported)
        rec.put('fp16', {'status': 'skipped', 'reason': 'fp16 runs in the suite on CUDA only'})
    rec.put(
        'config',
        {
            'file': s.trainer_config,
            'overrides': common,
            'precision': precision,
            'iterations': s.trainer_ipe * s.trainer_epochs,
            'compile': s.compile or NO_COMPILE,
        },
    )
    for run in runs.values():
        run.start()
    problems = []
    try:
        stopped_at = runs['zero2_cut'].sigterm_after(s.sigterm_after)
        cut = runs['zero2_cut'].wait()
        if cut.stopped_by != 'SIGTERM':
            raise RuntimeError(f'the interrupted run was not stopped by SIGTERM: {cut}')
        rec.put('sigterm', {'signalled_at_iteration': stopped_at, 'checkpoint_at': cut.iterations})
        runs['zero2_cut'].start()  # the same command resumes from its checkpoint
        # in order of what matters most, each recorded before the next is waited for (the stage has a cap)
        for name in ('zero2', 'zero2_cut'):
            runs[name].wait()
            rec.put(name, _run_summary(runs[name]))
        resume = rec.put('resume', compare_losses(runs['zero2'].losses(), runs['zero2_cut'].losses(), cut.iterations))
        if not resume['ok']:
            problems.append(f'resumed losses outside tolerance: {resume}')
        for name in ('fp16', 'zero0_compiled'):
            if name not in runs:
                continue
            runs[name].wait()
            rec.put(name, _run_summary(runs[name]))
            checks = rec.put(f'{name}_freeze', _freeze_checks(ctx, runs[name]))
            if not (checks['last_layer_unchanged_while_frozen'] and checks['last_layer_moved_after']):
                problems.append(f'{name}: last-layer freeze: {checks}')
        if 'fp16' in runs:  # the same schedule in bf16 (compiled): does fp16 learn as much?
            fp16, bf16 = rec.data['fp16']['loss_last'], rec.data['zero0_compiled']['loss_last']
            rec.put('fp16_vs_bf16_last_loss', {'fp16': fp16, 'bf16': bf16, 'rel_diff': abs(fp16 - bf16) / abs(bf16)})
    finally:
        for run in runs.values():
            if run.proc is not None and run.proc.poll() is None:
                run.proc.kill()
    if problems:
        raise AssertionError('; '.join(problems))


# -- (c) backbone throughput -----------------------------------------------------------------------------------
def backbone(ctx: Context) -> None:
    from bench import backbone_throughput as bt

    s, rec = ctx.sizes, ctx.rec
    batches = [str(b) for b in s.backbone_batches]
    parsed = {
        mode: bt.parse_args([*s.backbone_args, '--mode', mode, '--batch-sizes', *batches])
        for mode in ('infer', 'train')
    }
    for mode, (args, device) in parsed.items():
        rec.put(f'header_{mode}', bt.header(args, device))
    if not s.compile:
        rec.put('compiled', NO_COMPILE)
    results = rec.put('results', [])
    for compiled in [False] + ([True] if s.compile else []):  # eager first: a cap hit in compiling keeps it
        for mode, (args, device) in parsed.items():
            for bs in s.backbone_batches:
                results.append({'mode': mode, **bt.run_config(args, device, bs, compiled)})
                rec.put('results', results)
                _free_device_memory()


# -- (d) the DINO step -----------------------------------------------------------------------------------------
def step(ctx: Context) -> None:
    from bench import train_step_throughput as ts

    s, rec = ctx.sizes, ctx.rec
    args, device = ts.parse_args(list(s.step_args))
    ts.init_process_group(device)
    rec.put('header', ts.header(args, device))
    if not s.compile:
        rec.put('compiled', NO_COMPILE)
    results = rec.put('results', [])
    for compiled in [False] + ([True] if s.compile else []):
        for bs in s.step_batches:
            args.batch_size, args.compile_model = bs, compiled
            results.append(ts.measure(args, device))
            rec.put('results', results)
            _free_device_memory()


# -- (h) what SkipAt saves --------------------------------------------------------------------------------------
def saving(ctx: Context) -> None:
    """SkipAt against ViT by attention kind and token count (bench.skipat_saving), each cell recorded as it
    comes: a stage cut at its cap keeps the first geometries (197 tokens first)."""
    from bench import skipat_saving as ss
    from bench.train_step_throughput import init_process_group

    args, device = ss.parse_args(list(ctx.sizes.saving_args))
    if 'dino_step' in args.modes:
        init_process_group(device)
    report = ss.header(args, device)
    ctx.rec.put('header', dict(report))

    def save(r: Dict) -> None:
        ctx.rec.put('geometries', r['geometries'])
        ctx.rec.put('results', r['results'])

    ss.run_grid(args, device, report, save)


# -- (e) device augmentation and JPEG decoding -----------------------------------------------------------------
def _jpegs(shard_dir: Path, n: int) -> List[bytes]:
    out = []
    for tar_path in sorted(shard_dir.glob('*.tar')):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith('.jpg'):
                    out.append(tar.extractfile(member).read())
                    if len(out) == n:
                        return out
    return out


def augment(ctx: Context) -> None:
    import torch

    from bench.backbone_throughput import pick_device
    from bench.data_throughput import decode_rate, device_rate
    from skipssl.data import MultiCropConfig

    s, rec = ctx.sizes, ctx.rec
    device = pick_device(s.device)
    cfg = MultiCropConfig(n_local=s.aug_n_local)
    aug = rec.put('batched_multicrop_img_per_s', device_rate(cfg, device, s.aug_batch, s.aug_canvas, s.repeats))
    rec.put(
        'batched_multicrop',
        {
            'batch': s.aug_batch,
            'canvas': s.aug_canvas,
            'crops': f'{cfg.n_global}x{cfg.global_size} + {cfg.n_local}x{cfg.local_size}',
        },
    )
    # its share of a training step: the SkipAt eager step rate of stage (d) at the smallest batch, this run
    steps = read_json(ctx.results / 'step.json').get('measurements', {}).get('results', [])
    if steps:
        rate = steps[0]['skipat_img_per_s']
        rec.put(
            'share_of_step',
            {'step_img_per_s': rate, 'step_batch': steps[0]['batch_size'], 'share': (1 / aug) / (1 / aug + 1 / rate)},
        )
    else:
        rec.put('share_of_step', {'status': 'skipped', 'reason': 'stage step left no result'})
    jpegs = _jpegs(ctx.data / 'train', s.decode_batch)
    rec.put('jpeg', {'images': len(jpegs), 'mean_bytes': sum(map(len, jpegs)) / len(jpegs), 'size': list(s.image_size)})
    torch.set_num_threads(1)
    cpu = rec.put('decode_cpu_1thread_img_per_s', decode_rate(jpegs, torch.device('cpu'), s.decode_batch, s.repeats))
    if device.type == 'cuda':
        gpu = rec.put('decode_cuda_img_per_s', decode_rate(jpegs, device, s.decode_batch, s.repeats))
        rec.put('decode_cuda_over_cpu_core', gpu / cpu)
    else:
        rec.put('decode_cuda_img_per_s', {'status': 'skipped', 'reason': 'no CUDA device'})


KNN_MAX_DIFFERING = 0.001


# -- (f) feature extraction and k-NN ---------------------------------------------------------------------------
def knn(ctx: Context) -> None:
    from skipssl.checkpoint import build_backbone
    from skipssl_eval import distributed
    from skipssl_eval.data import open_split
    from skipssl_eval.features import FeatureSpec, extract
    from skipssl_eval.knn import Rows, knn_classify
    from skipssl_eval.synthetic import clustered_features

    s, rec = ctx.sizes, ctx.rec
    ranks = distributed.from_env(s.device)
    module = build_backbone(s.extract_model, dict(s.extract_kwargs)).to(ranks.device).eval()
    precision = 'bf16' if s.device == 'cuda' else 'fp32'
    spec = FeatureSpec(1, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), s.extract_resize, s.extract_crop, precision)
    split = open_split(str(ctx.data / 'train'), 'train')
    t0 = time.perf_counter()
    feats, _, _ = extract(
        module,
        split,
        spec,
        ranks,
        batch_size=256 if s.device == 'cuda' else 16,
        num_workers=s.workers,
        log=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    rec.put(
        'extraction',
        {
            'model': s.extract_model,
            'images': len(feats),
            'dim': feats.shape[1],
            'precision': precision,
            'seconds': seconds,
            'img_per_s': len(feats) / seconds,
            'workers': s.workers,
            'source': 'synthetic JPEG shards (decode + resize on the CPU)',
        },
    )
    del module
    _free_device_memory()

    train, ytr, centers = clustered_features(s.knn_train, s.knn_dim, s.knn_classes, spread=3.0, seed=0)
    test, yte, _ = clustered_features(s.knn_test, s.knn_dim, s.knn_classes, spread=3.0, seed=1, centers=centers)
    rec.put(
        'features',
        {
            'n_train': s.knn_train,
            'n_test': s.knn_test,
            'dim': s.knn_dim,
            'classes': s.knn_classes,
            'ks': list(s.knn_ks),
        },
    )
    results = {}
    for gpu in ('torch', 'no'):  # the torch search (on CUDA if present), then faiss's CPU index
        res = knn_classify(
            Rows.of(train), ytr, Rows.of(test), yte, s.knn_ks, query_batch=4096, gpu=gpu, num_classes=s.knn_classes
        )
        results[res.backend] = res
        rec.put(
            res.backend,
            {'top1': res.top1, 'seconds': res.seconds, 'queries_per_s': s.knn_test / max(res.seconds['search'], 1e-9)},
        )
    (a_name, a), (b_name, b) = results.items()
    differing = {k: int((a.predictions[k] != b.predictions[k]).any(1).sum()) for k in s.knn_ks}
    allowed = int(KNN_MAX_DIFFERING * s.knn_test)
    rec.put(
        'comparison',
        {
            'backends': [a_name, b_name],
            'differing_queries': differing,
            'predictions_match': all(v == 0 for v in differing.values()),
            'max_differing_allowed': allowed,
            'rule': 'same tie rules on both; cuBLAS and faiss sum the 384 products in different orders, so two '
            'neighbours within a float32 rounding of each other at the k-th place may swap: at most '
            f'{KNN_MAX_DIFFERING:.1%} of queries may differ',
            'search_speedup': b.seconds['search'] / max(a.seconds['search'], 1e-9),
        },
    )
    if max(differing.values()) > allowed:
        raise AssertionError(f'{a_name} and {b_name} predictions differ: {differing} of {s.knn_test} queries')


# -- (g) equal images: ViT against SkipAt ----------------------------------------------------------------------
def equal_images(ctx: Context) -> None:
    """The same DINO recipe, the same images (same shards, seed, batch and iteration count) for ViT and
    SkipAt, one after the other on the same device; device-seconds per image from each run's own clock
    (summary.json); then the k-NN of each exported teacher on the labelled train/test shards."""
    from skipssl_eval.pipeline import run_knn

    s, rec = ctx.sizes, ctx.rec
    work = ctx.folder('equal_images')
    env_ = child_env(threads=2 if s.device == 'cuda' else 1)
    overrides = [
        *s.equal_overrides,
        f'data.train_shards={ctx.data / "train"}',
        f'data.batch_size_per_rank={s.equal_batch}',
        f'data.samples_per_epoch={s.equal_batch * s.equal_iterations}',
        'train.epochs=1',
        'optim.warmup_epochs=0.25',
        'loss.warmup_teacher_temp_epochs=0',
        'optim.freeze_last_layer_epochs=0',
        f'train.log_every={max(1, s.equal_iterations // 4)}',
        'train.checkpoint_every=100000',
        'engine.zero_stage=0',
        f'engine.precision={"bf16" if s.device == "cuda" else "fp32"}',
    ]
    rec.put('recipe', {'overrides': overrides, 'images_per_run': s.equal_batch * s.equal_iterations})
    per_image = {}
    for key, config in s.equal_configs.items():
        run = PretrainRun(key, config, overrides, work, env_).start()
        summary = run.wait()
        seconds = summary.device_hours * 3600
        per_image[key] = seconds / summary.images_seen
        rec.put(
            key,
            {
                **_run_summary(run),
                'config': config,
                'images_seen': summary.images_seen,
                'device_hours': summary.device_hours,
                'unit': summary.device_hours_unit,
                'device_seconds_per_image': per_image[key],
            },
        )
    rec.put('skipat_over_vit_device_seconds_per_image', per_image['skipat'] / per_image['vit'])
    for key in s.equal_configs:
        out = run_knn(
            str(work / key),
            str(ctx.data / 'train'),
            str(ctx.data / 'test'),
            ks=s.knn_ks,
            out_dir=str(work / f'eval_{key}'),
            batch_size=256 if s.device == 'cuda' else 16,
            num_workers=s.workers,
            device=s.device,
        )
        rec.put(
            f'knn_{key}',
            {
                'top1': out[0]['top1'],
                'top5': out[0]['top5'],
                'backend': out[0]['backend'],
                'n_train': out[0]['n_train'],
                'n_test': out[0]['n_test'],
                'extract_seconds': out[0]['features']['extract_seconds'],
            },
        )
        _free_device_memory()


STAGES: Dict[str, Callable[[Context], None]] = {
    'prepare': prepare,
    'env': env,
    'trainer': trainer,
    'backbone': backbone,
    'step': step,
    'saving': saving,
    'augment': augment,
    'knn': knn,
    'equal_images': equal_images,
}
TITLES = {
    'prepare': 'synthetic labelled JPEG shards (train, test), written on the machine',
    'env': '(a) environment: device, driver, CUDA, torch and package versions, bf16 peak for MFU',
    'trainer': '(b) pretrain.py: bf16 ZeRO-2 device augmentation, SIGTERM + resume, ZeRO-0 compiled, fp16',
    'backbone': '(c) backbone throughput ViT vs SkipAt, inference and training, eager and compiled',
    'step': '(d) DINO step (2 global + 10 local crops): images/s, model FLOPs, MFU, SkipAt vs ViT',
    'saving': '(h) what SkipAt saves: SkipAt-S vs ViT-S, explicit and fused attention, 197/577/785 tokens',
    'augment': '(e) BatchedMultiCrop images/s and share of a step; JPEG decoding on the device',
    'knn': '(f) feature extraction; exact k-NN on the device against faiss on the CPU, same features',
    'equal_images': '(g) equal-images DINO, ViT vs SkipAt: device-seconds per image, k-NN after',
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='one stage of bench.gpu_suite (the runner starts these)')
    p.add_argument('stage', choices=list(STAGES))
    p.add_argument('--mode', choices=list(MODES), required=True)
    p.add_argument('--work', type=Path, required=True)
    p.add_argument('--results', type=Path, required=True, help="the suite's result folder (earlier stages)")
    p.add_argument('--partial', type=Path, required=True, help='measurements, rewritten as they come')
    p.add_argument('--error', type=Path, required=True, help='error and traceback, if it fails')
    args = p.parse_args(argv)
    ctx = Context(MODES[args.mode], args.work, args.results, Record(args.partial))
    try:
        STAGES[args.stage](ctx)
    except BaseException as exn:  # KeyboardInterrupt / SystemExit too: the runner reads why
        write_json({'error': f'{type(exn).__name__}: {exn}', 'traceback': traceback.format_exc()}, args.error)
        traceback.print_exc()
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
