"""The student's DeepSpeed engine, and the two things DINO needs from inside it: per-parameter gradient
clipping and the full-precision (master) weights for the teacher's EMA, for every engine layout:

- fp32, ZeRO 0: the module's parameters are the master weights and hold the gradients;
- bf16/fp16, ZeRO 0: DeepSpeed's (un)fused FP16 optimizer keeps fp32 copies; gradients sit in ``p.grad``;
- ZeRO 1/2 (any precision): each rank owns a fragment of every parameter's fp32 master weight and reduced
  gradient (``p._hp_mapping``); norms and weights are assembled with one collective each.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from skipssl_common.io import deep_merge

from ..config import Config
from ..dino import param_groups, reset_state
from .plan import global_batch


def precision_unsupported(precision: str) -> Optional[str]:
    """Why ``deepspeed.initialize`` would refuse ``precision`` ('bf16', 'fp16', 'fp32') on this machine, None where
    it accepts it. The answer is DeepSpeed's own check (its accelerator's ``is_fp16_supported`` /
    ``is_bf16_supported``): on CPU, fp16 needs oneDNN's fp16 kernels, which depend on the CPU model (absent on an
    AMD EPYC with avx512_bf16 but no avx512_fp16, and on Xeons without it); on CUDA, the GPU's compute capability
    decides.
    Used by the start-up check and by the tests' skip markers, so that both agree with DeepSpeed."""
    if precision == 'fp32':
        return None
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_fp16_supported() if precision == 'fp16' else acc.is_bf16_supported():
        return None
    name = acc.device_name()
    if name == 'cuda':
        major, minor = torch.cuda.get_device_capability()
        where = f'{torch.cuda.get_device_name()}, compute capability {major}.{minor}'
    elif name == 'cpu' and precision == 'fp16':
        where = 'oneDNN has no fp16 kernels for this CPU: torch.ops.mkldnn._is_mkldnn_fp16_supported() is False'
    else:
        where = f'DeepSpeed accelerator {name!r}'
    return f"{precision} is not supported on this machine's {name} ({where}), DeepSpeed would refuse it"


def deepspeed_config(cfg: Config, world_size: int, accum: Optional[int] = None) -> Dict:
    """``accum``: the plan's accumulation steps (a resize changes them), the config's when None."""
    e = cfg.engine
    accum = accum or cfg.train.grad_accum_steps
    ds = {
        'train_micro_batch_size_per_gpu': cfg.data.batch_size_per_rank,
        'gradient_accumulation_steps': accum,
        'train_batch_size': global_batch(cfg.data.batch_size_per_rank, accum, world_size),
        'zero_optimization': {'stage': e.zero_stage},
        # clipping is the trainer's (DINO clips each parameter separately), unless asked for globally
        'gradient_clipping': cfg.optim.clip_grad if cfg.optim.clip_mode == 'global' else 0.0,
        'zero_allow_untested_optimizer': True,
        'steps_per_print': 1 << 30,
        'wall_clock_breakdown': False,
    }
    if e.precision == 'bf16':
        ds['bf16'] = {'enabled': True}
    elif e.precision == 'fp16':
        ds['fp16'] = {
            'enabled': True,
            'loss_scale': 0,
            'initial_scale_power': 16,
            'loss_scale_window': 1000,
            'hysteresis': 2,
            'min_loss_scale': 1,
        }
    return deep_merge(ds, e.deepspeed)


def build_engine(student: nn.Module, cfg: Config, world_size: int, device_kind: str, accum: Optional[int] = None):
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=cfg.optim.betas, fused=device_kind == 'cuda')
    # DeepSpeed casts the module to bf16/fp16 and copies its master weights from that: keep the fp32 init,
    # so that the master weights (and the EMA teacher, a copy of the fp32 student) start where DINO's do
    low_precision = cfg.engine.precision != 'fp32'
    init = [p.detach().clone() for p in student.parameters() if p.requires_grad] if low_precision else []
    engine, _, _, _ = deepspeed.initialize(
        model=student, optimizer=optimizer, config=deepspeed_config(cfg, world_size, accum)
    )
    view = EngineView(engine)
    if low_precision:
        view.set_master_params(init)
    # DeepSpeed's FP16/BF16 optimizers create AdamW's state by stepping once with zero gradients, which
    # leaves the step count at 1 and so changes every later bias correction: start from a fresh state
    reset_state(view.base_optimizer)
    return engine


