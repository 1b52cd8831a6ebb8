"""One tiny SD1 run (2 epochs of 1 step, LoRA+, max-norm, fp16 save, no --output_name) read back
through its tensorboard events, its files and its warnings: the scalars sd-scripts logs, the file
names sd-scripts gives without --output_name, and the fp16-underflow count."""

from __future__ import annotations

import re

import pytest

from trainer.config import resolve_config
from trainer.run import train

pytestmark = pytest.mark.slow

LR = 1e-10  # so small that every trained lora_up flushes to zero in fp16
RATIO = 16.0


@pytest.fixture(scope="module")
def run(tiny_sd1_dir, tmp_path_factory):
    from loratools.tiny import make_dataset

    tmp = tmp_path_factory.mktemp("logging_run")
    data = make_dataset(tmp / "train", "sd1", 2, repeats=1).root
    prompts = tmp / "p.txt"
    prompts.write_text("tinychar --w 64 --h 64 --s 1 --d 7\n")
    cfg = resolve_config([
        "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(data),
        "--output_dir", str(tmp / "out"), "--resolution", "64",
        "--caption_extension", ".txt", "--train_batch_size", "2", "--network_dim", "4", "--network_alpha", "4",
        "--learning_rate", str(LR), "--lr_scheduler", "constant", "--max_train_epochs", "2", "--seed", "1",
        "--max_data_loader_n_workers", "0", "--network_args", f"loraplus_lr_ratio={RATIO:g}",
        "--scale_weight_norms", "1", "--save_precision", "fp16", "--save_every_n_steps", "1",
        "--save_every_n_epochs", "1", "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
        "--validation_split", "0.5", "--validate_every_n_steps", "1",
        "--log_with", "tensorboard", "--logging_dir", str(tmp / "logs"), "--log_prefix", "run-", "--log_config"])
    result = train(cfg)
    runs = list((tmp / "logs").glob("run-*"))
    assert len(runs) == 1  # logging_dir/log_prefix + timestamp
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in runs[0].rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars.update({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    result.hparams = [p.read_text() for p in runs[0].rglob("hparams.yml")]
    return result, scalars


def test_file_names_without_output_name_as_sd_scripts(run):
    result, _ = run
    out = result.output_dir
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "at-step00000001.safetensors", "at-step00000002.safetensors", "epoch-000001.safetensors", "last.safetensors"]
    assert result.final_file.name == "last.safetensors"
    from loratools.io.reader import open_safetensors

    meta = open_safetensors(result.final_file).metadata
    assert meta["ss_output_name"] == "None"  # sd-scripts writes str(args.output_name)
    assert meta["modelspec.title"].startswith("LoRA@")
    samples = [p.name for p in (out / "sample").glob("*.png")]
    assert len(samples) == 1 and re.fullmatch(r"000002_00_\d{14}_7\.png", samples[0])


def test_step_scalars_as_sd_scripts_names_them(run):
    result, scalars = run
    assert result.global_step == 2
    assert [s for s, _ in scalars["loss/current"]] == [1, 2]
    assert [v for _, v in scalars["loss/current"]] == pytest.approx(result.losses, rel=1e-6)
    assert [s for s, _ in scalars["loss/average"]] == [1, 2]
    # one learning rate per param group, LoRA+ lora_up groups at lr x ratio
    expected = {"lr/textencoder": LR, "lr/textencoder plus": LR * RATIO, "lr/unet": LR, "lr/unet plus": LR * RATIO}
    assert {t: [v for _, v in scalars[t]] for t in expected} == {
        t: [pytest.approx(v, rel=1e-6)] * 2 for t, v in expected.items()}
    assert not [t for t in scalars if t.startswith("lr/") and t not in expected]
    for tag in ("max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm"):
        assert [s for s, _ in scalars[tag]] == [1, 2]
    assert all(v == 0 for _, v in scalars["max_norm/keys_scaled"])  # norms stay far below 1 at this lr


def test_validation_loss_logged_per_step_and_epoch(run):
    result, scalars = run
    assert [s for s, _ in scalars["loss/validation/step_average"]] == [1, 2]
    assert [s for s, _ in scalars["loss/validation/epoch_average"]] == [1, 2]  # x-axis: the epoch number
    assert [v for _, v in scalars["loss/validation/step_average"]] == pytest.approx(
        [v for s, v in result.validation_losses][::2], rel=1e-6)
    # divergence = validation loss - the training moving average at that point
    for kind in ("step", "epoch"):
        avg = dict(scalars[f"loss/validation/{kind}_average"])
        div = dict(scalars[f"loss/validation/{kind}_divergence"])
        train_avg = dict(scalars["loss/average"]) if kind == "step" else dict(scalars["loss/epoch_average"])
        assert all(div[s] == pytest.approx(avg[s] - train_avg[s], rel=1e-5, abs=1e-7) for s in avg)


def test_epoch_average_logged_per_epoch(run):
    result, scalars = run
    steps = [s for s, _ in scalars["loss/epoch_average"]]
    assert steps == [1, 2]  # x-axis: the epoch number
    # one step per epoch: the epoch average is that step's loss
    assert [v for _, v in scalars["loss/epoch_average"]] == pytest.approx(result.losses, rel=1e-6)


def test_fp16_save_that_flushes_modules_warns_with_the_count_check_weights_reports(run):
    from loratools.ops.check_weights import check_file

    result, _ = run
    report = check_file(result.final_file)
    dead = [m for m in report.modules if m.status == "dead"]
    assert dead  # lora_up moved by ~1e-9: zero once cast to fp16
    messages = [w for w in result.warnings if "underflow" in w and result.final_file.name in w]
    assert messages and messages[-1].startswith(f"{len(dead)} modules of {result.final_file.name} are all-zero in fp16")


def test_log_config_stores_settings_without_paths_or_secrets(run):
    result, _ = run
    assert len(result.hparams) == 1
    text = result.hparams[0]
    assert "\nnetwork_dim: 4\n" in text and "\nloraplus_lr_ratio:" not in text  # None values are dropped
    assert "pretrained_model_name_or_path" not in text and "train_data_dir" not in text
    assert str(result.output_dir) not in text
