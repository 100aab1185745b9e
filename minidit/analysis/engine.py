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
from minidit.analysis.recorder import FFN, SUMS, TENSORS, Recorder, stream_axis
from minidit.analysis.rundir import RunDir, make_folder, write_atomic
from minidit.pipelines import ModelSpec
from minidit.pipelines.recipe import Recipe, Scheduler
from minidit.schedulers.flow import FlowMatchEuler


def build_manifest(recipe: Recipe, spec: ModelSpec, *, weights: str, revision: str | None, dtype: str, device: str,
                   scheduler: Scheduler, guidance: float, seed: int, prompt_source: str, n_prompts: int,
                   prev_on_host: bool, tensors: tuple[str, ...] = TENSORS) -> dict:
    """The run's manifest. With F among `tensors` (--ffn), each layer says where its F is taken ("f_point")."""
    layers = recipe.attention_layers()
    entries = [{"index": i, "name": layer.name, "kind": layer.kind, "streams": list(layer.streams),
                "a_point": layer.a_point} for i, layer in enumerate(layers)]
    if FFN in tensors:  # only then: a run without F keeps the manifest it always had
        for entry, layer in zip(entries, layers):
            entry["f_point"] = layer.f_point
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
        "layers": entries,
        "streams": list(stream_axis(layers)),
        "branches": list(recipe.branches(guidance)),
        "tensors": list(tensors),
        "sums": list(SUMS),
        "prev_on_host": prev_on_host,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "minidit": minidit.__version__},
    }


def scheduler_manifest(scheduler: Scheduler) -> dict:
    """The scheduler's name, schedule and mu (flow matching), and config."""
    flow = {"schedule": scheduler.schedule, "mu": scheduler.mu} if isinstance(scheduler, FlowMatchEuler) else {}
    return {"name": scheduler.name, **flow, "config": asdict(scheduler.cfg)}


def missing_prompts(run: RunDir, count: int, report: bool = True) -> list[int]:
    """The prompts of `count` whose record is missing or damaged (to recompute), saying so when `report`."""
    sound, damage = run.sound_records()
    todo = [i for i in range(count) if i not in sound]
    if report:
        for i, why in damage.items():
            print(f"record {run.record_path(i)} is damaged ({why}): recomputing prompt {i}", file=sys.stderr)
        if len(todo) < count:
            print(f"resuming: {count - len(todo)} of {count} prompts already done", file=sys.stderr)
    return todo


def run_prompts(recipe: Recipe, prompts: list[str], run: RunDir, *, scheduler: Scheduler, guidance: float, seed: int,
                batch_size: int = 1, todo: list[int] | None = None, save_images: bool = False,
                save_latents: bool = False, prev_on_host: bool = False, progress: bool = True) -> dict:
    """Sample and record the prompts `todo` (indices; by default every one whose record is missing),
    `batch_size` prompts per backbone call, recording the tensors the run's manifest lists. Returns what this
    process did, for `note_progress`."""
    steps = len(scheduler.timesteps)
    tensors = tuple(run.manifest().get("tensors", TENSORS))
    mine = missing_prompts(run, len(prompts), progress) if todo is None else todo
    started_all = time.perf_counter()
    recipe.prepare([prompts[i] for i in mine])  # e.g. encode every prompt once, then free the text encoder
    held = host = 0
    step_bar = tqdm(total=steps, desc="steps", leave=False, disable=None if progress else True)
    prompt_bar = tqdm(total=len(mine), desc="prompts", disable=None if progress else True)
    hook = recipe.model.register_forward_pre_hook(lambda *_: step_bar.update())
    try:
        for batch in batches(mine, batch_size, key=lambda i: recipe.batch_key(prompts[i])):
            step_bar.reset()
            started = time.perf_counter()
            recorder = Recorder(recipe.attention_layers(), branches=recipe.branches(guidance), num_steps=steps,
                                device=recipe.device, prev_on_host=prev_on_host, prompts=len(batch), tensors=tensors)
            with recorder.attach(recipe.model):
                latents = recipe.generate([prompts[i] for i in batch], seed, scheduler, guidance)
            sums = recorder.finish()
            held, host = max(held, recorder.held_bytes), max(host, recorder.host_bytes)
            seconds = round((time.perf_counter() - started) / len(batch), 3)
            for j, i in enumerate(batch):
                if save_latents:
                    save_latents_file(run.path / "latents" / f"{i:06d}.safetensors", latents[j:j + 1])
                if save_images:
                    save_images_file(run.path / "images" / f"{i:06d}.png", recipe.decode(latents[j:j + 1]))
                run.write_record(i, sums[j], {"prompt": prompts[i], "seed": seed, "seconds": seconds,
                                              "batch_size": len(batch)})
            prompt_bar.update(len(batch))
    finally:
        hook.remove()
        step_bar.close()
        prompt_bar.close()
    return {"done": len(mine), "held_bytes": held, "host_bytes": host,
            "seconds": round(time.perf_counter() - started_all, 3)}


def batches(indices: list[int], size: int, key) -> list[list[int]]:
    """`indices` in order, cut into batches of at most `size` that share `key(i)` (a batch is full when it has
    `size` prompts; the unfilled ones run last, in the order they were opened)."""
    full, open_batches = [], {}
    for i in indices:
        batch = open_batches.setdefault(key(i), [])
        batch.append(i)
        if len(batch) == size:
            full.append(open_batches.pop(key(i)))
    return full + list(open_batches.values())


def note_progress(run: RunDir, done: list[dict]) -> None:
    """Add to the manifest what the processes that filled the run did (`run_prompts`' returns): the most memory
    the analysis held, the prompts done, and this command's prompts and wall time (text encoding included; with
    several processes, the slowest one's)."""
    manifest = run.manifest()
    manifest["last_command"] = {"prompts": sum(d["done"] for d in done), "processes": len(done),
                                "seconds": max(d["seconds"] for d in done)}
    manifest["analysis_held_bytes"] = max([manifest.get("analysis_held_bytes", 0)] + [d["held_bytes"] for d in done])
    manifest["analysis_host_bytes"] = max([manifest.get("analysis_host_bytes", 0)] + [d["host_bytes"] for d in done])
    manifest["n_prompts_done"] = len(run.done())
    run.write_manifest(manifest)


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
