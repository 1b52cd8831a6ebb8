"""Sample prompt files, prompt-line options, sampler names and sample file names (spec 1.9)."""

from __future__ import annotations

import datetime
import json

import pytest

from loratools.errors import UsageError
from trainer.sampling import SAMPLERS, load_prompts, make_scheduler, parse_prompt_line, sample_file_name


def test_prompt_line_options():
    p = parse_prompt_line("cat, red --n blurry, lowres --w 100 --h 70 --d 42 --l 5.5 --s 2 --ss k_euler_a")
    assert (p.prompt, p.negative_prompt) == ("cat, red", "blurry, lowres")
    assert (p.width, p.height) == (96, 64)  # floored to multiples of 8
    assert (p.seed, p.scale, p.sample_steps, p.sample_sampler) == (42, 5.5, 2, "k_euler_a")
    q = parse_prompt_line("dog --W 16 --S 5000")
    assert (q.width, q.height, q.sample_steps, q.seed, q.scale) == (64, 512, 1000, None, 7.5)


def test_txt_toml_and_json_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\n\ncat --d 1\ndog\n")
    assert [p.prompt for p in load_prompts(txt)] == ["cat", "dog"]
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nsample_steps = 3\n[[prompt.subset]]\nprompt = "cat"\n'
                    '[[prompt.subset]]\nprompt = "dog"\nwidth = 128\n')
    got = load_prompts(toml)
    assert [(p.prompt, p.width, p.sample_steps) for p in got] == [("cat", 64, 3), ("dog", 128, 3)]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["cat --s 4", {"prompt": "dog", "negative_prompt": "x", "seed": 9}]))
    got = load_prompts(js)
    assert (got[0].sample_steps, got[1].negative_prompt, got[1].seed) == (4, "x", 9)
    with pytest.raises(UsageError):
        load_prompts(tmp_path / "missing.txt")


def test_sample_file_names_as_sd_scripts():
    now = datetime.datetime(2024, 6, 15, 12, 30, 45)
    assert sample_file_name("lora", None, 100, 0, 42, now) == "lora_000100_00_20240615123045_42.png"
    assert sample_file_name("lora", 3, 100, 12, None, now) == "lora_e000003_12_20240615123045.png"
    assert sample_file_name(None, None, 5, 0, None, now) == "000005_00_20240615123045.png"  # no --output_name


@pytest.mark.parametrize("name", ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                                  "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"])
def test_every_sampler_name_maps_to_a_diffusers_scheduler(name):
    if name.endswith("lms"):
        pytest.importorskip("scipy")  # diffusers' LMSDiscreteScheduler needs it
    sched = make_scheduler(name, v_parameterization=name == "euler")
    key = name[2:] if name.startswith("k_") else name
    assert type(sched).__name__ == SAMPLERS[key][0]
    assert sched.config.prediction_type == ("v_prediction" if name == "euler" else "epsilon")
    if key.startswith("dpmsolver"):
        assert sched.config.algorithm_type == key


def test_lms_without_scipy_is_a_usage_error():
    try:
        import scipy  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="scipy"):
            make_scheduler("k_lms", False)
    else:
        assert type(make_scheduler("k_lms", False)).__name__ == "LMSDiscreteScheduler"


def test_unknown_sampler_is_refused():
    with pytest.raises(UsageError, match="euler_a"):
        make_scheduler("k_nope", False)


def test_sampler_image_matches_the_diffusers_pipeline(tmp_path):
    """A sample with an untrained (identity) network equals diffusers' own render of the prompt."""
    from pathlib import Path

    import numpy as np
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from loratools.tiny import build_pipeline
    from trainer.config import resolve_config
    from trainer.models import BaseModel
    from trainer.network.network import LoRANetwork, NetworkOptions
    from trainer.sampling import Sampler

    pipe = build_pipeline("sd1")
    model = BaseModel("sd1", pipe.unet, pipe.vae, [pipe.text_encoder], [pipe.tokenizer], False, Path("."))
    net = LoRANetwork("sd1", pipe.unet, [pipe.text_encoder], NetworkOptions.from_args("sd1", 2, 1, None, {}))
    net.apply_to()
    cfg = resolve_config(["--sample_sampler", "euler", "--output_name", "s"])
    prompt = parse_prompt_line("tinychar, red circle --w 64 --h 64 --d 5 --s 3 --l 7")
    state = torch.get_rng_state()
    files = Sampler(cfg, model, net, Accelerator(cpu=True), tmp_path, "s", torch.float32, [prompt]).run(epoch=None, step=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert files[0].parent == tmp_path / "sample" and files[0].name.startswith("s_000001_00_")
    ours = np.asarray(Image.open(files[0]), dtype=np.int16)
    pipe.scheduler = make_scheduler("euler", False)
    ref = pipe("tinychar, red circle", num_inference_steps=3, guidance_scale=7.0, width=64, height=64,
               generator=torch.Generator().manual_seed(5)).images[0]
    assert np.abs(ours - np.asarray(ref, dtype=np.int16)).max() <= 1
