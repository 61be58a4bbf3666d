"""What a resume keeps, really run: the checkpoint records the identity of its training data (and the stream's
seed, shuffle buffer and epoch length); shards rebuilt at the same path are refused in one line naming what
changed, unless train.resume_with_changed_data says to go on (the interrupted epoch's stream starts again);
values a resumed run keeps (virtual slots, the global batch's accumulation steps) are what config.yaml records;
a checkpoint that cannot be written (disk full) is one line and the one before it stays valid."""

import json
import resource
import subprocess
from pathlib import Path

import pytest
import yaml

from skipssl import checkpoint as ckpt
from skipssl.config import ConfigError
from skipssl.data import resolve_shards
from skipssl.data.integrity import data_identity
from skipssl.train.run import check_output_dir
from skipssl_common.artefacts import RunSummary
from skipssl_common.io import sha256

from .image_shards import write_pattern_shards
from .test_failures import _one_error_line
from .test_train import ROOT, _env, command, run

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')
# one process, 32 images per iteration, 4 iterations per epoch
BASE = ['data.samples_per_epoch=128', 'train.epochs=1', 'train.attention_images=0', 'train.export_every_epoch=false']


def _shards(folder, seed):
    """Pattern shards whose index records every shard's size and SHA-256, as make_shards writes it."""
    write_pattern_shards(folder, n=256, n_shards=2, seed=seed)
    index = json.loads((folder / 'train-index.json').read_text())
    for s in index['shards']:
        s.update(num_bytes=(folder / s['name']).stat().st_size, sha256=sha256(folder / s['name']))
    (folder / 'train-index.json').write_text(json.dumps(index))


def _complete(run_dir):
    _, folder = ckpt.list_checkpoints(run_dir / 'checkpoints')[-1]
    return folder, json.loads((folder / ckpt.COMPLETE).read_text())


def test_resume_on_rebuilt_shards_is_refused_unless_asked_and_kept_values_are_recorded(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'run'
    _shards(data, seed=0)
    run(out, data, *BASE, 'train.stop_after_iterations=1')
    folder, record = _complete(out)
    first = data_identity(resolve_shards(str(data)))
    assert record['stream']['data']['fingerprint'] == first.fingerprint
    assert record['stream']['seed'] == 0 and record['stream']['iterations_per_epoch'] == 4

    # values a resume cannot apply: kept, said so, and config.yaml records what is in effect
    proc = run(out, data, *BASE, 'train.stop_after_iterations=2', 'data.virtual_slots=2', 'train.grad_accum_steps=2')
    assert 'not applied on resume' in proc.stderr and 'data.virtual_slots=2' in proc.stderr, proc.stderr[-3000:]
    assert 'train.grad_accum_steps=2' in proc.stderr
    recorded = yaml.safe_load((out / 'config.yaml').read_text())
    layout = _complete(out)[1]['layout']
    assert recorded['data']['virtual_slots'] == layout['slots'] == 1
    assert recorded['train']['grad_accum_steps'] == layout['accum'] == 1

    # the same shards rebuilt with other images: one line naming the change, nothing of the run touched
    _shards(data, seed=1)
    before = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.name != '.writer.lock'}
    proc = run(out, data, *BASE, check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'training data changed' in line and 'train-000000.tar' in line, line
    assert 'index train-index.json rewritten' in line and 'train.resume_with_changed_data=true' in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.name != '.writer.lock'} == before

    # so is another seed of the stream
    proc = run(out, data, *BASE, 'experiment.seed=1', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'experiment.seed 0 -> 1' in line, line

    # asked for: the run goes on, the interrupted epoch's stream started again, and says so
    proc = run(out, data, *BASE, 'train.resume_with_changed_data=true')
    assert "the interrupted epoch's stream starts again" in proc.stderr, proc.stderr[-3000:]
    summary = RunSummary.read(out)
    assert summary.finished and summary.iterations == 4
    assert summary.data_fingerprint == data_identity(resolve_shards(str(data))).fingerprint != first.fingerprint


def test_a_changed_epoch_length_is_refused_on_resume(tmp_path):
    data, out = tmp_path / 'data', tmp_path / 'run'
    write_pattern_shards(data, n=256, n_shards=2)
    run(out, data, *BASE, 'train.stop_after_iterations=1')
    proc = run(out, data, *BASE, 'data.samples_per_epoch=192', check=False)
    line = _one_error_line(proc.stderr)
    assert proc.returncode == 2 and 'epochs are 4 iterations' in line and 'makes them 6' in line, line


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_previous_one_stays(tmp_path):
    """Files limited to half a checkpoint's size once the resumed run trains (before, DeepSpeed may still compile
    its CPU ops, whose objects the limit would stop): the next checkpoint's write fails (EFBIG, as ENOSPC on a
    full disk; Python ignores SIGXFSZ)."""
    data, out = tmp_path / 'data', tmp_path / 'run'
    write_pattern_shards(data, n=256, n_shards=2)
    run(out, data, *BASE, 'train.stop_after_iterations=1')
    folder, _ = _complete(out)
    limit = (folder / ckpt.MODEL_FILE).stat().st_size // 2
    proc = subprocess.Popen(
        command(out, data, *BASE, 'train.stop_after_iterations=3'),
        cwd=ROOT,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if 'resumed from' in line:  # two iterations before the checkpoint at 3
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert proc.wait(timeout=300) == 2
    line = _one_error_line(''.join(lines))
    assert 'cannot write checkpoint' in line and 'ckpt-00000001 is kept' in line, line
    assert [f.name for _, f in ckpt.list_checkpoints(out / 'checkpoints')] == ['ckpt-00000001']
    ckpt.verify_checkpoint(folder)
    assert not list((out / 'checkpoints').glob('.ckpt-*'))


def test_an_output_dir_that_is_not_a_run_folder_is_refused(tmp_path):
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'thesis.tex').write_text('precious')
    for folder in (Path('/'), mine):
        with pytest.raises(ConfigError, match=rf'^experiment.output_dir: {folder} holds .* not a run folder'):
            check_output_dir(folder)
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'started' / 'submitit').mkdir(parents=True)  # skipssl_launch writes its logs there first
    for folder in ('new', 'empty', 'started'):
        check_output_dir(tmp_path / folder)
