"""Reference fixtures for the DiT, DDIM and weights-loader tests, computed with diffusers as the oracle.

Run by hand when the reference changes (needs the reference extra: diffusers, transformers):

    python tests/reference/generate.py

It writes, under tests/fixtures/dit/ (≈1 MB in all; the run is deterministic):

    sharded/  single/  bin/        tiny DiT repos in the exact layout of facebook/DiT-XL-2-256 on the Hub:
                                   model_index.json, scheduler/scheduler_config.json (DiT's byte-exact values),
                                   transformer/config.json (the legacy Hub content: Transformer2DModel, ignored
                                   keys, no norm_eps) and the weights as sharded safetensors + index, one
                                   safetensors file, or a torch pickle `.bin` (what main ships)
    small-variance/                the same model with its adaLN-Zero gates scaled by 1e-2 (one safetensors
                                   file): with the sample `small_variance_sample` draws, its residual stream has a
                                   per-token std near 1e-2, so every LayerNorm's eps shows in the outputs
    original/DiT-tiny-2-64x64.pt   the same model in the facebookresearch/DiT state-dict layout (fused qkv,
                                   one t/y embedder, pos_embed [1, L, D])
    hub-xl2-256/                   the real (full-size) DiT-XL/2-256 config files, byte-exact, no weights
    xl2_keys.json                  DiT-XL/2 key names and shapes, diffusers layout (from diffusers on meta)
                                   and original layout (from the port below on meta)
    reference.safetensors          inputs and expected outputs (see `main`); its metadata holds the DDIM cases
    VERSIONS.json                  the library versions that produced the expected outputs

Where the expected outputs come from:
- Hub layout, diffusers numerics: diffusers' DiTTransformer2DModel / DiTPipeline / DDIMScheduler themselves.
- Hub layout, original numerics: the same diffusers model with its timestep sinusoid shift set to 0 and the
  FFN LayerNorm eps set to 1e-6 (the two numerical differences from facebookresearch/DiT).
- The original `.pt`: `OriginalDiT` below, a test-only port of facebookresearch/DiT `models.py` (shift-0
  timestep sinusoid, eps 1e-6 everywhere, fused qkv, timm's explicit attention), run on the `.pt` tensors.
  `main` asserts that it agrees with the patched diffusers model before anything is written.
- The original convention's sampling loop: the port's `forward_with_cfg` (guidance on 3 channels, both halves
  of the batch fed from the first half) driven by diffusers' DDIMScheduler.

The weights are random (seeded), not diffusers' init: diffusers zero-inits the adaLN-Zero and output layers,
which would make every parity test compare zeros. The per-block embedder copies of the Hub-layout fixtures
differ from block to block (stronger than the real checkpoints, where they are identical) so that a model
wiring the wrong block's embedder fails; the `.pt` fixture has one embedder, as the real ones do.

Functions here are also used by the tests' "live" cases to rebuild a reference on the fly; diffusers is
imported inside the functions that need it, so the pure-torch port imports without it.
"""

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dit"
REFERENCE = FIXTURES / "reference.safetensors"
ORIGINAL_PT = FIXTURES / "original" / "DiT-tiny-2-64x64.pt"

SEED = 20240229
# checkpoints.md §13.1: the tiny DiTTransformer2DModel config
TINY = dict(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
            patch_size=2)
XL2_256 = dict(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
               out_channels=8, patch_size=2)
NULL_CLASS = 1000
SHARD_SIZE = "50KB"  # forces several shards plus the index, as FLUX / CogVideoX-5b / Mochi ship

# transformer inputs: timesteps include both ends of the range, labels include the null class
FORWARD_T = [0, 1, 421, 750, 999]
FORWARD_Y = [0, NULL_CLASS, 7, 999, NULL_CLASS]

# the end-to-end pipeline case
PIPELINE_LABELS = [1, 3]
PIPELINE_STEPS = 4
PIPELINE_GUIDANCE = 4.0
PIPELINE_SEED = 0

