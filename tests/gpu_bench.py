"""The GPU bench: what the recorder costs at the real models' full width, on random weights (no download).

    python tests/gpu_bench.py --device cuda            # PixArt-α, FLUX.1-dev and Mochi-1 at full size, bf16
    python tests/gpu_bench.py --device cpu --reduced   # the same code at a few layers and tokens, float32: seconds

Each backbone is built from its official config on the meta device, cast, materialised on the device
(`to_empty`) and filled with seeded random weights, then driven directly for a few Euler steps on random
latents and random text states of the real shapes (no text encoder, no VAE, no scheduler). Per model it prints:
- the recorder's overhead: the steps with a Recorder attached ÷ without (and with `prev_on_host`), the
  contenders alternated and each one's best of `repeats` kept, the clock read after a device synchronisation;
- peak accelerator memory without and with the recorder, against one step's K, V and A computed from the
  shapes and the recorder's own `held_bytes` (and what minidit/analysis/memory.py predicts it to be);
- host synchronisations per step, counted with `torch.cuda.set_sync_debug_mode("warn")` (it flags the
  operations PyTorch knows to synchronise: reads of a device value, pageable copies, ...): plain stepping,
  with the recorder and with `prev_on_host`; `finish()` and its one copy to the host are left out;
- one forward against diffusers' on the same weight tensors, where diffusers is installed.
Printed, never asserted; tests/test_gpu_bench.py runs it reduced on the CPU.

Models and sizes. PixArt-α 1024 (28 layers, latent 128 x 128 = 4096 tokens, 120 T5 tokens, batch 2 for guidance),
FLUX.1-dev (57 layers, latent 128 x 128 packed 2 x 2 to 4096 tokens, 512 T5 tokens, batch 1: guidance is
distilled), and Mochi-1-preview at its default length, 19 frames at 480 x 848 (4 latent frames of 60 x 106, 6360
tokens, 256 T5 tokens, batch 2), the largest video model that fits on an 80 GB accelerator with the recorder's
previous K, V and A on it. From memory.py's table (bf16, default lengths; `python -m minidit.analysis.memory`):

    model (default length)          parameters   weights   previous K, V, A   sum
    Latte-1 (16 x 512 x 512)           1.06 B     2.1 GB       12.8 GB       14.9 GB
    Open-Sora 1.2 (51 x 240 x 426)     1.21 B     2.4 GB        4.8 GB        7.2 GB
    CogVideoX-5b (49 x 480 x 720)      5.57 B    11.1 GB       28.0 GB       39.1 GB
    Mochi-1 (19 x 480 x 848)          10.03 B    20.1 GB       11.8 GB       31.9 GB

All four fit in 80 GB, so the one with the most parameters, Mochi-1, is the one (`video_choice()` computes this,
with a margin of 4 GB for activations: Mochi's largest, the SwiGLU's 2 x 8192-wide input for 2 x 6360 tokens, is
0.4 GB in bf16, and attention is fused, nothing L x L is stored); diffusers' copy shares the weight tensors.

Run time on one data-centre GPU, from the FLOPs of one forward (torch.utils.flop_counter on the meta device: the
matmuls and attention, 2 FLOPs per multiply-add; FLUX's 3.2 B modulation parameters act once per sample, not per
token), at 40% of the dense bf16 peak (minidit/analysis/flops.py's MFU): 396 TFLOP/s on an H100, 125 on an A100:

    PixArt-α   batch 2 x 4096 tokens           13.0 TFLOP  ->  0.033 s (H100), 0.10 s (A100)
    FLUX.1-dev batch 1 x (4096 + 512) tokens   74.4 TFLOP  ->  0.19 s, 0.60 s
    Mochi-1    batch 2 x (6360 + 256) tokens  191.8 TFLOP  ->  0.48 s, 1.53 s

With `steps` 4 and `repeats` 3 a model runs 3 x 4 warm-up (peak memory) steps, 3 x 3 x 4 timed steps, 3 x 4
counted steps and 8 forwards against diffusers: 68 forwards, 2.2 + 12.6 + 32.6 = 47 s on an H100 and
7.1 + 40.5 + 104 = 152 s on an A100. Add about 30 s for the CUDA context, importing diffusers, building and filling
22 B parameters and pinning Mochi's 11.6 GB of host buffers for `prev_on_host` once (the caching host allocator
reuses them); that mode's copies, 11.6 GB each way a step at about 20 GB/s over PCIe 4, overlap the step's
1.53 s of compute. About 1.5 minutes on an H100 and 3 on an A100: within the 8 allowed.
"""

