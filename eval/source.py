"""What to evaluate, and what is known about it.

A model spec is one of:
- a training checkpoint folder, its ``model.pt``, a run folder or its ``checkpoints/`` (newest complete
  checkpoint; the teacher backbone unless ``which='student'``);
- an exported backbone ``*.safetensors`` (``{run}/export/teacher-XXXXXXXX.safetensors``);
- a timm model name (``vit_small_patch16_224``, ``vit_small_patch16_skipat_224``): random init, the baseline;
- ``pixels``: the flattened, normalised input image itself (a sanity baseline, no network).

Everything here is cheap (one weight load); feature extraction comes later.
"""

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from skipssl.checkpoint import MODEL_FILE, build_backbone, check_model_kwargs, load_backbone, resolve_checkpoint
from skipssl_common.artefacts import SUMMARY_FILE, ArtefactError, ExportMeta, Provenance, RunSummary

from .errors import EvalError

log = logging.getLogger(__name__)

PIXELS = 'pixels'
RANDOM_INIT = 'random-init'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_KEYS = ('channels', 'mean', 'std', 'eval_resize', 'eval_crop')
MAX_IMAGE_SIDE = 4096  # --resize / --crop: a ViT-S/16 at 4096 px has 65536 tokens per image
_FLAGS = {'channels': 'channels', 'mean': 'mean', 'std': 'std', 'eval_resize': 'resize', 'eval_crop': 'crop'}
IMAGENET_DATA = {
    'channels': 3,
    'mean': list(IMAGENET_MEAN),
    'std': list(IMAGENET_STD),
    'eval_resize': 256,
    'eval_crop': 224,
}


@dataclass
class ModelInfo(Provenance):
    """Provenance of the evaluated weights; stored in every result file and cache key. ``data``: the
    normalisation the model was trained with, if known."""

    spec: str  # what was asked for
    kind: str  # 'checkpoint' | 'export' | 'random-init' | 'pixels'
    model_name: str
    model_kwargs: Dict[str, Any]
    sha256: str  # of model.pt / the export / the random weights
    tag: str  # result-file tag: 8-digit iteration, 'random-init', 'pixels' or a digest prefix
    which: Optional[str] = None  # 'teacher' / 'student' for training checkpoints
    path: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def looks_like_path(spec: str) -> bool:
    return os.path.exists(spec) or os.sep in spec or spec.endswith(('.safetensors', '.pt'))


def find_run_dir(path: Path) -> Optional[Path]:
    """The run folder of a checkpoint or export, from where it lies (``{run}/export/``, ``{run}/checkpoints/``,
    or a run folder itself); never from what its metadata says (see ``_claimed_run``)."""
    path = Path(path).resolve()
    if path.is_dir() and any((path / n).exists() for n in (SUMMARY_FILE, 'config.yaml', 'checkpoints')):
        return path
    if path.parent.name in ('export', 'checkpoints'):
        return path.parent.parent
    return None


def _claimed_run(path: Path, claimed: Optional[str], run: Optional[Path]) -> None:
    """A note when an export's metadata names a run it does not lie in (carried out of it, or the run moved):
    its results go beside it (or to --out-dir), never into the named folder, which may be another run."""
    if claimed and (run is None or Path(claimed).resolve() != run):
        log.warning(
            '%s: its metadata names run %s, but the file lies %s: results go %s, not into the named run',
            path,
            str(claimed)[:200],
            f'in {run}' if run is not None else 'outside any run folder',
            f'into {run}' if run is not None else f'beside it ({path.parent / "eval"}) unless --out-dir says',
        )


def export_metadata(path: Path) -> ExportMeta:
    """Metadata of an exported backbone without reading its weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework='pt') as f:
            return ExportMeta.from_metadata(f.metadata() or {}, str(path))
    except (SafetensorError, OSError) as exn:
        raise EvalError(f'{path} is not a readable safetensors file ({exn})') from exn
    except ArtefactError as exn:
        raise EvalError(str(exn)) from exn


def _checkpoint_extras(folder: Path) -> Dict[str, Any]:
    """position and data of a training checkpoint's model.pt, memory-mapped: no second full read."""
    blob = torch.load(folder / MODEL_FILE, map_location='cpu', weights_only=True, mmap=True)
    return {**blob.get('position', {}), 'data': blob.get('data', {})}


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def check_vit(module: nn.Module, info: ModelInfo) -> None:
    """DINO's k-NN and linear features are CLS tokens of a ViT: refuse anything else at once."""
    if not (hasattr(module, 'forward_intermediates') and getattr(module, 'has_class_token', False)):
        raise EvalError(
            f'{info.spec}: {info.model_name} ({type(module).__name__}) is not a ViT with a class '
            "token; the evaluators use the CLS token of the last blocks (DINO's protocol)"
        )


