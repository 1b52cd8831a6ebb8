"""Malformed factors and NaN/Inf, found once when a file is parsed and reported by every command.

Shapes are checked by each type's ``describe`` (which ``parse`` calls), so the header-only path
(check keys, metadata show) and the tensor path (check weights, merge, resize, convert) give the
same message naming the module and the shapes. NaN/Inf is refused by ``load_adapter`` naming the
tensor, or its module is left out with a warning under ``--skip-nonfinite`` (resize).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loratools.adapters import describe_header, load_adapter, parse_adapter
from loratools.errors import InvalidFileError, NonFiniteError
from loratools.io import open_safetensors, save_tensors

G = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=G)


def _lora(**over):
    t = {"lora_down.weight": _r(4, 32), "lora_up.weight": _r(16, 4), "alpha": torch.tensor(2.0)}
    return {f"lora_unet_m.{k}": v for k, v in {**t, **over}.items() if v is not None}


def _lycoris(prefix, **parts):
    return {f"lycoris_m.{k}": v for k, v in parts.items()}


# (file tensors, words the message must contain): one row per way a factor can be malformed
MALFORMED = [
    (_lora(**{"lora_up.weight": _r(16, 8)}), ["lora_up.weight (16, 8)", "lora_down.weight (4, 32)", "rank (8 vs 4)"]),
    (_lora(**{"lora_up.weight": _r(3, 3)}), ["lora_up.weight (3, 3)", "rank (3 vs 4)"]),
    (_lora(**{"lora_up.weight": _r(4, 16)}), ["lora_up.weight (4, 16)", "rank (16 vs 4)"]),  # dims swapped
    (_lora(**{"lora_up.weight": _r(16, 4, 3, 3)}), ["lora_up.weight has shape (16, 4, 3, 3)", "1x1"]),
    (_lora(**{"lora_down.weight": _r(32)}), ["lora_down.weight has shape (32,)", "2-D or 4-D"]),
    (_lora(**{"lora_down.weight": torch.zeros(0, 32), "lora_up.weight": torch.zeros(16, 0)}), ["empty factor"]),
    (_lora(alpha=torch.zeros(0)), ["alpha has shape (0,)", "one number"]),
    (_lora(alpha=torch.ones(2, 2)), ["alpha has shape (2, 2)"]),
    (_lora(**{"lora_mid.weight": _r(3, 4, 3, 3), "lora_down.weight": _r(4, 32, 1, 1),
              "lora_up.weight": _r(16, 4, 1, 1)}), ["lora_up.weight (16, 4, 1, 1) and lora_mid.weight (3, 4, 3, 3)"]),
    (_lora(dora_scale=_r(7, 1)), ["dora_scale has shape (7, 1)", "16 output rows"]),
    (_lycoris("", hada_w1_a=_r(16, 4), hada_w1_b=_r(4, 32), hada_w2_a=_r(16, 4), hada_w2_b=_r(5, 32)),
     ["hada_w2_a (16, 4) and hada_w2_b (5, 32)"]),
    (_lycoris("", hada_w1_a=_r(16, 4), hada_w1_b=_r(4, 32), hada_w2_a=_r(8, 4), hada_w2_b=_r(4, 32)),
     ["different shapes", "(16, 32)", "(8, 32)"]),
    (_lycoris("", lokr_w1=_r(4, 4), lokr_w2_a=_r(4, 2), lokr_w2_b=_r(3, 8)), ["lokr_w2_a (4, 2) and lokr_w2_b (3, 8)"]),
    (_lycoris("", lokr_w1=_r(4), lokr_w2=_r(4, 8)), ["lokr_w1 has shape (4,)"]),
    (_lycoris("", diff=_r(16, 32), diff_b=_r(5)), ["diff_b has shape (5,)", "16 rows"]),
    (_lycoris("", weight=_r(4, 4), on_input=torch.tensor(0)), ["IA3 vector"]),
]


@pytest.mark.parametrize("tensors, words", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_factors_are_named_on_both_paths(tensors, words):
    with pytest.raises(InvalidFileError) as parsed:
        parse_adapter(tensors, path="x.safetensors")
    with pytest.raises(InvalidFileError) as described:
        describe_header({k: tuple(v.shape) for k, v in tensors.items()}, path="x.safetensors")
    message = str(parsed.value)
    assert message == str(described.value)  # one check, one message, whichever path reads the file
    module = next(iter(tensors)).rsplit(".", 1)[0].split(".")[0]
    assert message.startswith(f"x.safetensors: module {module}: ") and "\n" not in message
    for w in words:
        assert w in message


def test_valid_variants_still_parse():
    """What the checks must not refuse: conv LoRA, Tucker, DoRA on either axis, PEFT conv DoRA,
    LoHa/LoKr (Tucker and full factors), full with bias, norm, IA3."""
    ok = {
        **_lora(),
        **{f"lora_unet_c.{k}": v for k, v in {"lora_down.weight": _r(4, 8, 3, 3), "lora_up.weight": _r(16, 4, 1, 1),
                                             "dora_scale": _r(1, 8, 1, 1)}.items()},
        **{f"lora_unet_t.{k}": v for k, v in {"lora_down.weight": _r(4, 8, 1, 1), "lora_mid.weight": _r(4, 4, 3, 3),
                                             "lora_up.weight": _r(16, 4, 1, 1), "dora_scale": _r(16, 1, 1, 1)}.items()},
        "lycoris_h.hada_w1_a": _r(4, 16), "lycoris_h.hada_w1_b": _r(4, 8), "lycoris_h.hada_t1": _r(4, 4, 3, 3),
        "lycoris_h.hada_w2_a": _r(4, 16), "lycoris_h.hada_w2_b": _r(4, 8), "lycoris_h.hada_t2": _r(4, 4, 3, 3),
        "lycoris_k.lokr_w1": _r(2, 2), "lycoris_k.lokr_w2": _r(8, 4, 3, 3),
        "lycoris_s.lokr_w1_a": _r(2, 1), "lycoris_s.lokr_w1_b": _r(1, 2), "lycoris_s.lokr_w2_a": _r(2, 8),
        "lycoris_s.lokr_t2": _r(2, 2, 3, 3), "lycoris_s.lokr_w2_b": _r(2, 4),
        "lycoris_f.diff": _r(16, 8), "lycoris_f.diff_b": _r(16), "lycoris_n.w_norm": _r(8), "lycoris_n.b_norm": _r(8),
        "lycoris_i.weight": _r(1, 8, 1, 1), "lycoris_i.on_input": torch.tensor(1),
    }
    parsed = parse_adapter(ok)
    assert len(parsed.modules) == 9 and not parsed.unknown
    assert set(describe_header({k: tuple(v.shape) for k, v in ok.items()}).modules) == set(parsed.modules)
    for m in parsed.modules.values():
        if not m.needs_base:
            assert m.delta().shape == m.weight_shape
    peft_conv_dora = {"unet.c.lora_A.weight": _r(4, 8, 3, 3), "unet.c.lora_B.weight": _r(16, 4, 1, 1),
                      "unet.c.lora_magnitude_vector": _r(1, 16, 1, 1)}  # PEFT's conv layout (out on axis 1)
    assert describe_header({k: tuple(v.shape) for k, v in peft_conv_dora.items()}).modules
    assert parse_adapter(peft_conv_dora).modules


def test_nonfinite_policies(tmp_path):
    t = _lora()
    t["lora_unet_n.lora_down.weight"] = _r(4, 32)
    t["lora_unet_n.lora_up.weight"] = _r(16, 4)
    t["lora_unet_n.lora_up.weight"][3, 1] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_tensors(path, t)
    with pytest.raises(NonFiniteError) as refused:
        load_adapter(path)
    assert str(refused.value).startswith(f"{path}: tensor lora_unet_n.lora_up.weight holds NaN or Inf")
    skipped = load_adapter(path, nonfinite="skip")
    assert set(skipped.modules) == {"lora_unet_m"} and "lora_unet_n.lora_up.weight" not in skipped.unknown
    assert any("skipped 1 module" in w and "lora_unet_n.lora_up.weight" in w for w in skipped.warnings)
    kept = load_adapter(path, nonfinite="keep")  # check weights reports it itself
    assert set(kept.modules) == {"lora_unet_m", "lora_unet_n"}
    assert open_safetensors(path)["lora_unet_n.lora_up.weight"].isinf().any()  # the input is untouched


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _one_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def broken(tiny_sd1, tmp_path_factory):
    """A tiny SD1 LoRA with one module's lora_up of the wrong rank, and one with a NaN."""
    from loratools.tiny import make_lora

    d = tmp_path_factory.mktemp("broken")
    good = make_lora(tiny_sd1, "sd1", "lora", path=d / "good.safetensors")
    key = sorted(k for k in good.tensors if k.endswith("lora_up.weight"))[0]
    rank = dict(good.tensors)
    rank[key] = torch.randn(rank[key].shape[0], 8).half()
    save_tensors(d / "rank.safetensors", rank, good.metadata)
    nan = dict(good.tensors)
    nan[key] = nan[key].clone()
    nan[key][0, 0] = float("nan")
    save_tensors(d / "nan.safetensors", nan, good.metadata)
    return {"dir": d, "key": key, "module": key.split(".")[0]}


