"""Reference fixtures for the Open-Sora 1.2 tests, computed with the official code of hpcaitech/Open-Sora at the tag
v1.2.0 (STDiT3, RFlow, the T5 wrapper) as the oracle.

Run by hand when the reference changes, with a clone of hpcaitech/Open-Sora that has the tag (a bare mirror is fine):

    OPENSORA_REPO=/path/to/Open-Sora python tests/reference/generate_opensora.py
    python tests/reference/generate_opensora.py --repo /path/to/Open-Sora

The official sources are exported from the tag (`git archive v1.2.0 opensora`) into a scratch folder and imported
from there, never installed. What cannot be installed on a CPU machine is replaced by stub modules put in
sys.modules before the import: colossalai and mmengine (the registry: a decorator that registers nothing),
xformers (its memory_efficient_attention and BlockDiagonalMask, written out below: softmax(q k^T / sqrt(Dh) + mask) v
in fp32, the semantics xformers documents), opensora.utils.ckpt_utils (needs colossalai), opensora.datasets (needs
av and torchvision; only IMG_FPS is used, read from the exported source). timm 0.9.16 needs torchvision to import
(which cannot be installed beside the CPU torch here), so its own `timm/layers/mlp.py` and `drop.py` are imported
as files, bypassing timm's package __init__. Package __init__ files of opensora are bypassed the same way (they
import every model of the repository); the modules STDiT3, RFLOW and T5Encoder live in are run as they are.

Extras this needs beyond the `reference` extra (install them by hand, e.g. `pip install timm==0.9.16 --no-deps
rotary_embedding_torch==0.5.3 ftfy beautifulsoup4 accelerate`): timm==0.9.16 (--no-deps), rotary_embedding_torch==
0.5.3 (its RotaryEmbedding is STDiT3's RoPE; beartype comes with it), ftfy and beautifulsoup4 (the T5 wrapper's
caption cleaning), accelerate (the T5 wrapper loads with a device_map). Versions of v1.2.0's requirements.txt where it
pins them.

It writes, under tests/fixtures/opensora/ (the run is deterministic):

    OpenSora-STDiT-v3/     the Hub folder hpcai-tech/OpenSora-STDiT-v3 (checkpoints.md §7.1), tiny: config.json with
                           the Hub file's keys (688 bytes at full size, checked) and tiny values, model.safetensors in
                           the official key names (fp32, rope.freqs and the y_embedder.y_embedding buffer included).
                           The real depth (28 spatial + 28 temporal blocks) at width 16 (2 heads of 8), caption
                           channels 32 (the tiny T5 fixture's width), model_max_length 24 (so that the aesthetic-score
                           suffix, 16 tokens of the tiny tokenizer, fits with a short prompt). Every weight is redrawn
                           (std WEIGHT_STD), the zero-initialised ones too; the q and k rows of every qkv projection
                           are scaled down (QK_SCALE) so that the RMS QK-norm sees inputs whose mean square is near its
                           eps, and a wrong eps shows.
    reference.safetensors  model/<case>/...: inputs (x, t, y (B, 1, L, C), mask, fps, height, width) and STDiT3's
                           output for each MODEL_CASES entry (captions of different lengths: the packed block-diagonal
                           cross-attention);
                           captures/<layer>/<K|V|A>: K and V entering the attention product and A (the layer's output
                           after `proj`) for every block of the capture case ("frames-3"): spatial and temporal
                           self-attention K, V (B', Nh, L, Dh) after QK-norm and (temporal) RoPE, A (B', L, D) in
                           the fold the attention runs in ((B T) S and (B S) T); cross-attention K, V packed as the
                           official code runs them (Nh, sum of valid text lengths, Dh), A (B, T S, D);
                           rflow/<case>/timesteps: RFLOW.sample's timesteps after the transform, for RFLOW_CASES;
                           sample/...: one whole RFLOW.sample (see SAMPLE_*): the noise z, the prompts' T5 states
                           and mask from the official T5Encoder on the tiny T5 fixture, the null caption, each step's
                           timestep and model output, and the final latents.
    sample.json            the sample run's settings: raw prompts, the prompts after the aesthetic-score suffix and
                           text_preprocessing (what T5 saw), steps, guidance, resolution, frames, fps, seed
    fullsize.json          the full-size STDiT3-XL/2 (§7.2 config) built by the official code on the meta device:
                           parameter count (parameters and buffers apart), key names and shapes
    VERSIONS.json          the tag, its commit, the files used, and the library versions
"""