DDIM_STEPS = (1, 4, 7, 20, 28, 50, 64)
DDIM_SHAPE = (2, 4, 4, 4)

# the LayerNorm-eps case: a residual stream whose per-token std stays near SMALL_STD, where eps (1e-6 or 1e-5)
# is a few percent of the variance and so moves the outputs far beyond float rounding
SMALL_STD = 1e-2
GATE_SCALE = 1e-2  # the adaLN-Zero gates' rows scaled down, so attention and FFN add only ~SMALL_STD


# ---- the Hub files' content ----------------------------------------------------------------------------

def hub_transformer_config(values: dict) -> dict:
    """`transformer/config.json` as facebook/DiT-XL-2-256 ships it (checkpoints.md §9.2): the legacy class name,
    keys DiTTransformer2DModel ignores, and no `norm_eps`."""
    return {"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
            "activation_fn": "gelu-approximate", "attention_bias": True, "cross_attention_dim": None, "dropout": 0.0,
            "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
            "num_embeds_ada_norm": 1000, "num_vector_embeds": None, "only_cross_attention": False,
            "upcast_attention": False, "use_linear_projection": False, **values}


# checkpoints.md §9.2, byte-exact (310 B); `timestep_spacing` is absent -> "leading"
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_end": 0.02,
                    "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False, "num_train_timesteps": 1000,
                    "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}

# the first ImageNet classes; the real file lists all 1000 (35.8 kB)
ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus",
            "2": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
            "3": "tiger shark, Galeocerdo cuvieri"}
MODEL_INDEX = {"_class_name": "DiTPipeline", "_diffusers_version": "0.12.0.dev0", "id2label": ID2LABEL,
               "scheduler": ["diffusers", "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"],
               "vae": ["diffusers", "AutoencoderKL"]}

# DDIM cases: DiT's own config with each timestep spacing, plus one with every other supported switch flipped
DDIM_CASES = {
    "dit-leading": SCHEDULER_CONFIG,
    "dit-trailing": {**SCHEDULER_CONFIG, "timestep_spacing": "trailing"},
    "dit-linspace": {**SCHEDULER_CONFIG, "timestep_spacing": "linspace"},
    "scaled-v-offset": {**SCHEDULER_CONFIG, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "beta_end": 0.012, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                        "steps_offset": 1},
}


