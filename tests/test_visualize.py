"""The overlay picture: regions keep their colours, outlines and number tags stay off the regions."""

import numpy as np
from PIL import Image

from infer.visualize import MIN_SIDE, PALETTE, overlay


def scene():
    image = np.full((60, 80, 3), 230, np.uint8)
    big, small = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    big[10:40, 10:40] = True
    image[big] = (220, 20, 20)  # a red square
    yy, xx = np.mgrid[:60, :80]
    small[(yy - 30) ** 2 + (xx - 60) ** 2 <= 16] = True  # a small blue circle
    image[small] = (20, 60, 220)
    return image, [big, small]


def test_regions_keep_their_colours_and_tags_stay_off_them():
    image, masks = scene()
    picture = np.asarray(overlay(Image.fromarray(image), masks, ["a red square", "a blue circle"]))
    scale = -(-MIN_SIDE // 80)  # small images are enlarged
    top = picture[: 60 * scale, : 80 * scale]
    assert picture.shape[1] == 80 * scale and picture.shape[0] > 60 * scale  # the legend goes below
    for mask, colour in zip(masks, [(220, 20, 20), (20, 60, 220)]):
        inside = np.kron(mask, np.ones((scale, scale), bool))
        assert (top[inside] == colour).all()  # no tint, no outline or tag over it: the colour named is shown
    outline = np.all(top == PALETTE[0], axis=-1)
    assert outline.any() and not (outline & np.kron(masks[0], np.ones((scale, scale), bool))).any()
    assert np.all(top == PALETTE[1], axis=-1).sum() > 100  # the small circle's outline and tag: around it


def test_caption_font_grows_with_the_image():
    """Legend lines are sized to the picture: a 1280-px picture gets twice the text of a 640-px one."""
    image, masks = scene()
    small = overlay(Image.fromarray(image), masks, ["a", "b"])  # 80 px, shown at 640
    big_image = np.kron(image, np.ones((16, 16, 1), np.uint8))  # 1280 px
    big = overlay(Image.fromarray(big_image), [np.kron(m, np.ones((16, 16), bool)) for m in masks], ["a", "b"])
    small_legend, big_legend = small.height - small.width * 60 // 80, big.height - 960
    assert 1.8 < big_legend / small_legend < 2.2
