"""The training job, really run: pretrain.py as one process and under torchrun with 2 gloo processes,
DeepSpeed engines, real image shards; exact resume after SIGKILL, SIGTERM checkpoint-and-exit, corrupt
checkpoints, config errors, non-finite loss."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from skipssl import checkpoint as ckpt
from skipssl.config import ConfigError, load_config
from skipssl.train import state as train_state
from skipssl.train.distributed import DistInfo
from skipssl_common.distributed import free_port

from .image_shards import write_pattern_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'cpu_tiny_skipat.yaml')
pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


FMNIST = Path('/usr/share/datasets/fashion-mnist')
HAVE_FMNIST = (FMNIST / 't10k-images-idx3-ubyte.gz').exists()


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    """Fashion-MNIST's test split as shards when the Debian package is there (setup.sh installs it), else
    synthetic gratings (enough for everything but the loss-falls check)."""
    out = tmp_path_factory.mktemp('shards')
    if HAVE_FMNIST:
        from skipssl.data.make_shards import write_shards
        from skipssl.data.sources import open_source

        write_shards(
            open_source('fashion-mnist', FMNIST, 'test'), out, 'train', max_samples=2500, workers=1, progress=False
        )
        return out
    return write_pattern_shards(out, n=1024, n_shards=4)


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(('SLURM_', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_', 'TORCHELASTIC'))
    }
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return env


def command(out_dir, shards, *overrides, nproc=1):
    args = [
        'pretrain.py',
        '--config',
        TINY,
        f'data.train_shards={shards}',
        f'experiment.output_dir={out_dir}',
        *overrides,
    ]
    if nproc == 1:
        return [sys.executable, *args]
    return [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node',
        str(nproc),
        '--master_addr',
        '127.0.0.1',
        '--master_port',
        str(free_port()),
        *args,
    ]


def run(out_dir, shards, *overrides, nproc=1, timeout=300, check=True):
    proc = subprocess.run(
        command(out_dir, shards, *overrides, nproc=nproc),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f'pretrain.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def log_lines(run_dir):
    """Logged scalars by iteration; a resumed run re-logs iterations after its checkpoint: keep the last."""
    lines = {}
    for line in (Path(run_dir) / 'log.jsonl').read_text().splitlines():
        rec = json.loads(line)
        lines[rec['iteration']] = rec
    return lines


def final_weights(run_dir):
    return ckpt.load_file(ckpt.resolve_checkpoint(run_dir) / ckpt.MODEL_FILE)


# 2 ranks x 32 images = 64 per iteration; 768 samples per epoch = 12 iterations per epoch; a constant teacher
# temperature, so that the loss values of the two epochs compare (the CE includes the teacher's entropy)
SMALL = [
    'data.samples_per_epoch=768',
    'train.epochs=2',
    'train.log_every=1',
    'loss.warmup_teacher_temp=0.04',
    'loss.teacher_temp=0.04',
    'loss.warmup_teacher_temp_epochs=0',
]


@pytest.fixture(scope='module')
def single_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp('single') / 'run'
    proc = run(
        out,
        shards,
        'data.samples_per_epoch=256',
        'train.epochs=2',
        'train.log_every=1',
        'train.checkpoint_every=3',
        'train.keep_checkpoints=6',
        'data.num_workers=1',
    )
    return out, proc


@pytest.fixture(scope='module')
def torchrun_run(shards, tmp_path_factory):
    """2 processes under torchrun, ZeRO-1 (optimizer state partitioned over the ranks), fp32."""
    out = tmp_path_factory.mktemp('torchrun') / 'run'
    run(out, shards, *SMALL, 'engine.zero_stage=1', 'train.checkpoint_every=5', nproc=2)
    return out


# -- config ---------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys_and_wrong_types_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'epochs'\?\)"):
        load_config(TINY, ['train.epoch=3'])
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'ten'"):
        load_config(TINY, ['train.epochs=ten'])
    with pytest.raises(ConfigError, match=r'augment.global_scale: expected 2 values'):
        load_config(TINY, ['augment.global_scale=[0.1]'])
    with pytest.raises(ConfigError, match=r'engine.zero_stage: 0, 1 or 2'):
        load_config(TINY, ['engine.zero_stage=3'])
    bad = tmp_path / 'bad.yaml'
    bad.write_text('base: ' + TINY + '\noptim: {lr: 0.1}\n')
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lr'"):
        load_config(bad)
    with pytest.raises(ConfigError, match='not of the form'):
        load_config(TINY, ['train.epochs'])
    with pytest.raises(ConfigError, match=r'engine.precision: fp16 needs engine.zero_stage 1 or 2'):
        load_config(TINY, ['engine.precision=fp16'])
    with pytest.raises(ConfigError, match=r'loss.warmup_teacher_temp_epochs: a whole number of epochs'):
        load_config(TINY, ['loss.warmup_teacher_temp_epochs=1.5'])
    with pytest.raises(ConfigError, match=r'loss.teacher_temp_schedule: per_epoch or per_iteration'):
        load_config(TINY, ['loss.teacher_temp_schedule=daily'])
    assert (
        load_config(
            TINY, ['loss.warmup_teacher_temp_epochs=1.5', 'loss.teacher_temp_schedule=per_iteration']
        ).loss.warmup_teacher_temp_epochs
        == 1.5
    )


def test_config_overrides_inheritance_and_reference_presets():
    cfg = load_config(TINY, ['train.epochs=7', 'augment.global_scale=[0.3, 1]', 'model.kwargs.depth=6'])
    assert cfg.train.epochs == 7 and cfg.augment.global_scale == (0.3, 1.0) and cfg.model.kwargs['depth'] == 6
    assert cfg.model.kwargs['skip_indices'] == [1, 2]  # an override merges into the mapping
    vit = load_config(ROOT / 'configs' / 'cpu_tiny_vit.yaml')
    assert vit.model.name == 'vit_tiny_patch16_224' and 'skip_indices' not in vit.model.kwargs  # a file replaces it
    skip = load_config(ROOT / 'configs' / 'dino_skipat_vit_s16_100ep.yaml')
    plain = load_config(ROOT / 'configs' / 'dino_vit_s16_100ep.yaml')
    # DINO's ViT-S/16 recipe (Caron et al. 2021, appendix; main_dino.py defaults for vit_small)
    assert (skip.optim.base_lr, skip.optim.min_lr, skip.optim.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (skip.optim.weight_decay, skip.optim.weight_decay_end, skip.optim.clip_grad) == (0.04, 0.4, 3.0)
    assert (skip.head.out_dim, skip.teacher.momentum, skip.model.drop_path_rate) == (65536, 0.996, 0.1)
    assert (skip.data.batch_size_per_rank, skip.augment.n_local, skip.train.epochs) == (64, 10, 100)
    assert skip.model.kwargs['skip_indices'] == [3, 4, 5, 6, 7, 8]
    diff = {k for k, v in plain.to_dict().items() if v != skip.to_dict()[k]}
    assert diff == {'model', 'experiment'} and plain.experiment.name == skip.experiment.name


@pytest.mark.slow
def test_bad_shards_and_model_fail_before_training(tmp_path, shards):
    proc = run(tmp_path / 'r', tmp_path / 'nowhere', check=False)
    assert proc.returncode == 2 and 'data.train_shards' in proc.stderr and 'nowhere' in proc.stderr
    proc = run(tmp_path / 'r', shards, 'model.kwargs.skip_indices=[0, 9]', check=False)
    assert proc.returncode == 2 and 'model:' in proc.stderr and 'skip' in proc.stderr
    assert not (tmp_path / 'r' / 'checkpoints').exists()


# -- single process, no launcher ------------------------------------------------------------------------
def test_single_process_run_writes_everything(single_run):
    out, proc = single_run
    assert 'state: finished' in proc.stdout
    cfg = load_config(out / 'config.yaml')  # the resolved config round-trips through the loader
    assert cfg.experiment.output_dir == str(out) and cfg.data.samples_per_epoch == 256
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['finished'] and summary['iterations'] == 16 and summary['epochs_done'] == 2
    assert summary['images_seen'] == 16 * 32 and summary['device_hours_unit'] == 'core-hours'
    assert summary['device_hours'] > 0 and [e['iteration'] for e in summary['per_epoch']] == [8, 16]
    assert summary['skipat'] and summary['config_name'] == 'cpu_tiny'
    # checkpoints every 3 iterations and at epoch ends, the newest 6 kept
    assert [i for i, _ in ckpt.list_checkpoints(out / 'checkpoints')] == [6, 8, 9, 12, 15, 16]
    for name in ('teacher-00000008.safetensors', 'teacher-00000016.safetensors', 'teacher.safetensors'):
        backbone, meta = ckpt.load_backbone(out / 'export' / name)
        assert meta['model_name'] == 'vit_tiny_patch16_skipat_224' and json.loads(meta['channels']) == 1
    # the final export is the newest checkpoint's teacher backbone
    blob = final_weights(out)
    exported, _ = ckpt.load_backbone(out / 'export' / 'teacher.safetensors')
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, blob['teacher'][f'backbone.{k}'])


def test_logged_schedules_follow_dino_formulas(single_run):
    """Every schedule moves in the tiny preset (8 iterations per epoch, 2 epochs): what the schedules say and
    what the optimizer applied, group by group, follow DINO's formulas (DINO's own cosine_scheduler, the
    teacher temperature per epoch) at every iteration."""
    from .test_dino_reference import dino_cosine_scheduler

    out, _ = single_run
    lines = log_lines(out)
    assert sorted(lines) == list(range(1, 17))
    ipe, epochs = 8, 2
    lr = dino_cosine_scheduler(0.008 * 32 / 256, 1e-5, epochs, ipe, warmup_epochs=1)
    wd = dino_cosine_scheduler(0.04, 0.2, epochs, ipe)
    momentum = dino_cosine_scheduler(0.96, 1.0, epochs, ipe)
    temp = np.concatenate((np.linspace(0.03, 0.05, 1), [0.05]))  # DINO's warm-up over 1 epoch, one value per epoch
    for i in range(epochs * ipe):
        rec, frozen = lines[i + 1], i < ipe
        assert rec['train/lr'] == pytest.approx(lr[i], rel=1e-6, abs=1e-12), i
        assert rec['train/weight_decay'] == pytest.approx(wd[i], rel=1e-6), i
        assert rec['train/teacher_momentum'] == pytest.approx(momentum[i], rel=1e-9), i
        assert rec['train/teacher_temp'] == pytest.approx(temp[i // ipe], rel=1e-9), i
        # applied: lr on every group but the frozen last layer, decay on the decay groups only
        assert rec['optim/lr/decay'] == rec['optim/lr/no_decay'] == pytest.approx(lr[i], rel=1e-6, abs=1e-12), i
        assert rec['optim/lr/decay_last_layer'] == (0.0 if frozen else pytest.approx(lr[i], rel=1e-6)), i
        assert (
            rec['optim/weight_decay/decay']
            == rec['optim/weight_decay/decay_last_layer']
            == pytest.approx(wd[i], rel=1e-6)
        )
        assert rec['optim/weight_decay/no_decay'] == 0.0
        assert 0 < rec['optim/clipped_fraction'] < 1, (i, rec['optim/clipped_fraction'])  # the clip really clips
        assert np.isfinite(rec['train/loss']) and rec['perf/images_per_s'] > 0
        assert 0 <= rec['collapse/teacher_entropy'] <= np.log(256) + 1e-4
    assert lines[1]['train/lr'] == 0.0 and lines[9]['train/lr'] == pytest.approx(0.008 * 32 / 256)
    assert len({rec['train/weight_decay'] for rec in lines.values()}) == 16
    assert lines[16]['train/teacher_momentum'] < 1.0 and lines[1]['train/teacher_momentum'] == pytest.approx(0.96)


def test_last_layer_is_frozen_during_the_first_epoch_only(single_run):
    """DINO's freeze in a real run: the head's last layer keeps its initial weights through epoch 1 (checkpoints
    at iterations 6 and 8) and moves at the first step after it (9), while the rest of the network moves from
    the start."""
    from skipssl.train.plan import build_student

    out, _ = single_run
    cfg = load_config(out / 'config.yaml')
    torch.manual_seed(cfg.experiment.seed)  # as the trainer builds the student
    init = build_student(cfg).state_dict()
    folders = dict(ckpt.list_checkpoints(out / 'checkpoints'))
    student = {i: ckpt.load_file(folders[i] / ckpt.MODEL_FILE)['student'] for i in (6, 8, 9)}
    for key in ('head.last_layer.weight_v', 'head.last_layer.weight_g'):
        assert torch.equal(student[6][key], init[key]) and torch.equal(student[8][key], init[key]), key
        assert not torch.equal(student[9][key], init[key]), key
    for key in ('backbone.patch_embed.proj.weight', 'head.mlp.0.weight'):
        assert not torch.equal(student[6][key], init[key]), key


def test_tensorboard_has_scalars_attention_maps_and_config(single_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = single_run
    acc = EventAccumulator(str(out / 'tb'), size_guidance={'images': 0, 'scalars': 0, 'tensors': 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        'train/loss',
        'train/lr',
        'train/weight_decay',
        'train/teacher_momentum',
        'train/teacher_temp',
        'collapse/teacher_entropy',
        'collapse/kl',
        'collapse/center_norm',
        'perf/images_per_s',
        'perf/data_wait_s',
        'perf/compute_s',
        'data/skipped_samples',
        'cost/core_hours',
    ):
        assert tag in tags['scalars'], tag
    assert len(acc.Scalars('train/loss')) == 16
    assert {'attention/images', 'attention/last_layer_cls', 'attention/last_layer_cls_mask60'} <= set(tags['images'])
    assert len(acc.Images('attention/last_layer_cls')) == 2  # once per epoch
    # at the iteration of each epoch's end, the step every scalar uses
    assert [e.step for e in acc.Images('attention/last_layer_cls_mask60')] == [8, 16]
    assert any('config' in t for t in tags['tensors'])


# -- two processes under torchrun -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FMNIST, reason=f'needs Fashion-MNIST in {FMNIST} (Debian package dataset-fashion-mnist)')
def test_torchrun_two_processes_train_and_loss_falls(torchrun_run):
    summary = json.loads((torchrun_run / 'summary.json').read_text())
    assert summary['finished'] and summary['device']['world_size'] == 2 and summary['global_batch'] == 64
    lines = log_lines(torchrun_run)
    losses = [lines[i]['train/loss'] for i in sorted(lines)]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses
    record = ckpt.verify_checkpoint(ckpt.resolve_checkpoint(torchrun_run))
    assert record['world_size'] == 2 and {'rank-00000.pt', 'rank-00001.pt', 'model.pt'} <= set(record['files'])


def _wait_for(predicate, proc, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f'process ended ({proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}')
        time.sleep(0.2)
    raise AssertionError(f'timed out waiting for {what}')


def _descendants(pid: int) -> list:
    """Every process below ``pid`` (torchrun starts each worker in a session of its own, so killing
    torchrun's process group leaves the workers running)."""
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL to torchrun and every worker and loader process at once, as a node failure would."""
    victims = [proc.pid] + _descendants(proc.pid)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f'/proc/{pid}').exists() and 'Z' not in _state(pid) for pid in victims):
        assert time.time() < deadline, 'a killed process is still running'
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return 'Z'


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(torchrun_run, shards, tmp_path):
    """Killed (SIGKILL to every process) after the checkpoint at iteration 10, resumed from it (mid-epoch:
    12 iterations per epoch): the same losses and the same final weights as the uninterrupted run."""
    out = tmp_path / 'run'
    cmd = command(out, shards, *SMALL, 'engine.zero_stage=1', 'train.checkpoint_every=5', nproc=2)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _wait_for(
            lambda: (
                (out / 'checkpoints' / 'ckpt-00000010' / ckpt.COMPLETE).exists()
                and (out / 'log.jsonl').exists()
                and max(log_lines(out), default=0) >= 12
            ),
            proc,
            240,
            'iteration 12',
        )
    finally:
        _kill_all(proc)
    killed_at = max(log_lines(out))
    assert killed_at < 24 and not (out / 'summary.json').exists()
    # Where the kill lands is up to timing; the resume point must not be: drop what came after checkpoint 10
    # (as if the kill had come before checkpoint 12, the epoch's end), so the run resumes in mid-epoch.
    for folder in (out / 'checkpoints').iterdir():
        if folder.name != 'ckpt-00000010':
            shutil.rmtree(folder)
    proc = run(out, shards, *SMALL, 'engine.zero_stage=1', 'train.checkpoint_every=5', nproc=2)
    assert 'ckpt-00000010 (epoch 0, iteration 10)' in proc.stderr, proc.stderr[-3000:]
    ref, got = log_lines(torchrun_run), log_lines(out)
    assert sorted(got) == sorted(ref)
    for i in ref:
        for key in ('train/loss', 'collapse/teacher_entropy', 'collapse/center_norm'):
            assert got[i][key] == ref[i][key], (i, key, killed_at)
    a, b = final_weights(torchrun_run), final_weights(out)
    for part in ('student', 'teacher'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a['loss_center'], b['loss_center'])


def test_sigterm_writes_a_checkpoint_at_the_next_iteration_and_exits_cleanly(shards, tmp_path):
    out = tmp_path / 'run'
    cmd = command(out, shards, 'data.samples_per_epoch=4096', 'train.epochs=1', 'train.log_every=1')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(
            lambda: (out / 'log.jsonl').exists() and max(log_lines(out), default=0) >= 3, proc, 180, 'iteration 3'
        )
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert 'SIGTERM received' in stderr and 'state: stopped (SIGTERM)' in stdout
    summary = json.loads((out / 'summary.json').read_text())
    last = max(log_lines(out))
    assert not summary['finished'] and summary['stopped_by'] == 'SIGTERM' and summary['iterations'] == last < 128
    assert [i for i, _ in ckpt.list_checkpoints(out / 'checkpoints')] == [last]
    ckpt.verify_checkpoint(out / 'checkpoints' / ckpt.checkpoint_name(last))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(single_run, tmp_path, caplog):
    src, _ = single_run
    out = tmp_path / 'run'
    shutil.copytree(src, out)
    newest = out / 'checkpoints' / 'ckpt-00000016' / ckpt.MODEL_FILE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    # a write that crashed before the rename leaves only a temporary folder, which is never picked
    (out / 'checkpoints' / '.ckpt-00000017.tmp').mkdir()
    info = DistInfo(0, 1, 0, torch.device('cpu'), 'single')
    with caplog.at_level('WARNING'):
        chosen = train_state.find_resumable(out / 'checkpoints', info)
    assert chosen.name == 'ckpt-00000015' and 'truncated' in caplog.text
    with pytest.raises(ckpt.CheckpointError, match='truncated'):
        ckpt.verify_checkpoint(newest.parent)


def test_checkpoints_load_weights_only():
    # the rank files hold DeepSpeed optimizer states; only its plain data classes are allow-listed
    names = {c.__name__ for c in train_state._safe_globals()}
    assert names == {'LossScaler', 'DynamicLossScaler', 'ZeroStageEnum', 'fragment_address'}


def test_non_finite_loss_stops_naming_the_iteration_without_saving(shards, tmp_path):
    out = tmp_path / 'run'
    proc = run(
        out,
        shards,
        'data.samples_per_epoch=128',
        'train.epochs=1',
        'optim.base_lr=1e30',
        'optim.clip_grad=0',
        'optim.warmup_epochs=0',
        'train.log_every=1',
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    # the first step's loss is finite, the huge update makes the second one non-finite; counted from 1 as the
    # console's "it 1/4" is
    assert 'it 1/4 ' in proc.stderr and 'it 2/4 ' not in proc.stderr
    assert 'non-finite at iteration 2 ' in proc.stderr
    assert ckpt.list_checkpoints(out / 'checkpoints') == []


# bf16, ZeRO-2 over 2 ranks, 2 micro-batches per step, multi-crop on the training device from raw uint8
# batches: 2 x 2 x 16 = 64 images per step, 256 per epoch = 4 iterations per epoch, 2 epochs
OTHER_PATHS = [
    'data.samples_per_epoch=256',
    'train.epochs=2',
    'train.log_every=1',
    'engine.precision=bf16',
    'engine.zero_stage=2',
    'train.grad_accum_steps=2',
    'data.batch_size_per_rank=16',
    'data.augment_on=device',
    'data.canvas_size=32',
]


@pytest.mark.slow
def test_bf16_zero2_gradient_accumulation_and_device_augmentation_resume_exactly(shards, tmp_path):
    """The other engine and data paths: an uninterrupted run, and one stopped (with its checkpoint) at
    iteration 3, in the middle of the first epoch and of the last layer's freeze, then resumed with the same
    command. CPU arithmetic is deterministic, so the resumed run equals the uninterrupted one bit for bit:
    losses at every iteration, student (fp32 master) and teacher weights, DINO centre."""
    ref, out = tmp_path / 'ref', tmp_path / 'run'
    run(ref, shards, *OTHER_PATHS, nproc=2)
    summary = json.loads((ref / 'summary.json').read_text())
    assert summary['finished'] and summary['iterations'] == 8 and summary['global_batch'] == 64
    lines = log_lines(ref)
    assert sorted(lines) == list(range(1, 9)) and all(np.isfinite(r['train/loss']) for r in lines.values())
    blob = final_weights(ref)
    assert all(v.dtype == torch.float32 for v in blob['student'].values() if v.is_floating_point())

    run(out, shards, *OTHER_PATHS, 'train.stop_after_iterations=3', nproc=2)
    assert [i for i, _ in ckpt.list_checkpoints(out / 'checkpoints')] == [3]
    proc = run(out, shards, *OTHER_PATHS, nproc=2)
    assert 'ckpt-00000003 (epoch 0, iteration 3)' in proc.stderr, proc.stderr[-3000:]
    got = log_lines(out)
    assert sorted(got) == sorted(lines)
    for i in lines:
        assert got[i]['train/loss'] == lines[i]['train/loss'], i
    a, b = final_weights(ref), final_weights(out)
    for part in ('student', 'teacher'):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a['loss_center'], b['loss_center'])