def load_model(
    spec: str,
    which: str = 'teacher',
    arch: Optional[str] = None,
    seed: int = 0,
    model_kwargs: Optional[Dict[str, Any]] = None,
    run_dir: Optional[str] = None,
) -> Tuple[Optional[nn.Module], ModelInfo]:
    """(backbone in eval mode or None for pixels, its ModelInfo); EvalError / CheckpointError when unusable.

    ``arch``: the model name the caller expects; a checkpoint of another architecture is refused.
    ``model_kwargs`` / ``seed``: for a random-init timm model (kwargs default to the run's, when
    ``run_dir`` names a run of that model). A random-init model and ``pixels`` take the preprocessing of the run
    ``run_dir`` names (from its final export), if any.
    """
    spec = str(spec)
    if spec == PIXELS:  # no weights to carry preprocessing: the run's, as for a random-init baseline
        data = run_defaults(Path(run_dir))[1] if run_dir is not None else {}
        info = ModelInfo(
            spec, PIXELS, PIXELS, {}, hashlib.sha256(b'pixels').hexdigest(), PIXELS, run_dir=run_dir, data=data
        )
        return None, info
    try:
        if looks_like_path(spec):
            module, info = _load_saved(Path(spec), which)
        else:
            module, info = _random_init(spec, seed, model_kwargs, run_dir)
    except EvalError:
        raise
    except ValueError as exn:  # build_backbone: unknown model name, kwargs the model does not take
        raise EvalError(f'{spec}: {exn}') from exn
    if run_dir is not None:
        info.run_dir = str(run_dir)
    if arch is not None and arch != info.model_name:
        raise EvalError(
            f'{spec} holds a {info.model_name} backbone, not the {arch} asked for (--arch): '
            'a checkpoint of another architecture'
        )
    check_vit(module, info)
    return module, info


def _load_saved(path: Path, which: str) -> Tuple[nn.Module, ModelInfo]:
    if path.suffix == '.safetensors':
        module, meta = load_backbone(path)
        export, digest = ExportMeta.from_metadata(meta, str(path)), meta['sha256']
        iteration = export.iteration
        info = ModelInfo(
            str(path),
            'export',
            export.model_name,
            export.model_kwargs,
            digest,
            f'{int(iteration):08d}' if iteration is not None else digest[:12],
            path=str(path.resolve()),
            iteration=iteration,
            epoch=export.epoch,
            images_seen=export.images_seen,
            device_hours=export.device_hours,
            device_hours_unit=export.device_hours_unit,
            data={k: export.data[k] for k in DATA_KEYS if k in export.data},
        )
        run = find_run_dir(path)
        _claimed_run(path, export.run_dir, run)
    else:
        folder = resolve_checkpoint(path)  # raises CheckpointError naming what it expected
        module, meta = load_backbone(folder, which=which)
        extras = _checkpoint_extras(folder)
        info = ModelInfo(
            str(path),
            'checkpoint',
            meta['model_name'],
            json.loads(meta['model_kwargs']),
            meta['sha256'],
            f'{int(meta["iteration"]):08d}',
            which=which,
            path=str(folder.resolve()),
            iteration=meta['iteration'],
            epoch=extras.get('epoch', meta.get('epoch')),
            images_seen=extras.get('images_seen'),
            device_hours=extras.get('device_hours'),
            device_hours_unit=extras.get('device_hours_unit'),
            data=dict(extras.get('data') or {}),
        )
        run = find_run_dir(folder)
    info.run_dir = str(run) if run is not None else None
    return module, info


def _random_init(
    name: str, seed: int, model_kwargs: Optional[Dict[str, Any]], run_dir: Optional[str]
) -> Tuple[nn.Module, ModelInfo]:
    kwargs, data = model_kwargs, {}
    if run_dir is not None:
        run_model, data = run_defaults(Path(run_dir))
        if kwargs is None and run_model.get('name') == name:
            kwargs = run_model.get('kwargs')
    where = '--model-kwargs' if model_kwargs is not None else f'{run_dir}/{SUMMARY_FILE}'
    check_model_kwargs(kwargs if kwargs is not None else {}, where)
    torch.manual_seed(seed)
    module = build_backbone(name, kwargs or {})  # ValueError naming the model when timm does not know it
    info = ModelInfo(name, RANDOM_INIT, name, dict(kwargs or {}), state_digest(module), RANDOM_INIT, data=data)
    return module.eval(), info


