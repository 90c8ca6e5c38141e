"""Trainable heads that sit on a backbone: the light MAE decoder and its reference initialisation, and the
SimCLR projection MLP."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mmssl.attention import SelfAttention
from mmssl.flops import blocks_flops, linear_flops
from mmssl.ops import gather_tokens, sincos_2d


class MAEDecoder(nn.Module):
    """The asymmetric MAE decoder (He et al. 2021, §3 and models_mae.py).

    Encoded visible tokens are projected to the decoder width, a shared learned mask token fills every masked
    position, fixed 2-D sin-cos position embeddings are added and a few transformer blocks predict each patch's
    target. Defaults are the paper's for ViT-B/L/H: 512 wide, 8 blocks, 16 heads.
    """

    def __init__(
        self,
        encoder_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        num_prefix_tokens: int = 1,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = sincos_2d(embed_dim, grid_size, num_prefix_tokens=num_prefix_tokens)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed (MAE §A.1), kept in the state dict
        norm = partial(nn.LayerNorm, eps=1e-6)  # as in the reference
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, attn_layer=SelfAttention
                )
                for _ in range(depth)
            ]
        )
        self.norm = norm(embed_dim)
        self.pred = nn.Linear(embed_dim, out_dim)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, prefix + K, D_enc), ids_restore (B, L) -> predictions (B, L, out_dim) in patch order."""
        x = self.embed(latent)  # (B, prefix + K, D)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, L = ids_restore.shape
        masked = self.mask_token.expand(B, L - visible.shape[1], -1)
        x = gather_tokens(torch.cat([visible, masked], dim=1), ids_restore)  # unshuffle to patch order
        x = torch.cat([prefix, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix_tokens :])

    def forward_flops(self, num_visible: int) -> int:
        """Forward FLOPs for one image (``mmssl/flops.py``): the embedding of the prefix and ``num_visible``
        encoded tokens, the blocks on every token, the prediction of every patch."""
        tokens = self.pos_embed.shape[1]  # prefix + L
        patches = tokens - self.num_prefix_tokens
        return (
            linear_flops(
                self.num_prefix_tokens + num_visible, self.embed.in_features, self.embed.out_features
            )
            + blocks_flops(tokens, self.blocks)
            + linear_flops(patches, self.pred.in_features, self.pred.out_features)
        )


def mae_init_(module: nn.Module) -> None:
    """MAE's ``initialize_weights``: xavier-uniform Linear (and the patch projection seen as a Linear), zero
    biases, unit LayerNorms, N(0, 0.02) for CLS and mask tokens. Frozen position embeddings are left alone."""
    for name, p in module.named_parameters():
        if name.endswith(("cls_token", "mask_token", "reg_token")):
            nn.init.normal_(p, std=0.02)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(
            m, nn.Conv2d
        ):  # the patch embedding, "like nn.Linear"; its bias keeps torch's default
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP g(h) (Chen et al. 2020, §2.1 and Fig. 8; reference ``model_util.projection_head``).

    ``num_layers`` Linear layers, each followed by BatchNorm; ReLU after all but the last. As in the
    reference ``linear_layer(use_bn=True)``: no Linear bias (BN follows), and the last BN has a learned scale
    but no shift (``center=False``), kept here as a zero ``bias`` frozen out of training. ResNet-50: 2048 ->
    2048 -> 128 (v1, ``num_layers=2``); SimCLR v2 and MoCo v3 use 3 layers. ``last_bn=False``: the last Linear
    has a bias and no BN follows (SLIP's ``image_mlp``: 3 layers, 4096 hidden, 256 out).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int = 128, num_layers: int = 2, last_bn: bool = True
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"projection head needs at least 1 layer, got num_layers={num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == num_layers - 1
            linear = nn.Linear(a, b, bias=last and not last_bn)
            nn.init.normal_(linear.weight, std=0.01)  # reference: random_normal_initializer(stddev=.01)
            layers += [linear] if last and not last_bn else [linear, nn.BatchNorm1d(b)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        if last_bn:
            layers[-1].bias.requires_grad_(False)  # center=False in the reference: the shift stays 0
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        return self.mlp(x)
