"""Hand-written mutants: realistic one-point bugs that the test suite must catch ("kill").

Each mutant edits one or two lines of minidit in a temporary copy of the repository, then runs the test files
that should catch it. By default the reference oracles are hidden (MINIDIT_LIVE=0), as on CI: a mutant counts as
killed only if the stored-fixture tests alone fail on it. Not part of `make test`; run it after changing a model,
a scheduler or a test, and when adding a model, add its mutants here.

    python tests/mutants.py                 # every mutant, CI mode; prints the score
    python tests/mutants.py flux dit-eps    # the mutants whose name contains one of these words
    python tests/mutants.py --live          # with the live reference tests too (needs the reference extra)
    make mutants
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str  # the bug it stands for
    edits: tuple[tuple[str, str, str], ...]  # (file, old text, new text); the old text must occur exactly once
    tests: tuple[str, ...]  # the test files (or node ids) that should kill it


def edit(file: str, old: str, new: str) -> tuple[str, str, str]:
    return file, old, new


DIT, PIXART, SD3, FLUX = "minidit/models/dit.py", "minidit/models/pixart.py", "minidit/models/sd3.py", \
    "minidit/models/flux.py"
MOCHI = "minidit/models/mochi.py"
OPENSORA, RFLOW = "minidit/models/opensora.py", "minidit/schedulers/rflow.py"
OPENSORA_TESTS = ("tests/test_opensora.py",)
OPENSORA_RECIPE, OPENSORA_PIPELINE_TESTS = "minidit/pipelines/opensora.py", ("tests/test_opensora_pipeline.py",)
MOCHI_RECIPE, FLOW = "minidit/pipelines/mochi.py", "minidit/schedulers/flow.py"
MOCHI_PIPELINE = "tests/test_mochi_pipeline.py"
BATCH_TESTS = ("tests/test_study.py::test_a_batch_of_prompts_records_what_batches_of_one_do",)
GENMO_TESTS = (f"{MOCHI_PIPELINE}::test_genmo_table_is_the_inverse",
               f"{MOCHI_PIPELINE}::test_genmo_file_equals_the_hub_layout")
CAPTURES = "tests/test_capture_points.py"
FLUX_PIPELINE = "minidit/pipelines/flux.py"
FFN_VALUE = "tests/test_ffn.py::test_f_is_the_ffn_output"
CACHE = "minidit/caching/cache.py"
CACHE_ORACLE = "tests/test_cache.py::test_a_plan_skips_what_it_reuses_and_nothing_else"

MUTANTS = [
    # ---- capture points: the K, V, A the recorder receives
    Mutant("flux-single-A-after-proj", "FLUX single-stream A taken after the fused projection instead of before", (
        edit(FLUX, "        return attention_output(out, layer=self.layer, streams=streams)  # A before the fused "
                   "projection", "        return out"),
        edit(FLUX, "        update = gate[:, None] * self.proj_out(torch.cat([a, mlp], dim=2))",
             "        update = gate[:, None] * attention_output(self.proj_out(torch.cat([a, mlp], dim=2)), "
             "layer=self.attn.layer, streams=streams)")),
        (CAPTURES, "tests/test_mmdit.py", "tests/test_mmdit_analysis.py", "tests/test_flux_pipeline.py")),
    Mutant("flux-double-A-before-to_out", "FLUX double-stream image A taken before to_out instead of after", (
        edit(FLUX, 'a_x = attention_output(self.to_out[0](out_x), layer=self.layer, streams="img")',
             'a_x = self.to_out[0](attention_output(out_x, layer=self.layer, streams="img"))'),),
        (CAPTURES, "tests/test_mmdit.py", "tests/test_mmdit_analysis.py", "tests/test_flux_pipeline.py")),
    Mutant("sd3-txt-A-before-to_add_out", "SD3 text A taken before to_add_out", (
        edit(SD3, 'return a_x, attention_output(self.to_add_out(out_c), layer=self.layer, streams="txt")',
             'return a_x, self.to_add_out(attention_output(out_c, layer=self.layer, streams="txt"))'),),
        (CAPTURES, "tests/test_mmdit.py", "tests/test_mmdit_analysis.py", "tests/test_sd3_pipeline.py")),
    Mutant("sd3-streams-swapped", "SD3 joint K/V labelled [txt; img] while the tokens are [img; txt]", (
        edit(SD3, 'streams = (("img", x.shape[1]), ("txt", c.shape[1]))',
             'streams = (("txt", c.shape[1]), ("img", x.shape[1]))'),),
        (CAPTURES, "tests/test_mmdit.py", "tests/test_mmdit_analysis.py", "tests/test_sd3_pipeline.py")),
    Mutant("dit-A-before-to_out", "DiT A taken before the output projection", (
        edit(DIT, "return attention_output(self.to_out[0](out), layer=self.layer)",
             "return self.to_out[0](attention_output(out, layer=self.layer))"),),
        (CAPTURES, "tests/test_dit_parity.py", "tests/test_analysis.py", "tests/test_attention.py")),
    Mutant("pixart-A-before-to_out", "PixArt self/cross A taken before the output projection", (
        edit(PIXART, "return attention_output(self.to_out[0](out), layer=self.layer)",
             "return self.to_out[0](attention_output(out, layer=self.layer))"),),
        (CAPTURES, "tests/test_pixart.py")),

    # ---- model numerics
    Mutant("dit-eps-adaLN", "DiT adaLN-Zero LayerNorm eps 1e-5 instead of 1e-6", (
        edit(DIT, "self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)",
             "self.norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-5)"),),
        ("tests/test_dit_parity.py",)),
    Mutant("dit-eps-ffn", "DiT FFN LayerNorm eps fixed at 1e-6, ignoring the config's norm_eps (1e-5)", (
        edit(DIT, "self.norm3 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=cfg.norm_eps)",
             "self.norm3 = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)"),),
        ("tests/test_dit_parity.py",)),
    Mutant("dit-eps-final", "DiT final LayerNorm eps 1e-5 instead of 1e-6", (
        edit(DIT, "self.norm_out = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-6)",
             "self.norm_out = nn.LayerNorm(cfg.hidden_size, elementwise_affine=False, eps=1e-5)"),),
        ("tests/test_dit_parity.py",)),
    Mutant("dit-shift-scale-swapped", "DiT attention modulation with shift and scale swapped", (
        edit(DIT, "modulate(self.norm1.norm(x), shift_msa, scale_msa)",
             "modulate(self.norm1.norm(x), scale_msa, shift_msa)"),),
        ("tests/test_dit_parity.py",)),
    Mutant("pixart-micro-conditions-swapped", "PixArt resolution micro-condition given as [w, h]", (
        edit("minidit/pipelines/pixart.py", '"resolution": torch.tensor([[h, w]] * len(text)',
             '"resolution": torch.tensor([[w, h]] * len(text)'),),
        ("tests/test_pixart.py",)),
    Mutant("pixart-mask-inverted", "PixArt cross-attention masks the real tokens instead of the padding", (
        edit(PIXART, "bias = ((1 - text_mask.to(x.dtype)) * MASK_BIAS)",
             "bias = (text_mask.to(x.dtype) * MASK_BIAS)"),),
        ("tests/test_pixart.py",)),
    Mutant("sd3-final-shift-scale", "SD3 final adaLN read as (shift, scale) instead of (scale, shift)", (
        edit(SD3, "scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)",
             "shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)"),),
        ("tests/test_mmdit.py",)),
    Mutant("flux-bfl-final-not-swapped", "FLUX BFL single file: final (shift, scale) loaded without the swap", (
        edit(FLUX, '"final_layer.adaLN_modulation.1": swap_halves("norm_out.linear"),',
             '"final_layer.adaLN_modulation.1": "norm_out.linear",'),),
        ("tests/test_mmdit.py",)),

    # ---- second checkpoint layouts: the rename tables
    Mutant("dit-original-qkv-order", "original DiT .pt: the fused qkv split as (k, q, v)", (
        edit(DIT, 'split("transformer_blocks.{i}.attn1.to_{}", "q", "k", "v")',
             'split("transformer_blocks.{i}.attn1.to_{}", "k", "q", "v")'),),
        ("tests/test_dit_parity.py",)),
    Mutant("pixart-original-kv-order", "original PixArt .pth: the cross-attention's fused kv split as (v, k)", (
        edit(PIXART, 'split("transformer_blocks.{i}.attn2.to_{}", "k", "v")',
             'split("transformer_blocks.{i}.attn2.to_{}", "v", "k")'),),
        ("tests/test_pixart.py::test_original_pth_layout",)),
    Mutant("sd3-single-file-last-not-swapped", "SD3 single file: the last block's text (shift, scale) not swapped", (
        edit(SD3, 'swap_halves("transformer_blocks.{last}.norm1_context.linear")',
             '"transformer_blocks.{last}.norm1_context.linear"'),),
        ("tests/test_mmdit.py",)),
    Mutant("rope-theta", "RoPE theta 1000 instead of 10000", (
        edit(FLUX, "ROPE_THETA = 10000.0", "ROPE_THETA = 1000.0"),),
        ("tests/test_mmdit.py",)),
    Mutant("rope-rotation-sign", "RoPE rotating the pairs the other way", (
        edit("minidit/rope.py", "rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1)",
             "rotated = torch.stack([pairs[..., 1], -pairs[..., 0]], dim=-1)"),),
        ("tests/test_mmdit.py",)),

    # ---- text encoders and tokenizers
    Mutant("t5-bucket-sign", "T5 relative-position buckets with the direction flipped", (
        edit("minidit/text/t5.py", "bucket = (relative_position > 0).long() * half",
             "bucket = (relative_position < 0).long() * half"),),
        ("tests/test_t5.py",)),
    Mutant("clip-causal-mask", "CLIP mask upper-triangular (attending to the future)", (
        edit("minidit/text/clip.py", "dtype=torch.bool, device=input_ids.device).tril()",
             "dtype=torch.bool, device=input_ids.device).triu()"),),
        ("tests/test_clip.py",)),
    Mutant("clip-tokenizer-case", "CLIP tokenizer without lower-casing", (
        edit("minidit/text/clip_tokenizer.py", 'return "".join(ch.lower() for ch in',
             'return "".join(ch for ch in'),),
        ("tests/test_clip_tokenizer.py",)),
    Mutant("flux-true-cfg-reversed", "FLUX true CFG batch built [cond; uncond] (FluxPipeline's call order) but "
           "combined as [uncond; cond]: cond + s (uncond - cond)", (
        edit(FLUX_PIPELINE, "text, pooled = recipe.text_batch(self.encode, prompts, cfg_scale)",
             "text, pooled = (x.flip(0) for x in recipe.text_batch(self.encode, prompts, cfg_scale))"),),
        ("tests/test_flux_pipeline.py",)),
    Mutant("flux-true-cfg-negative-pooled", "FLUX true CFG: the negative branch given the prompt's pooled vector", (
        edit(FLUX_PIPELINE, "text, pooled = recipe.text_batch(self.encode, prompts, cfg_scale)",
             "text, pooled = recipe.text_batch(self.encode, prompts, cfg_scale)[0], "
             "torch.cat([self.encode(p)[1] for p in prompts * 2])"),),
        ("tests/test_flux_pipeline.py",)),
    Mutant("sd3-pooled-order", "SD3 pooled vector as [bigG; CLIP-L]", (
        edit("minidit/pipelines/sd3.py", "pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)",
             "pooled = torch.cat([clip_g.text_embeds, clip_l.text_embeds], dim=-1)"),),
        ("tests/test_sd3_pipeline.py",)),

    # ---- decoder
    Mutant("vae-attention-scale", "VAE mid-block attention without the 1/sqrt(d) scale", (
        edit("minidit/vae/autoencoder_kl.py", "out = self.to_out[0](attention(q, k, v))",
             "out = self.to_out[0](attention(q, k, v, scale=1.0))"),),
        ("tests/test_vae.py",)),

    # ---- schedulers
    Mutant("ddim-trailing-offset", "DDIM trailing spacing without the final -1", (
        edit("minidit/schedulers/ddim.py", "ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1",
             "ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64)"),),
        ("tests/test_ddim.py",)),
    Mutant("flow-shift", "SD3 shift written s sigma / (1 + s sigma)", (
        edit("minidit/schedulers/flow.py", "return shift * sigma / (1 + (shift - 1) * sigma)",
             "return shift * sigma / (1 + shift * sigma)"),),
        ("tests/test_flow.py",)),
    Mutant("dpm-midpoint", "DPM-Solver++ 2M midpoint correction without its 1/2", (
        edit("minidit/schedulers/dpm_solver.py", "x_next = (sigma_next / sigma) * x - phi * x0 - 0.5 * phi * d1",
             "x_next = (sigma_next / sigma) * x - phi * x0 - phi * d1"),),
        ("tests/test_dpm_solver.py",)),

    # ---- the statistics
    Mutant("recorder-s_prev", "s_prev taken from the current step instead of the previous one", (
        edit("minidit/analysis/recorder.py", "sums = np.stack([cur[..., D_ABS], prev[..., X_L1],",
             "sums = np.stack([cur[..., D_ABS], cur[..., X_L1],"),),
        ("tests/test_analysis.py", "tests/test_mmdit_analysis.py")),
    Mutant("aggregate-ddof", "std over prompts with ddof 1 instead of the population std", (
        edit("minidit/analysis/aggregate.py", "mean, std = values.mean(axis=0), values.std(axis=0)",
             "mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)"),),
        ("tests/test_analysis.py",)),
    Mutant("dit-branch-order", "DiT batch labelled [uncond; cond] while it is [cond; uncond]", (
        edit("minidit/pipelines/dit.py", 'return ("cond", "uncond") if guidance > 1 else ("cond",)',
             'return ("uncond", "cond") if guidance > 1 else ("cond",)'),),
        ("tests/test_analysis.py",)),
    Mutant("sd3-branch-order", "SD3 (and PixArt) batch labelled [cond; uncond] while it is [uncond; cond]", (
        edit("minidit/pipelines/recipe.py", 'return ("uncond", "cond") if guidance > 1 else ("cond",)',
             'return ("cond", "uncond") if guidance > 1 else ("cond",)'),),
        ("tests/test_mmdit_analysis.py::test_sd3_summary_equals_float64_recomputation",)),
    # ---- Latte (tests/test_latte.py)
    Mutant("latte-final-eps", "Latte final LayerNorm eps 1e-5 instead of 1e-6", (
        edit("minidit/models/latte.py", "self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)",
             "self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)"),),
        ("tests/test_latte.py",)),
    Mutant("latte-temporal-ffn-eps", "Latte temporal block FFN LayerNorm eps fixed at 1e-5, not the config's 1e-6", (
        edit("minidit/models/latte.py", 'temporal_transformer_blocks.{index}.attn1", kv_stream="img")\n        '
             "self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)",
             'temporal_transformer_blocks.{index}.attn1", kv_stream="img")\n        '
             "self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-5)"),),
        ("tests/test_latte.py",)),
    Mutant("latte-temporal-shift-scale-swapped", "Latte temporal block FFN modulation with shift and scale swapped", (
        edit("minidit/models/latte.py", "self.attn1(h, h)\n        f = feed_forward_output(self.ff(modulate("
             "self.norm2(x), shift_mlp, scale_mlp))", "self.attn1(h, h)\n        f = feed_forward_output("
             "self.ff(modulate(self.norm2(x), scale_mlp, shift_mlp))"),),
        ("tests/test_latte.py",)),
    Mutant("latte-A-before-to_out", "Latte A (spatial, temporal, cross) taken before the output projection", (
        edit("minidit/models/latte.py", "return attention_output(self.to_out[0](out), layer=self.layer)",
             "return self.to_out[0](attention_output(out, layer=self.layer))"),),
        ("tests/test_latte.py",)),
    Mutant("latte-fold-T-outermost", "Latte temporal fold with the token positions outermost: (L B) T D", (
        edit("minidit/models/latte.py", 'x = rearrange(x, "(B T) L D -> (B L) T D", B=B)',
             'x = rearrange(x, "(B T) L D -> (L B) T D", B=B)'),
        edit("minidit/models/latte.py", 'x = rearrange(x, "(B L) T D -> (B T) L D", B=B)',
             'x = rearrange(x, "(L B) T D -> (B T) L D", B=B)')),
        ("tests/test_latte.py",)),
    Mutant("latte-temporal-pos-late", "Latte temporal position table added after the first temporal block", (
        edit("minidit/models/latte.py", "if i == 0 and T > 1:", "if i == 1 and T > 1:"),),
        ("tests/test_latte.py",)),
    Mutant("latte-mask-feature-off", "Latte prompt and negative T5 states not cut to the prompt's tokens", (
        edit("minidit/pipelines/latte.py", "keep = int(cond[1].sum())", "keep = cond[0].shape[1]"),),
        ("tests/test_latte.py",)),
    Mutant("latte-branch-order", "Latte text batch built [cond; uncond] while labelled and combined [uncond; cond]", (
        edit("minidit/pipelines/latte.py", "return torch.cat([uncond, cond])", "return torch.cat([cond, uncond])"),),
        ("tests/test_latte.py",)),
    # ---- CogVideoX (tests/test_cogvideox.py)
    Mutant("cogvideox-qk-norm-eps", "CogVideoX per-head q/k LayerNorm eps 1e-5 (the blocks' norm_eps), not 1e-6", (
        edit("minidit/models/cogvideox.py", "QK_NORM_EPS = 1e-6", "QK_NORM_EPS = 1e-5"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-enc-shift-scale-swapped", "CogVideoX text-stream attention modulation: enc_shift and enc_scale "
           "swapped", (
        edit("minidit/models/cogvideox.py", "modulate(self.norm1.norm(c), enc_shift, enc_scale)",
             "modulate(self.norm1.norm(c), enc_scale, enc_shift)"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-rope-on-text", "CogVideoX RoPE on the first L tokens (the text included), not the video's", (
        edit("minidit/models/cogvideox.py", "q = torch.cat([q[:, :, :lt], apply_rope(q[:, :, lt:], *rope)], dim=2)",
             "q = torch.cat([apply_rope(q[:, :, :x.shape[1]], *rope), q[:, :, x.shape[1]:]], dim=2)"),
        edit("minidit/models/cogvideox.py", "k = torch.cat([k[:, :, :lt], apply_rope(k[:, :, lt:], *rope)], dim=2)",
             "k = torch.cat([apply_rope(k[:, :, :x.shape[1]], *rope), k[:, :, x.shape[1]:]], dim=2)")),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-streams-swapped", "CogVideoX K/V/A labelled [img; txt] while the tokens are [txt; img]", (
        edit("minidit/models/cogvideox.py", 'streams = (("txt", lt), ("img", x.shape[1]))',
             'streams = (("img", x.shape[1]), ("txt", lt))'),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-A-before-to_out", "CogVideoX A taken before the output projection", (
        edit("minidit/models/cogvideox.py",
             "a = attention_output(self.to_out[0](out), layer=self.layer, streams=streams)",
             "a = self.to_out[0](attention_output(out, layer=self.layer, streams=streams))"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-final-scale-shift", "CogVideoX norm_out read as (scale, shift), SD3's and FLUX's order", (
        edit("minidit/models/cogvideox.py", "        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)",
             "        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-sincos-halves-swapped", "CogVideoX-2b position table with its row and column halves swapped", (
        edit("minidit/models/cogvideox.py", "grid_h, grid_w = torch.meshgrid(rows, cols",
             "grid_w, grid_h = torch.meshgrid(rows, cols"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-snr-shift-inverted", "CogVideoX DDIM SNR multiplied by snr_shift_scale instead of divided", (
        edit("minidit/schedulers/cogvideox_ddim.py", "return alphas_cumprod / (scale + (1 - scale) * alphas_cumprod)",
             "return alphas_cumprod * scale / (1 + (scale - 1) * alphas_cumprod)"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-no-zero-snr", "CogVideoX DDIM without the zero-terminal-SNR rescale", (
        edit("minidit/schedulers/cogvideox_ddim.py",
             "alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)", "pass"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-dynamic-cfg-exponent", "CogVideoX dynamic CFG with exponent 3 instead of 5", (
        edit("minidit/pipelines/cogvideox.py", "num_steps) ** 5.0))", "num_steps) ** 3.0))"),),
        ("tests/test_cogvideox.py",)),
    Mutant("cogvideox-dynamic-cfg-step-index", "CogVideoX dynamic CFG fed the step index instead of the timestep", (
        edit("minidit/pipelines/cogvideox.py", "dynamic_guidance(guidance, t, steps)",
             "dynamic_guidance(guidance, scheduler.timesteps.index(t), steps)"),),
        ("tests/test_cogvideox.py",)),
    # ---- Mochi (tests/test_mochi.py)
    Mutant("mochi-qk-norm-eps", "Mochi per-head q/k RMSNorm eps 1e-6 (the blocks' eps), not 1e-5", (
        edit(MOCHI, "QK_NORM_EPS = 1e-5", "QK_NORM_EPS = 1e-6"),), ("tests/test_mochi.py",)),
    Mutant("mochi-norm-eps", "Mochi block RMSNorms and final LayerNorm with eps 1e-5, not 1e-6", (
        edit(MOCHI, "NORM_EPS = 1e-6", "NORM_EPS = 1e-5"),), ("tests/test_mochi.py",)),
    Mutant("mochi-gate-without-tanh", "Mochi residual gates used raw instead of through tanh", (
        edit(MOCHI, "torch.tanh(gate)[:, None]", "gate[:, None]"),), ("tests/test_mochi.py",)),
    Mutant("mochi-final-shift-scale", "Mochi norm_out read as (shift, scale), genmo's order, not diffusers' (scale, "
           "shift)", (
        edit(MOCHI, "        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=1)",
             "        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)"),), ("tests/test_mochi.py",)),
    Mutant("mochi-swiglu-halves", "Mochi SwiGLU gate read from the first half (genmo's w1 layout)", (
        edit(MOCHI, "h, gate = self.proj(x).chunk(2, dim=-1)", "gate, h = self.proj(x).chunk(2, dim=-1)"),),
        ("tests/test_mochi.py",)),
    Mutant("mochi-rope-not-centred", "Mochi RoPE grid from 0 instead of centred on 0", (
        edit(MOCHI, "edges = torch.linspace(-n * scale / 2, n * scale / 2,", "edges = torch.linspace(0, n * scale,"),),
        ("tests/test_mochi.py",)),
    Mutant("mochi-rope-axes-swapped", "Mochi RoPE positions with the frame and column axes swapped", (
        edit(MOCHI, "grid = torch.meshgrid(t, centres(h), centres(w), indexing=\"ij\")",
             "grid = torch.meshgrid(t, centres(h), centres(w), indexing=\"ij\")[::-1]"),), ("tests/test_mochi.py",)),
    Mutant("mochi-mask-ignored", "Mochi padded text tokens left in the keys", (
        edit(MOCHI, "out = attention(q, k, v, mask=keep[:, None, None, :],", "out = attention(q, k, v, mask=None,"),),
        ("tests/test_mochi.py",)),
    Mutant("mochi-pool-unmasked-mean", "Mochi attention pooling query from the mean over padding too", (
        edit(MOCHI, "weight = mask[:, :, None].to(text.dtype)", "weight = torch.ones_like(text[:, :, :1])"),),
        ("tests/test_mochi.py",)),
    Mutant("mochi-streams-swapped", "Mochi K/V labelled [txt; img] while the tokens are [img; txt]", (
        edit(MOCHI, 'streams = (("img", x.shape[1]), ("txt", c.shape[1]))',
             'streams = (("txt", c.shape[1]), ("img", x.shape[1]))'),), ("tests/test_mochi.py",)),
    Mutant("mochi-A-before-to_out", "Mochi visual A taken before the output projection", (
        edit(MOCHI, 'a_x = attention_output(self.to_out[0](out_x), layer=self.layer, streams="img")',
             'a_x = self.to_out[0](attention_output(out_x, layer=self.layer, streams="img"))'),),
        ("tests/test_mochi.py",)),
    # the full-size key table (test_fullsize_on_meta) catches this too; run against the tiny weights alone, it shows
    # that the tiny fixtures' text width (24) differs from their visual width (16)
    Mutant("mochi-text-out-visual-width", "Mochi text stream's output projection to the visual width (to_out's "
           "shape copied to to_add_out)", (
        edit(MOCHI, "self.to_add_out = None if context_pre_only else nn.Linear(dim, text_dim)",
             "self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)"),),
        ("tests/test_mochi.py::test_transformer_matches_reference",)),
    # ---- Open-Sora 1.2 (tests/test_opensora.py)
    Mutant("opensora-qk-norm-eps", "Open-Sora per-head q/k RMSNorm eps 1e-5, not LlamaRMSNorm's 1e-6", (
        edit(OPENSORA, "QK_NORM_EPS = 1e-6", "QK_NORM_EPS = 1e-5"),), OPENSORA_TESTS),
    Mutant("opensora-shift-scale-swapped", "Open-Sora block modulation read as (scale, shift, gate)", (
        edit(OPENSORA, "shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(dim=1)",
             "scale_msa, shift_msa, gate_msa, scale_mlp, shift_mlp, gate_mlp = mod.unbind(dim=1)"),), OPENSORA_TESTS),
    Mutant("opensora-rope-on-spatial", "Open-Sora RoPE on the spatial attention instead of the temporal one", (
        edit(OPENSORA, "x = spatial(x, t6, text, mask, fold=SPATIAL, T=T, S=S)",
             "x = spatial(x, t6, text, mask, fold=SPATIAL, rope=self.rope(S), T=T, S=S)"),
        edit(OPENSORA, "fold=TEMPORAL, rope=rope, T=T, S=S)", "fold=TEMPORAL, rope=None, T=T, S=S)")), OPENSORA_TESTS),
    Mutant("opensora-rope-halves", "Open-Sora RoPE angles laid out in halves (GPT-NeoX style), not interleaved pairs", (
        edit(OPENSORA, "angles = torch.outer(positions, self.freqs).repeat_interleave(2, dim=1)",
             "angles = torch.outer(positions, self.freqs).repeat(1, 2)"),), OPENSORA_TESTS),
    Mutant("opensora-K-before-qk-norm", "Open-Sora self-attention K and V recorded one step early, before the "
           "QK-norm (and RoPE)", (
        edit(OPENSORA, "        q, k = self.q_norm(q), self.k_norm(k)\n",
             "        from minidit import attention as hook\n"
             "        if hook._recorder is not None:\n"
             "            hook._recorder.capture(self.layer, 'K', k, 2, 'img')\n"
             "            hook._recorder.capture(self.layer, 'V', v, 2, 'img')\n"
             "        q, k = self.q_norm(q), self.k_norm(k)\n"),
        edit(OPENSORA, "out = attention(q, k, v, layer=self.layer)  # (N, L, D)", "out = attention(q, k, v)")),
        OPENSORA_TESTS),
    Mutant("opensora-cross-mask-ignored", "Open-Sora cross-attention attends to padded text tokens", (
        edit(OPENSORA, 'out = attention(q, k, v, mask=mask, layer=self.layer, streams="txt")',
             'out = attention(q, k, v, mask=None, layer=self.layer, streams="txt")'),), OPENSORA_TESTS),
    Mutant("opensora-pos-scale-ignored", "Open-Sora position table not scaled by the video's pixel size", (
        edit(OPENSORA, "scale = (float(height[0]) * float(width[0])) ** 0.5 / cfg.input_sq_size", "scale = 1.0"),),
        OPENSORA_TESTS),
    Mutant("opensora-pos-base-size", "Open-Sora position grid stretched to its own height, not round(sqrt(S))", (
        edit(OPENSORA, "pos = position_table(cfg.hidden_size, H, W, scale, round(S**0.5))",
             "pos = position_table(cfg.hidden_size, H, W, scale, H)"),), OPENSORA_TESTS),
    Mutant("opensora-pos-halves-swapped", "Open-Sora position table with the row in the first half, not the column", (
        edit(OPENSORA, "return torch.cat([sincos(grid_col), sincos(grid_row)], dim=1)",
             "return torch.cat([sincos(grid_row), sincos(grid_col)], dim=1)"),), OPENSORA_TESTS),
    Mutant("opensora-fps-dropped", "Open-Sora conditioning without the fps embedding", (
        edit(OPENSORA, "c = self.t_embedder(timestep.to(dtype), dtype) + self.fps_embedder(fps, dtype)",
             "c = self.t_embedder(timestep.to(dtype), dtype)"),), OPENSORA_TESTS),
    Mutant("opensora-final-silu", "Open-Sora final layer modulated by SiLU(c), as the blocks' t_block, not by c", (
        edit(OPENSORA, "shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(dim=1)",
             "shift, scale = (self.scale_shift_table[None] + F.silu(c)[:, None]).unbind(dim=1)"),), OPENSORA_TESTS),
    Mutant("opensora-kv-halves", "Open-Sora cross-attention kv_linear read as (v, k), not (k, v)", (
        edit(OPENSORA, "k, v = rearrange(self.kv_linear(text)", "v, k = rearrange(self.kv_linear(text)"),),
        OPENSORA_TESTS),
    Mutant("rflow-transform-pixel-frames", "RFlow transform with the pixel frame count, not num_frames // 17 * 5", (
        edit(RFLOW, "frames = num_frames // FRAMES_PER_CHUNK * LATENT_FRAMES_PER_CHUNK", "frames = num_frames"),),
        OPENSORA_TESTS),
    Mutant("rflow-transform-off", "RFlow timestep transform ignoring the frame count (space ratio only)", (
        edit(RFLOW, "ratio = ratio_space * frames.sqrt()", "ratio = ratio_space"),), OPENSORA_TESTS),
    Mutant("rflow-last-step-skipped", "RFlow last step not taken to t = 0", (
        edit(RFLOW, "dt = (self._timesteps[i] if t_next is None else", "dt = (0 * self._timesteps[i] if t_next is None "
             "else"),), OPENSORA_TESTS),
    Mutant("opensora-null-caption-full-mask", "Open-Sora null caption with all its rows, not the prompt's mask", (
        edit(OPENSORA_RECIPE, "return torch.cat([states, null]), torch.cat([mask, mask])",
             "return torch.cat([states, null]), torch.cat([mask, torch.ones_like(mask)])"),), OPENSORA_PIPELINE_TESTS),
    Mutant("opensora-no-aesthetic-score", "Open-Sora prompt without the ' aesthetic score: 6.5.' suffix", (
        edit(OPENSORA_RECIPE, "clean_caption(with_aesthetic_score(prompt)),", "clean_caption(prompt),"),),
        OPENSORA_PIPELINE_TESTS),
    Mutant("opensora-no-cleaning", "Open-Sora prompt not cleaned (so not lower-cased) before T5", (
        edit(OPENSORA_RECIPE, "clean_caption(with_aesthetic_score(prompt)),", "with_aesthetic_score(prompt),"),),
        OPENSORA_PIPELINE_TESTS),
    Mutant("opensora-batch-order", "Open-Sora guidance reading the batch as [uncond; cond]", (
        edit(OPENSORA_RECIPE, "cond, uncond = v.chunk(2)", "uncond, cond = v.chunk(2)"),), OPENSORA_PIPELINE_TESTS),
    Mutant("opensora-image-fps", "Open-Sora video conditioned on the image fps (120) instead of 24", (
        edit(OPENSORA_RECIPE, "fps = IMAGE_FPS if self.frames == 1 else FPS", "fps = IMAGE_FPS"),),
        OPENSORA_PIPELINE_TESTS),
    Mutant("opensora-latent-frames-ceil", "Open-Sora latent frames as ceil(F / 17) * 5 (51 -> 15, 17 -> 5, 20 -> 10)", (
        edit(OPENSORA_RECIPE, "return chunks * LATENT_FRAMES_PER_CHUNK + -(-rest // 4)",
             "return -(-frames // FRAMES_PER_CHUNK) * LATENT_FRAMES_PER_CHUNK"),), OPENSORA_PIPELINE_TESTS),

    # ---- Mochi's sampler, checkpoint layouts and recipe (tests/test_mochi_pipeline.py)
    Mutant("mochi-threshold", "Mochi's linear-quadratic schedule with threshold 0.05 instead of 0.025", (
        edit(FLOW, "MOCHI_THRESHOLD = 0.025", "MOCHI_THRESHOLD = 0.05"),),
        (f"{MOCHI_PIPELINE}::test_scheduler_matches_reference",)),
    Mutant("mochi-quadratic-coefficient", "Mochi's schedule: the linear coefficient without the factor 2 on d", (
        edit(FLOW, "b = threshold / linear - 2 * d / quadratic**2", "b = threshold / linear - d / quadratic**2"),),
        (f"{MOCHI_PIPELINE}::test_scheduler_matches_reference",)),
    Mutant("mochi-timestep-not-inverted", "Mochi fed t = 1000 sigma (the usual flow convention) instead of "
           "1000 (1 - sigma)", (
        edit(FLOW, "self._timesteps = grid * n", "self._timesteps = self._sigmas * n"),),
        (f"{MOCHI_PIPELINE}::test_scheduler_matches_reference", f"{MOCHI_PIPELINE}::test_pipeline_final_latents")),
    Mutant("mochi-inverted-grid-ends-in-0", "Mochi's inverted grid closed with 0 instead of 1 (the last step goes "
           "backwards)", (
        edit(FLOW, "grid, end = 1.0 - self._sigmas, torch.ones(1)", "grid, end = 1.0 - self._sigmas, torch.zeros(1)"),),
        (f"{MOCHI_PIPELINE}::test_scheduler_matches_reference",)),
    Mutant("mochi-genmo-swiglu-not-swapped", "genmo file: the SwiGLU halves of mlp_x.w1 loaded without the swap", (
        edit(MOCHI, '"blocks.{b}.mlp_x.w1.weight": swap_halves("transformer_blocks.{b}.ff.net.0.proj.weight"),',
             '"blocks.{b}.mlp_x.w1.weight": "transformer_blocks.{b}.ff.net.0.proj.weight",'),),
        GENMO_TESTS),
    Mutant("mochi-genmo-text-swiglu-not-swapped", "genmo file: the text stream's mlp_y.w1 loaded without the swap", (
        edit(MOCHI, '"blocks.{i}.mlp_y.w1.weight": swap_halves("transformer_blocks.{i}.ff_context.net.0.proj.weight"),',
             '"blocks.{i}.mlp_y.w1.weight": "transformer_blocks.{i}.ff_context.net.0.proj.weight",'),),
        GENMO_TESTS),
    Mutant("mochi-genmo-final-not-swapped", "genmo file: final_layer.mod's (shift, scale) loaded without the swap", (
        edit(MOCHI, '"final_layer.mod": swap_halves("norm_out.linear"),', '"final_layer.mod": "norm_out.linear",'),),
        GENMO_TESTS),
    Mutant("mochi-genmo-qkv-order", "genmo file: the visual qkv_x split as (k, q, v)", (
        edit(MOCHI, 'split("transformer_blocks.{b}.attn1.to_{}.weight", "q", "k", "v")',
             'split("transformer_blocks.{b}.attn1.to_{}.weight", "k", "q", "v")'),),
        GENMO_TESTS),
    Mutant("mochi-variant-preferred", "Mochi reads the bf16 variant even where the fp32 files are there", (
        edit(MOCHI, "    if weights.has_weights(folder):\n",
             "    if weights.has_weights(folder) and not weights.has_weights(folder, VARIANT):\n"),),
        (f"{MOCHI_PIPELINE}::test_bf16_variant",)),
    Mutant("mochi-prompt-lower-cased", "Mochi's prompt lower-cased and stripped as PixArt's and Latte's are", (
        edit(MOCHI_RECIPE, "self.device, clean=False)", "self.device, clean=True)"),),
        (f"{MOCHI_PIPELINE}::test_pipeline_final_latents",)),
    Mutant("mochi-transformer-without-text-mask", "Mochi's transformer given no text mask (padding attended)", (
        edit(MOCHI_RECIPE, "v = self.model(batch, text, timestep, mask).float()",
             "v = self.model(batch, text, timestep, torch.ones_like(mask)).float()"),),
        (f"{MOCHI_PIPELINE}::test_pipeline_final_latents",)),
    Mutant("mochi-guidance-reversed", "Mochi's guidance with the halves taken as [cond; uncond]", (
        edit(MOCHI_RECIPE, "v = recipe.guided(*v.chunk(2), guidance)",
             "v = recipe.guided(*v.chunk(2)[::-1], guidance)"),),
        (f"{MOCHI_PIPELINE}::test_pipeline_final_latents",)),
    Mutant("mochi-temporal-factor-4", "Mochi's frames counted with CogVideoX's 4x temporal compression", (
        edit(MOCHI_RECIPE, "VAE_SPATIAL, VAE_TEMPORAL = 8, 6", "VAE_SPATIAL, VAE_TEMPORAL = 8, 4"),),
        (f"{MOCHI_PIPELINE}::test_pipeline_final_latents",)),
    # ---- F, the optional feed-forward capture (tests/test_ffn.py)
    Mutant("ffn-dit-after-gate", "DiT F captured after the gate (gate_mlp * FFN) instead of before it", (
        edit(DIT, "        f = feed_forward_output(self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp)), "
                  "layer=self.attn1.layer)\n        x = x + gate_mlp[:, None] * f\n",
             "        f = gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))\n"
             "        x = x + feed_forward_output(f, layer=self.attn1.layer)\n"),),
        (f"{FFN_VALUE}[dit-tiny]",)),
    Mutant("ffn-flux-single-before-proj_out", "FLUX single-stream F taken as the MLP's GELU output, before the fused "
           "output projection (as its A is taken)", (
        edit(FLUX, "        mlp = F.gelu(self.proj_mlp(h_in), approximate=\"tanh\")\n",
             "        mlp = feed_forward_output(F.gelu(self.proj_mlp(h_in), approximate=\"tanh\"), "
             "layer=self.attn.layer, streams=streams)\n"),
        edit(FLUX, "        return feed_forward_output(update, layer=self.attn.layer, streams=streams)",
             "        return update")),
        (f"{FFN_VALUE}[flux-tiny]",)),
    Mutant("ffn-flux-single-without-gate", "FLUX single-stream F without the gate: proj_out's output, not the block's "
           "update of the residual stream", (
        edit(FLUX, "        update = gate[:, None] * self.proj_out(torch.cat([a, mlp], dim=2))\n"
                   "        return feed_forward_output(update, layer=self.attn.layer, streams=streams)",
             "        update = self.proj_out(torch.cat([a, mlp], dim=2))\n"
             "        return gate[:, None] * feed_forward_output(update, layer=self.attn.layer, streams=streams)"),),
        (f"{FFN_VALUE}[flux-tiny]",)),
    Mutant("ffn-sd3-txt-as-img", "SD3 text-stream F (ff_context) filed under the image stream", (
        edit(SD3, 'feed_forward_output(f_c, layer=self.attn.layer, streams="txt")',
             'feed_forward_output(f_c, layer=self.attn.layer, streams="img")'),),
        (f"{FFN_VALUE}[sd3]",)),
    Mutant("ffn-cogvideox-streams-swapped", "CogVideoX F labelled [img; txt] while its tokens are [txt; img]", (
        edit("minidit/models/cogvideox.py", 'streams=(("txt", lt), ("img", x.shape[1])))\n        x = x + gate',
             'streams=(("img", x.shape[1]), ("txt", lt)))\n        x = x + gate'),),
        (f"{FFN_VALUE}[cogvideox]",)),
    Mutant("ffn-resume-ignores-tensors", "a run with F resumable without it (tensors not part of the run's identity)", (
        edit("minidit/analysis/rundir.py", '"streams", "branches", "tensors",', '"streams", "branches",'),),
        ("tests/test_ffn.py::test_the_command_records_draws_and_guards_f",)),
    Mutant("ffn-recorder-f-into-a", "the recorder files F in A's place of the record", (
        edit("minidit/analysis/recorder.py", "self.tensor_index = {name: i for i, name in enumerate(self.tensors)}",
             "self.tensor_index = {name: min(i, 2) for i, name in enumerate(self.tensors)}"),),
        ("tests/test_ffn.py::test_kva_are_unchanged_by_ffn[dit-tiny]",)),
    # ---- sampling with a caching plan (tests/test_cache.py)
    Mutant("cache-keeps-for-this-step", "an output kept when this step's cell is reused, not the next one's: a later "
           "reuse returns an older output", (
        edit(CACHE, "keep = step + 1 < cache.plan.steps and cache.plan.reuse[step + 1, self.layer, self.component]",
             "keep = step + 1 < cache.plan.steps"),
        edit(CACHE, "        cache.keep(self, out if keep else None)",
             "        if keep and self.kept is None:\n            cache.keep(self, out)"),),
        (CACHE_ORACLE,)),
    Mutant("cache-skips-the-next-step", "the reuse looked up one step late (the backbone call counted after the "
           "blocks ran)", (
        edit(CACHE, "        if cache.plan.reuse[step, self.layer, self.component]:",
             "        if step > 0 and cache.plan.reuse[step - 1, self.layer, self.component]:"),),
        (CACHE_ORACLE,)),
    Mutant("cache-fused-attention-counted-computed", "a fused block's inner attention not counted as skipped when "
           "the block is reused", (
        edit(CACHE, "            for part in self.modules():  # itself, and a fused block's attention inside it\n"
                    "                if isinstance(part, Reusable):\n"
                    "                    cache.skipped[part.component] += 1",
             "            cache.skipped[self.component] += 1"),),
        (f"{CACHE_ORACLE}[flux-tiny]",)),
    Mutant("cache-ffn-context-not-wrapped", "SD3's text-stream feed-forward left out of the layer's cache modules: it "
           "runs when the plan reuses the feed-forward", (
        edit(SD3, 'ffn=in_block(b.attn.layer, "ff", *([] if b.context_pre_only else ["ff_context"])))',
             'ffn=in_block(b.attn.layer, "ff"))'),),
        (f"{CACHE_ORACLE}[sd3]",)),
    Mutant("plan-whole-steps-attention-only", "measured whole-step plans score steps by the attention's change only",
           (edit("minidit/caching/measured.py", "curve[1:, 0, 0] = np.nanmean(change[1:], axis=(1, 2))",
                 "curve[1:, 0, 0] = np.nanmean(change[1:, :, 0], axis=1)"),),
           ("tests/test_plan.py::test_whole_steps_are_chosen_by_the_layer_averaged_change",)),
    Mutant("ssim-k2-wrong", "SSIM's second constant 0.3 instead of Wang et al.'s 0.03", (
        edit("minidit/caching/report.py", "SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03",
             "SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.3"),),
        ("tests/test_cache.py::test_psnr_and_ssim_against_scikit_image",)),
    Mutant("ssim-window-sigma", "SSIM's Gaussian window of sigma 1.0 instead of 1.5", (
        edit("minidit/caching/report.py", "SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5,",
             "SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.0,"),),
        ("tests/test_cache.py::test_psnr_and_ssim_against_scikit_image",)),
    # ---- prompts in batches (tests/test_study.py)
    Mutant("batch-noise-per-row", "a batch of prompts drawn as one (P, ...) tensor from the seed: each prompt's noise "
           "then depends on its place in the batch", (
        edit("minidit/pipelines/recipe.py",
             "return initial_noise((1, *shape), seed, dtype, device).expand(prompts, *shape).contiguous()",
             "return initial_noise((prompts, *shape), seed, dtype, device)"),), BATCH_TESTS),
    Mutant("batch-rows-prompt-major", "the recorder reads the batch as [prompt: branches] instead of [branch: prompts]",
           (edit("minidit/analysis/recorder.py",
                 "cols = stats[:, :, start:start + width].reshape(self.num_steps, 4, len(g.keys), branches, prompts)",
                 "cols = stats[:, :, start:start + width].reshape(self.num_steps, 4, len(g.keys), prompts, branches)"
                 ".swapaxes(3, 4)"),), BATCH_TESTS),
]


def copy_repo(target: Path) -> None:
    """The files git tracks (and untracked, unignored ones), as they are in the work tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def apply(mutant: Mutant, tree: Path) -> None:
    for file, old, new in mutant.edits:
        path = tree / file
        text = path.read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {mutant.name}: {old!r} occurs {text.count(old)} times in {file}, not once; "
                             f"update the mutant to the current code")
        path.write_text(text.replace(old, new))