import argparse
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import generator_tools as tools
import torch

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURES = ROOT / "opensora"
FOLDER = FIXTURES / "OpenSora-STDiT-v3"
REFERENCE = FIXTURES / "reference.safetensors"
T5_TINY = ROOT / "t5" / "tiny"

TAG = "v1.2.0"
TAG_COMMIT = "17cce908b22283acc3c946816c81f46dd442a453"
SOURCES = ("opensora/models/stdit/stdit3.py", "opensora/models/layers/blocks.py", "opensora/schedulers/rf/__init__.py",
           "opensora/schedulers/rf/rectified_flow.py", "opensora/models/text_encoder/t5.py",
           "opensora/utils/inference_utils.py", "scripts/inference.py", "configs/opensora-v1-2/inference/sample.py")

SEED = 20240617
WEIGHT_STD = 0.2
QK_SCALE = 5e-3  # the q and k rows of every qkv projection: q, k mean squares near the RMSNorm's eps (1e-6)

# checkpoints.md §7.2: config.json of hpcai-tech/OpenSora-STDiT-v3 (688 B, sorted keys, indent 2)
HUB_CONFIG = {
    "architectures": ["STDiT3"], "caption_channels": 4096, "class_dropout_prob": 0.1, "depth": 28, "drop_path": 0.0,
    "enable_flash_attn": False, "enable_layernorm_kernel": False, "enable_sequence_parallelism": False,
    "freeze_y_embedder": True, "hidden_size": 1152, "in_channels": 4, "input_size": [None, None, None],
    "input_sq_size": 512, "mlp_ratio": 4.0, "model_max_length": 300, "model_type": "STDiT3", "num_heads": 16,
    "only_train_temporal": False, "patch_size": [1, 2, 2], "pred_sigma": True, "qk_norm": True,
    "skip_y_embedder": False, "torch_dtype": "float32", "transformers_version": "4.36.2"}
HUB_SIZE = 688
TINY = {"hidden_size": 16, "num_heads": 2, "caption_channels": 32, "model_max_length": 24}
# the config keys the model class takes (the others are transformers' metadata)
MODEL_KEYS = ("input_size", "input_sq_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
              "mlp_ratio", "class_dropout_prob", "pred_sigma", "drop_path", "caption_channels", "model_max_length",
              "qk_norm", "enable_flash_attn", "enable_layernorm_kernel", "enable_sequence_parallelism",
              "only_train_temporal", "freeze_y_embedder", "skip_y_embedder")

# model cases: latent (T, H, W), timesteps, valid caption tokens per row (of 24), fps, (height, width) in pixels;
# the patch grids' base size round(sqrt(S)) differs from their height and width in two of them
MODEL_CASES = {
    "frames-3": ((3, 4, 8), (999.0, 312.5), (7, 24), (24.0, 24.0), (32.0, 48.0)),
    "frame-1-odd": ((1, 6, 5), (1.0, 640.25), (1, 13), (120.0, 8.0), (48.0, 40.0)),  # odd W: the patch embed pads
    "frames-5-hd": ((5, 2, 8), (500.0, 0.0), (24, 3), (24.0, 24.0), (720.0, 1280.0)),
}
CAPTURE_CASE = "frames-3"

# RFLOW.sample's timesteps after the transform: (steps, height, width, frames), model_args in float32 unless named
RFLOW_CASES = {
    "240p-9:16-51f-30": (30, 240, 426, 51),  # the v1.2.0 sample.py defaults
    "720p-16:9-102f-30": (30, 720, 1280, 102),
    "image-512-1f-10": (10, 512, 512, 1),
    "144p-17f-4": (4, 144, 256, 17),
    "480p-16f-8": (8, 480, 854, 16),  # 16 // 17 * 5 = 0 frames: every timestep transforms to 0
    "240p-9:16-51f-30-bf16": (30, 240, 426, 51),  # model_args in bf16, as scripts/inference.py with dtype bf16
}

# the sample run: scripts/inference.py's steps on the tiny model, in fp32 on the CPU
SAMPLE_PROMPTS = ("A fox", "A cat sitting on a wooden table next to a cup of coffee, morning light")
SAMPLE_AES = 6.5
SAMPLE_STEPS = 4
SAMPLE_GUIDANCE = 7.0
SAMPLE_FRAMES = 17  # pixel frames: 5 latent frames (micro_frame_size 17 -> 5)
SAMPLE_LATENT_FRAMES = 5
SAMPLE_SIZE = (64, 96)  # pixels (height, width); the latent is /8
SAMPLE_FPS = 24
SAMPLE_SEED = 42


