"""The 2x2 pixel shuffle of the adaptor."""

from __future__ import annotations

import torch

from dsvl2.projector import pixel_shuffle


def test_pixel_shuffle_pads_and_orders_channel_major() -> None:
    grid = torch.arange(9, dtype=torch.float32).view(1, 9, 1)  # 3x3 grid, one channel
    out = pixel_shuffle(torch.cat([grid, 100 + grid], dim=-1), 2)
    assert out.shape == (1, 4, 8)
    # first 2x2 block: pixels 0,1,3,4 of channel 0, then of channel 1
    assert out[0, 0].tolist() == [0, 1, 3, 4, 100, 101, 103, 104]
    # bottom-right block holds pixel 8 and three zero pads
    assert out[0, 3].tolist() == [8, 0, 0, 0, 108, 0, 0, 0]
