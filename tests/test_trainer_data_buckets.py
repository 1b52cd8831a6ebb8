"""Bucket algorithm against the hand-checked vectors of train-spec 1.4 (sd-scripts' BucketManager)."""

from __future__ import annotations

import math

import pytest

from trainer.data.buckets import BucketManager, crop_ltrb, make_bucket_resos


def test_sd1_bucket_list_512():
    resos = make_bucket_resos((512, 512), 256, 1024, 64)
    expected_half = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576)]
    expected = sorted(set(expected_half + [(h, w) for w, h in expected_half] + [(512, 512)]))
    assert resos == expected and len(resos) == 17


def test_sdxl_bucket_list_1024_has_49_buckets_within_area():
    resos = make_bucket_resos((1024, 1024), 256, 1024, 32)
    assert len(resos) == 49
    assert all(w * h <= 1024 * 1024 and w % 32 == 0 and h % 32 == 0 for w, h in resos)
    assert (1024, 1024) in resos and resos == sorted(resos)


@pytest.mark.parametrize("no_upscale, size, bucket, resized", [
    # upscale allowed: (512, 512), 256..1024, step 64
    (False, (1000, 1500), (384, 640), (427, 640)),
    (False, (1920, 1080), (640, 384), (683, 384)),
    (False, (300, 900), (256, 832), (277, 832)),
    # bucket_no_upscale: (1024, 1024), step 32; buckets made on demand, may exceed max_bucket_reso
    (True, (1000, 1500), (832, 1248), (832, 1248)),
    (True, (1920, 1080), (1344, 768), (1365, 768)),
    (True, (300, 900), (288, 896), (300, 900)),
])
def test_select_bucket_vectors(no_upscale, size, bucket, resized):
    if no_upscale:
        manager = BucketManager.for_dataset((1024, 1024), True, 256, 1024, 32, True)
    else:
        manager = BucketManager.for_dataset((512, 512), True, 256, 1024, 64, False)
    got_bucket, got_resized, error = manager.select_bucket(*size)
    assert (got_bucket, got_resized) == (bucket, resized)
    assert error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    assert got_resized[0] >= bucket[0] and got_resized[1] >= bucket[1]  # covers the bucket, never pads
    assert got_bucket in manager.resos


def test_exact_bucket_size_is_kept_and_no_bucket_mode_covers_then_crops():
    manager = BucketManager.for_dataset((512, 512), True, 256, 1024, 64, False)
    assert manager.select_bucket(384, 640)[:2] == ((384, 640), (384, 640))
    single = BucketManager.for_dataset((512, 512), False, 256, 1024, 64, False)
    # 1920x1080 is wider than 1:1, so the height is matched: scale 512/1080
    assert single.select_bucket(1920, 1080)[:2] == ((512, 512), (int(1920 * 512 / 1080 + 0.5), 512))


def test_ties_take_the_first_bucket_in_sorted_order():
    # aspect 1.25 is 0.75 away from both 0.5 (32x64) and 2.0 (128x64): numpy argmin takes the first
    manager = BucketManager(False, (64, 64), 32, predefined=[(32, 64), (128, 64)])
    assert manager.select_bucket(80, 64)[0] == (32, 64)
    assert manager.select_bucket(81, 64)[0] == (128, 64)


def test_round_to_steps_is_half_up_then_floor():
    manager = BucketManager(True, (1024, 1024), 64)
    assert manager.round_to_steps(127.4) == 64 and manager.round_to_steps(127.5) == 128


def test_crop_ltrb_fits_original_aspect_into_bucket():
    # bucket 64x64, tall image 120x200: fit width 64*0.6 = 38.4, left = floor((64-38.4)/2) = 12
    assert crop_ltrb((64, 64), (120, 200)) == (12.0, 0.0, 12.0 + 38.4, 64)
    left, top, right, bottom = crop_ltrb((96, 64), (64, 64))
    assert (left, top, right, bottom) == (16.0, 0.0, 80.0, 64)
    assert math.isclose(crop_ltrb((64, 96), (64, 64))[1], 16.0)
