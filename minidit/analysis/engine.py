"""The analysis loop: every prompt not yet done -> sample with the recorder attached -> an atomic record.

`run_prompts` fills a run directory; `aggregate` (aggregate.py) and `write_figures` (figures.py) turn the
records into tables and plots. They are separate steps so that several processes can fill one directory.
"""

import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import minidit
from minidit.analysis.recorder import SUMS, TENSORS, Recorder, stream_axis
from minidit.analysis.rundir import RunDir, make_folder, write_atomic
from minidit.pipelines import ModelSpec
from minidit.pipelines.recipe import Recipe, Scheduler
from minidit.schedulers.flow import FlowMatchEuler


def build_manifest(recipe: Recipe, spec: ModelSpec, *, weights: str, revision: str | None, dtype: str, device: str,
                   scheduler: Scheduler, guidance: float, seed: int, prompt_source: str, n_prompts: int,
                   prev_on_host: bool) -> dict:
    layers = recipe.attention_layers()
    return {
        "model": spec.name,
        "repo": spec.repo,
        "weights": weights,
        "revision": revision,
        "dtype": dtype,
        "device": str(device),
        "steps": len(scheduler.timesteps),
        "scheduler": scheduler_manifest(scheduler),
        "timesteps": [float(t) for t in scheduler.timesteps],
        "sigmas": [float(s) if math.isfinite(s) else None for s in scheduler.sigmas],  # None: infinite (pure noise)
        "guidance": guidance,
        **recipe.manifest_fields(),  # resolution, frames and what else the recipe's numbers depend on
        "seed": seed,
        "prompt_source": prompt_source,
        "n_prompts": n_prompts,
        "layers": [{"index": i, "name": layer.name, "kind": layer.kind, "streams": list(layer.streams),
                    "a_point": layer.a_point} for i, layer in enumerate(layers)],
        "streams": list(stream_axis(layers)),
        "branches": list(recipe.branches(guidance)),
        "tensors": list(TENSORS),
        "sums": list(SUMS),
        "prev_on_host": prev_on_host,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "minidit": minidit.__version__},
    }


def scheduler_manifest(scheduler: Scheduler) -> dict:
    """The scheduler's name, schedule and mu (flow matching), and config."""
    flow = {"schedule": scheduler.schedule, "mu": scheduler.mu} if isinstance(scheduler, FlowMatchEuler) else {}
    return {"name": scheduler.name, **flow, "config": asdict(scheduler.cfg)}


def run_prompts(recipe: Recipe, prompts: list[str], run: RunDir, *, scheduler: Scheduler, guidance: float, seed: int,
                save_images: bool = False, save_latents: bool = False, prev_on_host: bool = False) -> int:
    """Sample and record every prompt whose record is missing; returns how many were done now."""
    steps = len(scheduler.timesteps)
    recorder = Recorder(recipe.attention_layers(), branches=recipe.branches(guidance), num_steps=steps,
                        device=recipe.device, prev_on_host=prev_on_host)
    sound, damage = run.sound_records()
    for i, why in damage.items():
        print(f"record {run.record_path(i)} is damaged ({why}): recomputing prompt {i}", file=sys.stderr)
    todo = [i for i in range(len(prompts)) if i not in sound]
    if len(todo) < len(prompts):
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already done", file=sys.stderr)
    recipe.prepare([prompts[i] for i in todo])  # e.g. encode every prompt once, then free the text encoder
    step_bar = tqdm(total=steps, desc="steps", leave=False, disable=None)
    hook = recipe.model.register_forward_pre_hook(lambda *_: step_bar.update())
    try:
        for i in tqdm(todo, desc="prompts", disable=None):
            step_bar.reset()
            started = time.perf_counter()
            recorder.start_prompt()
            with recorder.attach(recipe.model):
                latents = recipe.generate(prompts[i], seed, scheduler, guidance)
            sums = recorder.finish()
            if save_latents:
                save_latents_file(run.path / "latents" / f"{i:06d}.safetensors", latents)
            if save_images:
                save_images_file(run.path / "images" / f"{i:06d}.png", recipe.decode(latents))
            run.write_record(i, sums, {"prompt": prompts[i], "seed": seed,
                                       "seconds": round(time.perf_counter() - started, 3)})
    finally:
        hook.remove()
        step_bar.close()
    manifest = run.manifest()
    manifest["analysis_held_bytes"] = max(manifest.get("analysis_held_bytes", 0), recorder.held_bytes)
    manifest["analysis_host_bytes"] = max(manifest.get("analysis_host_bytes", 0), recorder.host_bytes)
    manifest["n_prompts_done"] = len(sound) + len(todo)  # every prompt to do was written (or the loop raised)
    run.write_manifest(manifest)
    return len(todo)


def save_latents_file(path: Path, latents: torch.Tensor) -> None:
    """Final latents as safetensors (key "latents"): readable with safetensors.numpy or safetensors.torch."""
    from safetensors.torch import save

    make_folder(path.parent)
    write_atomic(path, save({"latents": latents.detach().float().cpu().contiguous()}))


STRIP_FRAMES = 8  # a video's frame strip shows at most this many frames, evenly spaced, first and last included
GIF_FPS = 8  # Latte's and CogVideoX's sample videos are written at 8 frames per second


def save_images_file(path: Path, images: np.ndarray) -> None:
    """uint8 images (B, H, W, 3) side by side in one PNG; videos (B, T, H, W, 3): an animated GIF beside it (the
    batch side by side in every frame) and, in the PNG, a strip of `STRIP_FRAMES` frames (rows: the batch)."""
    from PIL import Image

    make_folder(path.parent)
    if images.ndim == 5:
        frames = np.concatenate(list(images), axis=2)  # (T, H, B*W, 3)
        gif = [Image.fromarray(frame) for frame in frames]
        write_atomic(path.with_suffix(".gif"), _encoded(gif[0], "GIF", save_all=True, append_images=gif[1:],
                                                        duration=round(1000 / GIF_FPS), loop=0))
        shown = np.unique(np.linspace(0, images.shape[1] - 1, min(STRIP_FRAMES, images.shape[1])).round().astype(int))
        images = np.stack([np.concatenate(list(video[shown]), axis=1) for video in images])  # (B, H, n*W, 3)
        write_atomic(path, _encoded(Image.fromarray(np.concatenate(list(images), axis=0)), "PNG"))
        return
    write_atomic(path, _encoded(Image.fromarray(np.concatenate(list(images), axis=1)), "PNG"))


def _encoded(image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
