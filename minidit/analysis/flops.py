"""What a study costs in compute, counted from the shapes: the README's expected time of a study (estimated).

    python -m minidit.analysis.flops          # every model at the study's settings (--preset paper) or its defaults

Counting. Each backbone is built from its official config on the meta device (no memory, no weights) and run once
on meta inputs of the study's shapes under PyTorch's FlopCounterMode, which counts matrix products and convolutions
at 2 FLOPs per multiply-add, biases free. Norms, softmax, activations, modulations and RoPE are not counted: they are
elementwise, few FLOPs beside the products, and their time is part of what the MFU below absorbs.
Attention runs on minidit's explicit path (`explicit_attention()`): Q K^T and P V, two batched products (aten.bmm)
that the counter counts on any device, 4 B Nh Lq Lk Dh; padded text tokens count as keys (masked, not dropped).
The fused F.scaled_dot_product_attention gives the same count on the meta device, where PyTorch decomposes it into
those products, but 0 on a CPU tensor (its fused kernel has no FLOP formula); tests/test_flops.py checks all three.
The table's attention share is the batched products: in these models the attention's, and Mochi's RoPE angles
(positions x frequencies, 0.1 GFLOP a forward: nothing beside its attention).

Time. A study is `prompts` x `steps` backbone forwards of batch 2 ([uncond; cond]; batch 1 for FLUX.1-dev, whose
guidance is distilled into an input), at an effective throughput of a GPU's dense bf16 peak times an assumed model
FLOP utilisation, MFU = 0.40: an assumption, not a measurement. Large bf16 transformers sustain roughly 40-50% of
the dense peak end to end (Megatron-LM: 52% of an A100 at scale; FlashAttention-2 reaches about 70% of an A100's
peak but about 35% of an H100's), and these backbones run eagerly, their norms, modulations and RoPE unfused: a
round 0.40, the same for both GPUs (conservative on the A100, which is the easier one to fill). Prompts are
independent, so K GPUs take ceil(prompts / K) prompts each. Counted: the backbone, nearly all of sampling; not the
text encoders or the VAE decode (once per prompt each; minidit has no VAE yet for CogVideoX, Open-Sora and Mochi),
nor the recorder, whose cost the project measured only on the CPU (a few percent on large captures;
tests/gpu_bench.py measures it on a GPU): the times are for sampling alone. A forward whose FLOPs take under
OVERHEAD_BOUND_S (DiT-XL/2: 2 x 256 tokens) is bound by eager PyTorch's per-operation overhead, not by its FLOPs: its
times are lower bounds (">=").
Mochi: the study ran genmo's code, which drops the padded text tokens; counted with all 256 (diffusers' way), its
attention, 44% of its forward, is about 3% high (14,566 tokens instead of about 14,340).
"""

import argparse
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from minidit.attention import explicit_attention
from minidit.errors import MiniditError
from minidit.models import cogvideox, dit, flux, latte, mochi, opensora, pixart, sd3
from minidit.pipelines import recipe_class
from minidit.pipelines.flux import PACK, image_ids
from minidit.pipelines.mochi import VAE_TEMPORAL as MOCHI_VAE_TEMPORAL
from minidit.pipelines.opensora import latent_frames as opensora_latent_frames
from minidit.presets import COCO_PROMPTS, PAPER

H100_PEAK = 989e12  # FLOP/s, H100 SXM, dense bf16 (no sparsity)
A100_PEAK = 312e12  # FLOP/s, A100, dense bf16
MFU = 0.40  # assumed model FLOP utilisation (see above): not measured
GPUS = 8  # the multi-GPU column
VAE_SCALE = 8  # pixels per latent cell: every model's VAE
CLIP_TOKENS = 77  # SD3 puts CLIP-L's and CLIP-bigG's 77 tokens before T5's
OVERHEAD_BOUND_S = 0.01  # an order of magnitude, not measured: eager PyTorch spends ~10 us of Python and launch on
# each of a forward's ~1000 operations; a forward whose FLOPs take less than this on an H100 is bound by that instead
DISTILLED_GUIDANCE = {"flux-dev"}  # guidance is an input of the model: one branch, batch 1


