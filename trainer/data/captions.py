"""Captions as sd-scripts reads and rewrites them for every use of an image.

Reading: the caption file is ``<image stem><caption_extension>``; only its first line is used
(every non-empty line with wildcards); an empty file is an error; a missing file falls back to
the concept folder's class tokens. Processing (``process_caption``) follows sd-scripts' order:
prefix/suffix, whole-caption dropout, wildcards or first line, then fixed/flex tags (keep_tokens
or keep_tokens_separator), token warmup, shuffle, tag dropout, the ``", "`` join, and the
secondary separator. Randomness comes from a ``random.Random`` the caller seeds, so a run is
reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from loratools.errors import InvalidFileError


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset (sd-scripts' subset keys of the same names)."""

    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


def read_caption(image_path: Path, caption_extension: str, enable_wildcard: bool = False) -> str | None:
    """The caption of ``image_path`` or None when there is no caption file.

    sd-scripts also tries the stem minus its last four ``_``-separated tokens (face-crop tools name
    crops ``<stem>_x_y_w_h``); that lookup is kept, applied to the file stem.
    """
    stem = image_path.stem
    candidates = [image_path.with_name(stem + caption_extension)]
    tokens = stem.split("_")
    if len(tokens) >= 5:
        candidates.append(image_path.with_name("_".join(tokens[:-4]) + caption_extension))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InvalidFileError(f"caption is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8",
                                   path=path) from None
        if not lines:
            raise InvalidFileError("caption file is empty; write the caption on its first line or delete the file "
                                   "to use the folder's class token", path=path)
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip())
        return lines[0].strip()
    return None


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """sd-scripts' ``ss_tag_frequency`` counts for one folder: split on ``,``, strip, lowercase, skip empty."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def token_warmup_steps(opts: CaptionOptions, max_train_steps: int) -> int:
    """A ``token_warmup_step`` below 1 is a fraction of the run (sd-scripts floors it)."""
    if opts.token_warmup_step < 1:
        return math.floor(opts.token_warmup_step * max_train_steps)
    return int(opts.token_warmup_step)


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, epoch: int = 1,
                    step: int = 0, max_train_steps: int = 0) -> str:
    """One use of a caption: the text the text encoder will see.

    Args:
        caption: the raw caption (first line, all lines with wildcards, or the class token).
        opts: the subset's caption settings.
        rng: the random source for dropout, shuffle and wildcards.
        epoch: the current epoch, 1-based as in sd-scripts (``caption_dropout_every_n_epochs``).
        step: the current optimizer step (token warmup).
        max_train_steps: for a fractional ``token_warmup_step``.

    Example:
        >>> process_caption("cat,red,  blue", CaptionOptions(keep_tokens=1, caption_tag_dropout_rate=0.0,
        ...                 shuffle_caption=True), random.Random(0)).startswith("cat, ")
        True
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    dropped = dropped or (opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if opts.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = token_warmup_steps(opts, max_train_steps)
    if opts.shuffle_caption or warmup > 0 or opts.caption_tag_dropout_rate > 0:
        caption = _rearrange_tags(caption, opts, rng, warmup=warmup, step=step)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def _rearrange_tags(caption: str, opts: CaptionOptions, rng: random.Random, *, warmup: int, step: int) -> str:
    sep = opts.caption_separator
    fixed: list[str] = []
    suffix: list[str] = []
    if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
        fixed_part, flex_part = caption.split(opts.keep_tokens_separator, 1)
        if opts.keep_tokens_separator in flex_part:
            flex_part, suffix_part = flex_part.split(opts.keep_tokens_separator, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
    else:
        # sd-scripts keeps empty pieces here (a trailing separator yields an empty tag).
        tokens = [t.strip() for t in caption.strip().split(sep)]
        flex = tokens[:]
        if opts.keep_tokens > 0:
            fixed = flex[: opts.keep_tokens]
            flex = tokens[opts.keep_tokens:]

    if warmup and step < warmup:
        count = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
        flex = flex[:count]
    if opts.shuffle_caption:
        rng.shuffle(flex)
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """``{a|b|c}`` becomes one random choice; ``{{``/``}}`` are literal braces; one random line of several."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")