def run_tests(tree: Path, tests: tuple[str, ...], live: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "MINIDIT_LIVE": "1" if live else "0"}
    present = [t for t in tests if (tree / t.split("::")[0]).exists()]
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *present],
                          cwd=tree, env=env, capture_output=True, text=True)


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            return line.split(" - ")[0].split(" ", 1)[1]
    return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="run the mutants whose name contains one of these words")
    parser.add_argument("--live", action="store_true", help="let the live reference tests run too")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run of the targeted tests on the unmutated copy (they must pass there, "
                             "or a 'kill' means nothing)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(word in m.name for word in args.only)]
    if not chosen:
        raise SystemExit(f"no mutant matches {args.only}; names: {', '.join(m.name for m in MUTANTS)}")

    with tempfile.TemporaryDirectory(prefix="minidit-mutants-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_repo(pristine)
        if not args.no_baseline:
            targeted = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            baseline = run_tests(pristine, targeted, args.live)
            if baseline.returncode != 0:
                print(baseline.stdout[-3000:])
                raise SystemExit(f"the targeted tests fail without any mutant ({first_failure(baseline.stdout)}): "
                                 f"fix that first")
            print(f"baseline: the targeted tests pass on the unmutated copy ({len(targeted)} files)", flush=True)
        survivors = []
        for mutant in chosen:
            tree = Path(tmp) / mutant.name
            shutil.copytree(pristine, tree)
            apply(mutant, tree)
            start = time.time()
            result = run_tests(tree, mutant.tests, args.live)
            killed = result.returncode != 0
            verdict = f"killed by {first_failure(result.stdout)}" if killed else "SURVIVED"
            print(f"{mutant.name:<34} {verdict}  ({time.time() - start:.0f} s)", flush=True)
            if not killed:
                survivors.append(mutant)
            shutil.rmtree(tree)
    mode = "with the live tests" if args.live else "CI mode: stored fixtures only"
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed ({mode})")
    for mutant in survivors:
        print(f"  survived: {mutant.name}: {mutant.why}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