# ---- the official code, exported and imported ------------------------------------------------------------------

def repo_path(argument: str | None) -> Path:
    path = argument or os.environ.get("OPENSORA_REPO")
    if not path:
        raise SystemExit("generate_opensora.py needs a clone of hpcaitech/Open-Sora with the tag v1.2.0: pass "
                         "--repo PATH or set OPENSORA_REPO=PATH (a bare mirror works too)")
    found = subprocess.run(["git", "-C", path, "rev-parse", f"{TAG}^{{commit}}"], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"{path} is not a git clone of hpcaitech/Open-Sora with the tag {TAG}: {found.stderr.strip()}")
    if found.stdout.strip() != TAG_COMMIT:
        raise SystemExit(f"{path}: {TAG} is {found.stdout.strip()}, expected {TAG_COMMIT}")
    return Path(path)


def export(repo: Path, scratch: Path) -> None:
    archive = subprocess.run(["git", "-C", str(repo), "archive", TAG, "opensora"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)


def _package(name: str, path: Path | None = None) -> types.ModuleType:
    """An empty package (its __init__ not run) whose submodules are found under `path`."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path is not None else []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = module
    return module


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


class _Registry:
    """mmengine's Registry, reduced to what the imported modules call at import time."""

    def register_module(self, name=None, **kwargs):
        return lambda obj: obj


class BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask: query block i attends to key block i only."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def materialize(self, device) -> torch.Tensor:
        mask = torch.full((sum(self.q_seqlen), sum(self.kv_seqlen)), float("-inf"), device=device)
        q0 = k0 = 0
        for nq, nk in zip(self.q_seqlen, self.kv_seqlen):
            mask[q0:q0 + nq, k0:k0 + nk] = 0
            q0, k0 = q0 + nq, k0 + nk
        return mask


CROSS_CALLS: list | None = None  # the cross-attention's (q, k, v) while captures are taken


def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None, scale=None):
    """xformers.ops.memory_efficient_attention, written out: q, k, v (B, L, Nh, Dh), softmax over the keys of
    q k^T / sqrt(Dh) plus the mask, in fp32; returns (B, Lq, Nh, Dh)."""
    assert p == 0.0
    if CROSS_CALLS is not None:
        CROSS_CALLS.append((q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, Nh, L, Dh)
    scores = (qh * scale) @ kh.transpose(-2, -1)
    if attn_bias is not None:
        scores = scores + attn_bias.materialize(q.device)
    return (scores.softmax(-1) @ vh).transpose(1, 2).contiguous().to(q.dtype)  # contiguous, as xformers returns


def install_stubs(scratch: Path) -> None:
    src = scratch / "opensora"
    import transformers  # loaded before the stubs exist: it probes for xformers and flash_attn as it loads

    assert transformers.PreTrainedModel and transformers.T5EncoderModel and transformers.AutoTokenizer
    xformers = _package("xformers")
    xformers.ops = _module("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    xformers.ops.fmha = _module("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
    sys.modules["xformers.ops.fmha"] = xformers.ops.fmha

    timm_dir = Path(importlib.util.find_spec("timm").origin).parent  # found, not imported
    _package("timm", timm_dir)
    _package("timm.layers", timm_dir / "layers")
    mlp, drop = importlib.import_module("timm.layers.mlp"), importlib.import_module("timm.layers.drop")
    _package("timm.models")
    _module("timm.models.layers", DropPath=drop.DropPath, Mlp=mlp.Mlp)
    _module("timm.models.vision_transformer", Mlp=mlp.Mlp)

    _package("opensora", src)
    for package in ("models", "models/stdit", "models/layers", "models/text_encoder", "schedulers",
                    "schedulers/iddpm", "utils", "acceleration"):
        _package("opensora." + package.replace("/", "."), src / package)
    _module("opensora.registry", MODELS=_Registry(), SCHEDULERS=_Registry(), DATASETS=_Registry())

    def load_checkpoint(*args, **kwargs):
        raise RuntimeError("the generator loads weights itself")

    _module("opensora.utils.ckpt_utils", load_checkpoint=load_checkpoint)
    img_fps = int(re.search(r"^IMG_FPS = (\d+)$", (src / "datasets" / "datasets.py").read_text(), re.M).group(1))
    _module("opensora.datasets", IMG_FPS=img_fps, __path__=[])
    _module("opensora.datasets.utils", read_from_path=load_checkpoint)


def official(scratch: Path) -> types.SimpleNamespace:
    install_stubs(scratch)
    imported = {name: importlib.import_module(f"opensora.{name}") for name in (
        "models.stdit.stdit3", "models.layers.blocks", "schedulers.rf", "schedulers.rf.rectified_flow",
        "models.text_encoder.t5", "utils.inference_utils")}
    return types.SimpleNamespace(stdit3=imported["models.stdit.stdit3"], blocks=imported["models.layers.blocks"],
                                 rf=imported["schedulers.rf"], rectified_flow=imported["schedulers.rf.rectified_flow"],
                                 t5=imported["models.text_encoder.t5"],
                                 inference_utils=imported["utils.inference_utils"])


# ---- the tiny model ---------------------------------------------------------------------------------------------

def hub_config(tiny: bool = True) -> dict:
    return {**HUB_CONFIG, **(TINY if tiny else {})}


def model_config(os_, tiny: bool = True):
    values = {k: v for k, v in hub_config(tiny).items() if k in MODEL_KEYS}
    values["input_size"], values["patch_size"] = tuple(values["input_size"]), tuple(values["patch_size"])
    return os_.stdit3.STDiT3Config(**values)


def build_model(os_):
    """The official STDiT3 from the tiny config, every weight redrawn; rope.freqs and the null caption kept."""
    torch.manual_seed(SEED)
    model = os_.stdit3.STDiT3(model_config(os_)).eval()
    dim = TINY["hidden_size"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "rope.freqs":  # fixed frequencies, stored as a parameter
                p.normal_(0, WEIGHT_STD)
            if name.endswith(".attn.qkv.weight") or name.endswith(".attn.qkv.bias"):
                p[: 2 * dim] *= QK_SCALE
    return model


def load_model(os_):
    """The official STDiT3 built from the written config.json, the written model.safetensors loaded strictly.
    NOTE: STDiT3.from_pretrained (the Hub path of STDiT3_XL_2) fails under transformers 5 (the class, written for
    4.36, never calls post_init), so the file is read with safetensors and load_state_dict(strict=True)."""
    from safetensors.torch import load_file

    config = json.loads((FOLDER / "config.json").read_text())
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in MODEL_KEYS}
    model = os_.stdit3.STDiT3(os_.stdit3.STDiT3Config(**values)).eval()
    model.load_state_dict(load_file(FOLDER / "model.safetensors"), strict=True)
    return model


def model_inputs(case: str) -> dict[str, torch.Tensor]:
    (T, H, W), timesteps, valid, fps, (height, width) = MODEL_CASES[case]
    generator = torch.Generator().manual_seed(SEED + 1 + list(MODEL_CASES).index(case))
    L, C = TINY["model_max_length"], TINY["caption_channels"]
    return {"x": torch.randn(2, 4, T, H, W, generator=generator), "t": torch.tensor(timesteps),
            "y": torch.randn(2, 1, L, C, generator=generator),
            "mask": torch.stack([(torch.arange(L) < n).long() for n in valid]),
            "fps": torch.tensor(fps), "height": torch.tensor([height] * 2), "width": torch.tensor([width] * 2)}


@torch.no_grad()
def reference_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], inputs["t"], inputs["y"], mask=inputs["mask"], fps=inputs["fps"],
                 height=inputs["height"], width=inputs["width"])


