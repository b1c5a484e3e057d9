"""xtl.explain.drawing: the colours a map becomes, checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xtl.explain.drawing import FLAT_LABEL, colormap_for, is_flat, overlay, save_overlay, scaled, to_rgb

GREY = np.full((8, 8, 3), 128, dtype=np.uint8)


def _pure(heatmap, signed):
    """The map's colours alone (alpha 1) on a plain grey image."""
    return overlay(GREY, heatmap, signed=signed, alpha=1.0).astype(int)


def test_signed_maps_are_zero_centred_and_symmetric():
    heatmap = torch.zeros(8, 8)
    heatmap[0, 0], heatmap[0, 1] = 2.0, -2.0
    heatmap[7, 7] = 1.0  # positive, half the largest |value|
    rgb = _pure(heatmap, signed=True)
    red, blue, zero = rgb[0, 0], rgb[0, 1], rgb[4, 4]
    assert red[0] > red[2] + 50 and blue[2] > blue[0] + 50  # + is red, - is blue
    assert np.ptp(zero) <= 3 and zero.min() > 230  # zero is the neutral near-white middle
    # symmetric scale: +2 and -2 are equally far from neutral, +1 lies between zero and +2
    assert abs(np.abs(red - zero).sum() - np.abs(blue - zero).sum()) < 60
    assert np.abs(rgb[7, 7] - zero).sum() < np.abs(red - zero).sum()
    # the same values positive only: zero still neutral, not the colour of the minimum
    positive_only = heatmap.clamp_min(0)
    assert np.ptp(_pure(positive_only, signed=True)[4, 4]) <= 3


def test_unsigned_maps_use_a_uniform_map_from_min_to_max():
    import matplotlib

    heatmap = np.linspace(5.0, 7.0, 64).reshape(8, 8)  # offset: min..max, not 0..max
    rgb = _pure(heatmap, signed=False)
    cmap = matplotlib.colormaps[colormap_for(False)[0]]
    assert colormap_for(False)[0] in ("inferno", "viridis", "magma", "cividis")
    np.testing.assert_allclose(rgb[0, 0], np.array(cmap(0.0)[:3]) * 255, atol=2)
    np.testing.assert_allclose(rgb[7, 7], np.array(cmap(1.0)[:3]) * 255, atol=2)
    # perceptually uniform: lightness grows monotonically along the ramp (jet's would not)
    lightness = rgb.reshape(-1, 3) @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lightness) >= -1)


def test_colour_bar_norms_match_the_overlay_scale():
    name, norm = colormap_for(True)
    assert name in ("RdBu_r", "bwr", "coolwarm") and (norm.vmin, norm.vmax) == (-1, 1)
    values = np.array([[-3.0, 0.0], [1.5, 3.0]])
    np.testing.assert_allclose(scaled(values, signed=True), [[-1, 0], [0.5, 1]])
    np.testing.assert_allclose(scaled(values, signed=False), [[0, 0.5], [0.75, 1]])
    assert colormap_for(False)[1].vmin == 0 and colormap_for(False)[1].vmax == 1


@pytest.mark.parametrize("heatmap", [torch.zeros(4, 4), torch.full((4, 4), 3.5), torch.full((4, 4), float("nan"))])
def test_flat_maps_are_not_coloured(heatmap):
    assert is_flat(heatmap)
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for signed in (False, True):
        assert np.array_equal(overlay(image, heatmap, signed=signed), image)
    assert FLAT_LABEL == "flat map"
    assert not is_flat(torch.tensor([[0.0, 1e-6]]))


def test_images_in_every_layout_and_maps_at_any_size():
    rgb = np.zeros((16, 12, 3), dtype=np.uint8)
    rgb[:, :, 1] = 200
    as_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    as_uint8 = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    for image in (rgb, as_float, as_uint8):
        assert np.array_equal(to_rgb(image), rgb)
    heatmap = torch.zeros(2, 3)
    heatmap[0, 0] = 1.0  # top-left cell of a coarse grid, resized bilinearly to 16 x 12
    out = overlay(as_float, heatmap, alpha=1.0)
    assert out.shape == (16, 12, 3) and out.dtype == np.uint8
    assert out[0, 0].sum() > out[15, 11].sum() + 200  # bright where the map is high
    assert overlay(rgb, heatmap, size=(32, 24)).shape == (32, 24, 3)
    half = overlay(rgb, heatmap, alpha=0.5).astype(int)
    pure = overlay(rgb, heatmap, alpha=1.0).astype(int)
    np.testing.assert_allclose(half, (rgb.astype(int) + pure) / 2, atol=1.5)  # alpha blends linearly


def test_save_overlay_writes_the_overlay_atomically(tmp_path):
    heatmap = torch.arange(16.0).reshape(4, 4) - 8
    path = save_overlay(tmp_path / "sub" / "map.png", GREY, heatmap, signed=True)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), overlay(GREY, heatmap, signed=True))
    assert [p.name for p in path.parent.iterdir()] == ["map.png"]  # no temporary file left behind


def test_a_gallery_marks_flat_maps_names_the_class_and_keeps_text_legible():
    """A synthetic gallery: a flat map is labelled, not drawn; each tile names the class its map
    explains (here not the true class); one colour bar per kind of map; no text under 9 pt."""
    from matplotlib.text import Text

    from xtl.explain.gallery import GalleryRow, gallery_figure

    names = ["cat", "dog", "ship"]
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    signed_map = torch.linspace(-1, 2, 16).reshape(4, 4)
    row = GalleryRow(image, 0, torch.tensor([0.2, 0.7, 0.1]), {"flat": torch.zeros(4, 4), "lrp": signed_map},
                     "true: cat", targets={"flat": 1, "lrp": 2}, signed={"flat": False, "lrp": True})
    fig = gallery_figure([row, row], names, "synthetic")
    tiles = fig.axes[1:3]
    assert [ax.get_xlabel() for ax in tiles] == ["map: dog", "map: ship"]
    assert [t.get_text() for t in tiles[0].texts] == [FLAT_LABEL] and not tiles[1].texts
    shown = np.asarray(tiles[0].images[0].get_array()).astype(int)
    plain = to_rgb(image, shown.shape[:2]).astype(int)
    # the flat tile shows the image faded towards grey, with no colour map on it
    assert np.all(np.abs(shown - (plain + 2 * 160) / 3) <= 1)
    np.testing.assert_array_equal(np.asarray(tiles[1].images[0].get_array()),
                                  overlay(image, signed_map, signed=True, size=shown.shape[:2]))
    colour_bars = sorted(a._colorbar.cmap.name for a in fig.axes if a.get_label() == "<colorbar>")
    assert colour_bars == ["RdBu_r", "inferno"]
    fig.canvas.draw()
    sizes = {t.get_text(): t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()}
    assert min(sizes.values()) >= 9, sizes
