"""Caption -> text conditioning, as sd-scripts computes it (spec 2.4).

Long captions (`--max_token_length 150|225`) are split into chunks of 75 tokens, each wrapped
as BOS + 75 + EOS/PAD, encoded separately and merged back to n·75+2 states. SD1 takes the last
layer or `hidden_states[-clip_skip]` + final LayerNorm; SDXL takes the penultimate layer of both
encoders (no LayerNorm) and TE2's projected state at the first EOS as the pooled vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def tokenize(tokenizer, captions: Sequence[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids of shape (B, n_chunks, 77), sd-scripts' chunking and pad/EOS fixes."""
    model_max = tokenizer.model_max_length
    max_length = model_max if not max_token_length else max_token_length + 2
    out = []
    for caption in captions:
        ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt").input_ids[0]
        if max_length <= model_max:
            out.append(ids.unsqueeze(0))
            continue
        chunks = []
        same_pad = tokenizer.pad_token_id == tokenizer.eos_token_id
        for i in range(1, max_length - model_max + 2, model_max - 2):
            chunk = torch.cat((ids[0:1], ids[i:i + model_max - 2], ids[-1:]))
            if not same_pad:
                if chunk[-2] != tokenizer.eos_token_id and chunk[-2] != tokenizer.pad_token_id:
                    chunk[-1] = tokenizer.eos_token_id
                if chunk[1] == tokenizer.pad_token_id:
                    chunk[1] = tokenizer.eos_token_id
            chunks.append(chunk)
        out.append(torch.stack(chunks))
    return torch.stack(out)


def _merge_chunks(states: torch.Tensor, batch: int, model_max: int) -> torch.Tensor:
    """(B·n, 77, D) -> (B, n·75+2, D): first BOS, the 75 interior states per chunk, last EOS."""
    states = states.reshape(batch, -1, states.shape[-1])
    total = states.shape[1]
    if total == model_max:
        return states
    parts = [states[:, 0:1]]
    for i in range(1, total, model_max):
        parts.append(states[:, i:i + model_max - 2])
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


@dataclass
class TextConditioning:
    """UNet conditioning for one batch: `hidden` (B, L, D) and, for SDXL, `pooled` (B, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def _final_layer_norm(text_encoder) -> torch.nn.Module:
    # transformers 5 CLIPTextModel has no `text_model` level; CLIPTextModelWithProjection still does.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def encode_sd(text_encoder, tokenizer, ids: torch.Tensor, clip_skip: int | None) -> TextConditioning:
    """SD1/SD2 conditioning from ids (B, n, 77)."""
    batch, model_max = ids.shape[0], tokenizer.model_max_length
    flat = ids.reshape(-1, model_max).to(text_encoder.device)
    if not clip_skip:
        states = text_encoder(flat)[0]
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        states = _final_layer_norm(text_encoder)(out.hidden_states[-clip_skip])
    return TextConditioning(_merge_chunks(states, batch, model_max))


def encode_sdxl(text_encoders: Sequence, tokenizers: Sequence, ids: Sequence[torch.Tensor]) -> TextConditioning:
    """SDXL conditioning: concat(TE1 h[-2], TE2 h[-2]) and TE2's projected first-EOS state."""
    te1, te2 = text_encoders
    tok1, tok2 = tokenizers
    batch, n_chunks = ids[0].shape[0], ids[0].shape[1]
    flat1 = ids[0].reshape(-1, tok1.model_max_length).to(te1.device)
    flat2 = ids[1].reshape(-1, tok2.model_max_length).to(te2.device)
    h1 = te1(flat1, output_hidden_states=True, return_dict=True).hidden_states[-2]
    out2 = te2(flat2, output_hidden_states=True, return_dict=True)
    h2 = out2.hidden_states[-2]
    last = out2.last_hidden_state
    eos_index = torch.argmax((flat2 == tok2.eos_token_id).int(), dim=1).to(last.device)
    pooled = last[torch.arange(last.shape[0], device=last.device), eos_index]
    pooled = te2.text_projection(pooled.to(te2.text_projection.weight.dtype))
    h1 = _merge_chunks(h1, batch, tok1.model_max_length)
    h2 = _merge_chunks(h2, batch, tok2.model_max_length)
    return TextConditioning(torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled[::n_chunks])


class TextEncoderHelper:
    """Tokenize + encode for one architecture, with the run's clip_skip and max_token_length."""

    def __init__(self, arch: str, tokenizers: Sequence, text_encoders: Sequence, *, clip_skip: int | None,
                 max_token_length: int | None) -> None:
        self.arch = arch
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length

    def encode(self, captions: Sequence[str]) -> TextConditioning:
        ids = [tokenize(tok, captions, self.max_token_length) for tok in self.tokenizers]
        if self.arch == "sdxl":
            return encode_sdxl(self.text_encoders, self.tokenizers, ids)
        return encode_sd(self.text_encoders[0], self.tokenizers[0], ids[0], self.clip_skip)