class _MatmulWatch(torch.overrides.TorchFunctionMode):
    """The operands of every matmul inside the official Attention.forward: q @ k^T, then attn @ v."""

    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in ("__matmul__", "matmul"):
            self.operands.append(args[1])
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def reference_captures(os_, model, inputs) -> dict[str, torch.Tensor]:
    global CROSS_CALLS
    store: dict[str, torch.Tensor] = {}
    originals = {}

    def self_attention(name, module):
        original = module.forward

        def watched(x):
            with _MatmulWatch() as watch:
                out = original(x)
            assert len(watch.operands) == 2, (name, len(watch.operands), [tuple(o.shape) for o in watch.operands])
            store[f"{name}/K"] = watch.operands[0].transpose(-2, -1).contiguous()  # after QK-norm and RoPE
            store[f"{name}/V"] = watch.operands[1].contiguous()
            store[f"{name}/A"] = out.clone()  # after proj (proj_drop: identity)
            return out
        return watched

    def cross_attention(name, module):
        original = module.forward

        def watched(x, cond, mask=None):
            global CROSS_CALLS
            CROSS_CALLS = []
            out = original(x, cond, mask)
            (_, k, v), CROSS_CALLS = CROSS_CALLS[0], None
            store[f"{name}/K"] = k[0].transpose(0, 1).contiguous()  # (1, sum L, Nh, Dh) -> (Nh, sum L, Dh)
            store[f"{name}/V"] = v[0].transpose(0, 1).contiguous()
            store[f"{name}/A"] = out.clone()
            return out
        return watched

    for kind in ("spatial_blocks", "temporal_blocks"):
        for i, block in enumerate(getattr(model, kind)):
            for attr, wrap in (("attn", self_attention), ("cross_attn", cross_attention)):
                module = getattr(block, attr)
                originals[module] = module.forward
                module.forward = wrap(f"{kind}.{i}.{attr}", module)
    try:
        out = reference_forward(model, inputs)
    finally:
        for module, forward in originals.items():
            module.forward = forward
        CROSS_CALLS = None
    assert torch.equal(out, reference_forward(model, inputs)), "watching the attention layers changed the output"
    assert len(store) == 3 * 4 * model.config.depth
    return store


