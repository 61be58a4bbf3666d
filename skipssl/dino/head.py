"""DINO projection head: MLP, L2 normalisation, weight-normalised prototype layer."""

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight W = g * v / ||v|| (row-wise), as DINO's weight-normalised last layer.

    With ``fixed_norm`` the gain g is not a parameter (every row of W has norm 1), so no frozen parameter
    reaches the optimizer. Parameter names match ``nn.utils.weight_norm`` (``weight_g``, ``weight_v``), so
    DINO's head state dicts load (``tests/test_dino.py``): with ``fixed_norm`` their ``weight_g``, which
    DINO stores although ``norm_last_layer`` fixes it at 1, is checked to be all ones and dropped.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fixed_norm = in_features, out_features, fixed_norm
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default init, as DINO's last layer
        self.weight_v = nn.Parameter(v)
        if fixed_norm:
            self.register_buffer('weight_g', torch.ones(out_features, 1), persistent=False)
        else:
            self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return self.weight_g.to(v.dtype) * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + 'weight_g'
        if self.fixed_norm and key in state_dict:  # load_state_dict hands each module its own copy of the dict
            g = state_dict.pop(key)
            if tuple(g.shape) != (self.out_features, 1) or not bool((g == 1).all()):
                error_msgs.append(
                    f'{key}: the gains are not all 1 (shape {tuple(g.shape)}): a last layer trained with '
                    'norm_last_layer=False, which a head with norm_last_layer=True cannot hold'
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, out_features={self.out_features}, fixed_norm={self.fixed_norm}'


class DINOHead(nn.Module):
    """MLP in_dim -> hidden -> ... -> bottleneck (GELU), L2-normalise, weight-normalised Linear -> out_dim."""

    mlp: nn.Module  # one Linear, or a Sequential of them with GELUs

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f'DINOHead needs nlayers >= 1, got {nlayers}')
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(init_weights_vit_timm)  # trunc_normal(std .02), zero bias, as DINO
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
