"""Reference fixtures for the SD3 and FLUX transformer tests, computed with diffusers' SD3Transformer2DModel and
FluxTransformer2DModel as the oracles.

Run by hand when the reference changes (needs the reference extra):

    python tests/reference/generate_mmdit.py

It writes, under tests/fixtures/mmdit/ (the run is deterministic):

    sd3/transformer/       a tiny SD3-medium-like MMDiT in the Hub layout: one fp16 safetensors file holding
                           pos_embed.pos_embed (as the real file does), config.json in the Hub's form (no qk_norm,
                           no dual_attention_layers: the class defaults apply)
    sd3/sd3_tiny.safetensors   the same weights in the single-file layout (`model.diffusion_model.` + fused qkv,
                           (shift, scale) order), plus a few `first_stage_model.` tensors that the loader must skip
    flux-dev/transformer/  a tiny FLUX.1-dev-like transformer: bf16 in three shards plus the index, the Hub's
                           config form (no axes_dims_rope: the class default (16, 56, 56) scaled down is written
                           explicitly, since a tiny head cannot hold 128 channels)
    flux-dev/flux1-tiny.safetensors, flux-schnell/...  the BFL single-file layout (fused qkv and linear1)
    reference.safetensors  inputs and outputs per case, in fp32 from the fp16/bf16 weights
    fullsize.json          the full-size configs on the meta device: parameter counts, key names and shapes
    VERSIONS.json

The single files are written from the diffusers state dicts by code independent of minidit's rename tables.
"""

import json
import shutil
from pathlib import Path

import generator_tools as tools
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mmdit"
REFERENCE = FIXTURES / "reference.safetensors"
SEED = 20240613
WEIGHT_STD = 0.1

SD3_HUB = {"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0.dev0", "attention_head_dim": 64,
           "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24,
           "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
           "pos_embed_max_size": 192, "sample_size": 128}
SD3_TINY = {"attention_head_dim": 8, "caption_projection_dim": 16, "num_attention_heads": 2, "num_layers": 3,
            "joint_attention_dim": 32, "pooled_projection_dim": 24, "pos_embed_max_size": 12, "sample_size": 16}
FLUX_HUB = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0",
            "_name_or_path": "../checkpoints/flux-dev/transformer", "attention_head_dim": 128, "guidance_embeds": True,
            "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
FLUX_TINY = {"attention_head_dim": 16, "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 3,
             "joint_attention_dim": 32, "pooled_projection_dim": 24, "axes_dims_rope": [4, 6, 6]}
HUB_SIZES = {"sd3": 372, "flux-dev": 378}  # checkpoints.md §3.2, §4.2
FLUX_SHARDS = 3
RMS_NORMS = ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")

# cases: batch 2, non-square latents, text length
SD3_LATENTS, SD3_TEXT = (2, 16, 6, 10), 7  # a 3 x 5 patch grid, cropped from the 12 x 12 table
FLUX_GRID, FLUX_TEXT = (3, 5), 6  # packed tokens: a 3 x 5 grid of 2x2 patches (a 6 x 10 latent)


def _quiet_diffusers():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    return diffusers


def class_config(hub: dict) -> dict:
    return {k: v for k, v in hub.items() if not k.startswith("_")}


def randomize(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(RMS_NORMS):  # QK RMSNorm weights: around 1
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, WEIGHT_STD)


def build(kind: str, **overrides):
    diffusers = _quiet_diffusers()
    if kind == "sd3":
        model = diffusers.SD3Transformer2DModel.from_config(class_config({**SD3_HUB, **SD3_TINY}))
    else:
        model = diffusers.FluxTransformer2DModel.from_config(class_config({**FLUX_HUB, **FLUX_TINY, **overrides}))
    randomize(model, SEED + len(kind) + len(overrides))
    return model.eval()


def load(kind: str, folder: Path):
    diffusers = _quiet_diffusers()
    cls = diffusers.SD3Transformer2DModel if kind == "sd3" else diffusers.FluxTransformer2DModel
    return cls.from_pretrained(folder, torch_dtype=torch.float32).eval()


# ---- inputs and oracle calls -----------------------------------------------------------------------------

def sd3_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 1)
    b = SD3_LATENTS[0]
    return {"x": torch.randn(SD3_LATENTS, generator=g), "t": torch.tensor([1000.0, 287.5]),
            "text": torch.randn(b, SD3_TEXT, SD3_TINY["joint_attention_dim"], generator=g),
            "pooled": torch.randn(b, SD3_TINY["pooled_projection_dim"], generator=g)}


@torch.no_grad()
def sd3_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], encoder_hidden_states=inputs["text"], pooled_projections=inputs["pooled"],
                 timestep=inputs["t"]).sample