def test_every_command_names_the_module_and_shapes(broken, tiny_sd1_ckpt, tmp_path):
    """check keys and convert said "applies" / wrote the file before; check weights, merge and resize
    gave tracebacks. The CLI runs the header path (check keys) and a tensor path (convert); the
    other commands' operations are called in-process (same ``load_adapter``)."""
    from loratools.ops.check_weights import check_file
    from loratools.ops.merge.checkpoint import MergeOptions, merge_checkpoint
    from loratools.ops.merge.ratios import WeightedPath
    from loratools.ops.resize import Resizer, parse_recipes

    d, module = broken["dir"], broken["module"]
    src = d / "rank.safetensors"
    expected = f"{src}: module {module}: lora_up.weight "
    for args in (("check", "keys", src, "--base", tiny_sd1_ckpt),
                 ("convert", src, "--to", "peft", "--base", tiny_sd1_ckpt, "-o", tmp_path / "peft.safetensors")):
        assert _one_line(_cli(*args, cwd=d)).startswith(f"error: {expected}")
    calls = [lambda: check_file(src),
             lambda: merge_checkpoint(MergeOptions(base=tiny_sd1_ckpt, adapters=[WeightedPath(src, 1.0)],
                                                   output=tmp_path / "merged.safetensors")),
             lambda: Resizer(None, cache_dir=None).resize(src, parse_recipes("rank=2"),
                                                          output=tmp_path)]
    for call in calls:
        with pytest.raises(InvalidFileError) as exc:
            call()
        assert str(exc.value).startswith(expected) and "disagree on the rank (8 vs 4)" in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_resize_refuses_nan_naming_the_tensor_or_skips_it(broken):
    from loratools.ops.resize import Resizer

    d, key = broken["dir"], broken["key"]
    src = d / "nan.safetensors"
    with pytest.raises(NonFiniteError) as refused:  # was: torch._C._LinAlgError from the SVD
        Resizer(None, cache_dir=None).resize(src, "rank=2", output=d)
    assert str(refused.value).startswith(f"{src}: tensor {key} holds NaN or Inf")
    assert "--skip-nonfinite" in str(refused.value)
    out = d / "nan_rank2.safetensors"
    assert not out.exists()
    proc = _cli("resize", "--new_rank", "2", "--skip-nonfinite", "-o", d, src, cwd=d)
    assert proc.returncode == 0 and "skipped 1 module(s)" in proc.stderr and key in proc.stderr, proc.stderr
    written = open_safetensors(out)
    assert not any(k.startswith(broken["module"] + ".") for k in written)
    assert all(bool(torch.isfinite(written[k]).all()) for k in written)
    out.unlink()
