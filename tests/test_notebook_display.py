"""Issue 27, notebook-first display: an `Explanation` and the faithfulness scores show themselves
(`_repr_png_`, `_repr_html_`, a short `__repr__`), `plot()` returns a Figure, `overlay` takes batches.
Real CIFAR-10 images, a tiny randomly initialised timm:resnet10t."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from xtl.explain import Explanation, drawing, explain, gallery
from xtl.models import describe_model, preprocessing

from helpers import cifar_uint8, random_resnet10t

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cnn():
    return random_resnet10t()


@pytest.fixture(scope="module")
def batch(cifar, cnn):
    """(uint8 images, preprocessed 64 px images, labels): 6 real CIFAR-10 images."""
    pixels, labels = cifar_uint8(cifar)
    return pixels, preprocessing(spec=replace(describe_model(cnn), input_size=64))(pixels), labels


def _decoded(png: bytes) -> np.ndarray:
    assert png.startswith(PNG)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_an_explanation_repr_is_one_short_line_never_a_tensor_dump(cnn, batch):
    _, x, _ = batch
    e = explain(cnn, x, [3, 5, 1, 0, 2, 8], "gradcam")
    text = repr(e)
    assert text == "Explanation(method='gradcam', images=6, map=2x2, signed=False, targets=[3, 5, 1, 0, 2, 8])"
    many = Explanation("saliency", torch.arange(20), torch.zeros(20, 4, 4), torch.zeros(20, 8, 8), signed=True)
    assert repr(many) == ("Explanation(method='saliency', images=20, map=4x4, signed=True, "
                          "targets=[0, 1, 2, 3, 4, 5, 6, 7, ...])")
    assert "tensor(" not in repr(many) and "\n" not in repr(many)


def test_explain_keeps_a_small_uint8_copy_of_the_images_to_draw_on(cnn, batch):
    pixels, x, _ = batch
    e = explain(cnn, x, None, "saliency")
    assert e.images is not None and e.images.dtype == torch.uint8 and e.images.device.type == "cpu"
    assert tuple(e.images.shape) == tuple(x.shape)
    # mapped back with the model's mean and std: the pixels, resized as preprocessing resized them
    resized = torch.nn.functional.interpolate(pixels.float(), size=(64, 64), mode="bilinear", align_corners=False,
                                              antialias=True)
    assert (e.images.float() - resized).abs().mean() < 3.0


def test_the_png_is_a_grid_of_overlays_with_a_colour_bar_for_unsigned_and_signed_maps(cnn, batch):
    _, x, _ = batch
    unsigned = explain(cnn, x, [3, 3, 3, 8, 8, 8], "gradcam")
    signed = explain(cnn, x, [3, 3, 3, 8, 8, 8], "integrated_gradients", n_steps=4)
    assert signed.signed and not unsigned.signed
    for e, cmap, low, word in ((unsigned, drawing.UNSIGNED_CMAP, 0.0, "unsigned"), (signed, drawing.SIGNED_CMAP, -1.0, "signed")):
        figure = e.plot()
        tiles = [a for a in figure.axes if a.get_images() and a.get_xlabel().startswith("target")]
        assert len(tiles) == 6 and [a.get_xlabel().split()[1] for a in tiles] == ["3", "3", "3", "8", "8", "8"]
        bars = [a for a in figure.axes if a not in tiles and a.get_visible() and a.get_ylabel()]
        assert len(bars) == 1 and bars[0].get_ylabel() == drawing.colour_bar_label(e.signed)
        solids = [c for c in bars[0].collections if type(c).__name__ == "QuadMesh"]
        assert solids and solids[0].get_cmap().name == cmap  # the diverging map for signed, inferno else
        assert bars[0].get_ylim() == pytest.approx((low, 1.0))  # centred at 0 for signed maps
        assert word + ":" in figure.get_suptitle()
        # each tile is the map over its own image, exactly as drawing.overlay draws it
        drawn = tiles[1].get_images()[0].get_array()
        expected = drawing.overlay(e.images[1], e.raw[1], signed=e.signed, size=drawn.shape[:2])
        assert np.array_equal(np.asarray(drawn), expected)
        png = e._repr_png_()
        picture = _decoded(png)
        assert picture.shape[0] > 100 and picture.shape[1] > 400


def test_the_html_has_a_header_line_and_the_png_inline(cnn, batch):
    _, x, _ = batch
    e = explain(cnn, x, [3, 5, 1, 0, 2, 8], "gradcam")
    page = e._repr_html_()
    assert "<b>gradcam</b>: 6 images, map grid 2x2, unsigned, targets [3, 5, 1, 0, 2, 8]" in page
    found = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert found
    assert _decoded(base64.b64decode(found.group(1))).shape == _decoded(e._repr_png_()).shape


def test_without_images_the_maps_are_drawn_alone_or_over_images_given(cnn, batch, tmp_path):
    pixels, x, _ = batch
    e = explain(cnn, x, [3, 5, 1, 0, 2, 8], "gradcam")
    loaded = Explanation.load(e.save(tmp_path / "e.safetensors"))
    assert loaded.images is None
    figure = loaded.plot()
    tiles = [a for a in figure.axes if a.get_xlabel().startswith("target")]
    alone = np.asarray(tiles[0].get_images()[0].get_array())
    assert alone.shape == (2, 2) and np.allclose(alone, drawing.scaled(e.raw[0]))  # the map on its own grid
    assert _decoded(loaded._repr_png_()).ndim == 3
    over = loaded.plot(images=pixels)  # uint8 images given: overlays again
    tile = [a for a in over.axes if a.get_xlabel().startswith("target")][0]
    assert np.asarray(tile.get_images()[0].get_array()).shape[-1] == 3
    with pytest.raises(Exception, match="images= holds 2 images for 6 maps"):
        loaded.plot(images=pixels[:2])


def test_plot_shows_at_most_max_images_and_draws_into_given_axes(cnn, batch):
    from xtl.io import pyplot

    _, x, _ = batch
    e = explain(cnn, x, None, "saliency")
    figure = e.plot(max_images=2, alpha=0.3)
    assert len([a for a in figure.axes if a.get_xlabel().startswith("target")]) == 2
    assert "first 2 shown" in figure.get_suptitle()
    plt = pyplot()
    own, ax = plt.subplots()
    assert e.plot(ax=ax) is own and len(ax.get_images()) == 1  # the tiles side by side in one Axes
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"target {int(t)}" for t in e.targets]
    grid_figure, axes = plt.subplots(2, 3)
    assert e.plot(ax=axes) is grid_figure and all(a.get_images() for a in axes.flat)
    plt.close("all")


def test_show_outside_a_notebook_draws_with_pyplot(cnn, batch, monkeypatch):
    from xtl.io import pyplot

    _, x, _ = batch
    e = explain(cnn, x[:2], None, "saliency")
    shown = []
    monkeypatch.setattr(pyplot(), "show", lambda *a, **k: shown.append(pyplot().gcf()))
    assert e.show() is None
    assert len(shown) == 1 and any(a.get_xlabel().startswith("target") for a in shown[0].axes)
    pyplot().close("all")


def test_overlay_takes_a_batch_of_images_and_maps(cnn, batch):
    pixels, x, _ = batch
    e = explain(cnn, x, None, "integrated_gradients", n_steps=4)
    many = drawing.overlay(pixels, e.raw, signed=True)
    assert many.shape == (6, 32, 32, 3) and many.dtype == np.uint8
    for i in range(6):
        assert np.array_equal(many[i], drawing.overlay(pixels[i], e.raw[i], signed=True))
    # one image under several maps, several images under one map, and the gallery's older overlay
    assert drawing.overlay(pixels[0], e.raw).shape == (6, 32, 32, 3)
    assert drawing.overlay(pixels, e.raw[0]).shape == (6, 32, 32, 3)
    old = gallery.overlay(pixels, e.maps)
    assert old.shape == (6, 64, 64, 3) and np.allclose(old[2], gallery.overlay(pixels[2], e.maps[2]))
    with pytest.raises(ValueError, match="6 images and 2 maps"):
        drawing.overlay(pixels, e.raw[:2])


# ----------------------------------------------------------------------------- the faithfulness scores


@pytest.fixture(scope="module")
def scored(cnn, batch):
    from xtl.faithfulness import score

    _, x, labels = batch
    e = explain(cnn, x, None, "gradcam")
    return score(cnn, x, labels, e.maps, steps=4, batch_size=64)


def test_scores_repr_is_short_and_their_table_has_one_row_per_image(scored):
    text = repr(scored)
    assert text.startswith("Scores(images=6, points=5, mean AUC: deletion=") and "srg=" in text
    assert "tensor(" not in text and "\n" not in text
    assert repr(scored.curves["deletion"]).startswith("Curve(images=6, points=5, auc_mean=")
    frame = scored.to_pandas()
    assert list(frame.columns) == ["image", "target", "deletion", "insertion", "positive", "negative", "srg",
                                   "srg_accuracy"]
    assert len(frame) == 6 and frame["image"].tolist() == list(range(6))
    assert frame["target"].tolist() == scored.targets.tolist()
    assert np.allclose(frame["deletion"], scored.curves["deletion"].auc.double().numpy())
    assert np.allclose(frame["srg"], frame["insertion"] - frame["deletion"])
    page = scored._repr_html_()
    assert page.startswith("<div><div>Scores: images=6") and "<table" in page and "srg_accuracy" in page


def test_method_and_model_scores_show_their_tables(scored):
    from xtl.faithfulness import MethodScores, ModelScores

    method = MethodScores("gradcam", dict(scored.curves), explain_seconds=0.5, score_seconds=1.0)
    model = ModelScores(name="notebook", model="timm:resnet10t", n_images=6, steps=4, baseline="zero",
                        methods=[method])
    assert repr(method).startswith("MethodScores(method='gradcam', reading='unsigned', images=6, mean: deletion=")
    assert repr(model) == ("ModelScores(name='notebook', model='timm:resnet10t', map_sets=1, images=6, steps=4, "
                           "baseline='zero', grid=pixel)")
    per_image = method.to_pandas()
    assert len(per_image) == 6 and {"method", "image", "deletion", "srg"} <= set(per_image.columns)
    table = model.to_pandas()
    assert len(table) == 1 and table.iloc[0]["deletion"] == pytest.approx(model.rows()[0]["deletion"])
    assert len(model.to_pandas(per_image=True)) == 6
    assert "<table" in model._repr_html_() and "ModelScores: name=&#x27;notebook&#x27;" in model._repr_html_()
    assert "<table" in method._repr_html_()
