"""Sample images during training (`--sample_prompts`, spec 1.9), with sd-scripts' prompt syntax,
sampler names and file names; the training RNG is saved and restored around sampling."""

from __future__ import annotations

import datetime
import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loratools.errors import UsageError

#: sd-scripts sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def sampler_key(name: str) -> str:
    """Normalise a sampler name: `k_` aliases map to the same scheduler."""
    key = name.lower()
    key = key[2:] if key.startswith("k_") else key
    if key not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)} (k_ aliases accepted)")
    return key


def make_scheduler(name: str, v_parameterization: bool):
    """The diffusers scheduler for a sampler name, on SD's training schedule."""
    import diffusers

    cls_name, extra = SAMPLERS[sampler_key(name)]
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "prediction_type": "v_prediction" if v_parameterization else "epsilon",
              "steps_offset": 1, **extra}
    try:
        sched = getattr(diffusers, cls_name).from_config(config)  # tolerates keys a scheduler does not take
    except ImportError as exc:  # LMS needs scipy
        raise UsageError(f"sampler {name} is unavailable: {str(exc).strip().splitlines()[0]} "
                         "(pip install scipy), or pick another --sample_sampler") from None
    if getattr(sched.config, "clip_sample", None) is False:
        sched.register_to_config(clip_sample=True)
    return sched


