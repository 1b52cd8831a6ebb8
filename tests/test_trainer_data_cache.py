"""TrainDataset batches and sd-scripts-compatible latent caches (train-spec 2.6): file names, keys,
reuse without the VAE, invalidation, flip and alpha variants, SDXL size/crop conditioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import resolve_config
from trainer.data import build_dataset
from trainer.data.latent_cache import latent_cache_path, load_latents


def fake_vae(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the VAE: 8x8 average pooling, plus a 4th channel (the mean)."""
    pooled = torch.nn.functional.avg_pool2d(images, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def refuse(images: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the VAE must not run when valid caches exist")


@pytest.fixture()
def dataset_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "train" / "2_thing"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h), mode in (("wide", (200, 120), "RGB"), ("tall", (120, 200), "RGBA"), ("sq", (64, 64), "RGB")):
        channels = 4 if mode == "RGBA" else 3
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        Image.fromarray(pixels, mode).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"thing, {name}\n", encoding="utf-8")
    return tmp_path / "train"


def _cfg(root: Path, *extra: str):
    return resolve_config(["--train_data_dir", str(root), "--resolution", "64", "--caption_extension", ".txt",
                           "--train_batch_size", "2", "--seed", "3", *extra])


def test_batch_dict_contract_without_cache(dataset_dir: Path):
    ds = build_dataset(_cfg(dataset_dir, "--alpha_mask", "--prior_loss_weight", "0.5"))
    assert len(ds) == 3 and ds.steps_per_epoch == 3 and ds.num_train_images == 6
    ds.set_epoch(1)
    batch = ds[0]
    b = len(batch["captions"])
    assert batch["latents"] is None and batch["images"].shape == (b, 3, 64, 64)
    assert batch["images"].dtype == torch.float32 and -1 <= batch["images"].min() and batch["images"].max() <= 1
    assert batch["loss_weights"].tolist() == [1.0] * b
    for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
        assert batch[key].shape == (b, 2) and batch[key].dtype == torch.long
    assert batch["alpha_masks"].shape == (b, 1, 64, 64)
    assert all(c.startswith("thing, ") for c in batch["captions"])


def test_pixels_are_resized_to_cover_then_centre_cropped(dataset_dir: Path):
    ds = build_dataset(_cfg(dataset_dir))
    found = {}
    for i in range(len(ds)):
        batch = ds[i]
        for k, key in enumerate(batch["image_keys"]):
            found[Path(key).name] = (batch["images"][k], batch["original_sizes_hw"][k].tolist(),
                                     batch["crop_top_lefts"][k].tolist(), batch["target_sizes_hw"][k].tolist())
    image, original, crop, target = found["wide.png"]
    # 200x120 into 64x64: scale 64/120 -> 107x64 (area filter), centre crop (107-64)//2 = 21
    reference = Image.open(dataset_dir / "2_thing" / "wide.png").convert("RGB").resize((107, 64), Image.Resampling.BOX)
    expected = np.asarray(reference)[:, 21:21 + 64].astype(np.float32) / 255 * 2 - 1
    assert torch.allclose(image, torch.from_numpy(expected.transpose(2, 0, 1).copy()), atol=1e-6)
    assert original == [120, 200] and target == [64, 64]
    # analytic crop: fit 200x120 into 64x64 -> 64 x 38.4, top = floor(25.6 / 2) = 12, left 0
    assert crop == [12, 0]
    assert found["tall.png"][2] == [0, 12]


def test_flip_mirrors_pixels_and_crop_left(dataset_dir: Path):
    ds = build_dataset(_cfg(dataset_dir, "--flip_aug"))
    plain = build_dataset(_cfg(dataset_dir))
    reference = {}
    for i in range(len(plain)):
        batch = plain[i]
        for k, key in enumerate(batch["image_keys"]):
            reference[key] = batch["images"][k]
    flips = plain_seen = 0
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            batch = ds[i]
            for k, key in enumerate(batch["image_keys"]):
                if torch.equal(batch["images"][k], reference[key]):
                    plain_seen += 1
                    expected_left = 12 if key.endswith("tall.png") else 0
                else:
                    assert torch.equal(batch["images"][k], torch.flip(reference[key], dims=[2]))
                    flips += 1
                    # tall: crop box 12..50.4 of 64 -> flipped left = 64 - 50.4 = 13.6 -> 13
                    expected_left = 13 if key.endswith("tall.png") else 0
                if not key.endswith("sq.png"):
                    assert batch["crop_top_lefts"][k, 1].item() == expected_left
    assert flips > 3 and plain_seen > 3


