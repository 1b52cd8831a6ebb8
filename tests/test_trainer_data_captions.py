"""Caption reading and per-use processing (sd-scripts' read_caption / process_caption)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from loratools.errors import InvalidFileError
from trainer.data.captions import CaptionOptions, process_caption, read_caption, tag_frequency


def test_shuffle_keeps_the_first_keep_tokens_and_joins_with_comma_space():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    caption = "tinychar,1girl,  red hair, smile,blue eyes, outdoors"
    seen = set()
    for seed in range(40):
        out = process_caption(caption, opts, random.Random(seed))
        parts = out.split(", ")
        assert parts[:2] == ["tinychar", "1girl"]
        assert sorted(parts[2:]) == sorted(["red hair", "smile", "blue eyes", "outdoors"])
        seen.add(tuple(parts[2:]))
    assert len(seen) > 5  # it really shuffles
    # same seed, same caption
    assert process_caption(caption, opts, random.Random(7)) == process_caption(caption, opts, random.Random(7))


def test_without_shuffle_or_dropout_the_caption_is_untouched():
    assert process_caption("a,b ,  c", CaptionOptions(keep_tokens=1), random.Random(0)) == "a,b ,  c"


def test_tag_dropout_drops_only_flex_tags_at_the_given_rate():
    opts = CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=0.3)
    tags = [f"t{i}" for i in range(10)]
    rng = random.Random(123)
    kept = 0
    for _ in range(400):
        out = process_caption(", ".join(["keep"] + tags), opts, rng).split(", ")
        assert out[0] == "keep" and all(t in tags for t in out[1:])
        assert out[1:] == [t for t in tags if t in out[1:]]  # order kept without shuffle
        kept += len(out) - 1
    assert kept / 4000 == pytest.approx(0.7, abs=0.03)


def test_caption_dropout_rate_and_every_n_epochs():
    opts = CaptionOptions(caption_dropout_rate=0.25)
    rng = random.Random(5)
    empty = sum(process_caption("a, b", opts, rng) == "" for _ in range(2000))
    assert empty / 2000 == pytest.approx(0.25, abs=0.03)
    every = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert [process_caption("a", every, random.Random(0), epoch=e) for e in range(1, 7)] == ["a", "a", "", "a", "a", ""]


def test_keep_tokens_separator_with_fixed_suffix():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=5)
    for seed in range(10):
        out = process_caption("char, 1girl ||| x, y, z ||| best quality, masterpiece", opts, random.Random(seed))
        parts = out.split(", ")
        assert parts[:2] == ["char", "1girl"] and parts[-2:] == ["best quality", "masterpiece"]
        assert sorted(parts[2:5]) == ["x", "y", "z"]


def test_prefix_suffix_secondary_separator_and_first_line():
    opts = CaptionOptions(caption_prefix="pre", caption_suffix="post", secondary_separator=";;;")
    assert process_caption("a;;;b, c\nsecond line", opts, random.Random(0)) == "pre a,b, c"


def test_wildcards_choose_one_option_and_keep_escaped_braces():
    opts = CaptionOptions(enable_wildcard=True)
    outs = {process_caption("{red|blue} ball, {{literal}}", opts, random.Random(s)) for s in range(30)}
    assert outs == {"red ball, {literal}", "blue ball, {literal}"}
    lines = {process_caption("one\ntwo", opts, random.Random(s)) for s in range(30)}
    assert lines == {"one", "two"}


def test_token_warmup_grows_the_flex_tags():
    opts = CaptionOptions(keep_tokens=1, token_warmup_min=1, token_warmup_step=4)
    caption = "k, a, b, c, d, e"
    # flex = 5 tags; at step s: floor(s * (5 - 1) / 4) + 1 tags
    assert [len(process_caption(caption, opts, random.Random(0), step=s).split(", ")) - 1 for s in range(6)] == \
        [1, 2, 3, 4, 5, 5]
    fraction = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5)
    assert process_caption("a, b, c", fraction, random.Random(0), step=0, max_train_steps=10) == "a"


def test_read_caption_first_line_fallback_and_errors(tmp_path: Path):
    image = tmp_path / "img.png"
    image.write_bytes(b"")
    assert read_caption(image, ".txt") is None
    (tmp_path / "img.txt").write_text("  first, line \nsecond\n", encoding="utf-8")
    assert read_caption(image, ".txt") == "first, line"
    assert read_caption(image, ".txt", enable_wildcard=True) == "first, line\nsecond"
    (tmp_path / "img.caption").write_text("", encoding="utf-8")
    with pytest.raises(InvalidFileError, match="caption file is empty"):
        read_caption(image, ".caption")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(InvalidFileError, match="not UTF-8"):
        read_caption(tmp_path / "bad.png", ".txt")
    # face-crop naming: <stem>_a_b_c_d falls back to <stem>'s caption
    (tmp_path / "face.txt").write_text("face caption", encoding="utf-8")
    assert read_caption(tmp_path / "face_1_2_3_4.png", ".txt") == "face caption"


def test_tag_frequency_counts_lowercased_stripped_tags():
    assert tag_frequency(["Cat, red ,", "cat, Blue", ""]) == {"cat": 2, "red": 1, "blue": 1}
