"""The training grid a person reads: labelled rows (original, then k tokens each), enlarged crops."""
from __future__ import annotations

import pytest
import torch

from vistok.eval.plots import labelled_rows


def rows(n: int = 3, size: int = 16) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [("original", torch.rand(n, 3, size, size, generator=g)),
            ("4 tokens, 17.1 dB", torch.rand(n, 3, size, size, generator=g)),
            ("16 tokens, 19.8 dB", torch.rand(n, 3, size, size, generator=g))]


def test_rows_are_enlarged_to_a_readable_size_with_exact_pixels() -> None:
    data = rows()
    grid = labelled_rows(data, min_cell=128, pad=4)
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1
    # 16 px crops become 128 px cells (factor 8, nearest): 3 rows of 128 + padding
    assert grid.shape[1] == 3 * (128 + 4) + 4
    label_width = grid.shape[2] - 3 * (128 + 4) - 4
    assert label_width > 60  # room for the longest label
    for r, (_, images) in enumerate(data):
        for i in range(images.shape[0]):
            top, left = 4 + r * 132, label_width + i * 132
            cell = grid[:, top:top + 128, left:left + 128]
            expected = torch.nn.functional.interpolate(images[i:i + 1], scale_factor=8, mode="nearest")[0]
            torch.testing.assert_close(cell, (expected * 255).round() / 255, atol=1e-6, rtol=0)


def test_each_row_carries_its_label() -> None:
    data = rows()
    grid = labelled_rows(data)
    label_width = grid.shape[2] - 3 * (128 + 4) - 4
    inked = []
    for r in range(len(data)):
        band = grid[:, 4 + r * 132:4 + r * 132 + 128, :label_width]
        inked.append(int((band < 0.5).any(dim=0).sum()))  # dark text pixels in this row's label area
    assert all(count > 20 for count in inked)
    # different labels are drawn differently ("original" vs "4 tokens, ..."), and longer text takes more ink
    assert len(set(inked)) == len(inked)
    blank = labelled_rows([("", data[0][1])])
    assert not (blank[:, :, : blank.shape[2] - 3 * 132 - 4] < 0.5).any()


def test_large_images_are_not_enlarged_and_bad_rows_are_refused() -> None:
    big = labelled_rows([("original", torch.rand(2, 3, 160, 160))], pad=2)
    assert big.shape[1] == 160 + 2 + 2
    with pytest.raises(ValueError, match="expected"):
        labelled_rows([("original", torch.rand(2, 3, 16, 16)), ("8 tokens", torch.rand(3, 3, 16, 16))])
    with pytest.raises(ValueError, match="at least one row"):
        labelled_rows([])