# ---- RFlow and the sample run -----------------------------------------------------------------------------------

def rflow_timesteps(os_, case: str) -> torch.Tensor:
    """RFLOW.sample's timestep list (before the loop) for a batch of one, as a (N,) tensor."""
    steps, height, width, frames = RFLOW_CASES[case]
    dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
    args = os_.inference_utils.prepare_multi_resolution_info("STDiT2", 1, (height, width), frames, 24, "cpu", dtype)
    rflow = os_.rf.RFLOW(num_sampling_steps=steps, use_timestep_transform=True)
    timesteps = [(1.0 - i / rflow.num_sampling_steps) * rflow.num_timesteps for i in range(steps)]
    timesteps = [torch.tensor([t]) for t in timesteps]
    timesteps = [os_.rectified_flow.timestep_transform(t, args, num_timesteps=rflow.num_timesteps) for t in timesteps]
    return torch.cat(timesteps)


def text_encoder_folder(scratch: Path) -> Path:
    """The tiny T5 fixture's tokenizer and encoder in one folder, as DeepFloyd/t5-v1_1-xxl holds them."""
    folder = scratch / "t5-v1_1-xxl"
    folder.mkdir()
    for part in ("tokenizer", "text_encoder"):
        for f in (T5_TINY / part).iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@torch.no_grad()