def run_defaults(run_dir: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model {'name', 'kwargs'} from summary.json, data normalisation from the final export) of a run."""
    model, data = {}, {}
    if (run_dir / SUMMARY_FILE).is_file():
        try:
            model = RunSummary.read(run_dir).model
        except (OSError, ArtefactError) as exn:
            raise EvalError(str(exn)) from exn
    exports = list_exports(run_dir)
    if exports:
        meta = export_metadata(exports[-1])
        data = {k: meta.data[k] for k in DATA_KEYS if k in meta.data}
    return model, data


def list_exports(run_dir: Path) -> List[Path]:
    """The run's per-epoch teacher exports, oldest first (``teacher-XXXXXXXX.safetensors``)."""
    return sorted(Path(run_dir, 'export').glob('teacher-[0-9]*.safetensors'))


def preprocessing_flags(args: Any) -> Dict[str, Any]:
    """The preprocessing a command line sets (--channels, --resize, --crop, --mean, --std), for data_settings."""
    return {
        'channels': args.channels,
        'eval_resize': args.resize,
        'eval_crop': args.crop,
        'mean': args.mean,
        'std': args.std,
    }


def data_settings(info: ModelInfo, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Evaluation preprocessing: command line, else what the checkpoint says, else ImageNet's (DINO)."""
    settings = dict(IMAGENET_DATA)
    if info.kind == PIXELS:  # raw intensities: cosine similarity of the images themselves
        settings.update(mean=[0.0], std=[1.0])
    settings.update({k: v for k, v in info.data.items() if v is not None})
    settings.update({k: v for k, v in overrides.items() if v is not None})

    def refuse(key: str, why: str) -> EvalError:
        flag = _FLAGS[key]
        where = f'--{flag}' if overrides.get(key) is not None else f"{info.spec}: its preprocessing's {key}"
        return EvalError(f'{where} {str(settings[key])[:80]}: {why}')

    for key in ('channels', 'eval_resize', 'eval_crop'):
        value = settings[key]
        if isinstance(value, float) and value.is_integer():  # 256.0 in a hand-written export
            value = settings[key] = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise refuse(key, 'not an integer')
        if key == 'channels' and value not in (1, 3):
            raise refuse(key, 'images are read as 1 (grey) or 3 (RGB) channels')
        if not 1 <= value <= MAX_IMAGE_SIDE:
            raise refuse(key, f'an image side in pixels, 1..{MAX_IMAGE_SIDE}')
    channels = settings['channels']
    for key in ('mean', 'std'):
        raw = settings[key] if isinstance(settings[key], (list, tuple)) else [settings[key]]
        if not raw or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
            raise refuse(key, 'not a list of numbers')
        values = [float(v) for v in raw]
        if len(values) == 1:
            values = values * channels
        if len(values) != channels:
            raise refuse(key, f'{len(values)} values for {channels}-channel images')
        if not all(math.isfinite(v) for v in values) or (key == 'std' and min(values) <= 0):
            raise refuse(key, 'must be finite' + (' and positive (images are divided by it)' if key == 'std' else ''))
        settings[key] = values
    return settings


def check_channels(module: Optional[nn.Module], info: ModelInfo, channels: int) -> None:
    if module is None:
        return
    proj = getattr(getattr(module, 'patch_embed', None), 'proj', None)
    in_chans = getattr(proj, 'in_channels', None)
    if in_chans is not None and in_chans != channels:
        raise EvalError(
            f'{info.spec}: the model takes {in_chans}-channel images but the evaluation reads '
            f'{channels}-channel ones (set --channels, or use a checkpoint trained on this data)'
        )


def check_blocks(module: Optional[nn.Module], info: ModelInfo, n_last_blocks: int) -> None:
    depth = len(getattr(module, 'blocks', ())) if module is not None else None
    if depth is not None and n_last_blocks > depth:
        raise EvalError(f'{info.spec}: --n-last-blocks {n_last_blocks} but {info.model_name} has {depth} blocks')