def test_latent_cache_files_keys_and_reuse(dataset_dir: Path):
    cfg = _cfg(dataset_dir, "--cache_latents_to_disk", "--flip_aug", "--alpha_mask")
    ds = build_dataset(cfg)
    report = ds.cache_latents(fake_vae, to_disk=True)
    assert (report.encoded, report.reused) == (3, 0)
    folder = dataset_dir / "2_thing"
    path = folder / "wide_0200x0120_sd.npz"
    assert path == latent_cache_path(folder / "wide.png", (200, 120), sdxl=False)
    assert sorted(p.name for p in folder.glob("*.npz")) == ["sq_0064x0064_sd.npz", "tall_0120x0200_sd.npz",
                                                            "wide_0200x0120_sd.npz"]
    with np.load(path) as npz:
        assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask"}
        assert npz["latents"].shape == (4, 8, 8) and npz["latents"].dtype == np.float32
        assert npz["original_size"].tolist() == [200, 120]
        assert npz["crop_ltrb"].tolist() == pytest.approx([0, 12, 64, 50.4])
        assert npz["alpha_mask"].shape == (64, 64)
        batch_images = build_dataset(_cfg(dataset_dir))
        for i in range(len(batch_images)):
            b = batch_images[i]
            for k, key in enumerate(b["image_keys"]):
                if key.endswith("wide.png"):
                    expected = fake_vae(b["images"][k:k + 1])[0].numpy()
                    assert np.allclose(npz["latents"], expected, atol=1e-6)
                    flipped = fake_vae(torch.flip(b["images"][k:k + 1], dims=[3]))[0].numpy()
                    assert np.allclose(npz["latents_flipped"], flipped, atol=1e-6)
    with np.load(folder / "tall_0120x0200_sd.npz") as npz:
        assert npz["alpha_mask"].min() < 1.0  # real alpha kept

    again = build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk", "--flip_aug", "--alpha_mask"))
    assert again.cache_latents(refuse, to_disk=True).reused == 3
    again.set_epoch(1)
    batch = again[0]
    assert batch["images"] is None and batch["latents"].shape == (len(batch["captions"]), 4, 8, 8)
    assert batch["alpha_masks"].shape == (len(batch["captions"]), 1, 64, 64)
    assert batch["target_sizes_hw"].tolist()[0] == [64, 64]


def test_cache_is_recomputed_when_keys_or_bucket_change(dataset_dir: Path):
    build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk")).cache_latents(fake_vae, to_disk=True)
    # flip_aug needs latents_flipped, which the first run did not write
    with_flip = build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk", "--flip_aug"))
    assert with_flip.cache_latents(fake_vae, to_disk=True).encoded == 3
    assert "latents_flipped" in np.load(dataset_dir / "2_thing" / "sq_0064x0064_sd.npz").files
    # a new resolution changes every bucket: stale 8x8 latents are replaced by 16x16 ones
    bigger = resolve_config(["--train_data_dir", str(dataset_dir), "--resolution", "128", "--caption_extension",
                             ".txt", "--cache_latents_to_disk"])
    assert build_dataset(bigger).cache_latents(fake_vae, to_disk=True).encoded == 3
    assert load_latents(dataset_dir / "2_thing" / "sq_0064x0064_sd.npz").latents.shape == (4, 16, 16)
    # --skip_cache_check trusts what exists
    skip = build_dataset(resolve_config(["--train_data_dir", str(dataset_dir), "--resolution", "64",
                                         "--caption_extension", ".txt", "--cache_latents_to_disk",
                                         "--skip_cache_check", "--alpha_mask"]))
    assert skip.cache_latents(refuse, to_disk=True).reused == 3