def reference_sample(os_, model, scratch: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """scripts/inference.py's steps for one batch of SAMPLE_PROMPTS (aesthetic-score suffix, text cleaning, the
    multi-resolution info, a mask strategy of "" per prompt), then RFLOW.sample with the official T5Encoder."""
    iu = os_.inference_utils
    folder = text_encoder_folder(scratch)
    os_.t5.T5Embedder.available_models = [str(folder)]  # it accepts DeepFloyd's Hub id only
    tools.quiet_diffusers()
    text_encoder = os_.t5.T5Encoder(from_pretrained=str(folder), model_max_length=TINY["model_max_length"],
                                    device="cpu", dtype=torch.float32)
    text_encoder.y_embedder = model.y_embedder  # as scripts/inference.py does, for the null caption
    rflow = os_.rf.RFLOW(use_timestep_transform=True, num_sampling_steps=SAMPLE_STEPS, cfg_scale=SAMPLE_GUIDANCE)

    prompts = [iu.append_score_to_prompts([p], aes=SAMPLE_AES)[0] for p in SAMPLE_PROMPTS]
    prompts = [os_.t5.text_preprocessing(p) for p in prompts]
    n = len(prompts)
    args = iu.prepare_multi_resolution_info("STDiT2", n, SAMPLE_SIZE, SAMPLE_FRAMES, SAMPLE_FPS, "cpu", torch.float32)
    latent = (SAMPLE_LATENT_FRAMES, SAMPLE_SIZE[0] // 8, SAMPLE_SIZE[1] // 8)
    z = torch.randn(n, 4, *latent, generator=torch.Generator().manual_seed(SAMPLE_SEED))
    masks = iu.apply_mask_strategy(z, [[] for _ in range(n)], [""] * n, 0, align=5)
    assert masks is not None and masks.bool().all()  # ones: the x_mask path runs, and selects the plain branch

    calls = []
    original = model.forward

    def watched(*a, **kw):
        out = original(*a, **kw)
        calls.append((a[1].clone(), out.clone()))
        return out

    model.forward = watched
    torch.manual_seed(0)  # sample() draws noise it does not use (mask_add_noise is all False)
    try:
        final = rflow.sample(model, text_encoder, z=z.clone(), prompts=prompts, device="cpu", additional_args=args,
                             mask=masks, progress=False)
    finally:
        model.forward = original
    encoded = text_encoder.encode(prompts)
    assert encoded["mask"][0].sum() < TINY["model_max_length"] and encoded["mask"][1].all(), (prompts, encoded["mask"])
    tensors = {"sample/z": z, "sample/y": encoded["y"][:, 0], "sample/mask": encoded["mask"],
               "sample/y_null": text_encoder.null(n)[:, 0], "sample/latents": final,
               "sample/timesteps": torch.stack([t for t, _ in calls]),  # (N, 2n): the model's t, [cond; uncond]
               "sample/model_out": torch.stack([out for _, out in calls])}  # (N, 2n, 8, T, H, W)
    settings = {"prompts": list(SAMPLE_PROMPTS), "aes": SAMPLE_AES, "processed_prompts": prompts,
                "steps": SAMPLE_STEPS, "guidance": SAMPLE_GUIDANCE, "height": SAMPLE_SIZE[0], "width": SAMPLE_SIZE[1],
                "num_frames": SAMPLE_FRAMES, "latent_shape": [4, *latent], "fps": SAMPLE_FPS, "seed": SAMPLE_SEED,
                "noise": "torch.randn((2, 4, T, H, W), generator=torch.Generator().manual_seed(seed)), stored as "
                         "sample/z", "dtype": "float32", "mask_strategy": "'' per prompt (a mask of ones, x_mask on)",
                "model_max_length": TINY["model_max_length"]}
    return tensors, settings


def fullsize_table(os_) -> dict:
    with torch.device("meta"):
        model = os_.stdit3.STDiT3(model_config(os_, tiny=False))
    buffers = {name for name, _ in model.named_buffers()}
    sd = model.state_dict()
    return {"OpenSora-STDiT-v3": {
        "parameters": sum(p.numel() for p in model.parameters()),
        "stored_buffers": {k: sd[k].numel() for k in sd if k in buffers},
        "keys": {k: list(v.shape) for k, v in sd.items()}}}


def versions(repo: Path) -> dict:
    import rotary_embedding_torch  # noqa: F401

    found = {name: importlib.metadata.version(name) for name in (
        "torch", "transformers", "timm", "rotary_embedding_torch", "accelerate", "ftfy", "safetensors")}
    return {"opensora_tag": TAG, "opensora_commit": TAG_COMMIT, "opensora_files": list(SOURCES), **found,
            "python": sys.version.split()[0]}


def main() -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", help="a clone of hpcaitech/Open-Sora with the tag v1.2.0 (default: $OPENSORA_REPO)")
    repo = repo_path(parser.parse_args().repo)
    assert len(json.dumps(hub_config(tiny=False), indent=2, sort_keys=True)) + 1 == HUB_SIZE
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        export(repo, scratch)
        os_ = official(scratch)
        if FIXTURES.exists():
            shutil.rmtree(FIXTURES)
        FOLDER.mkdir(parents=True)

        model = build_model(os_)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, FOLDER / "model.safetensors", metadata={"format": "pt"})
        tools.write_sorted_json(FOLDER / "config.json", hub_config())
        loaded = load_model(os_)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sd.items()) and len(sd) == len(
            loaded.state_dict())

        tensors = {}
        for case in MODEL_CASES:
            inputs = model_inputs(case)
            tensors |= {f"model/{case}/{k}": v for k, v in inputs.items()}
            tensors[f"model/{case}/out"] = reference_forward(loaded, inputs)
        tensors |= {f"captures/{k}": v for k, v in reference_captures(os_, loaded, model_inputs(CAPTURE_CASE)).items()}
        tensors |= {f"rflow/{case}/timesteps": rflow_timesteps(os_, case).float() for case in RFLOW_CASES}
        sample, settings = reference_sample(os_, loaded, scratch)
        tensors |= sample

        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, REFERENCE)
        tools.write_json(FIXTURES / "sample.json", settings)
        (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_table(os_)) + "\n")
        tools.write_sorted_json(FIXTURES / "VERSIONS.json", versions(repo))
    print(f"wrote {FIXTURES} ({REFERENCE.stat().st_size / 1e3:.0f} kB reference, "
          f"{(FOLDER / 'model.safetensors').stat().st_size / 1e3:.0f} kB model)")


if __name__ == "__main__":
    main()