@dataclass(frozen=True)
class Study:
    """One model's study: what each backbone forward sees, and how many there are."""

    model: str
    height: int
    width: int
    frames: int | None  # None: an image model
    steps: int
    text_tokens: int  # T5 tokens (the preset's max_sequence_length)
    batch: int  # guidance branches in a forward
    prompts: int

    def settings(self) -> str:
        frames = "" if self.frames is None else f"{self.frames} x "
        return f"{frames}{self.height} x {self.width}, {self.steps} steps, batch {self.batch}"


def studies() -> list[Study]:
    """The study's settings (presets.PAPER) per model; DiT-XL/2 and CogVideoX-2b, which it did not run, at DiT's
    pipeline defaults and at CogVideoX-5b's settings."""
    def from_preset(name: str) -> Study:
        s = PAPER[name]
        return Study(name, s.height, s.width, s.frames, s.steps, s.max_sequence_length,
                     1 if name in DISTILLED_GUIDANCE else 2, s.num_prompts)

    dit_steps = recipe_class("dit").default_steps  # guidance 4 (DiTPipeline's default): batch 2
    cog5b = from_preset("cogvideox-5b")
    return [Study("dit-xl-256", 256, 256, None, dit_steps, 0, 2, COCO_PROMPTS),
            *map(from_preset, ["pixart-1024", "sd3", "flux-dev", "latte", "cogvideox-5b"]),
            replace(cog5b, model="cogvideox-2b"), from_preset("opensora"), from_preset("mochi")]


# ---- each backbone and its inputs, built on the meta device (call inside `torch.device("meta")`) -----------------

def empty(*shape: int) -> torch.Tensor:
    return torch.empty(shape)