@dataclass
class Prompt:
    """One sample prompt with sd-scripts' defaults."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    sample_steps: int = 30
    sample_sampler: str | None = None

    def normalised(self) -> Prompt:
        self.width = max(64, self.width - self.width % 8)
        self.height = max(64, self.height - self.height % 8)
        self.sample_steps = max(1, min(1000, self.sample_steps))
        return self


_OPTIONS = [
    (re.compile(r"^w (\d+)", re.I), "width", int),
    (re.compile(r"^h (\d+)", re.I), "height", int),
    (re.compile(r"^d (\d+)", re.I), "seed", int),
    (re.compile(r"^s (\d+)", re.I), "sample_steps", int),
    (re.compile(r"^l ([\d\.]+)", re.I), "scale", float),
    (re.compile(r"^n (.+)", re.I), "negative_prompt", str),
    (re.compile(r"^ss (.+)", re.I), "sample_sampler", str),
]


def parse_prompt_line(line: str) -> Prompt:
    """`a cat --n blurry --w 64 --h 64 --d 42 --l 5.5 --s 2 --ss euler` -> Prompt."""
    parts = line.split(" --")
    p = Prompt(parts[0].strip())
    for part in parts[1:]:
        for regex, attr, conv in _OPTIONS:
            m = regex.match(part.strip())
            if m:
                setattr(p, attr, conv(m.group(1).strip()) if conv is not str else m.group(1).strip())
                break
    return p.normalised()


def _from_dict(d: dict[str, Any]) -> Prompt:
    p = Prompt(str(d.get("prompt", "")))
    for key in ("negative_prompt", "width", "height", "seed", "scale", "sample_steps", "sample_sampler"):
        if key in d:
            setattr(p, key, d[key])
    return p.normalised()


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt (one per line, # comments), .toml ([prompt] + [[prompt.subset]]) or .json file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--sample_prompts {path} does not exist")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        base = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"}
        return [_from_dict({**base, **sub}) for sub in data.get("prompt", {}).get("subset", [])]
    if path.suffix == ".json":
        items = json.loads(path.read_text(encoding="utf-8"))
        return [parse_prompt_line(i) if isinstance(i, str) else _from_dict(i) for i in items]
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [parse_prompt_line(ln) for ln in lines if ln and not ln.startswith("#")]


def sample_file_name(output_name: str | None, epoch: int | None, step: int, index: int, seed: int | None,
                     now: datetime.datetime | None = None) -> str:
    """`[{name}_]{e000001|000010}_{00}_{YYYYmmddHHMMSS}[_{seed}].png` as sd-scripts writes (no name
    prefix without --output_name)."""
    suffix = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d%H%M%S")
    prefix = "" if output_name is None else f"{output_name}_"
    return f"{prefix}{suffix}_{index:02d}_{stamp}" + (f"_{seed}" if seed is not None else "") + ".png"


class Sampler:
    """Renders the prompt list with the network applied, on each process's share of the prompts."""

    def __init__(self, cfg: Any, model: Any, network: Any, accelerator: Any, out_dir: Path, name: str | None,
                 weight_dtype: torch.dtype, prompts: list[Prompt]) -> None:
        self.cfg, self.model, self.network, self.accelerator = cfg, model, network, accelerator
        self.folder = out_dir / "sample"
        self.name = name
        self.weight_dtype = weight_dtype
        self.prompts = prompts

    @classmethod
    def maybe(cls, cfg: Any, model: Any, network: Any, accelerator: Any, out_dir: Path, name: str | None,
              weight_dtype: torch.dtype, seed: int) -> Sampler | None:
        if not cfg.sample_prompts:
            return None
        if not (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first):
            return None
        return cls(cfg, model, network, accelerator, out_dir, name, weight_dtype, load_prompts(cfg.sample_prompts))

    def _pipeline(self, scheduler):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        m = self.model
        with warnings.catch_warnings():
            # diffusers asks for clip_sample=False in a hub config; sd-scripts samples with True on purpose
            warnings.filterwarnings("ignore", message=r"(?s).*clip_sample", category=FutureWarning)
            if m.arch == "sdxl":
                pipe = StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoders[0],
                                                 text_encoder_2=m.text_encoders[1], tokenizer=m.tokenizers[0],
                                                 tokenizer_2=m.tokenizers[1], unet=m.unet, scheduler=scheduler)
            else:
                pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0],
                                               unet=m.unet, scheduler=scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, *, epoch: int | None, step: int) -> list[Path]:
        """Render this process's prompts; returns the written files. RNG states are restored."""
        from trainer.text_encoding import TextEncoderHelper

        acc = self.accelerator
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        py_state = random.getstate()
        was_training = self.network.training
        vae_device = next(self.model.vae.parameters()).device
        te_devices = [next(te.parameters()).device for te in self.model.text_encoders]
        self.network.eval()
        self.network.set_multiplier(1.0)  # samples show the network at full strength
        written: list[Path] = []
        try:
            self.model.vae.to(acc.device)
            for te in self.model.text_encoders:  # off the device when their outputs are cached
                te.to(acc.device)
            text = TextEncoderHelper(self.model.arch, self.model.tokenizers, self.model.text_encoders,
                                     clip_skip=None if self.model.arch == "sdxl" else self.cfg.clip_skip,
                                     max_token_length=self.cfg.max_token_length)
            now = datetime.datetime.now()
            self.folder.mkdir(parents=True, exist_ok=True)
            for index in range(acc.process_index, len(self.prompts), acc.num_processes):
                p = self.prompts[index]
                sched = make_scheduler(p.sample_sampler or self.cfg.sample_sampler, self.model.v_parameterization)
                pipe = self._pipeline(sched)
                seed = p.seed if p.seed is not None else random.SystemRandom().randint(0, 2**31)
                gen = torch.Generator(device="cpu").manual_seed(seed)
                with torch.no_grad():
                    with acc.autocast():
                        pos = text.encode([p.prompt])
                        neg = text.encode([p.negative_prompt])
                        kwargs: dict[str, Any] = {"prompt_embeds": pos.hidden, "negative_prompt_embeds": neg.hidden}
                        if self.model.arch == "sdxl":
                            kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
                        latents = pipe(num_inference_steps=p.sample_steps, guidance_scale=p.scale, width=p.width,
                                       height=p.height, generator=gen, output_type="latent", **kwargs).images
                    # decoded outside autocast, in the VAE's own dtype (fp32 with --no_half_vae: no NaNs)
                    vae = self.model.vae
                    decoded = vae.decode(latents.to(vae.dtype) / self.model.latent_scaling).sample
                    image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
                path = self.folder / sample_file_name(self.name, epoch, step, index, p.seed, now)
                image.save(path)
                written.append(path)
        finally:
            self.model.vae.to(vae_device)
            for te, device in zip(self.model.text_encoders, te_devices):
                te.to(device)
            self.network.train(was_training)
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
            random.setstate(py_state)
        return written
