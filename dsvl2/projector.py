"""The vision-language adaptor (checkpoint prefix `projector.`) and the 2D tile layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.config import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """[N, g*g, C] -> [N, ceil(g/r)^2, C*r*r]: zero-pad the grid at the bottom and right to a
    multiple of r, then each r x r block becomes one vector, channel-major."""
    n, hw, c = x.shape
    side = int(hw**0.5)
    pad = -side % ratio
    x = x.view(n, side, side, c)
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))
    x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=ratio, stride=ratio)
    return x.transpose(1, 2)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kind = cfg.projector_type
        hidden = cfg.n_embed * cfg.mlp_ratio
        if kind == "identity":
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(cfg.input_dim, cfg.n_embed)
        elif kind == "mlp_gelu":
            modules: list[nn.Module] = [nn.Linear(cfg.input_dim, cfg.n_embed)]
            for _ in range(1, cfg.depth):
                modules += [nn.GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
            self.layers = nn.Sequential(*modules)
        else:  # downsample_mlp_gelu
            ratio = cfg.downsample_ratio
            modules = [nn.Linear(cfg.input_dim * ratio * ratio, hidden)]
            for _ in range(1, cfg.depth - 1):
                modules += [nn.GELU(), nn.Linear(hidden, hidden)]
            modules += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
            self.layers = nn.Sequential(*modules)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cfg.projector_type == "downsample_mlp_gelu":
            features = pixel_shuffle(features, self.cfg.downsample_ratio)
        return self.layers(features)


def stitch_tiles(tiles: torch.Tensor, num_width_tiles: int, num_height_tiles: int) -> torch.Tensor:
    """Row-major tiles [w*h, s*s, D] side by side as one grid [s*h, s*w, D] (the local view)."""
    _, tokens, dim = tiles.shape
    side = int(tokens**0.5)
    grid = tiles.view(num_height_tiles, num_width_tiles, side, side, dim).permute(0, 2, 1, 3, 4)
    return grid.reshape(num_height_tiles * side, num_width_tiles * side, dim)


def layout_image_tokens(
    tile_embeds: torch.Tensor,
    num_width_tiles: int,
    num_height_tiles: int,
    newline: torch.Tensor,
    separator: torch.Tensor,
    global_view_pos: str = "head",
) -> torch.Tensor:
    """One image's token sequence from its projected tiles [1 + w*h, s*s, D] (global first).

    Global view: s rows of (s tokens + newline). Local view: s*h rows of (s*w tokens + newline),
    the tiles side by side. A view separator sits between the two views.
    """
    _, tokens, dim = tile_embeds.shape
    side = int(tokens**0.5)
    global_view = tile_embeds[0].view(side, side, dim)
    global_view = torch.cat([global_view, newline.expand(side, 1, dim)], dim=1).reshape(-1, dim)
    local = stitch_tiles(tile_embeds[1:], num_width_tiles, num_height_tiles)
    local = torch.cat([local, newline.expand(local.shape[0], 1, dim)], dim=1).reshape(-1, dim)
    sep = separator.view(1, dim)
    if global_view_pos == "head":
        return torch.cat([global_view, sep, local])
    return torch.cat([local, sep, global_view])
