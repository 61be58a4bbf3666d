"""Typed experiment configuration: YAML files, dotted command-line overrides, validation before any work.

A config file is YAML with the sections below (every field has a default, DINO's ViT-S/16 reference setting
where there is one). ``base: other.yaml`` inherits from another file (relative to this one). Overrides are
``section.key=value`` strings whose values are parsed as YAML (``train.epochs=10``,
``augment.global_scale=[0.5,1.0]``). Unknown keys and values of the wrong type raise ConfigError naming the
key, before anything expensive starts.
"""

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from skipssl_common.io import deep_merge

from .data.multicrop import MultiCropConfig
from .data.pixels import MAX_IMAGE_PIXELS


class ConfigError(ValueError):
    pass


# A config is a few dozen values: deeper nesting or more values than these is a malformed or hostile file
# (a "billion laughs" document expands a few aliases into 10^9 values), refused before anything reads it.
MAX_YAML_DEPTH = 64
MAX_YAML_VALUES = 100_000
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 80, 80, 40
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 8


def short(value: Any) -> str:
    """``repr(value)`` cut to a bounded length without walking the whole value: what messages quote."""
    return _SHORT.repr(value)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounded nesting and alias expansion."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise ConfigError(f'nested more than {MAX_YAML_DEPTH} levels deep')
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node):
        n = _expanded_size(node, {})
        if n > MAX_YAML_VALUES:
            raise ConfigError(
                f'it holds {n} values with its aliases expanded, more than {MAX_YAML_VALUES} (a "billion laughs"?)'
            )
        return super().construct_document(node)


