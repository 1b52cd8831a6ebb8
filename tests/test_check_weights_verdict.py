"""check weights tells expected findings from problems, measures what an underflow costs, and says what
to do (issue 15, item 4). Was: the demo's own LoCon got FAILED for 6 dead layers the tool explained as
expected plus 3 underflowing layers whose fp16 storage changed their deltas by 0.03 %."""

from __future__ import annotations

import math

import pytest
import torch

from loratools.adapters import parse_adapter
from loratools.ops.check_weights import CheckOptions, check_adapter, fp16_loss
from test_check_weights_op import SD1_LAST, _kill, fixture_lora

UP = "lora_unet_up_blocks_1_attentions_0_proj_out"


def test_fp16_loss_hand_computed():
    # fp16 file: 2^-20 is a subnormal, rounded at most half a step (2^-25); 1.0 is normal (not counted)
    x = torch.tensor([2.0 ** -20, 1.0], dtype=torch.float16)
    assert fp16_loss({"lora_up.weight": x.float()}, {"lora_up.weight": torch.float16}) == pytest.approx(
        2.0 ** -25 / math.sqrt(1.0 + 2.0 ** -40), rel=1e-12)
    # fp32 file: the exact change a cast makes; 1e-7 becomes two subnormal steps, 2^-23
    y = torch.full((3, 4), 1e-7)
    got = fp16_loss({"lora_up.weight": y, "lora_down.weight": torch.ones(2, 3), "alpha": torch.tensor(1e-7)},
                    {"lora_up.weight": torch.float32, "lora_down.weight": torch.float32, "alpha": torch.float32})
    assert got == pytest.approx(abs(2.0 ** -23 - float(torch.tensor(1e-7))) / float(torch.tensor(1e-7)), rel=1e-6)
    # independently: cast the whole tensor (its values are all below fp16's normal range)
    assert got == pytest.approx(float((y.half().float() - y).norm() / y.norm()), rel=1e-5)


def _lora(up_value: float | None, dtype=torch.float16):
    t, meta = fixture_lora("lora_kohya_sd15_lora.json", dtype=dtype)
    for m in SD1_LAST:
        _kill(t, m, "dead")
    if up_value is not None:
        up = t[f"{UP}.lora_up.weight"]
        t[f"{UP}.lora_up.weight"] = (torch.randn(up.shape, generator=torch.Generator().manual_seed(3))
                                     * up_value).to(dtype)
    return parse_adapter(t, meta)


def test_harmless_underflow_is_expected_and_the_verdict_is_ok():
    r = check_adapter(_lora(3e-5))  # most |values| below 6.1e-5, stored in fp16: ~0.1 % of the delta
    m = next(m for m in r.modules if m.name == UP)
    assert m.status == "underflow" and 0 < m.fp16_loss < 0.01 and m.expected.startswith("harmless")
    assert not r.failed and r.problems == []
    assert r.expected == ["6 dead, all expected (text-encoder layer 11 is unused at clip skip 2)",
                          f"1 underflowing, harmless: below fp16's normal range (6.1e-5), but fp16 storage changes "
                          f"their deltas by at most {100 * m.fp16_loss:.2g} %"]
    assert r.verdict == "OK: nothing to fix; 7 finding(s) are expected (see above)"
    assert r.to_json()["verdict"] == r.verdict and r.to_json()["modules"][0]["fp16_loss"] is None


def test_costly_underflow_is_a_problem_with_what_to_do():
    r = check_adapter(_lora(1e-6))  # a few subnormal steps per value: several percent of the delta lost
    m = next(m for m in r.modules if m.name == UP)
    assert m.status == "underflow" and m.fp16_loss > 0.01 and m.expected is None
    assert r.failed and len(r.problems) == 1
    assert r.problems[0].startswith("1 underflowing:") and "--save_precision bf16" in r.problems[0]
    assert r.verdict.startswith("FAILED: 1 module(s) with problems (1 underflow)")
    assert r.expected[0].startswith("6 dead, all expected") and "6 dead" not in r.verdict
    assert not check_adapter(_lora(1e-6), CheckOptions(fail_on=frozenset({"dead"}))).failed


def test_clean_file_verdict():
    t, meta = fixture_lora("lora_kohya_sd15_lora.json")
    r = check_adapter(parse_adapter(t, meta))
    assert r.verdict == "OK: all 264 modules are fine" and r.expected == r.problems == []
