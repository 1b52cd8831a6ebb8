"""The synthetic sd-scripts dataset: folder layout, captions, sizes."""

from __future__ import annotations

from PIL import Image

from loratools.tiny import make_dataset


def test_layout_captions_and_sizes(tiny_dataset):
    ds = tiny_dataset
    assert ds.concept_dir == ds.root / "5_tinychar" and ds.repeats == 5
    assert [p.name for p in sorted(ds.concept_dir.glob("*.png"))] == [f"img_{i:03d}.png" for i in range(6)]
    for image in ds.images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == ds.captions[image.name]
        tags = caption.split(", ")
        assert tags[0] == "tinychar" and "stripes" in tags and len(tags) == 5
    sizes = {Image.open(p).size for p in ds.images}
    ratios = {round(w / h, 2) for w, h in sizes}
    assert len(ratios) >= 4  # portrait, landscape, square, wide: several buckets


def test_options_and_determinism(tmp_path):
    a = make_dataset(tmp_path / "a", "sdxl", 4, repeats=2, concept="dog toy", trigger="ohwx", seed=3,
                     uncaptioned=1, rgba=1, caption_extension=".caption")
    b = make_dataset(tmp_path / "b", "sdxl", 4, repeats=2, concept="dog toy", trigger="ohwx", seed=3,
                     uncaptioned=1, rgba=1, caption_extension=".caption")
    assert a.concept_dir.name == "2_dog toy"
    assert a.captions == b.captions and all(c.startswith("ohwx, ") for c in a.captions.values())
    assert not a.images[-1].with_suffix(".caption").exists() and a.images[-1].name not in a.captions
    assert Image.open(a.images[0]).mode == "RGBA" and Image.open(a.images[1]).mode == "RGB"
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(a.images, b.images))
