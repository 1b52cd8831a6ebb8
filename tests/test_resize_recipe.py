"""resize recipes: grammar, validation messages, names (spec A1), sd-scripts flags."""

from __future__ import annotations

import math

import pytest

from loratools.errors import UsageError
from loratools.ops.resize.recipe import fmt, kohya_recipe, named_recipes, parse_recipe, parse_recipes


@pytest.mark.parametrize("value,text", [(-3.5, "-3.5"), (-3.0, "-3"), (-2.8712, "-2.87"), (0.0, "0"),
                                        (2.675, "2.67"), (0.125, "0.12"), (-0.001, "-0"), (-math.inf, "-inf"),
                                        (10.0, "10"), (1 / 3, "0.33")])
def test_fmt_matches_elias(value, text):
    assert fmt(value) == text


def test_elias_weights_normalised_by_plain_sum():
    r = parse_recipe("fro_ckpt=3,spn_lora,thr=-1")
    assert r.weights == {"fro_ckpt": 0.75, "spn_lora": 0.25}
    assert (r.method, r.param) == ("thr", -1.0)
    assert parse_recipe("fro_ckpt=2,spn_lora=-1,thr=0").weights == {"fro_ckpt": 2.0, "spn_lora": -1.0}


@pytest.mark.parametrize("text,stem", [
    ("fro_ckpt=1,thr=-3.5", "frockpt1"),
    ("spn_ckpt=1,size=32", "spnckpt1_size32"),
    ("fro_ckpt=3,spn_lora=1,thr=-1", "frockpt0.75_spnlora0.25"),
    ("params=0.2,fro_ckpt=0.8,thr=-3", "frockpt0.8_params0.2"),
    ("fro_ckpt,rescale=0.5,thr=0.3", "frockpt1_scale0.5"),
    ("fro_ckpt=1,size=0.01", "frockpt1_size0.01"),
    ("sv_fro=0.9", "svfro0.9"),
    ("sv_ratio=4,max_rank=32,conv_rank=8,min_rank=1", "svratio4_max32_conv8_min1"),
    ("rank=16", "rank16"),
])
def test_output_stem(text, stem):
    assert parse_recipe(text).stem() == stem


def test_whitespace_and_trailing_comma_tolerated():
    assert parse_recipe(" fro_ckpt = 1 , thr = -3.55 ,").param == -3.55


def test_thr_or_size_alone_defaults_to_fro_ckpt():
    assert parse_recipe("size=20").weights == {"fro_ckpt": 1.0}


def test_typo_names_bad_key_suggestion_and_valid_keys():
    with pytest.raises(UsageError) as e:
        parse_recipe("fro_chkpt=1,thr=-3")
    msg = str(e.value)
    assert "'fro_chkpt'" in msg and "did you mean 'fro_ckpt'" in msg and "sv_fro" in msg and "max_rank" in msg


@pytest.mark.parametrize("text,words", [
    ("fro_ckpt=1,thr=-3,size=10", "both thr= and size="),
    ("fro_ckpt=1", "selects nothing"),
    ("fro_ckpt=1,spn_lora=-1,thr=-3", "sum to 0"),
    ("thr=abc", "not a number"),
    ("thr=", "needs a value"),
    ("sv_fro=1.5", "(0, 1]"),
    ("sv_ratio=0.5", ">= 1"),
    ("rank=2.5", "integer"),
    ("fro_ckpt=1,sv_fro=0.9", "only apply"),
    ("sv_fro=0.9,rank=4", "several selections"),
    ("size=0", "positive"),
    ("thr=-3,rescale=0", "positive"),
    ("sv_fro=0.9,min_rank=8,max_rank=4", "min_rank"),
])
def test_bad_recipes_are_usage_errors(text, words):
    with pytest.raises(UsageError, match=None) as e:
        parse_recipe(text)
    assert words in str(e.value)


def test_multiple_recipes_and_duplicates():
    rs = parse_recipes("fro_ckpt=1,thr=-3.55:sv_fro=0.9:spn_lora,thr=-1")
    assert [r.method for r in rs] == ["thr", "sv_fro", "thr"]
    with pytest.raises(UsageError, match="same recipe"):
        parse_recipes("sv_fro=0.9:sv_fro=0.90")


def test_named_recipes_ship_and_parse():
    names = named_recipes()
    assert "default" in names
    assert parse_recipe("default").text == "fro_ckpt=1,thr=-3.55"
    for name in names:
        parse_recipe(name)


def test_kohya_flags():
    assert kohya_recipe(new_rank=None, new_conv_rank=None, dynamic_method=None, dynamic_param=None) == "rank=4"
    assert kohya_recipe(new_rank=16, new_conv_rank=8, dynamic_method=None, dynamic_param=None) == "rank=16,conv_rank=8"
    assert kohya_recipe(new_rank=None, new_conv_rank=None, dynamic_method="sv_fro", dynamic_param=0.9) == "sv_fro=0.9"
    assert kohya_recipe(new_rank=None, new_conv_rank=None, dynamic_method="sv_fro", dynamic_param=0.9,
                        kohya_compat=True) == "sv_fro=0.9,max_rank=4"
    assert kohya_recipe(new_rank=32, new_conv_rank=8, dynamic_method="sv_ratio",
                        dynamic_param=4.0) == "sv_ratio=4.0,max_rank=32,conv_rank=8"
    with pytest.raises(UsageError, match="needs --dynamic_param"):
        kohya_recipe(new_rank=None, new_conv_rank=None, dynamic_method="sv_fro", dynamic_param=None)
    with pytest.raises(UsageError, match="expected sv_fro"):
        kohya_recipe(new_rank=None, new_conv_rank=None, dynamic_method="sv_frob", dynamic_param=0.9)
    for text in ("rank=16,conv_rank=8", "sv_ratio=4.0,max_rank=32,conv_rank=8"):
        parse_recipe(text)
