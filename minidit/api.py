"""The small Python API: load a backbone by name or from a folder, sample with or without recording.

    import minidit
    recipe = minidit.load_backbone("dit-tiny")                       # or "dit-xl-256", or a Hub-layout folder
    latents, sums = minidit.sample(recipe, "circle", steps=20, record=True)
    run = minidit.analysis.read_run("runs/dit-tiny")                  # a finished run directory as arrays
"""

from pathlib import Path

import numpy as np
import torch

from minidit import weights
from minidit.analysis.recorder import Recorder
from minidit.errors import MiniditError
from minidit.pipelines import MODELS, ModelSpec, model_spec, recipe_class
from minidit.pipelines.recipe import Recipe


def resolve_weights(spec: ModelSpec, weights_dir: str | Path | None = None, revision: str | None = None,
                    download_dir: str | Path | None = None) -> Path:
    """The folder holding `spec`'s files: --weights, the embedded copy, or a Hub download (into the user's Hub
    cache, or into `download_dir/<repo name>`)."""
    if weights_dir is not None:
        folder = Path(weights_dir)
        if not folder.is_dir():
            example = f"made by `hf download {spec.repo}`" if spec.repo else f"as {spec.embedded} is"
            raise MiniditError(f"--weights {folder} does not exist: pass a folder in the Hub layout of "
                               f"{spec.repo or spec.name} (e.g. {example})")
        return folder
    if spec.embedded is not None:
        if not (spec.embedded / "model_index.json").is_file():
            raise MiniditError(f"the embedded model {spec.embedded} is missing; restore it with `git checkout weights`")
        return spec.embedded
    local_dir = Path(download_dir) / spec.repo.split("/")[-1] if download_dir is not None else None
    return weights.download(spec.repo, revision=revision, allow_patterns=spec.files, local_dir=local_dir)


def load_backbone(name: str = "dit-tiny", *, weights_dir: str | Path | None = None, revision: str | None = None,
                  dtype: str = "fp32", device: str = "cpu", **options) -> Recipe:
    """A ready-to-sample recipe (backbone, scheduler config, labels) for a model name from `MODELS`; `options` are
    those the recipe declares (e.g. height=512)."""
    spec = model_spec(name)
    folder = resolve_weights(spec, weights_dir, revision)
    return recipe_class(spec.family)(folder, dtype=weights.parse_dtype(dtype), device=device, **options)


def sample(recipe: Recipe, prompt: str, *, steps: int | None = None, scheduler: str | None = None,
           guidance: float | None = None, seed: int = 0, record: bool = False,
           prev_on_host: bool = False) -> tuple[torch.Tensor, np.ndarray | None]:
    """Sample one prompt. With `record`, also return its float64 sums [layer, stream, branch, tensor, d, 7]."""
    steps = recipe.default_steps if steps is None else steps
    guidance = recipe.default_guidance if guidance is None else guidance
    name = scheduler or recipe.default_scheduler
    if name not in recipe.schedulers:
        raise MiniditError(f"{recipe.name} has no scheduler {name!r}; choose one of {', '.join(recipe.schedulers)}")
    sched = recipe.make_scheduler(name, steps)
    if not record:
        return recipe.generate(prompt, seed, sched, guidance), None
    recorder = Recorder(recipe.attention_layers(), branches=recipe.branches(guidance), num_steps=steps,
                        device=recipe.device, prev_on_host=prev_on_host)
    with recorder.attach(recipe.model):
        latents = recipe.generate(prompt, seed, sched, guidance)
    return latents, recorder.finish()


__all__ = ["MODELS", "load_backbone", "resolve_weights", "sample"]