def config_json(config: dict) -> str:
    """Serialised the way diffusers writes config files (and so the way the Hub files are)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# ---- a test-only port of facebookresearch/DiT models.py ------------------------------------------------
# Module and attribute names equal the original's, so its state dict has the original checkpoint's keys.
# timm's PatchEmbed, Attention and Mlp are reduced to the layers that hold weights.

def original_timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def original_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of the original (MAE's): numpy, float64, "w goes first"."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def original_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _PatchEmbed(nn.Module):
    def __init__(self, patch, in_ch, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.freq = freq

    def forward(self, t):
        return self.mlp(original_timestep_embedding(t, self.freq))


class _LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # class_dropout_prob > 0: + the null class


class _Attention(nn.Module):  # timm's, non-fused path
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(original_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(original_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class _FinalLayer(nn.Module):
    def __init__(self, dim, patch, out_ch):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(original_modulate(self.norm_final(x), shift, scale))


class OriginalDiT(nn.Module):
    """facebookresearch/DiT `DiT` (learn_sigma=True, mlp_ratio 4, num_classes 1000), inference only."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 num_classes=1000):
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels * 2, patch_size
        self.x_embedder = _PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = _TimestepEmbedder(hidden_size)
        self.y_embedder = _LabelEmbedder(num_classes, hidden_size)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([_Block(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = _FinalLayer(hidden_size, patch_size, self.out_channels)

    @classmethod
    def tiny(cls) -> "OriginalDiT":
        return cls(input_size=TINY["sample_size"], patch_size=TINY["patch_size"], in_channels=TINY["in_channels"],
                   hidden_size=TINY["num_attention_heads"] * TINY["attention_head_dim"], depth=TINY["num_layers"],
                   num_heads=TINY["num_attention_heads"])

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(shape=(x.shape[0], c, h * p, h * p))

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        # the original: "For exact reproducibility reasons, we apply classifier-free guidance on only three channels"
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def load_original(sd: dict[str, torch.Tensor]) -> OriginalDiT:
    model = OriginalDiT.tiny()
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ---- the two checkpoint layouts, written by hand from diffusers' scripts/convert_dit_to_diffusers.py ----

def hub_to_original(hub: dict[str, torch.Tensor], num_layers: int, pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of the conversion: fuse q/k/v into qkv, keep block 0's embedders as the single t/y embedder."""
    emb = "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": pos_embed,
           "x_embedder.proj.weight": hub["pos_embed.proj.weight"], "x_embedder.proj.bias": hub["pos_embed.proj.bias"],
           "t_embedder.mlp.0.weight": hub[emb + "timestep_embedder.linear_1.weight"],
           "t_embedder.mlp.0.bias": hub[emb + "timestep_embedder.linear_1.bias"],
           "t_embedder.mlp.2.weight": hub[emb + "timestep_embedder.linear_2.weight"],
           "t_embedder.mlp.2.bias": hub[emb + "timestep_embedder.linear_2.bias"],
           "y_embedder.embedding_table.weight": hub[emb + "class_embedder.embedding_table.weight"]}
    for i in range(num_layers):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.adaLN_modulation.1.{kind}"] = hub[b + f"norm1.linear.{kind}"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([hub[b + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            out[f"blocks.{i}.attn.proj.{kind}"] = hub[b + f"attn1.to_out.0.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = hub[b + f"ff.net.0.proj.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = hub[b + f"ff.net.2.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = hub[f"proj_out_1.{kind}"]
        out[f"final_layer.linear.{kind}"] = hub[f"proj_out_2.{kind}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def original_to_diffusers(orig: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The conversion itself (what convert_dit_to_diffusers.py does), for the live reference of the `.pt`."""
    out = {"pos_embed.proj.weight": orig["x_embedder.proj.weight"], "pos_embed.proj.bias": orig["x_embedder.proj.bias"],
           "proj_out_1.weight": orig["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": orig["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": orig["final_layer.linear.weight"], "proj_out_2.bias": orig["final_layer.linear.bias"]}
    for i in range(num_layers):
        b = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"norm1.emb.timestep_embedder.linear_1.{kind}"] = orig[f"t_embedder.mlp.0.{kind}"]
            out[b + f"norm1.emb.timestep_embedder.linear_2.{kind}"] = orig[f"t_embedder.mlp.2.{kind}"]
            out[b + f"norm1.linear.{kind}"] = orig[f"blocks.{i}.adaLN_modulation.1.{kind}"]
            q, k, v = orig[f"blocks.{i}.attn.qkv.{kind}"].chunk(3, dim=0)
            out[b + f"attn1.to_q.{kind}"], out[b + f"attn1.to_k.{kind}"], out[b + f"attn1.to_v.{kind}"] = q, k, v
            out[b + f"attn1.to_out.0.{kind}"] = orig[f"blocks.{i}.attn.proj.{kind}"]
            out[b + f"ff.net.0.proj.{kind}"] = orig[f"blocks.{i}.mlp.fc1.{kind}"]
            out[b + f"ff.net.2.{kind}"] = orig[f"blocks.{i}.mlp.fc2.{kind}"]
        out[b + "norm1.emb.class_embedder.embedding_table.weight"] = orig["y_embedder.embedding_table.weight"]
    return out


# ---- diffusers as the oracle (imported lazily) -----------------------------------------------------------

def _quiet_diffusers():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    return diffusers


def diffusers_dit(folder: Path | None = None, *, state_dict: dict | None = None, numerics: str = "diffusers"):
    """diffusers' DiT from a Hub-layout transformer folder (loaded through the legacy Transformer2DModel class, as
    the Hub config asks) or from a state dict. numerics="original" sets the timestep sinusoid shift to 0 and the
    FFN LayerNorm eps to 1e-6, facebookresearch/DiT's values."""
    diffusers = _quiet_diffusers()
    if folder is not None:
        model = diffusers.Transformer2DModel.from_pretrained(folder)
        assert type(model).__name__ == "DiTTransformer2DModel", type(model)
    else:
        model = diffusers.DiTTransformer2DModel(**TINY)
        model.load_state_dict(state_dict, strict=True)
    if numerics == "original":
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
            block.norm3.eps = 1e-6
    return model.float().eval()


@torch.no_grad()
def diffusers_forward(model, x, t, y) -> torch.Tensor:
    return model(x, timestep=t, class_labels=y).sample


class _CaptureVAE(nn.Module):
    """Stands in for the VAE so that DiTPipeline hands over its final latents unchanged (scaling factor 1)."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(scaling_factor=1.0)
        self.latents = None

    def decode(self, z):
        self.latents = z.clone()
        return types.SimpleNamespace(sample=z)


def diffusers_pipeline_latents(transformer, scheduler_config: dict, labels: list[int], steps: int, guidance: float,
                               seed: int) -> torch.Tensor:
    """Final latents of diffusers' DiTPipeline itself (its VAE decode replaced by a capture)."""
    diffusers = _quiet_diffusers()
    vae = _CaptureVAE()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae,
                                 scheduler=diffusers.DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe(labels, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
         num_inference_steps=steps, output_type="pt")
    return vae.latents


def pipeline_noise(batch: int, seed: int) -> torch.Tensor:
    """The draw DiTPipeline makes, through its own randn_tensor."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (batch, TINY["in_channels"], TINY["sample_size"], TINY["sample_size"])
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"),
                        dtype=torch.float32)


@torch.no_grad()
def original_pipeline_latents(model: OriginalDiT, scheduler_config: dict, labels: list[int], steps: int,
                              guidance: float, seed: int) -> torch.Tensor:
    """facebookresearch/DiT sample.py's loop (z doubled, labels + null, forward_with_cfg, keep the first half)
    with diffusers' DDIMScheduler as the sampler; the learned-variance channels are dropped before the step."""
    diffusers = _quiet_diffusers()
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    z = pipeline_noise(len(labels), seed)
    z = torch.cat([z, z], 0)
    y = torch.cat([torch.tensor(labels), torch.tensor([NULL_CLASS] * len(labels))], 0)
    for t in scheduler.timesteps:
        out = model.forward_with_cfg(z, t.expand(len(z)), y, guidance)
        z = scheduler.step(out[:, : model.in_channels], t, z).prev_sample
    return z.chunk(2, dim=0)[0]


def ddim_reference(config: dict, steps: int, model_output: torch.Tensor, sample: torch.Tensor) -> dict:
    """diffusers' DDIMScheduler: timesteps, alphas_cumprod and one step at the first and at the last timestep."""
    diffusers = _quiet_diffusers()
    scheduler = diffusers.DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    return {"timesteps": ts.clone(), "alphas_cumprod": scheduler.alphas_cumprod.clone(),
            "final_alpha_cumprod": torch.as_tensor(scheduler.final_alpha_cumprod).reshape(1).clone(),
            "prev_first": scheduler.step(model_output, ts[0], sample).prev_sample,
            "prev_last": scheduler.step(model_output, ts[-1], sample).prev_sample}


def ddim_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randn(DDIM_SHAPE, generator=g), torch.randn(DDIM_SHAPE, generator=g)


def forward_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(len(FORWARD_T), TINY["in_channels"], TINY["sample_size"], TINY["sample_size"], generator=g)
    return x, torch.tensor(FORWARD_T, dtype=torch.int64), torch.tensor(FORWARD_Y, dtype=torch.int64)


def small_variance_weights(hub_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub fixture's weights with the adaLN-Zero gate rows (gate_msa, gate_mlp) scaled by GATE_SCALE."""
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    small = {k: v.clone() for k, v in hub_sd.items()}
    for k in small:
        if k.endswith(".norm1.linear.weight") or k.endswith(".norm1.linear.bias"):
            for chunk in (2, 5):  # (shift, scale, gate) for attention, then for the FFN
                small[k][chunk * dim:(chunk + 1) * dim] *= GATE_SCALE
    return small


def small_variance_sample(model, batch: int) -> torch.Tensor:
    """A sample whose patch embedding cancels the sin-cos position table up to noise of std SMALL_STD: the
    square patch-embedding matrix (C p p = D) is inverted in float64 for every patch."""
    p, c, n = TINY["patch_size"], TINY["in_channels"], TINY["sample_size"] // TINY["patch_size"]
    conv = model.pos_embed.proj
    w = conv.weight.double().reshape(conv.weight.shape[0], -1)  # (D, C p p), columns in (c, kh, kw) order
    g = torch.Generator().manual_seed(SEED + 3)
    target = SMALL_STD * torch.randn(batch, n * n, w.shape[0], generator=g, dtype=torch.float64)
    patches = torch.linalg.solve(w, (target - conv.bias.double() - model.pos_embed.pos_embed.double()).mT).mT
    x = patches.reshape(batch, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(batch, c, n * p, n * p)
    return x.float()


def residual_std(model, x: torch.Tensor) -> float:
    """The largest per-token std of the patch embedding plus position table (the first LayerNorm's input)."""
    with torch.no_grad():
        return model.pos_embed(x).std(dim=-1, unbiased=False).max().item()


def max_scaled_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1.0)).item()


# ---- generation ------------------------------------------------------------------------------------------

@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter drawn from one seeded generator, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("embedding_table.weight"):
            std = 0.5
        elif p.ndim >= 2:
            std = (p.numel() / p.shape[0]) ** -0.5  # 1/sqrt(fan_in)
        else:
            std = 0.2
        p.copy_(torch.randn(p.shape, generator=g) * std)


def write_repo(folder: Path, transformer, **save_kwargs) -> None:
    """A Hub-style DiT repo: model_index.json, scheduler/, transformer/ with the legacy config.json."""
    transformer.save_pretrained(folder / "transformer", **save_kwargs)
    (folder / "transformer" / "config.json").write_text(config_json(hub_transformer_config(TINY)))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(config_json(SCHEDULER_CONFIG))
    (folder / "model_index.json").write_text(config_json(MODEL_INDEX))


def xl2_key_tables() -> dict:
    """DiT-XL/2 names and shapes: diffusers' layout (built from the real config on meta) and the original."""
    diffusers = _quiet_diffusers()
    cfg = {k: v for k, v in hub_transformer_config(XL2_256).items()
           if k in ("activation_fn", "attention_bias", "norm_elementwise_affine", "norm_num_groups", "norm_type",
                    "num_embeds_ada_norm", "upcast_attention", "dropout", *XL2_256)}
    with torch.device("meta"):
        hub = diffusers.DiTTransformer2DModel(**cfg)
        orig = OriginalDiT()
    hub_sd, orig_sd = hub.state_dict(), orig.state_dict()
    table = {"diffusers": {k: list(v.shape) for k, v in hub_sd.items()},
             "original": {k: list(v.shape) for k, v in orig_sd.items()},
             "diffusers_params": sum(v.numel() for v in hub_sd.values()),
             "original_params": sum(v.numel() for v in orig_sd.values())}
    # checkpoints.md §9.4 and §12.1
    assert (len(table["diffusers"]), table["diffusers_params"]) == (538, 749_826_464), table["diffusers_params"]
    assert (len(table["original"]), table["original_params"]) == (292, 675_129_632), table["original_params"]
    return table


def versions() -> dict:
    import diffusers
    import huggingface_hub
    import safetensors

    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"diffusers": diffusers.__version__, "transformers": transformers_version, "torch": torch.__version__,
            "numpy": np.__version__, "safetensors": safetensors.__version__,
            "huggingface_hub": huggingface_hub.__version__, "python": sys.version.split()[0]}


def main() -> None:
    import shutil

    from safetensors.torch import save_file

    diffusers = _quiet_diffusers()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)

    # -- the tiny model in the Hub layout, three ways
    hub_model = diffusers.DiTTransformer2DModel(**TINY).eval()
    randomise(hub_model, SEED)
    write_repo(FIXTURES / "sharded", hub_model, safe_serialization=True, max_shard_size=SHARD_SIZE)
    write_repo(FIXTURES / "single", hub_model, safe_serialization=True)
    write_repo(FIXTURES / "bin", hub_model, safe_serialization=False)
    assert len(list((FIXTURES / "sharded" / "transformer").glob("*.safetensors"))) > 1, "not sharded"
    hub_sd = {k: v.clone() for k, v in hub_model.state_dict().items()}

    # -- the original layout: one embedder shared by all blocks (block 0's), plus the fixed pos_embed table
    num_layers, dim = TINY["num_layers"], TINY["num_attention_heads"] * TINY["attention_head_dim"]
    grid = TINY["sample_size"] // TINY["patch_size"]
    tied = dict(hub_sd)
    for k in hub_sd:
        if ".norm1.emb." in k:
            tied[k] = hub_sd["transformer_blocks.0." + k.split(".", 2)[2]]
    pos_embed = torch.from_numpy(original_pos_embed(dim, grid)).float().unsqueeze(0)  # (1, L, D)
    original_sd = hub_to_original(tied, num_layers, pos_embed)
    ORIGINAL_PT.parent.mkdir(parents=True)
    torch.save(original_sd, ORIGINAL_PT)
    converted = original_to_diffusers(original_sd, num_layers)
    assert converted.keys() == tied.keys() and all(torch.equal(converted[k], tied[k]) for k in tied)
    port = load_original(original_sd)

    # -- transformer outputs
    x, t, y = forward_inputs()
    reloaded = diffusers_dit(FIXTURES / "single" / "transformer")
    ref = {"dit/x": x, "dit/t": t, "dit/y": y,
           "dit/hub_out": diffusers_forward(reloaded, x, t, y),
           "dit/hub_out_original_numerics": diffusers_forward(
               diffusers_dit(FIXTURES / "single" / "transformer", numerics="original"), x, t, y)}
    assert torch.equal(ref["dit/hub_out"], diffusers_forward(hub_model, x, t, y))
    with torch.no_grad():
        ref["dit/original_out"] = port(x, t, y)
    # the port and the patched diffusers model must agree on the same (tied) weights, and the port with
    # diffusers' numerics must too: this validates the port before its outputs become expectations
    patched = diffusers_forward(diffusers_dit(state_dict=tied, numerics="original"), x, t, y)
    assert max_scaled_error(ref["dit/original_out"], patched) < 1e-5, max_scaled_error(ref["dit/original_out"], patched)
    assert max_scaled_error(ref["dit/hub_out"], ref["dit/hub_out_original_numerics"]) > 1e-4, "numerics must differ"

    # -- the LayerNorm-eps case: each of the three eps (adaLN 1e-6, FFN norm_eps, final 1e-6) must matter
    small = diffusers.DiTTransformer2DModel(**TINY).eval()
    small.load_state_dict(small_variance_weights(hub_sd), strict=True)
    write_repo(FIXTURES / "small-variance", small, safe_serialization=True)
    small_x = small_variance_sample(small, len(FORWARD_T))
    assert residual_std(small, small_x) < 2 * SMALL_STD, residual_std(small, small_x)
    small_reloaded = diffusers_dit(FIXTURES / "small-variance" / "transformer")
    ref["dit/small_variance/x"] = small_x
    ref["dit/small_variance/out"] = diffusers_forward(small_reloaded, small_x, t, y)
    ref["dit/small_variance/out_original_numerics"] = diffusers_forward(
        diffusers_dit(FIXTURES / "small-variance" / "transformer", numerics="original"), small_x, t, y)
    layer_norms = {"adaLN": lambda m: [b.norm1.norm for b in m.transformer_blocks],
                   "FFN": lambda m: [b.norm3 for b in m.transformer_blocks], "final": lambda m: [m.norm_out]}
    for name, modules in layer_norms.items():
        mutated = diffusers_dit(FIXTURES / "small-variance" / "transformer")
        for module in modules(mutated):
            module.eps = 1e-5 if module.eps == 1e-6 else 1e-6
        moved = max_scaled_error(diffusers_forward(mutated, small_x, t, y), ref["dit/small_variance/out"])
        print(f"small-variance case: the {name} LayerNorm eps swapped (1e-6 <-> 1e-5) moves the output by {moved:.3g}")
        assert moved > 1e-3, (name, moved)

    # -- the end-to-end pipeline: diffusers' DiTPipeline, and the original's CFG loop on the port
    ref["pipeline/noise"] = pipeline_noise(len(PIPELINE_LABELS), PIPELINE_SEED)
    ref["pipeline/labels"] = torch.tensor(PIPELINE_LABELS)
    for name, guidance in (("guided", PIPELINE_GUIDANCE), ("unguided", 1.0)):
        ref[f"pipeline/{name}"] = diffusers_pipeline_latents(reloaded, SCHEDULER_CONFIG, PIPELINE_LABELS,
                                                             PIPELINE_STEPS, guidance, PIPELINE_SEED)
    for steps in (1, PIPELINE_STEPS):
        ref[f"pipeline/original_steps{steps}"] = original_pipeline_latents(
            port, SCHEDULER_CONFIG, PIPELINE_LABELS, steps, PIPELINE_GUIDANCE, PIPELINE_SEED)

    # -- DDIM
    model_output, sample = ddim_inputs()
    ref["ddim/model_output"], ref["ddim/sample"] = model_output, sample
    for case, config in DDIM_CASES.items():
        for steps in DDIM_STEPS:
            out = ddim_reference(config, steps, model_output, sample)
            if steps == DDIM_STEPS[0]:
                ref[f"ddim/{case}/alphas_cumprod"] = out["alphas_cumprod"]
                ref[f"ddim/{case}/final_alpha_cumprod"] = out["final_alpha_cumprod"]
            for key in ("timesteps", "prev_first", "prev_last"):
                ref[f"ddim/{case}/N{steps}/{key}"] = out[key]

    # one metadata entry: safetensors writes several in hash order, which would make the file non-deterministic
    metadata = {"ddim_cases": DDIM_CASES, "ddim_steps": DDIM_STEPS, "tiny": TINY,
                "pipeline": {"labels": PIPELINE_LABELS, "steps": PIPELINE_STEPS, "guidance": PIPELINE_GUIDANCE,
                             "seed": PIPELINE_SEED}}
    save_file({k: v.contiguous() for k, v in sorted(ref.items())}, REFERENCE,
              metadata={"reference": json.dumps(metadata, sort_keys=True)})

    # -- full-size: real config files (byte-exact sizes from checkpoints.md §9) and key tables
    xl = FIXTURES / "hub-xl2-256"
    (xl / "transformer").mkdir(parents=True)
    (xl / "scheduler").mkdir(parents=True)
    (xl / "transformer" / "config.json").write_text(config_json(hub_transformer_config(XL2_256)))
    (xl / "scheduler" / "scheduler_config.json").write_text(config_json(SCHEDULER_CONFIG))
    assert (xl / "transformer" / "config.json").stat().st_size == 602
    assert (xl / "scheduler" / "scheduler_config.json").stat().st_size == 310
    (FIXTURES / "xl2_keys.json").write_text(json.dumps(xl2_key_tables(), indent=1) + "\n")

    (FIXTURES / "VERSIONS.json").write_text(json.dumps(versions(), indent=2) + "\n")
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    print(f"wrote {FIXTURES} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
