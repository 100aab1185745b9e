"""The image VAE decoder of diffusers' AutoencoderKL: latents -> RGB, for DiT-XL/2, PixArt-α, SD3 and FLUX.1.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", https://arxiv.org/abs/2112.10752.
Official code: CompVis/latent-diffusion `ldm/modules/diffusionmodules/model.py` (Decoder), and diffusers
`AutoencoderKL` (`models/autoencoders/vae.py`), whose key names this module's attributes carry.
Checkpoints: the `vae/` folder of each pipeline repo (checkpoints.md §2.4, §3.4, §4.4, §10):
- the SD VAE (`stabilityai/sd-vae-ft-ema`, `-mse`; the copies in `facebook/DiT-XL-2-*`, a `.bin` pickle, and
  `PixArt-alpha/*`, fp32 safetensors): 4 latent channels, z / 0.18215, with `post_quant_conv`;
- the SD3-medium (fp16) and FLUX.1 (16-bit) VAEs: 16 latent channels, z / scale + shift, no quant convs.

Quirks of the files, handled by the loader at the end:
- they hold the whole autoencoder; the encoder half (`ENCODER_KEYS`) is dropped before the strict load.
- files written before diffusers 0.15 or so (SD 1.x's VAE; likely also sd-vae-ft-* and DiT's `.bin`, unverified)
  name the mid-block attention `query, key, value, proj_attn`; diffusers renames them on load, and so does
  `LEGACY_ATTENTION` here.
- `force_upcast` is not applied: the caller picks the dtype. Decode in fp32 (or bf16): the SD VAE can overflow
  in fp16, which is why diffusers upcasts.
- the mid-block attention is one head as wide as the channels, over all H*W latent positions. It calls
  `attention()` with no layer name, so the analysis never records it.

Shapes: latents (B, C_lat, H, W) -> images (B, 3, H * 2**(n-1), W * 2**(n-1)), n = len(block_out_channels);
D is the channel width of a block, L = H*W positions.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidit import weights
from minidit.attention import attention
from minidit.errors import MiniditError

EPS = 1e-6  # every GroupNorm of the decoder (resnets, attention, output)


@dataclass(frozen=True)
class VAEConfig:
    """`vae/config.json` of an AutoencoderKL; a key the file omits takes diffusers' class default."""

    block_out_channels: tuple[int, ...] = (64,)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    layers_per_block: int = 1  # the decoder's up blocks have one more resnet than this
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # None: no shift (the SD VAE)
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_hub(cls, config: dict) -> "VAEConfig":
        if config.get("act_fn", "silu") != "silu":
            raise MiniditError(f"VAE config has act_fn={config['act_fn']!r}; minidit's VAE supports only 'silu'")
        if any(t != "UpDecoderBlock2D" for t in config.get("up_block_types", cls.up_block_types)):
            raise MiniditError(f"VAE config has up_block_types={config['up_block_types']}; minidit's VAE supports "
                               f"only UpDecoderBlock2D")
        if config.get("latents_mean") is not None or config.get("latents_std") is not None:
            raise MiniditError("VAE config sets latents_mean/latents_std; minidit's VAE normalises latents with "
                               "scaling_factor and shift_factor only")
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        for name in ("block_out_channels", "up_block_types"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


# the shapes every full-size VAE here shares: 4 blocks, 8x upsampling, 2 (+1 in the decoder) resnets per block
FULL_SIZE = {"block_out_channels": (128, 256, 512, 512), "up_block_types": ("UpDecoderBlock2D",) * 4,
             "layers_per_block": 2}
PRESETS = {  # checkpoints.md §2.4, §3.4, §4.4, §10
    "stabilityai/sd-vae-ft-ema": VAEConfig(**FULL_SIZE),
    "stabilityai/stable-diffusion-3-medium-diffusers": VAEConfig(
        **FULL_SIZE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_post_quant_conv=False),
    "black-forest-labs/FLUX.1-dev": VAEConfig(
        **FULL_SIZE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_post_quant_conv=False),
}


class ResnetBlock2D(nn.Module):
    def __init__(self, d_in: int, d_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, d_in, eps=EPS)
        self.conv1 = nn.Conv2d(d_in, d_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, d_out, eps=EPS)
        self.conv2 = nn.Conv2d(d_out, d_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(d_in, d_out, 1) if d_in != d_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, GroupNorm before, residual after."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # checkpoint key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "B D H W -> B (H W) D")
        one_head = lambda t: rearrange(t, "B L D -> B 1 L D")  # noqa: E731  (Nh = 1, Dh = D)
        q, k, v = one_head(self.to_q(tokens)), one_head(self.to_k(tokens)), one_head(self.to_v(tokens))
        out = self.to_out[0](attention(q, k, v))  # (B, L, D); no layer name: never recorded
        return x + rearrange(out, "B (H W) D -> B D H W", H=h, W=w)


class MidBlock(nn.Module):
    def __init__(self, dim: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(dim, dim, groups), ResnetBlock2D(dim, dim, groups)])
        self.attentions = nn.ModuleList([Attention(dim, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsample2D(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, D, 2H, 2W)


class UpDecoderBlock2D(nn.Module):
    def __init__(self, d_in: int, d_out: int, num_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(d_in if i == 0 else d_out, d_out, groups)
                                      for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([Upsample2D(d_out)]) if upsample else None  # key: upsamplers.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(widths[max(i - 1, 0)], widths[i], cfg.layers_per_block + 1, groups,
                             upsample=i < len(widths) - 1)
            for i in range(len(cfg.up_block_types))])
        self.conv_norm_out = nn.GroupNorm(groups, cfg.block_out_channels[0], eps=EPS)
        self.conv_out = nn.Conv2d(cfg.block_out_channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, D, H, W)
        for block in self.up_blocks:
            x = block(x)  # (B, D', 2H, 2W) except after the last block
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H * 2**(n-1), W * 2**(n-1))


class AutoencoderKLDecoder(nn.Module):
    """The decoding half of AutoencoderKL: `post_quant_conv` (when the config has it) and `decoder`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        c = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Raw decoder, no latent normalisation (diffusers' `vae.decode(z).sample`): (B, C_lat, H, W) -> images."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the backbone's space (B, C_lat, H, W) -> images (B, 3, 8H, 8W) for the full-size VAEs.

        Undoes the latent normalisation first, as the pipelines do: z / scaling_factor (+ shift_factor when set).
        Images are nominally in [-1, 1] and not clamped; `to_uint8` clamps.
        NOTE(official): DiTPipeline multiplies by 1 / scaling_factor instead of dividing (a 1-ulp difference).
        """
        z = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        return self(z.to(self.decoder.conv_in.weight.dtype))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), rounded as diffusers' image processor does."""
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    return (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


# ---- checkpoints -------------------------------------------------------------------------------------

# The encoder half of an AutoencoderKL file: present in every Hub `vae/` file, unused for decoding.
ENCODER_KEYS = ("encoder.", "quant_conv.")
# diffusers' deprecated attention-block names (renamed on load by ModelMixin._fix_state_dict_keys_on_load).
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def decoder_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole AutoencoderKL state dict -> the decoder's: encoder keys dropped, legacy attention names renamed."""
    out = {}
    for key, tensor in sd.items():
        if key.startswith(ENCODER_KEYS):
            continue
        parts = key.split(".")  # decoder.mid_block.attentions.{i}.<name>.{weight,bias}
        if key.startswith("decoder.mid_block.attentions.") and len(parts) == 6 and parts[4] in LEGACY_ATTENTION:
            parts[4] = LEGACY_ATTENTION[parts[4]]
        out[".".join(parts)] = tensor
    return out


def load_vae(folder: str | Path, *, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> AutoencoderKLDecoder:
    """Load the decoder from a Hub-layout `vae/` folder (config.json + safetensors, shards or a `.bin`)."""
    folder = Path(folder)
    cfg = VAEConfig.from_hub(weights.read_json(folder / "config.json"))
    sd = decoder_state_dict(weights.load_folder(folder, dtype))
    with torch.device("meta"):
        model = AutoencoderKLDecoder(cfg)
    weights.load_into(model, sd, dtype=dtype, device=device, source=str(folder))
    return model.eval()