def test_in_memory_cache_and_sdxl_names(dataset_dir: Path):
    ds = build_dataset(_cfg(dataset_dir, "--cache_latents"))
    assert ds.cache_latents(fake_vae, to_disk=False).encoded == 3
    assert not list(dataset_dir.rglob("*.npz"))
    assert ds.cache_latents(refuse, to_disk=False).reused == 3
    sdxl = build_dataset(_cfg(dataset_dir, "--model_type", "sdxl", "--cache_latents_to_disk"))
    sdxl.cache_latents(fake_vae, to_disk=True)
    assert sorted(p.name for p in dataset_dir.rglob("*.npz"))[0] == "sq_0064x0064_sdxl.npz"


def _solid_images(tmp_path: Path, folder_name: str, n: int, *flags: str):
    """``n`` uncaptioned 64x64 images of different colours; the config of a run over them."""
    folder = tmp_path / "train" / folder_name
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 30, 0, 0)).save(folder / f"{i}.png")
    return resolve_config(["--train_data_dir", str(tmp_path / "train"), "--resolution", "64", *flags])


def test_epoch_order_is_reproducible_and_changes_between_epochs(tmp_path: Path):
    cfg = _solid_images(tmp_path, "3_x", 8, "--seed", "1", "--train_batch_size", "4")
    a, b = build_dataset(cfg), build_dataset(cfg)

    def order(ds, epoch):
        ds.set_epoch(epoch)
        return [ds[i]["image_keys"] for i in range(len(ds))]

    assert order(a, 1) == order(b, 1)
    assert order(a, 2) != order(a, 1)
    assert order(a, 1) == order(b, 1)  # going back to an epoch gives the same order (resume)


def test_persistent_workers_follow_set_epoch(tmp_path: Path):
    cfg = _solid_images(tmp_path, "2_x", 6, "--seed", "2", "--train_batch_size", "3")
    ds = build_dataset(cfg)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=1, persistent_workers=True,
                                         collate_fn=lambda items: items[0])
    orders = []
    for epoch in (1, 2):
        ds.set_epoch(epoch)
        orders.append([batch["image_keys"] for batch in loader])
    reference = build_dataset(cfg)
    for epoch, order in zip((1, 2), orders):
        reference.set_epoch(epoch)
        assert order == [reference[i]["image_keys"] for i in range(len(reference))]
    assert orders[0] != orders[1]


def test_legacy_cache_name_and_sharded_caching(dataset_dir: Path):
    folder = dataset_dir / "2_thing"
    # an older sd-scripts cache <stem>.npz with latents of the right shape is reused as is
    np.savez(folder / "sq.npz", latents=np.full((4, 8, 8), 0.5, dtype=np.float32))
    first = build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk"))
    report = first.cache_latents(fake_vae, to_disk=True, shard=(0, 2))
    assert report.reused == 1 and report.encoded == 1          # 2 left to encode, this process takes 1
    second = build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk"))
    assert second.cache_latents(fake_vae, to_disk=True, shard=(1, 2)).encoded == 1
    done = build_dataset(_cfg(dataset_dir, "--cache_latents_to_disk"))
    assert done.cache_latents(refuse, to_disk=True).reused == 3
    latents = [done[i]["latents"] for i in range(len(done))]
    assert any(torch.all(t == 0.5) for batch in latents for t in batch)


def test_validation_part(dataset_dir: Path):
    assert build_dataset(_cfg(dataset_dir), validation=True) is None
    cfg = _cfg(dataset_dir, "--validation_split", "0.34", "--validation_seed", "1")
    train, val = build_dataset(cfg), build_dataset(cfg, validation=True)
    train_keys = {k for layout in train.layouts for k in layout.images}
    val_keys = {k for layout in val.layouts for k in layout.images}
    assert len(train_keys) == 2 and len(val_keys) == 1 and not train_keys & val_keys
    assert train.plan.num_validation_images == 2 and train.num_train_images == 4  # x2 repeats