def backbone(s: Study) -> tuple[nn.Module, tuple]:
    """The backbone of `s.model` and the positional arguments of one forward, shaped as its recipe calls it."""
    B, h, w, Lt = s.batch, s.height // VAE_SCALE, s.width // VAE_SCALE, s.text_tokens
    t, mask = empty(B), torch.ones(B, Lt, dtype=torch.long)  # timesteps; every text token kept
    if s.model == "dit-xl-256":
        cfg = dit.PRESETS["DiT-XL/2-256"]
        labels = torch.zeros(B, dtype=torch.long)
        return dit.DiT(cfg), (empty(B, cfg.in_channels, h, w), t, labels)
    if s.model == "pixart-1024":
        cfg = pixart.PRESETS["PixArt-XL-2-1024-MS"]
        x, text = empty(B, cfg.in_channels, h, w), empty(B, Lt, cfg.caption_channels)
        micro = empty(B, 2), empty(B, 1)  # the resolution and aspect-ratio micro-conditions
        return pixart.PixArt(cfg), (x, t, text, mask, *micro)
    if s.model == "sd3":
        cfg = sd3.PRESETS["stable-diffusion-3-medium"]
        text = empty(B, CLIP_TOKENS + Lt, cfg.joint_attention_dim)  # CLIP's states zero-padded to T5's width, T5's
        return sd3.SD3Transformer(cfg), (empty(B, cfg.in_channels, h, w), t, text, empty(B, cfg.pooled_projection_dim))
    if s.model == "flux-dev":
        cfg = flux.PRESETS["FLUX.1-dev"]
        x = empty(B, (h // PACK) * (w // PACK), cfg.in_channels)  # latents packed 2 x 2
        text, pooled, guidance = empty(B, Lt, cfg.joint_attention_dim), empty(B, cfg.pooled_projection_dim), empty(B)
        return flux.FluxTransformer(cfg), (x, t, text, pooled, image_ids(h, w), empty(Lt, 3), guidance)
    if s.model == "latte":
        cfg = latte.PRESETS["Latte-1"]
        return latte.Latte(cfg), (empty(B, cfg.in_channels, s.frames, h, w), t, empty(B, Lt, cfg.caption_channels))
    if s.model in ("cogvideox-5b", "cogvideox-2b"):
        cfg = cogvideox.PRESETS["CogVideoX-5b" if s.model == "cogvideox-5b" else "CogVideoX-2b"]
        T = (s.frames - 1) // cfg.temporal_compression_ratio + 1  # the first frame, then 4 frames a latent frame
        x, t = empty(B, T, cfg.in_channels, h, w), torch.zeros(B, dtype=torch.long)  # frames before channels
        return cogvideox.CogVideoXTransformer(cfg), (x, empty(B, Lt, cfg.text_embed_dim), t)
    if s.model == "opensora":
        cfg = opensora.PRESETS["OpenSora-STDiT-v3"]
        x = empty(B, cfg.in_channels, opensora_latent_frames(s.frames), h, w)
        fps = empty(B)
        size = [torch.full((B,), side, device="cpu") for side in (s.height, s.width)]  # read as numbers: on the CPU
        return opensora.STDiT3(cfg), (x, t, empty(B, Lt, cfg.caption_channels), mask, fps, *size)
    if s.model == "mochi":
        cfg = mochi.PRESETS["mochi-1-preview"]
        T = (s.frames - 1) // MOCHI_VAE_TEMPORAL + 1  # the first frame, then 6 frames a latent frame
        x = empty(B, cfg.in_channels, T, h, w)
        return mochi.MochiTransformer(cfg), (x, empty(B, Lt, cfg.text_embed_dim), t, mask)
    raise MiniditError(f"no FLOP count for {s.model!r}: flops.backbone knows {', '.join(m.model for m in studies())}")


@dataclass(frozen=True)
class Count:
    total: int  # FLOPs of one forward
    attention: int  # of which batched products: the attention's (Q K^T and P V), and Mochi's RoPE angles


def forward_flops(s: Study) -> Count:
    """FLOPs of one backbone forward of study `s`, counted on the meta device."""
    with torch.device("meta"), torch.no_grad(), explicit_attention(), FlopCounterMode(display=False) as counter:
        model, args = backbone(s)
        model(*args)
    by_op = counter.get_flop_counts()["Global"]
    return Count(counter.get_total_flops(), by_op.get(torch.ops.aten.bmm, 0))


def study_seconds(s: Study, per_forward: int, peak: float, gpus: int = 1) -> float:
    """Sampling time of the study on `gpus` GPUs of dense peak `peak` FLOP/s at MFU: each takes its share of prompts."""
    return math.ceil(s.prompts / gpus) * s.steps * per_forward / (peak * MFU)


def duration(seconds: float) -> str:
    """Hours with one decimal, or minutes under an hour."""
    minutes = seconds / 60
    if minutes >= 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes:.1f} min" if minutes < 10 else f"{minutes:.0f} min"


def table() -> str:
    """The README's table (markdown). ">=": a lower bound (a forward under OVERHEAD_BOUND_S, see above)."""
    rows = [f"| model | settings (frames x H x W, steps, batch) | TFLOP per forward (attention) | PFLOP per prompt | "
            f"prompts | 1 H100 | {GPUS} H100 | 1 A100 |", "|---|---|---|---|---|---|---|---|"]
    for s in studies():
        count = forward_flops(s)
        bound = ">= " if count.total / (H100_PEAK * MFU) < OVERHEAD_BOUND_S else ""
        times = [study_seconds(s, count.total, H100_PEAK), study_seconds(s, count.total, H100_PEAK, GPUS),
                 study_seconds(s, count.total, A100_PEAK)]
        rows.append(f"| {s.model} | {s.settings()} | {count.total / 1e12:.2f} ({count.attention / count.total:.0%}) | "
                    f"{s.steps * count.total / 1e15:.2f} | {s.prompts} | "
                    + " | ".join(bound + duration(t) for t in times) + " |")
    return "\n".join(rows)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(table())


if __name__ == "__main__":
    main()