class EngineView:
    """Gradient fragments and master weights of ``engine.module``'s parameters, in named_parameters order."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.names, self.params = zip(*[(n, p) for n, p in engine.module.named_parameters() if p.requires_grad])
        opt = engine.optimizer
        # ZeRO 1/2 give every parameter an _hp_mapping attribute (None where another rank owns all of it)
        self.partitioned = any(hasattr(p, '_hp_mapping') for p in self.params)
        self._fp32_of = {}
        if not self.partitioned and hasattr(opt, 'fp16_groups') and hasattr(opt, 'fp32_groups'):
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                self._fp32_of.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
        elif not self.partitioned and hasattr(opt, 'fp16_groups') and hasattr(opt, 'fp32_groups_flat'):
            for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for lp in lp_group:
                    self._fp32_of[id(lp)] = flat.narrow(0, offset, lp.numel()).view_as(lp)
                    offset += lp.numel()
        elif not self.partitioned and any(p.dtype != torch.float32 for p in self.params):
            raise RuntimeError(f'cannot find the fp32 master weights of optimizer {type(opt).__name__}')
        if self.partitioned:
            self._numels = [p.numel() for p in self.params]
            self._flat = torch.empty(sum(self._numels), dtype=torch.float32, device=self.params[0].device)

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that holds the state: the engine's own at fp32 ZeRO 0, else the one inside
        DeepSpeed's wrapper (FP16/BF16 optimizer, ZeRO), whose groups hold flat fp32 partitions."""
        opt = self.engine.optimizer
        inner = getattr(opt, 'optimizer', opt)
        if not isinstance(inner, torch.optim.Optimizer):
            raise RuntimeError(f'cannot find the torch optimizer inside {type(opt).__name__}')
        return inner

    # -- gradients ---------------------------------------------------------------------------------------
    def grad_fragments(self) -> List[torch.Tensor]:
        """This rank's part of each parameter's reduced gradient (all of it unless partitioned; an empty
        tensor where another rank owns the parameter). Valid between backward and step at a boundary."""
        frags = []
        for p in self.params:
            if p.grad is not None:
                frags.append(p.grad)
                continue
            mapping = getattr(p, '_hp_mapping', None)
            if mapping is None:
                frags.append(p.new_zeros(0))
                continue
            g = mapping.get_lp_grad_fragment(p._index_in_param_group)
            addr = mapping.lp_fragment_address
            if g.numel() == p.numel() and addr.numel != p.numel():
                g = g.reshape(-1).narrow(0, addr.start, addr.numel)
            frags.append(g)
        return frags

    @property
    def loss_scale(self) -> float:
        """The factor the gradients still carry at the boundary (fp16's dynamic loss scale; 1 otherwise):
        DeepSpeed divides it out inside ``step()``, after the trainer has clipped."""
        return float(getattr(self.engine.optimizer, 'loss_scale', 1.0))

    @torch.no_grad()
    def clip_per_param(self, max_norm: float) -> torch.Tensor:
        """DINO's clipping: each parameter's gradient rescaled to norm <= max_norm; one all-reduce of the
        squared norms when partitioned, no host sync. Norms are of the unscaled gradients (DINO clips after
        its GradScaler's ``unscale_``). Returns the norms before clipping."""
        frags = self.grad_fragments()
        sq = (
            torch.stack([f.float().pow(2).sum() if f.numel() else f.new_zeros((), dtype=torch.float32) for f in frags])
            if frags
            else torch.zeros(0)
        )
        if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sq)
        norms = sq.sqrt() / self.loss_scale
        coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        nonempty = [(f, c) for f, c in zip(frags, coefs.unbind()) if f.numel()]
        if nonempty:
            # fp32 coefficients: a bf16 gradient is scaled in fp32 and rounded once
            torch._foreach_mul_([f for f, _ in nonempty], [c for _, c in nonempty])
        return norms

    # -- master weights -------------------------------------------------------------------------------------
    @torch.no_grad()
    def master_params(self) -> List[torch.Tensor]:
        """The fp32 weights the optimizer updates, one full tensor per parameter, on every rank."""
        if not self.partitioned:
            return [self._fp32_of.get(id(p), p) for p in self.params]
        self._flat.zero_()
        offset = 0
        for p, n in zip(self.params, self._numels):
            mapping = getattr(p, '_hp_mapping', None)
            if mapping is not None:
                addr = mapping.lp_fragment_address
                self._flat.narrow(0, offset + addr.start, addr.numel).copy_(mapping.hp_fragment.reshape(-1))
            offset += n
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self._flat)  # fragments are disjoint, so the sum assembles them
        return [t.view_as(p) for t, p in zip(self._flat.split(self._numels), self.params)]

    @torch.no_grad()
    def set_master_params(self, values: Sequence[torch.Tensor]) -> None:
        """Overwrite the fp32 master weights with full tensors (one per parameter, named_parameters order) and
        the module's working copy with their rounding to its dtype; every rank passes the same values."""
        for p, v in zip(self.params, values, strict=True):
            v = v.to(device=p.device, dtype=torch.float32)
            if self.partitioned:
                mapping = getattr(p, '_hp_mapping', None)
                if mapping is not None:
                    addr = mapping.lp_fragment_address
                    frag = mapping.hp_fragment
                    frag.copy_(v.reshape(-1).narrow(0, addr.start, addr.numel).view_as(frag))
            else:
                self._fp32_of.get(id(p), p).copy_(v)
            p.copy_(v)

    # -- optimizer state, independent of the layout ------------------------------------------------------
    def _fragments(self) -> List[Optional[Tuple[torch.Tensor, int, int]]]:
        """Per parameter: (the fp32 master tensor this rank updates, its start and length in the flattened
        parameter), or None where another rank owns all of it."""
        if not self.partitioned:
            return [(self._fp32_of.get(id(p), p), 0, p.numel()) for p in self.params]
        out: List[Optional[Tuple[torch.Tensor, int, int]]] = []
        for p in self.params:
            mapping = getattr(p, '_hp_mapping', None)
            if mapping is None:
                out.append(None)
                continue
            addr = mapping.lp_fragment_address
            out.append((mapping.hp_fragment, addr.start, addr.numel))
        return out

    def _locate(self, master: torch.Tensor) -> Tuple[int, torch.Tensor, int]:
        """(group index, the base optimizer's parameter that holds ``master``, offset of ``master`` in it): the
        optimizer's state lives with that parameter, flat partitions included."""
        start = master.data_ptr()
        for gi, group in enumerate(self.base_optimizer.param_groups):
            for b in group['params']:
                offset, rest = divmod(start - b.data_ptr(), b.element_size())
                if b.dtype == master.dtype and rest == 0 and 0 <= offset and offset + master.numel() <= b.numel():
                    return gi, b, offset
        raise RuntimeError(
            f'cannot find the optimizer parameter that holds a master weight of {type(self.engine.optimizer).__name__}'
        )

    @torch.no_grad()
    def full_optimizer_state(self, keys: Sequence[str] = ('exp_avg', 'exp_avg_sq')) -> Dict:
        """AdamW's state as full fp32 tensors per parameter name, and its step count per group name, the same
        on every rank whatever the partitioning (one all-reduce per key when partitioned): what
        ``set_full_optimizer_state`` loads into an engine of any layout."""
        opt = self.base_optimizer
        frags = self._fragments()
        out: Dict = {'state': {}, 'step': {}}
        for key in keys:
            flat = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=self.params[0].device)
            offset = 0
            for p, frag in zip(self.params, frags):
                if frag is not None:
                    master, start, numel = frag
                    _, b, at = self._locate(master)
                    value = opt.state.get(b, {}).get(key)
                    if value is not None:
                        flat.narrow(0, offset + start, numel).copy_(value.reshape(-1).narrow(0, at, numel))
                offset += p.numel()
            if self.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flat)  # fragments are disjoint, so the sum assembles them
            out['state'][key] = {
                n: t.view_as(p).cpu().clone()
                for n, t, p in zip(self.names, flat.split([p.numel() for p in self.params]), self.params)
            }
        for group in opt.param_groups:
            steps = [opt.state[b]['step'] for b in group['params'] if 'step' in opt.state.get(b, {})]
            out['step'][group['name']] = float(steps[0]) if steps else 0.0
        return out

    @torch.no_grad()
    def set_full_optimizer_state(self, saved: Dict) -> None:
        """Load what ``full_optimizer_state`` returned (on any layout) into this engine's optimizer: each rank
        writes its fragments, in place where the state exists (DeepSpeed keeps views of it)."""
        opt = self.base_optimizer
        frags = self._fragments()
        for key, values in saved['state'].items():
            for name, frag in zip(self.names, frags):
                if frag is None:
                    continue
                master, start, numel = frag
                _, b, at = self._locate(master)
                state = opt.state[b]
                if key not in state:
                    state[key] = torch.zeros_like(b, memory_format=torch.preserve_format)
                value = values[name].reshape(-1).narrow(0, start, numel)
                state[key].view(-1).narrow(0, at, numel).copy_(value.to(state[key]))
        for group in opt.param_groups:
            on_device = group.get('fused') or group.get('capturable')
            for b in group['params']:
                state = opt.state[b]
                if 'step' not in state:  # as torch's AdamW creates it
                    state['step'] = torch.zeros((), dtype=torch.float32, device=b.device if on_device else 'cpu')
                state['step'].fill_(saved['step'][group['name']])

    def master_state_dict(self) -> Dict[str, torch.Tensor]:
        """engine.module's state dict with every parameter replaced by its fp32 master weight."""
        state = {k: v.detach().clone().cpu() for k, v in self.engine.module.state_dict().items()}
        for name, w in zip(self.names, self.master_params()):
            state[name] = w.detach().clone().cpu()
        return state