def flux_ids(grid: tuple[int, int], text_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """img_ids (0, row, column) for a grid of packed tokens, txt_ids zeros: as FluxPipeline builds them."""
    rows, cols = grid
    img = torch.zeros(rows, cols, 3)
    img[..., 1] += torch.arange(rows)[:, None]
    img[..., 2] += torch.arange(cols)[None, :]
    return img.reshape(rows * cols, 3), torch.zeros(text_length, 3)


def flux_inputs(guidance: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + 2)
    b, n = 2, FLUX_GRID[0] * FLUX_GRID[1]
    img_ids, txt_ids = flux_ids(FLUX_GRID, FLUX_TEXT)
    inputs = {"x": torch.randn(b, n, 64, generator=g), "t": torch.tensor([1.0, 0.3125]),
              "text": torch.randn(b, FLUX_TEXT, FLUX_TINY["joint_attention_dim"], generator=g),
              "pooled": torch.randn(b, FLUX_TINY["pooled_projection_dim"], generator=g),
              "img_ids": img_ids, "txt_ids": txt_ids}
    if guidance:
        inputs["guidance"] = torch.tensor([3.5, 3.5])
    return inputs


@torch.no_grad()
def flux_forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(inputs["x"], encoder_hidden_states=inputs["text"], pooled_projections=inputs["pooled"],
                 timestep=inputs["t"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
                 guidance=inputs.get("guidance")).sample


# ---- the single-file layouts, written from the diffusers state dicts -------------------------------------------

def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_single_file(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    plain = {"pos_embed.proj.": "x_embedder.proj.", "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
             "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
             "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
             "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.", "context_embedder.": "context_embedder.",
             "proj_out.": "final_layer.linear."}
    for p in ("weight", "bias"):
        for new, old in plain.items():
            out[old + p] = sd[new + p]
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
        for i in range(num_layers):
            b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
            last = i == num_layers - 1
            out[o + f"x_block.adaLN_modulation.1.{p}"] = sd[b + f"norm1.linear.{p}"]
            ctx_mod = sd[b + f"norm1_context.linear.{p}"]
            out[o + f"context_block.adaLN_modulation.1.{p}"] = _swap(ctx_mod) if last else ctx_mod
            out[o + f"x_block.attn.qkv.{p}"] = torch.cat([sd[b + f"attn.to_{n}.{p}"] for n in "qkv"])
            out[o + f"context_block.attn.qkv.{p}"] = torch.cat([sd[b + f"attn.add_{n}_proj.{p}"] for n in "qkv"])
            out[o + f"x_block.attn.proj.{p}"] = sd[b + f"attn.to_out.0.{p}"]
            out[o + f"x_block.mlp.fc1.{p}"] = sd[b + f"ff.net.0.proj.{p}"]
            out[o + f"x_block.mlp.fc2.{p}"] = sd[b + f"ff.net.2.{p}"]
            if not last:
                out[o + f"context_block.attn.proj.{p}"] = sd[b + f"attn.to_add_out.{p}"]
                out[o + f"context_block.mlp.fc1.{p}"] = sd[b + f"ff_context.net.0.proj.{p}"]
                out[o + f"context_block.mlp.fc2.{p}"] = sd[b + f"ff_context.net.2.{p}"]
    out = {"model.diffusion_model." + k: v for k, v in out.items()}
    g = torch.Generator().manual_seed(SEED + 3)
    out |= {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 16, 3, 3, generator=g),  # to be skipped
            "first_stage_model.decoder.conv_in.bias": torch.randn(8, generator=g)}
    return out


def flux_single_file(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    plain = {"x_embedder.": "img_in.", "time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.",
             "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
             "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.",
             "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.", "context_embedder.": "txt_in.",
             "proj_out.": "final_layer.linear."}
    if cfg["guidance_embeds"]:
        plain |= {"time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
                  "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer."}
    out = {}
    for p in ("weight", "bias"):
        for new, old in plain.items():
            out[old + p] = sd[new + p]
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(sd[f"norm_out.linear.{p}"])
        for i in range(cfg["num_layers"]):
            b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
            out[o + f"img_mod.lin.{p}"] = sd[b + f"norm1.linear.{p}"]
            out[o + f"txt_mod.lin.{p}"] = sd[b + f"norm1_context.linear.{p}"]
            out[o + f"img_attn.qkv.{p}"] = torch.cat([sd[b + f"attn.to_{n}.{p}"] for n in "qkv"])
            out[o + f"txt_attn.qkv.{p}"] = torch.cat([sd[b + f"attn.add_{n}_proj.{p}"] for n in "qkv"])
            out[o + f"img_attn.proj.{p}"] = sd[b + f"attn.to_out.0.{p}"]
            out[o + f"txt_attn.proj.{p}"] = sd[b + f"attn.to_add_out.{p}"]
            for stream, mod in (("img", "ff"), ("txt", "ff_context")):
                out[o + f"{stream}_mlp.0.{p}"] = sd[b + f"{mod}.net.0.proj.{p}"]
                out[o + f"{stream}_mlp.2.{p}"] = sd[b + f"{mod}.net.2.{p}"]
        for i in range(cfg["num_single_layers"]):
            b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
            out[o + f"modulation.lin.{p}"] = sd[b + f"norm.linear.{p}"]
            out[o + f"linear1.{p}"] = torch.cat([sd[b + f"attn.to_{n}.{p}"] for n in "qkv"] + [sd[b + f"proj_mlp.{p}"]])
            out[o + f"linear2.{p}"] = sd[b + f"proj_out.{p}"]
    for i in range(cfg["num_layers"]):
        b, o = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out[o + "img_attn.norm.query_norm.scale"] = sd[b + "norm_q.weight"]
        out[o + "img_attn.norm.key_norm.scale"] = sd[b + "norm_k.weight"]
        out[o + "txt_attn.norm.query_norm.scale"] = sd[b + "norm_added_q.weight"]
        out[o + "txt_attn.norm.key_norm.scale"] = sd[b + "norm_added_k.weight"]
    for i in range(cfg["num_single_layers"]):
        b, o = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}.norm."
        out[o + "query_norm.scale"] = sd[b + "norm_q.weight"]
        out[o + "key_norm.scale"] = sd[b + "norm_k.weight"]
    return out


# ---- writing --------------------------------------------------------------------------------------------

def save(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(sd.items())}, path, metadata={"format": "pt"})


def write_sd3(folder: Path, model) -> None:
    tools.write_sorted_json(folder / "transformer" / "config.json", {**SD3_HUB, **SD3_TINY})
    sd = model.state_dict()
    save(folder / "transformer" / "diffusion_pytorch_model.safetensors", sd, torch.float16)
    save(folder / "sd3_tiny.safetensors", sd3_single_file(sd, SD3_TINY["num_layers"]), torch.float16)


def write_flux(folder: Path, model, hub: dict) -> None:
    """The transformer in three bf16 shards plus the index, as the Hub's FLUX.1 folders hold it."""
    tools.write_sorted_json(folder / "transformer" / "config.json", hub)
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    weight_map, filled = {}, 0  # sorted keys, cut into FLUX_SHARDS runs of about equal size
    for key in sorted(sd):
        shard = min(FLUX_SHARDS - 1, filled * FLUX_SHARDS // total)
        weight_map[key] = f"diffusion_pytorch_model-{shard + 1:05d}-of-{FLUX_SHARDS:05d}.safetensors"
        filled += sd[key].numel() * sd[key].element_size()
    assert len(set(weight_map.values())) == FLUX_SHARDS
    for filename in sorted(set(weight_map.values())):
        save(folder / "transformer" / filename, {k: sd[k] for k, f in weight_map.items() if f == filename},
             torch.bfloat16)
    tools.write_sorted_json(folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = {**FLUX_HUB, **FLUX_TINY, **{k: v for k, v in hub.items() if not k.startswith("_")}}
    save(folder / "flux1-tiny.safetensors", flux_single_file(sd, cfg), torch.bfloat16)


def fullsize_tables() -> dict:
    diffusers = _quiet_diffusers()
    tables = {}
    builds = {"SD3-medium": (diffusers.SD3Transformer2DModel, SD3_HUB),
              "FLUX.1-dev": (diffusers.FluxTransformer2DModel, FLUX_HUB),
              "FLUX.1-schnell": (diffusers.FluxTransformer2DModel, {**FLUX_HUB, "guidance_embeds": False})}
    for name, (cls, hub) in builds.items():
        with torch.device("meta"):
            model = cls.from_config(class_config(hub))
        tables[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        "keys": {k: list(v.shape) for k, v in model.state_dict().items()}}
    return tables


def main() -> None:
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    FIXTURES.mkdir(parents=True)
    for name, hub in (("sd3", SD3_HUB), ("flux-dev", FLUX_HUB)):  # the Hub files' byte sizes
        assert len(json.dumps(hub, indent=2, sort_keys=True)) + 1 == HUB_SIZES[name], name

    tensors = {}
    write_sd3(FIXTURES / "sd3", build("sd3"))
    inputs = sd3_inputs()
    tensors |= {f"sd3/{k}": v for k, v in inputs.items()}
    tensors["sd3/out"] = sd3_forward(load("sd3", FIXTURES / "sd3" / "transformer"), inputs)

    for variant, guidance in (("flux-dev", True), ("flux-schnell", False)):
        hub = {**FLUX_HUB, **FLUX_TINY, "guidance_embeds": guidance}
        if not guidance:
            hub.pop("_name_or_path")  # as schnell's config.json
        write_flux(FIXTURES / variant, build("flux", guidance_embeds=guidance), hub)
        inputs = flux_inputs(guidance)
        tensors |= {f"{variant}/{k}": v for k, v in inputs.items()}
        tensors[f"{variant}/out"] = flux_forward(load("flux", FIXTURES / variant / "transformer"), inputs)

    save_file({k: v.contiguous() for k, v in tensors.items()}, REFERENCE)
    (FIXTURES / "fullsize.json").write_text(json.dumps(fullsize_tables()) + "\n")
    tools.write_sorted_json(FIXTURES / "VERSIONS.json", tools.versions("diffusers", "torch", "safetensors"))
    print(f"wrote {FIXTURES}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items() if k.endswith("out")))


if __name__ == "__main__":
    main()