import argparse
import contextlib
import gc
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's minidit, as tests/bench.py does

from minidit.analysis import memory  # noqa: E402
from minidit.analysis.recorder import Recorder  # noqa: E402
from minidit.models.flux import PRESETS as FLUX_PRESETS  # noqa: E402
from minidit.models.flux import FluxTransformer  # noqa: E402
from minidit.models.mochi import PRESETS as MOCHI_PRESETS  # noqa: E402
from minidit.models.mochi import MochiTransformer  # noqa: E402
from minidit.models.pixart import PRESETS as PIXART_PRESETS  # noqa: E402
from minidit.models.pixart import PixArt  # noqa: E402
from minidit.pipelines.flux import image_ids  # noqa: E402

VIDEO_MODELS = ("latte", "opensora", "cogvideox-2b", "cogvideox-5b", "mochi")  # memory.SETTINGS' names
ACCELERATOR_BYTES = 80e9
ACTIVATION_MARGIN = 4e9  # bytes left for one step's activations beside the weights and the previous K, V, A
WEIGHT_STD = 0.02  # random weights: N(0, 0.02) matrices, zero biases, unit norm scales: activations stay O(1)
GUIDANCE = 4.5  # classifier-free guidance of the batch-2 models (PixArt's and Mochi's pipeline default)
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance input (FluxPipeline's default)
GB = 1e9


# ---- the models as the bench drives them --------------------------------------------------------------------

class PixArtBench:
    """PixArt-α 1024: latents (B, 4, 128, 128), 120 T5 tokens (some padded), micro-conditions 1024 x 1024."""

    name, diffusers_class, branches = "pixart", "PixArtTransformer2DModel", ("uncond", "cond")

    def __init__(self, reduced: bool):
        cfg = PIXART_PRESETS["PixArt-XL-2-1024-MS"]
        # reduced: 2 layers, 2 heads of 72, a 64 x 64 latent (1024 tokens: captures of 1.2 MB, the recorder's large
        # path, as at full size), 8 text tokens
        self.cfg = replace(cfg, num_layers=2, num_attention_heads=2, sample_size=64) if reduced else cfg
        self.text_tokens, self.valid_tokens = (8, 5) if reduced else (120, 40)
        self.title = "PixArt-α 1024² (PixArt-XL-2-1024-MS)"

    def backbone(self) -> nn.Module:
        return PixArt(self.cfg)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.in_channels, self.cfg.sample_size, self.cfg.sample_size)

    def conditioning(self, g: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
        batch, side = len(self.branches), 8 * self.cfg.sample_size
        mask = (torch.arange(self.text_tokens, device=device) < self.valid_tokens).long().expand(batch, -1)
        return {"text": text_states(batch, self.text_tokens, self.cfg.caption_channels, g, device, dtype),
                "mask": mask, "resolution": torch.tensor([[side, side]] * batch, dtype=dtype, device=device),
                "aspect_ratio": torch.ones(batch, 1, dtype=dtype, device=device)}

    def ours(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), 999 * sigma, device=x.device)
        out = model(x, t, c["text"], c["mask"], c["resolution"], c["aspect_ratio"])
        return out[:, :self.cfg.in_channels]  # epsilon; the learned variance is unused at inference

    def theirs(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), 999 * sigma, device=x.device)
        micro = {"resolution": c["resolution"], "aspect_ratio": c["aspect_ratio"]}
        out = model(x, encoder_hidden_states=c["text"], timestep=t, added_cond_kwargs=micro,
                    encoder_attention_mask=c["mask"], return_dict=False)[0]
        return out[:, :self.cfg.in_channels]

    def diffusers_config(self) -> dict:
        return {**config_dict(self.cfg), "cross_attention_dim": self.cfg.hidden_size}

    def setting(self, params: int) -> memory.Setting:
        tokens = (self.cfg.sample_size // self.cfg.patch_size) ** 2
        return memory.Setting(self.name, "", params, self.cfg.num_layers, self.cfg.hidden_size, {"img": tokens},
                              len(self.branches))


class FluxBench:
    """FLUX.1-dev at 1024²: latents (B, 16, 128, 128) packed 2 x 2 to (B, 4096, 64), 512 T5 tokens, one branch."""

    name, diffusers_class, branches = "flux", "FluxTransformer2DModel", ("cond",)

    def __init__(self, reduced: bool):
        cfg = FLUX_PRESETS["FLUX.1-dev"]
        # reduced: 1 double- and 1 single-stream block, 2 heads of 128 (RoPE's 16 + 56 + 56), a 32 x 32 latent
        # (256 tokens: the recorder's grouped path), 8 text tokens
        self.cfg = replace(cfg, num_layers=1, num_single_layers=1, num_attention_heads=2) if reduced else cfg
        self.side, self.text_tokens = (32, 8) if reduced else (128, 512)
        self.title = "FLUX.1-dev 1024²"

    def backbone(self) -> nn.Module:
        return FluxTransformer(self.cfg)

    def latent_shape(self) -> tuple[int, ...]:
        return ((self.side // 2) ** 2, self.cfg.in_channels)  # packed tokens

    def conditioning(self, g: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
        batch = len(self.branches)
        return {"text": text_states(batch, self.text_tokens, self.cfg.joint_attention_dim, g, device, dtype),
                "pooled": torch.randn(batch, self.cfg.pooled_projection_dim, generator=g, device=device).to(dtype),
                "img_ids": image_ids(self.side, self.side).to(device, dtype),
                "txt_ids": torch.zeros(self.text_tokens, 3, device=device, dtype=dtype),
                "guidance": torch.full((batch,), FLUX_GUIDANCE, device=device)}

    def ours(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), sigma, device=x.device)
        return model(x, t, c["text"], c["pooled"], c["img_ids"], c["txt_ids"], c["guidance"])

    def theirs(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), sigma, device=x.device)
        return model(x, encoder_hidden_states=c["text"], pooled_projections=c["pooled"], timestep=t,
                     img_ids=c["img_ids"], txt_ids=c["txt_ids"], guidance=c["guidance"], return_dict=False)[0]

    def diffusers_config(self) -> dict:
        return config_dict(self.cfg)

    def setting(self, params: int) -> memory.Setting:
        tokens = {"img": (self.side // 2) ** 2, "txt": self.text_tokens}
        layers = self.cfg.num_layers + self.cfg.num_single_layers
        return memory.Setting(self.name, "", params, layers, self.cfg.hidden_size, tokens, len(self.branches))


class MochiBench:
    """Mochi-1-preview at 19 frames of 480 x 848: latents (B, 12, 4, 60, 106), 256 T5 tokens (some padded)."""

    name, diffusers_class, branches = "mochi", "MochiTransformer3DModel", ("uncond", "cond")

    def __init__(self, reduced: bool):
        cfg = MOCHI_PRESETS["mochi-1-preview"]
        # reduced: 2 blocks (the last one has no text output, as at full size), 2 heads of 128, a text stream of 96,
        # 2 latent frames of 16 x 16 (128 tokens: every capture takes the recorder's grouped path), 8 text tokens
        self.cfg = replace(cfg, num_layers=2, num_attention_heads=2, pooled_projection_dim=96) if reduced else cfg
        self.frames, self.height, self.width = (2, 16, 16) if reduced else (4, 60, 106)  # latent (F - 1) / 6 + 1, H / 8
        self.text_tokens, self.valid_tokens = (8, 5) if reduced else (256, 40)
        self.title = "Mochi-1-preview, 19 frames at 480 x 848"

    def backbone(self) -> nn.Module:
        return MochiTransformer(self.cfg)

    def latent_shape(self) -> tuple[int, ...]:
        return (self.cfg.in_channels, self.frames, self.height, self.width)

    def conditioning(self, g: torch.Generator, device: torch.device, dtype: torch.dtype) -> dict:
        batch = len(self.branches)
        mask = (torch.arange(self.text_tokens, device=device) < self.valid_tokens).long().expand(batch, -1)
        return {"text": text_states(batch, self.text_tokens, self.cfg.text_embed_dim, g, device, dtype), "mask": mask}

    def ours(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), 1000 * (1 - sigma), dtype=x.dtype, device=x.device)  # NOTE(official): 0 at noise
        return model(x, c["text"], t, c["mask"])

    def theirs(self, model: nn.Module, x: torch.Tensor, sigma: float, c: dict) -> torch.Tensor:
        t = torch.full((len(x),), 1000 * (1 - sigma), dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():  # MochiRoPE's float32 autocast region warns on the CPU
            warnings.simplefilter("ignore", UserWarning)
            return model(x, c["text"], t, c["mask"], return_dict=False)[0]

    def diffusers_config(self) -> dict:
        return config_dict(self.cfg)

    def setting(self, params: int) -> memory.Setting:
        tokens = {"img": self.frames * (self.height // 2) * (self.width // 2), "txt": self.text_tokens}
        return memory.Setting(self.name, "", params, self.cfg.num_layers, self.cfg.hidden_size, tokens,
                              len(self.branches), text_in_last=False, text_width=self.cfg.pooled_projection_dim)


BENCHES = {"pixart": PixArtBench, "flux": FluxBench, "mochi": MochiBench}


def video_choice(budget: float = ACCELERATOR_BYTES, itemsize: int = 2) -> str:
    """The video model with the most parameters whose weights, previous K, V and A (on the accelerator) and
    ACTIVATION_MARGIN fit in `budget` bytes at its default length (memory.py's first setting of each model)."""
    fitting = {}
    for s in memory.SETTINGS:
        if s.model in VIDEO_MODELS and s.model not in fitting:
            held, _ = memory.held_bytes(s.captures(), s.branches, itemsize)
            if s.params * itemsize + held + ACTIVATION_MARGIN <= budget:
                fitting[s.model] = s.params
    return max(fitting, key=fitting.get)


def text_states(batch: int, tokens: int, width: int, g: torch.Generator, device, dtype) -> torch.Tensor:
    """Random stand-ins for T5 states (B, Lt, width), standard normal."""
    return torch.randn(batch, tokens, width, generator=g, device=device).to(dtype)


def config_dict(cfg) -> dict:
    """A minidit config as the Hub's config.json keys: the dataclass fields are named after them."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


# ---- building ---------------------------------------------------------------------------------------------------

def build(bench, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
          seed: int = 0) -> nn.Module:
    """The backbone on the meta device, cast to `dtype`; for another device materialised there (`to_empty`) and
    filled with seeded random weights."""
    with torch.device("meta"):
        model = bench.backbone().to(dtype).eval()
    assert not list(model.buffers()), "a buffer would lose its computed values in to_empty"
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # the scales of the RMS norms
                p.fill_(1.0)
            else:
                p.normal_(0.0, WEIGHT_STD, generator=g)
    return model


def diffusers_twin(bench, model: nn.Module) -> nn.Module | str:
    """diffusers' class of the model holding the very same weight tensors (minidit's state-dict keys are
    diffusers'), or why there is none. Built as diffusers' from_pretrained does: parameters on the meta device,
    buffers (PixArt's position table) computed."""
    try:
        import diffusers
        from accelerate import init_empty_weights
    except ImportError as e:
        return f"{e.name} not installed"
    diffusers.utils.logging.set_verbosity_error()
    with init_empty_weights():
        twin = getattr(diffusers, bench.diffusers_class)(**bench.diffusers_config())
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    param = next(model.parameters())
    return twin.to(param.device, param.dtype).eval()


# ---- stepping ---------------------------------------------------------------------------------------------------

def denoise(bench, model: nn.Module, x: torch.Tensor, cond: dict, steps: int) -> torch.Tensor:
    """`steps` Euler steps of x (one sample's latents, float32) from sigma 1 towards 0, guided when the batch has
    two branches: every step sees new latents and a new timestep, as in sampling."""
    sigmas = [1 - i / steps for i in range(steps + 1)]  # Python floats: nothing read back from the device
    dtype = next(model.parameters()).dtype
    for sigma, following in zip(sigmas, sigmas[1:]):
        out = bench.ours(model, torch.cat([x] * len(bench.branches)).to(dtype), sigma, cond).float()
        v = out[:1] + GUIDANCE * (out[1:] - out[:1]) if len(bench.branches) == 2 else out  # [uncond; cond]
        x = x + (following - sigma) * v
    return x


@dataclass
class Run:
    """One way of stepping: plain, with a recorder, or with a recorder holding the previous step on the host."""

    mode: str  # "plain" | "recorded" | "prev-on-host"
    held_bytes: int = 0
    host_bytes: int = 0
    peak: int | None = None  # bytes, CUDA only
    syncs: float | None = None  # per step, CUDA only


def step_loop(bench, model, x, cond, steps: int, mode: str, count_syncs: bool = False) -> Run:
    """Step `steps` times in `mode`; with `count_syncs`, count the synchronisations PyTorch flags meanwhile (the
    recorder's finish() excluded)."""
    run = Run(mode)
    recorder = None
    if mode != "plain":
        recorder = Recorder(model.attention_layers(), branches=bench.branches, num_steps=steps, device=x.device,
                            prev_on_host=mode == "prev-on-host")
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.enter_context(recorder.attach(model))
        if count_syncs:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        denoise(bench, model, x, cond, steps)
    if count_syncs:
        run.syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
    if recorder is not None:
        recorder.finish()
        run.held_bytes, run.host_bytes = recorder.held_bytes, recorder.host_bytes
    return run


def best_of(repeats: int, fns: list[Callable[[], object]], sync: Callable[[], None]) -> list[float]:
    """Best wall time of each fn, alternating them repeat by repeat (tests/bench.py's best_of), the clock read
    after `sync` so that the device's queued work is counted."""
    times = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i] = min(times[i], time.perf_counter() - start)
    return times


# ---- the bench --------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What the bench found for one model (sizes in bytes, times in seconds)."""

    title: str
    layers: int
    params: int
    kva_bytes: int  # one step's K, V and A, computed from the shapes
    predicted: tuple[int, int]  # memory.py's (held_bytes, host_bytes) for the recorder, on the device
    predicted_on_host: tuple[int, int]  # the same with prev_on_host
    runs: dict[str, Run]
    times: dict[str, float]
    diffusers: tuple[float, float, float] | str  # (minidit s, diffusers s, max |diff| / max |out|), or why not
    lines: list[str] = field(default_factory=list)


def measure(bench, device: torch.device, dtype: torch.dtype, steps: int, repeats: int) -> Result:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    model = build(bench, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator(device).manual_seed(1)
    x = torch.randn(1, *bench.latent_shape(), generator=g, device=device)
    cond = bench.conditioning(g, device, dtype)

    captures, itemsize, branches = bench.setting(params).captures(), dtype.itemsize, len(bench.branches)
    kva_bytes = sum(captures) * branches * itemsize
    predicted = memory.held_bytes(captures, branches, itemsize, cpu=not cuda)
    predicted_on_host = memory.held_bytes(captures, branches, itemsize, prev_on_host=True, cpu=not cuda)

    runs = {}
    for mode in ("plain", "recorded", "prev-on-host"):  # the warm-up, measuring each one's peak memory
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
        runs[mode] = step_loop(bench, model, x, cond, steps, mode)
        if cuda:
            runs[mode].peak = torch.cuda.max_memory_allocated(device)
    loops = [lambda m=mode: step_loop(bench, model, x, cond, steps, m) for mode in runs]
    times = dict(zip(runs, best_of(repeats, loops, sync)))
    if cuda:
        for mode in runs:
            runs[mode].syncs = step_loop(bench, model, x, cond, steps, mode, count_syncs=True).syncs

    twin = diffusers_twin(bench, model)
    if isinstance(twin, str):
        compared = twin
    else:
        batch = torch.cat([x] * branches).to(dtype)
        mine = bench.ours(model, batch, 0.5, cond).float()
        err = ((mine - bench.theirs(twin, batch, 0.5, cond).float()).abs().max() / mine.abs().max()).item()
        t_mine, t_theirs = best_of(repeats, [lambda: bench.ours(model, batch, 0.5, cond),
                                             lambda: bench.theirs(twin, batch, 0.5, cond)], sync)
        compared = (t_mine, t_theirs, err)
        del twin
    result = Result(bench.title, len(model.attention_layers()), params, kva_bytes, predicted, predicted_on_host, runs,
                    times, compared)
    result.lines = report(bench, result, device, dtype, steps, repeats)
    return result


def size(n: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{n / GB:{sign}.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:{sign}.2f} MB"


def report(bench, r: Result, device: torch.device, dtype: torch.dtype, steps: int, repeats: int) -> list[str]:
    """The lines printed for one model."""
    tokens = " + ".join(f"{n} {stream}" for stream, n in bench.setting(r.params).tokens.items())
    params = f"{r.params / 1e9:.2f} B" if r.params >= 1e9 else f"{r.params / 1e6:.1f} M"
    plain, rec, host = (r.runs[m] for m in ("plain", "recorded", "prev-on-host"))
    t = r.times
    lines = [f"{r.title}: {r.layers} layers, {params} parameters, batch "
             f"{len(bench.branches)} x ({tokens}) tokens, {str(dtype).removeprefix('torch.')} on {device}, "
             f"{steps} steps, best of {repeats}",
             f"  recorder overhead: recorded / plain {t['recorded'] / t['plain']:.3f} x, --prev-on-host / plain "
             f"{t['prev-on-host'] / t['plain']:.3f} x (plain {t['plain']:.3f} s, recorded {t['recorded']:.3f} s, "
             f"--prev-on-host {t['prev-on-host']:.3f} s)"]
    if device.type == "cuda":
        peaks = (f"plain {size(plain.peak)}, recorded {size(rec.peak)} ({size(rec.peak - plain.peak, True)}), "
                 f"--prev-on-host {size(host.peak)} ({size(host.peak - plain.peak, True)})")
    else:
        peaks = "n/a (CUDA only)"
    lines.append(f"  peak memory: {peaks}; one step's K/V/A {size(r.kva_bytes)} (computed from the shapes), "
                 f"recorder held_bytes {size(rec.held_bytes)} (memory.py: {size(r.predicted[0])}); "
                 f"--prev-on-host held_bytes {size(host.held_bytes)}, host_bytes {size(host.host_bytes)} "
                 f"(memory.py: {size(r.predicted_on_host[0])}, {size(r.predicted_on_host[1])})")
    if device.type == "cuda":
        lines.append(f"  host syncs per step: plain {plain.syncs:.2f}, recorded {rec.syncs:.2f}, --prev-on-host "
                     f"{host.syncs:.2f} (set_sync_debug_mode; finish() excluded)")
    else:
        lines.append("  host syncs per step: n/a (CUDA only)")
    if isinstance(r.diffusers, str):
        lines.append(f"  forward vs diffusers: {r.diffusers}")
    else:
        mine, theirs, err = r.diffusers
        lines.append(f"  forward vs diffusers: minidit {mine * 1e3:.1f} ms, diffusers {theirs * 1e3:.1f} ms, ratio "
                     f"{mine / theirs:.3f} x (same weights; max |diff| / max |out| {err:.1e})")
    return lines


@torch.no_grad()
def run(device: str = "cuda", reduced: bool = False, steps: int = 4, repeats: int = 3,
        models: tuple[str, ...] = tuple(BENCHES)) -> dict[str, Result]:
    """Bench each model in turn (freeing the previous one first) and print its lines as they come."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: `--device cpu --reduced` runs the bench's code at a few layers and "
                         "tokens on the CPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = {}
    for name in models:
        bench = BENCHES[name](reduced)
        bench.title += ", reduced" if reduced else ""
        results[name] = measure(bench, device, dtype, steps, repeats)
        print("\n".join(results[name].lines), flush=True)
        gc.collect()  # the model and its twin, before the next model is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> dict[str, Result]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    p.add_argument("--reduced", action="store_true", help="a few layers, heads and tokens: the CPU test's size")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per run (at least 2; default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, the best kept (default 3)")
    p.add_argument("--models", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    args = p.parse_args(argv)
    return run(args.device, args.reduced, args.steps, args.repeats, tuple(args.models))


if __name__ == "__main__":
    main()
