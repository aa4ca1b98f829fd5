"""The training crop decodes JPEGs at the scale its box needs (data/scaled_decode.py): the same draws as
torchvision's RandomResizedCrop, bit-equal where the box is small, close where it is decoded reduced."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from xception_pl.data.samples import Skip, decode, image_dimensions
from xception_pl.data.scaled_decode import DecodeCrop, draft_decode
from xception_pl.data.transforms import train_transform


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth JPEG (colour fields, as photographs are at this scale) with a little noise."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(low, float) + rng.normal(0, 3, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode).save(out, "JPEG", quality=90)
    return out.getvalue()


def both(crop: DecodeCrop, data: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(from the bytes, from a full decode, the next random draw after each): same seed for both."""
    (width, height), is_jpeg = image_dimensions(data)
    torch.manual_seed(seed)
    scaled, after_scaled = crop.from_bytes(data, width, height, is_jpeg), torch.rand(()).item()
    torch.manual_seed(seed)
    full, after_full = crop(decode(data, is_jpeg)), torch.rand(()).item()
    return scaled, full, after_scaled, after_full


def reduction(crop: DecodeCrop, data: bytes, seed: int) -> int:
    (width, height), _ = image_dimensions(data)
    torch.manual_seed(seed)
    box = crop.crop.make_params([torch.empty(3, height, width, device="meta")])
    return next((r for r in (8, 4, 2) if min(box["height"], box["width"]) >= r * crop.size), 1)


def test_a_box_under_twice_the_output_decodes_in_full_and_matches_torchvision_bit_for_bit():
    crop, data = train_transform(64), photo(100, 80)  # every box < 128 px: nothing to reduce
    for seed in range(20):
        scaled, full, after_scaled, after_full = both(crop, data, seed)
        assert torch.equal(scaled, full) and after_scaled == after_full


def test_large_boxes_decode_reduced_with_the_same_draws_and_close_pixels():
    crop, data = train_transform(96), photo(1200, 900)
    reductions = {reduction(crop, data, seed) for seed in range(60)}
    assert {2, 4, 8} <= reductions  # the seeds cover every DCT scaling
    for seed in range(60):
        scaled, full, after_scaled, after_full = both(crop, data, seed)
        assert scaled.shape == full.shape == (3, 96, 96) and scaled.dtype == torch.uint8
        assert after_scaled == after_full  # the flip (and what follows) drew the same numbers
        assert (scaled.float() - full.float()).abs().mean() < 4  # libjpeg's scaling filter vs an antialiased resize


def test_the_reduced_decode_is_the_largest_dct_scaling_that_keeps_the_size():
    data = photo(1600, 1200)
    assert draft_decode(data, 400, 300).shape == (3, 300, 400)
    assert draft_decode(data, 200, 150).shape == (3, 150, 200)
    assert draft_decode(data, 1000, 700).shape == (3, 1200, 1600)  # 1/2 would be smaller than asked


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_come_out_rgb(mode):
    crop, data = train_transform(32), photo(400, 300, mode)
    for seed in range(5):
        scaled, full, _, _ = both(crop, data, seed)
        assert scaled.shape == full.shape == (3, 32, 32)


def test_a_corrupt_jpeg_decoded_reduced_is_a_counted_skip():
    crop, data = train_transform(32), photo(640, 480)
    seed = next(s for s in range(40) if reduction(crop, data, s) > 1)
    torch.manual_seed(seed)
    with pytest.raises(Skip, match="corrupt_image"):
        crop.from_bytes(data[:700], 640, 480, True)  # header intact, the scan cut short