def _expanded_size(node: yaml.Node, memo: Dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded, counted in time linear in the document (shared nodes once)."""
    if id(node) not in memo:
        if isinstance(node, yaml.MappingNode):
            children = [n for kv in node.value for n in kv]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[id(node)]


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with nesting and alias expansion bounded; ConfigError (or yaml.YAMLError) when bad."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@dataclass
class ExperimentSection:
    name: str = 'dino'  # shared by the SkipAt and plain-ViT runs of one comparison
    output_dir: str = 'runs/dino'  # the run folder: checkpoints, logs, TensorBoard, summary
    seed: int = 0


@dataclass
class ModelSection:
    name: str = 'vit_small_patch16_skipat_224'  # any timm ViT or vit_*_skipat_* (SkipAt)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, skip_indices...)
    # 'fused' (timm's scaled-dot-product kernel) or 'explicit' (the N x N matrix written out, as timm 0.5.4 did);
    # same outputs, different time: docs/saving.md
    attention: str = 'fused'
    drop_path_rate: float = 0.1  # student only
    compile: bool = False  # torch.compile the backbone
    grad_checkpointing: bool = False


@dataclass
class HeadSection:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    norm_last_layer: bool = True


@dataclass
class LossSection:
    student_temp: float = 0.1
    center_momentum: float = 0.9
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    # DINO's code steps the teacher temperature once per epoch; 'per_iteration' interpolates within epochs
    teacher_temp_schedule: str = 'per_epoch'


@dataclass
class TeacherSection:
    momentum: float = 0.996  # cosine from this to momentum_end over training
    momentum_end: float = 1.0


@dataclass
class OptimSection:
    base_lr: float = 5e-4  # scaled by global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # 0 disables
    clip_mode: str = 'per_param'  # DINO's per-parameter norm, or 'global' (DeepSpeed's gradient_clipping)
    freeze_last_layer_epochs: float = 1.0


@dataclass
class DataSection:
    train_shards: str = ''  # folder, index json, .txt list or brace pattern
    samples_per_epoch: int = 0  # 0: the shards' sample count from their index
    batch_size_per_rank: int = 64  # micro-batch per rank
    num_workers: int = 8
    shuffle_buffer: int = 2000  # per virtual slot
    virtual_slots: int = 0  # the epoch's stream cut into this many slots, fixed at the run's start and
    #                                   kept on resume (0: ranks x workers at the start); ranks resume on divisors
    channels: int = 3
    augment_on: str = 'cpu'  # 'cpu': loader workers; 'device': BatchedMultiCrop on the training device
    canvas_size: int = 256  # device augmentation: images reach the device at this size
    max_skip_fraction: float = 0.01
    allow_pipe_shards: bool = False  # run 'pipe:' shard specs (also lines of a .txt list) as shell commands
    max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are skipped undecoded (decompression bombs); 0: no limit
    eval_resize: int = 256  # evaluation preprocessing, stored with exports
    eval_crop: int = 224


@dataclass
class TrainSection:
    epochs: int = 100
    grad_accum_steps: int = 1
    stop_after_iterations: int = 0  # >0: stop (with a checkpoint) there; the schedules still span all epochs
    log_every: int = 10  # iterations between logged scalars (the only host syncs)
    checkpoint_every: int = 1000  # iterations; a checkpoint is also written at every epoch's end
    keep_checkpoints: int = 3
    export_every_epoch: bool = True  # teacher backbone as safetensors at every epoch's end
    attention_images: int = 4  # last-layer attention maps of this many fixed images, every epoch
    collapse_warn_every: int = 100  # iterations between collapse checks
    restart_if_no_valid_checkpoint: bool = False  # checkpoints exist but none verifies: start again at 0 (else stop)
    # resume although the shards, experiment.seed or data.shuffle_buffer changed (else refused): the interrupted
    # epoch's stream of samples starts again
    resume_with_changed_data: bool = False


@dataclass
class EngineSection:
    device: str = 'auto'  # auto (cuda when available), cuda, cpu
    precision: str = 'bf16'  # bf16, fp16 (dynamic loss scaling), fp32
    zero_stage: int = 0  # 0, 1 or 2
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class Config:
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    model: ModelSection = field(default_factory=ModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    loss: LossSection = field(default_factory=LossSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    augment: MultiCropConfig = field(default_factory=MultiCropConfig)  # DINO's multi-crop recipe, every number
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineSection = field(default_factory=EngineSection)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- parsing and type checking --------------------------------------------------------------------------
def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _type_name(tp) -> str:
    return getattr(tp, '__name__', None) or str(tp).replace('typing.', '')


def _coerce(value: Any, tp, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted for floats, lists for tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as exn:
                errors.append(str(exn))
        raise ConfigError(errors[0] if errors else f'{key}: invalid value {short(value)}')
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key}: expected a list, got {short(value)}')
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f'{key}[{i}]') for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f'{key}: expected {len(args)} values, got {len(value)} ({short(value)})')
        return tuple(_coerce(v, a, f'{key}[{i}]') for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'{key}: expected a mapping, got {short(value)}')
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key}: expected a list, got {short(value)}')
        return [_coerce(v, args[0], f'{key}[{i}]') for i, v in enumerate(value)] if args else list(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{key}: expected true or false, got {short(value)}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'{key}: expected an integer, got {short(value)}')
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key}: expected a number, got {short(value)}')
        if not math.isfinite(value):  # no setting means infinity, and NaN passes every comparison check
            raise ConfigError(f'{key}: expected a finite number, got {value}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'{key}: expected a string, got {short(value)}')
        return value
    raise ConfigError(f'{key}: unsupported type {_type_name(tp)}')


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit('.', 1)[-1], known, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else f' (known: {", ".join(known)})'
    return ConfigError(f'unknown config key {key!r}{hint}')


def _build(cls, values: Dict[str, Any], prefix: str = ''):
    if not isinstance(values, dict):
        raise ConfigError(f'{prefix.rstrip(".") or "config"}: expected a mapping, got {short(values)}')
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for k in values:
        if k not in known:
            raise _unknown(prefix + str(k), known)
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values[f.name] or {}, key + '.')
        else:
            kwargs[f.name] = _coerce(values[f.name], tp, key)
    try:
        return cls(**kwargs)
    except ValueError as exn:  # a section's own checks (e.g. MultiCropConfig.__post_init__)
        raise ConfigError(f'{prefix.rstrip(".") or "config"}: {exn}') from exn


# free-form mappings: a file that sets one replaces its base's (overrides still merge key by key)
_WHOLE = {('model', 'kwargs'), ('engine', 'deepspeed')}


def _read_yaml(path: Path, seen: Tuple[Path, ...] = ()) -> Dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f'config file {path} does not exist')
    if path in seen:
        raise ConfigError(f'config inheritance loop: {" -> ".join(map(str, seen + (path,)))}')
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exn:
        raise ConfigError(f'{path}: not valid YAML: {exn}') from exn
    except ConfigError as exn:
        raise ConfigError(f'{path}: {exn}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: the top level must be a mapping of sections')
    base = data.pop('base', None)
    if base is not None:
        data = deep_merge(_read_yaml(path.parent / base, seen + (path,)), data, whole=_WHOLE)
    return data


def parse_overrides(overrides: Sequence[str]) -> Dict:
    """['train.epochs=10', 'model.kwargs.depth=6'] -> nested dict with YAML-parsed values."""
    out: Dict = {}
    for item in overrides:
        key, sep, raw = item.partition('=')
        if not sep or not key or any(not part for part in key.split('.')):
            raise ConfigError(f'override {short(item)} is not of the form section.key=value')
        try:
            value = load_yaml(raw) if raw != '' else ''
        except yaml.YAMLError as exn:
            raise ConfigError(f'override {short(item)}: value is not valid YAML: {exn}') from exn
        except ConfigError as exn:
            raise ConfigError(f'override {short(item)}: {exn}') from None
        node = out
        *parents, leaf = key.split('.')
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f'override {short(item)} conflicts with another override of {p!r}')
        node[leaf] = value
    return out


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> Config:
    """Config from a YAML file (or defaults) plus dotted overrides, validated."""
    data = _read_yaml(Path(path)) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: Dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


# -- semantic checks --------------------------------------------------------------------------------------
def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f'{key}: {msg}')


def validate(cfg: Config) -> None:
    """Value checks that need no files or devices (those are checked at start-up)."""
    e, o, d, t, a, lo = cfg.engine, cfg.optim, cfg.data, cfg.train, cfg.augment, cfg.loss
    # first: the warm-up checks below are bounded by it, and would name the warm-up for train.epochs=0
    _check(t.epochs >= 1, 'train.epochs', f'must be >= 1, got {t.epochs}')
    _check(e.precision in ('bf16', 'fp16', 'fp32'), 'engine.precision', f'bf16, fp16 or fp32, got {e.precision!r}')
    _check(e.zero_stage in (0, 1, 2), 'engine.zero_stage', f'0, 1 or 2, got {e.zero_stage}')
    # DeepSpeed's ZeRO-0 fp16 optimizer for a client optimizer (FP16_UnfusedOptimizer) is never handed the loss
    # to scale by engine.backward, yet divides the gradients by the loss scale before AdamW (seen in 0.19.8)
    _check(
        e.precision != 'fp16' or e.zero_stage > 0,
        'engine.precision',
        "fp16 needs engine.zero_stage 1 or 2 (DeepSpeed's ZeRO-0 fp16 optimizer does not scale the loss, so "
        'gradients underflow and AdamW sees them divided by the loss scale); or use bf16',
    )
    _check(e.device in ('auto', 'cpu', 'cuda'), 'engine.device', f'auto, cpu or cuda, got {e.device!r}')
    _check(
        o.clip_mode in ('per_param', 'global', 'none'),
        'optim.clip_mode',
        f'per_param, global or none, got {o.clip_mode!r}',
    )
    _check(o.clip_grad >= 0, 'optim.clip_grad', f'must be >= 0, got {o.clip_grad}')
    _check(o.base_lr > 0, 'optim.base_lr', f'must be > 0, got {o.base_lr}')
    _check(o.min_lr >= 0, 'optim.min_lr', f'must be >= 0, got {o.min_lr}')
    _check(0 <= o.warmup_epochs <= t.epochs, 'optim.warmup_epochs', f'must be in [0, train.epochs={t.epochs}]')
    _check(0 <= o.freeze_last_layer_epochs, 'optim.freeze_last_layer_epochs', 'must be >= 0')
    _check(d.augment_on in ('cpu', 'device'), 'data.augment_on', f'cpu or device, got {d.augment_on!r}')
    _check(d.batch_size_per_rank >= 1, 'data.batch_size_per_rank', f'must be >= 1, got {d.batch_size_per_rank}')
    _check(d.num_workers >= 0, 'data.num_workers', f'must be >= 0, got {d.num_workers}')
    _check(d.channels in (1, 3), 'data.channels', f'1 or 3, got {d.channels}')
    _check(
        len(a.mean) == d.channels and len(a.std) == d.channels,
        'augment.mean',
        f'mean {a.mean} and std {a.std} need one value per channel (data.channels={d.channels})',
    )
    _check(t.grad_accum_steps >= 1, 'train.grad_accum_steps', f'must be >= 1, got {t.grad_accum_steps}')
    _check(t.log_every >= 1 and t.checkpoint_every >= 1, 'train.log_every', 'log_every and checkpoint_every >= 1')
    _check(t.keep_checkpoints >= 1, 'train.keep_checkpoints', f'must be >= 1, got {t.keep_checkpoints}')
    for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
        _check(getattr(lo, key) > 0, f'loss.{key}', f'temperatures must be > 0, got {getattr(lo, key)}')
    _check(
        0 <= lo.warmup_teacher_temp_epochs <= t.epochs,
        'loss.warmup_teacher_temp_epochs',
        f'must be in [0, train.epochs={t.epochs}]',
    )
    _check(
        lo.teacher_temp_schedule in ('per_epoch', 'per_iteration'),
        'loss.teacher_temp_schedule',
        f'per_epoch or per_iteration, got {lo.teacher_temp_schedule!r}',
    )
    _check(
        lo.teacher_temp_schedule != 'per_epoch' or float(lo.warmup_teacher_temp_epochs).is_integer(),
        'loss.warmup_teacher_temp_epochs',
        f'a whole number of epochs with loss.teacher_temp_schedule=per_epoch, got {lo.warmup_teacher_temp_epochs}',
    )
    _check(
        0 <= cfg.teacher.momentum <= cfg.teacher.momentum_end <= 1,
        'teacher.momentum',
        'need 0 <= momentum <= momentum_end <= 1',
    )
    _check(cfg.head.out_dim >= 2 and cfg.head.nlayers >= 1, 'head.out_dim', 'out_dim >= 2 and nlayers >= 1')
    for key in ('hidden_dim', 'bottleneck_dim'):
        _check(getattr(cfg.head, key) >= 1, f'head.{key}', f'must be >= 1, got {getattr(cfg.head, key)}')
    _check(
        t.stop_after_iterations >= 0,
        'train.stop_after_iterations',
        f'must be >= 0 (0: no early stop), got {t.stop_after_iterations}',
    )
    _check(
        t.attention_images >= 0 and t.collapse_warn_every >= 1,
        'train.attention_images',
        'attention_images >= 0 and collapse_warn_every >= 1',
    )
    _check(
        d.samples_per_epoch >= 0,
        'data.samples_per_epoch',
        f'must be >= 0 (0: count from the shard index), got {d.samples_per_epoch}',
    )
    _check(d.shuffle_buffer >= 0, 'data.shuffle_buffer', f'must be >= 0, got {d.shuffle_buffer}')
    _check(d.max_image_pixels >= 0, 'data.max_image_pixels', f'must be >= 0 (0: no limit), got {d.max_image_pixels}')
    _check(d.virtual_slots >= 0, 'data.virtual_slots', f'must be >= 0 (0: ranks x workers), got {d.virtual_slots}')
    _check(0 <= d.max_skip_fraction <= 1, 'data.max_skip_fraction', f'must be in [0, 1], got {d.max_skip_fraction}')
    for key in ('canvas_size', 'eval_resize', 'eval_crop'):
        _check(getattr(d, key) >= 1, f'data.{key}', f'must be >= 1, got {getattr(d, key)}')
    _check(o.weight_decay >= 0 and o.weight_decay_end >= 0, 'optim.weight_decay', 'must be >= 0')
    _check(all(0 <= b < 1 for b in o.betas), 'optim.betas', f'each in [0, 1), got {list(o.betas)}')
    _check(0 <= lo.center_momentum <= 1, 'loss.center_momentum', f'must be in [0, 1], got {lo.center_momentum}')
    _check_skip_indices(cfg.model.kwargs.get('skip_indices', []))
    _check(
        cfg.model.attention in ('fused', 'explicit'),
        'model.attention',
        f'fused or explicit, got {cfg.model.attention!r}',
    )
    _check_phi(cfg.model.kwargs)
    _check(
        not math.isnan(cfg.model.drop_path_rate) and 0 <= cfg.model.drop_path_rate < 1,
        'model.drop_path_rate',
        'must be in [0, 1)',
    )
    _check(
        'num_classes' not in cfg.model.kwargs and 'drop_path_rate' not in cfg.model.kwargs,
        'model.kwargs',
        'num_classes is fixed to 0 (the DINO head follows) and drop_path_rate is model.drop_path_rate',
    )


def _check_phi(kwargs: Dict[str, Any]) -> None:
    ratio = kwargs.get('phi_hidden_ratio', 2.0)
    _check(
        isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0,
        'model.kwargs.phi_hidden_ratio',
        f"Phi's hidden width as a multiple of the embedding width, a number > 0 (the paper: 2), got {ratio!r}",
    )
    size = kwargs.get('phi_kernel_size', 5)
    _check(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1 and size % 2 == 1,
        'model.kwargs.phi_kernel_size',
        f"Phi's depth-wise convolution size, an odd integer >= 1 (the paper: 5), got {size!r}",
    )


def _check_skip_indices(value: Any) -> None:
    # a string is iterable too: "13" would silently mean blocks 1 and 3
    _check(
        isinstance(value, (list, tuple)),
        'model.kwargs.skip_indices',
        f'expected a list of block indices, e.g. [3, 4, 5], got {value!r}',
    )
    _check(
        all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value),
        'model.kwargs.skip_indices',
        f'block indices are integers >= 0, got {list(value)}',
    )
    _check(len(set(value)) == len(value), 'model.kwargs.skip_indices', f'repeated block index in {list(value)}')
