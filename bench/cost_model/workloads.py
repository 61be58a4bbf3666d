"""The runs the cost model records: a backbone's inference, a backbone's forward+backward, and the whole DINO
step as the project's trainer runs it on a GPU (``skipssl.train.step.DINOStep`` on DeepSpeed bf16).

Every model is built on the meta device (no initialisation) and its parameters turned into fake tensors, so
recording costs the same at batch 1 and batch 1024.
"""

import types
from contextlib import contextmanager, nullcontext
from typing import Iterator, List, Optional

import timm
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import skipssl  # noqa: F401  (registers the SkipAt models)
from skipssl.dino import DINOHead, DINOLoss, MultiCropWrapper, clip_gradients_per_param, ema_update, make_teacher

from .record import CudaAutocastSoftmax, OpCost, OpRecorder

# explicit: timm's Attention with fused_attn = False (q * scale, q @ k^T, softmax, @ v: the N x N matrix and its
# softmax go through memory); explicit_timm054: the same as timm 0.5.4 wrote it, which the paper's table was
# measured with (the scale multiplies the N x N matrix: one more pass over it); fused: scaled-dot-product
# attention (FlashAttention on a GPU)
ATTENTION_KINDS = ('explicit', 'explicit_timm054', 'fused')
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# DINO's recipe as the paper ran it: 2 global crops of 224 px, 10 local crops of 96 px; the head's sizes
GLOBAL_CROPS, LOCAL_CROPS, GLOBAL_PX, LOCAL_PX = 2, 10, 224, 96
HEAD_OUT_DIM = 65536
CLIP_GRAD = 3.0


def _timm054_attention(
    self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
) -> torch.Tensor:
    """timm 0.5.4's Attention.forward (the scale applied to q @ k^T, not to q)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn.softmax(dim=-1)
    attn = self.attn_drop(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def set_attention(model: nn.Module, kind: str) -> nn.Module:
    """Every timm Attention of ``model`` computes ``kind`` (one of ATTENTION_KINDS)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f'attention kind {kind!r} is not one of {", ".join(ATTENTION_KINDS)}')
    for m in model.modules():
        if hasattr(m, 'fused_attn') and hasattr(m, 'qkv'):
            m.fused_attn = kind == 'fused'
            if kind == 'explicit_timm054':
                m.forward = types.MethodType(_timm054_attention, m)
    return model


def to_fake(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """``module`` (built on the meta device) with fake CPU tensors for parameters and buffers."""
    # new Parameter objects: a fake tensor cannot be swapped into a meta Parameter
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        return module._apply(lambda t: mode.from_tensor(torch.empty_like(t, device='cpu')))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def meta_backbone(name: str, kind: str, patch_size: Optional[int] = None, drop_path_rate: float = 0.0) -> nn.Module:
    kwargs = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate)
    if patch_size is not None:
        kwargs['patch_size'] = patch_size
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    return set_attention(model, kind)


@contextmanager
def amp(precision: str) -> Iterator[None]:
    """Mixed precision as CUDA autocast gives it (see CudaAutocastSoftmax); fp32 runs plain."""
    if precision == 'fp32':
        yield
        return
    with torch.autocast('cpu', dtype=PRECISIONS[precision]), CudaAutocastSoftmax():
        yield


def record_backbone(
    name: str,
    kind: str,
    batch: int,
    precision: str,
    mode_name: str = 'infer',
    img_size: int = 224,
    patch_size: Optional[int] = None,
) -> List[OpCost]:
    """Ops of one batch through a backbone under autocast: ``infer`` (forward, eval mode, no grad) or ``train``
    (forward + backward of a mean-square loss on the features, as bench.backbone_throughput's train mode)."""
    if mode_name not in ('infer', 'train'):
        raise ValueError(f'mode {mode_name!r} is not infer or train')
    fake = FakeTensorMode()
    model = to_fake(meta_backbone(name, kind, patch_size), fake)
    model.train(mode_name == 'train')
    recorder = OpRecorder()
    with fake:
        x = torch.empty(batch, 3, img_size, img_size)
        with recorder:
            with torch.no_grad() if mode_name == 'infer' else nullcontext(), amp(precision):
                out = model(x)
            if mode_name == 'train':
                out.float().square().mean().backward()
    return recorder.ops


def record_dino_step(name: str, kind: str, batch: int, precision: str = 'bf16') -> List[OpCost]:
    """Ops of one DINO step of ``batch`` images per GPU, as skipssl.train.step.DINOStep runs it on DeepSpeed at
    ZeRO 0 in ``precision`` (bf16 or fp16: the student's weights in that dtype, fp32 master weights):
    teacher forward on the 2 global crops under autocast; student forward on 2 x 224 + 10 x 96 crops; head and
    DINO loss (centre update included); backward; the low-precision gradients into fp32; DINO's per-parameter
    clipping; fused AdamW on the fp32 master weights; master weights back into the student; the teacher's EMA.
    Left out: data loading and augmentation, the gradient all-reduce over GPUs, the loss scaler of fp16."""
    if precision not in ('bf16', 'fp16'):
        raise ValueError(f'the DINO step is costed in bf16 or fp16 (DeepSpeed), not {precision!r}')
    dtype = PRECISIONS[precision]
    fake = FakeTensorMode()
    backbone = meta_backbone(name, kind, drop_path_rate=0.1)
    with torch.device('meta'):
        student = MultiCropWrapper(backbone, DINOHead(backbone.num_features, HEAD_OUT_DIM))
    teacher = to_fake(make_teacher(student), fake)
    master = to_fake(nn.ParameterList([p for p in student.parameters() if p.requires_grad]), fake)
    # DeepSpeed's bf16/fp16 engine holds the module in that dtype, fp32 master weights in its optimizer
    student = to_fake(student.to(dtype), fake)
    params = [p for p in student.parameters() if p.requires_grad]
    loss_fn = to_fake(DINOLoss(HEAD_OUT_DIM, n_teacher_crops=GLOBAL_CROPS), fake)
    recorder = OpRecorder()
    with fake:
        master = list(master)
        for m in master:
            m.grad = torch.zeros_like(m)
        optimizer = torch.optim.AdamW(master, lr=1e-4, fused=True)
        optimizer.step()  # creates AdamW's state, which a running training has
        crops = [torch.empty(batch, 3, GLOBAL_PX, GLOBAL_PX) for _ in range(GLOBAL_CROPS)]
        crops += [torch.empty(batch, 3, LOCAL_PX, LOCAL_PX) for _ in range(LOCAL_CROPS)]
        with recorder:
            with torch.no_grad(), amp(precision):
                teacher_out = teacher(crops[:GLOBAL_CROPS])
            student_out = student([c.to(dtype) for c in crops])
            loss = loss_fn(student_out, teacher_out, 0.04)
            loss.backward()
            with torch.no_grad():
                torch._foreach_copy_([m.grad for m in master], [p.grad for p in params])
                clip_gradients_per_param(master, CLIP_GRAD)
                optimizer.step()
                torch._foreach_copy_(params, master)
                teacher_params = [p for p in teacher.parameters()]
                ema_update(teacher_params, master, 0.996)
    return recorder.ops
