"""The on-disk formats shared by training and evaluation: training checkpoints and exported backbones.

A training checkpoint is a folder ``{run}/checkpoints/ckpt-{iteration:08d}/`` holding ``model.pt``
(student, teacher, DINO centre, position, model spec; written by rank 0), one ``rank-{r:05d}.pt`` per
rank (optimizer partition, RNG states, data reader position) and ``COMPLETE`` (JSON: iteration, world size,
file sizes and SHA-256 digests), written last. The folder is assembled under a temporary name and renamed
into place, so a folder with the final name is either complete or was damaged afterwards, which the
digests catch. Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint never runs code.

An exported backbone is one safetensors file (the teacher backbone's weights) whose metadata
(``skipssl_common.artefacts.ExportMeta``) names the timm model and its keyword arguments, so ``load_backbone``
rebuilds it without the training config.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from skipssl_common.artefacts import ArtefactError, ExportMeta
from skipssl_common.io import PathLike, atomic_path, atomic_write_text, fsync_dir, sha256

CKPT_PREFIX = 'ckpt-'
COMPLETE = 'COMPLETE'
MODEL_FILE = 'model.pt'
_CKPT_RE = re.compile(r'^ckpt-(\d{8})$')


class CheckpointError(RuntimeError):
    pass


def rank_file(rank: int) -> str:
    return f'rank-{rank:05d}.pt'


def checkpoint_name(iteration: int) -> str:
    return f'{CKPT_PREFIX}{iteration:08d}'


# -- training checkpoints -------------------------------------------------------------------------------
def list_checkpoints(ckpt_root: PathLike) -> List[Tuple[int, Path]]:
    """(iteration, folder) of every finished-looking checkpoint folder, oldest first (temporaries skipped)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def verify_checkpoint(folder: PathLike, world_size: Optional[int] = None) -> Dict:
    """The checkpoint's COMPLETE record after checking that every file it lists is there with its digest;
    CheckpointError naming what is wrong otherwise."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f'{folder}: no {COMPLETE} marker (the write did not finish)')
    try:
        record = json.loads(marker.read_text())
    except ValueError as exn:
        raise CheckpointError(f'{marker}: unreadable ({exn})') from exn
    for name, info in record.get('files', {}).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f'{folder}: {name} is missing')
        if f.stat().st_size != info['bytes']:
            raise CheckpointError(f'{f}: {f.stat().st_size} bytes, {info["bytes"]} were written (truncated?)')
        if sha256(f) != info['sha256']:
            raise CheckpointError(f'{f}: SHA-256 differs from the one recorded at write time (corrupt)')
    if world_size is not None:
        check_world_size(record, folder, world_size)
    return record


def check_world_size(record: Dict, folder: PathLike, world_size: int) -> None:
    """A resume needs the ranks that wrote the checkpoint (CheckpointError otherwise)."""
    if record.get('world_size') != world_size:
        raise CheckpointError(
            f'{folder} was written by {record.get("world_size")} ranks, this run has {world_size}: exact resume '
            'needs the same number of ranks (optimizer partitions, RNG and reader positions are per rank)'
        )


def finalize_checkpoint(tmp_folder: PathLike, final_folder: PathLike, record: Dict) -> None:
    """Write COMPLETE (with sizes and digests of every file) into ``tmp_folder`` and rename it into place."""
    tmp_folder, final_folder = Path(tmp_folder), Path(final_folder)
    record = dict(record)
    record['files'] = {
        f.name: {'bytes': f.stat().st_size, 'sha256': sha256(f)}
        for f in sorted(tmp_folder.iterdir())
        if f.is_file() and f.name != COMPLETE
    }
    atomic_write_text(json.dumps(record, indent=1), tmp_folder / COMPLETE)
    fsync_dir(tmp_folder)
    if final_folder.exists():  # same iteration saved again (e.g. end of epoch == every-N boundary)
        shutil.rmtree(final_folder)
    os.replace(tmp_folder, final_folder)
    fsync_dir(final_folder.parent)


def prune_checkpoints(ckpt_root: PathLike, keep: int) -> List[Path]:
    """Delete all but the newest ``keep`` checkpoints (and stale temporaries); returns what was deleted."""
    deleted = []
    root = Path(ckpt_root)
    for _, folder in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)
        deleted.append(folder)
    for tmp in root.glob(f'.{CKPT_PREFIX}*.tmp*') if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        deleted.append(tmp)
    return deleted


def load_file(path: PathLike, map_location: Union[str, torch.device] = 'cpu') -> Dict:
    """torch.load with weights_only=True and a message naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exn:
        raise CheckpointError(f'cannot load {path}: {type(exn).__name__}: {exn}') from exn


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint folder from a checkpoint folder, its model.pt, a run folder or its checkpoints folder
    (newest complete checkpoint)."""
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent
    if (p / COMPLETE).is_file():
        return p
    for root in (p / 'checkpoints', p):
        for _, folder in reversed(list_checkpoints(root)):
            if (folder / COMPLETE).is_file():
                return folder
    raise CheckpointError(
        f'no complete checkpoint at {path} (expected a run folder, its checkpoints/ folder, '
        f'a {CKPT_PREFIX}XXXXXXXX folder or an exported .safetensors backbone)'
    )


# -- backbones ------------------------------------------------------------------------------------------
def build_backbone(name: str, kwargs: Optional[Dict] = None) -> nn.Module:
    """A timm ViT (or SkipAt-ViT) without classifier that takes inputs of any size."""
    import timm

    from . import models  # noqa: F401  (registers the SkipAt models)

    kwargs = dict(kwargs or {})
    kwargs.setdefault('dynamic_img_size', True)
    if not timm.is_model(name):
        raise ValueError(
            f"unknown model {name!r}: not in timm's registry (e.g. vit_small_patch16_224, vit_small_patch16_skipat_224)"
        )
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exn:
        raise ValueError(f'model {name!r} does not take these arguments {sorted(kwargs)}: {exn}') from exn


# What a file may ask timm.create_model for: the architecture arguments of timm's VisionTransformer and SkipAt's,
# each with a type and bounds (numbers) or its choices (strings). Anything else (checkpoint_path, pretrained,
# pretrained_cfg: weights or files from elsewhere; layer classes) is refused: a checkpoint or export is someone
# else's file, and its kwargs reach timm unchecked otherwise.
_INT, _FLOAT, _BOOL = (int,), (int, float), (bool,)
MODEL_KWARGS: Dict[str, Tuple[tuple, object]] = {
    'img_size': (_INT, (1, 4096)),
    'patch_size': (_INT, (1, 1024)),
    'in_chans': (_INT, (1, 16)),
    'embed_dim': (_INT, (1, 8192)),
    'depth': (_INT, (1, 256)),
    'num_heads': (_INT, (1, 256)),
    'mlp_ratio': (_FLOAT, (0, 64)),
    'reg_tokens': (_INT, (0, 64)),
    'init_values': (_FLOAT + (type(None),), (0, 10)),
    **{rate: (_FLOAT, (0, 1)) for rate in ('drop_rate', 'pos_drop_rate', 'patch_drop_rate', 'proj_drop_rate')},
    **{rate: (_FLOAT, (0, 1)) for rate in ('attn_drop_rate', 'drop_path_rate')},
    **{flag: (_BOOL, None) for flag in ('qkv_bias', 'qk_norm', 'proj_bias', 'class_token', 'no_embed_class')},
    **{flag: (_BOOL, None) for flag in ('pre_norm', 'final_norm', 'dynamic_img_size', 'dynamic_img_pad')},
    'fc_norm': (_BOOL + (type(None),), None),
    'global_pool': ((str,), ('', 'token', 'avg', 'max', 'avgmax', 'map')),
    'pos_embed': ((str,), ('learn', 'none')),
    'skip_indices': ((list, tuple), (0, 255)),
    'phi_hidden_ratio': (_FLOAT, (0, 64)),
    'phi_kernel_size': (_INT, (1, 63)),
}
MAX_PARAMETERS = 2_000_000_000  # a ViT-G/14 has 1.8e9; more would take minutes to build and fail on memory
MAX_TOKENS = 65536  # patches per image at img_size / patch_size


def _fits(value: object, types: tuple, allowed: object) -> bool:
    if value is not None and isinstance(value, bool) != (bool in types):  # True is an int to Python, not a depth
        return False
    if not isinstance(value, types):
        return False
    if isinstance(value, str):
        return isinstance(allowed, tuple) and value in allowed
    if isinstance(value, (int, float)) and isinstance(allowed, tuple) and not isinstance(value, bool):
        return bool(allowed[0] <= value <= allowed[1])  # False for NaN
    return True


def check_model_kwargs(kwargs: object, where: str) -> None:
    """CheckpointError naming ``where`` and the key when ``kwargs`` (a file's model arguments) asks timm for
    anything outside ``MODEL_KWARGS`` or its bounds, or for a model over MAX_PARAMETERS / MAX_TOKENS."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f'{where}: model kwargs are {type(kwargs).__name__}, not a mapping')
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            raise CheckpointError(
                f'{where}: model kwarg {str(key)[:60]!r} is refused (only the ViT architecture arguments reach '
                f'timm: {", ".join(MODEL_KWARGS)})'
            )
        types, allowed = MODEL_KWARGS[key]
        if key == 'skip_indices':
            ok = isinstance(value, types) and len(value) <= 256 and all(_fits(v, _INT, allowed) for v in value)
        else:
            ok = _fits(value, types, allowed)
        if not ok:
            raise CheckpointError(f'{where}: model kwarg {key}={str(value)[:60]} is out of range or of the wrong type')
    dim, depth = kwargs.get('embed_dim', 768), kwargs.get('depth', 12)
    tokens = (kwargs.get('img_size', 224) // kwargs.get('patch_size', 16)) ** 2
    params = depth * dim * dim * (4 + 2 * kwargs.get('mlp_ratio', 4.0)) + tokens * dim
    if tokens > MAX_TOKENS or params > MAX_PARAMETERS:
        raise CheckpointError(
            f'{where}: model kwargs ask for a ViT of about {params:.2g} parameters and {tokens} patches per image '
            f'(limits {MAX_PARAMETERS:.0e}, {MAX_TOKENS})'
        )


def save_backbone(backbone: nn.Module, path: PathLike, meta: ExportMeta) -> Path:
    """Export a backbone's weights as safetensors with what is needed to rebuild it; written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in backbone.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta.to_metadata())
    return path


def load_backbone(path: PathLike, which: str = 'teacher') -> Tuple[nn.Module, Dict]:
    """(backbone in eval mode, metadata) from an exported .safetensors backbone or a training checkpoint
    (``which`` of 'teacher' / 'student'; a run folder means its newest complete checkpoint)."""
    path = Path(path)
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise CheckpointError(f'no such backbone file: {path}')
        try:
            with safe_open(str(path), framework='pt') as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exn:
            raise CheckpointError(f'{path} is not a readable safetensors file ({type(exn).__name__}: {exn})') from exn
        try:
            export = ExportMeta.from_metadata(meta, str(path))
        except ArtefactError as exn:
            raise CheckpointError(str(exn)) from exn
        name, kwargs = export.model_name, export.model_kwargs
        meta['sha256'] = sha256(path)
    else:
        folder = resolve_checkpoint(path)
        record = verify_checkpoint(folder)
        blob = load_file(folder / MODEL_FILE)
        if which not in ('teacher', 'student'):
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
        state = {k[len('backbone.') :]: v for k, v in blob[which].items() if k.startswith('backbone.')}
        name, kwargs = blob['model']['name'], blob['model']['kwargs']
        pos = blob['position']
        meta = {
            'model_name': name,
            'model_kwargs': json.dumps(kwargs, sort_keys=True),
            'checkpoint': str(folder),
            'iteration': record['iteration'],
            'epoch': pos['epoch'],
            'images_seen': pos.get('images_seen'),
            'device_hours': pos.get('device_hours'),
            'device_hours_unit': pos.get('device_hours_unit'),
            'sha256': record['files'][MODEL_FILE]['sha256'],
            'which': which,
            **{k: json.dumps(v) for k, v in blob.get('data', {}).items()},
        }
    check_model_kwargs(kwargs, str(path))
    check_finite(state, path)
    backbone = build_backbone(name, kwargs)
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as exn:  # shapes: the weights of another model under this one's metadata
        detail = next((ln.strip() for ln in str(exn).splitlines() if 'size mismatch' in ln), str(exn)[:200])
        raise CheckpointError(f'{path}: weights do not fit {name}({kwargs}): {detail}') from exn
    if missing or unexpected:
        raise CheckpointError(
            f'{path}: weights do not fit {name}({kwargs}): missing {missing[:5]}, unexpected {unexpected[:5]}'
        )
    return backbone.eval(), meta


def check_finite(state: Dict[str, torch.Tensor], path: PathLike) -> None:
    """CheckpointError naming the file and the first tensor holding NaN or Inf: such weights give features
    and accuracies that look like numbers (10% on ten classes) but mean nothing."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f'{path}: weight {key} holds {bad} non-finite values (NaN/Inf) of {tensor.numel()}: a diverged or '
                'damaged model, refused before any feature is extracted'
            )
