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
from minidit.analysis.recorder import Recorder, tensors_to_record
from minidit.errors import MiniditError
from minidit.pipelines import MODELS, ModelSpec, model_spec, recipe_class
from minidit.pipelines.recipe import Recipe


def resolve_weights(spec: ModelSpec, weights_dir: str | Path | None = None, revision: str | None = None,
                    download_dir: str | Path | None = None) -> Path:
    """The folder holding `spec`'s files: --weights, the embedded copy, or a Hub download (into the user's Hub
    cache, or into `download_dir/<repo name>`). A model assembled from several repositories (`spec.parts`) gets a
    folder with one sub-folder per repository; `revision` is that of the model's own repository."""
    if weights_dir is not None:
        folder = Path(weights_dir)
        if not folder.is_dir():
            raise MiniditError(f"--weights {folder} does not exist: pass a folder in the Hub layout of "
                               f"{spec.repo or spec.name} (e.g. {_example(spec)})")
        return folder
    if spec.embedded is not None:
        if not (spec.embedded / "model_index.json").is_file():
            raise MiniditError(f"the embedded model {spec.embedded} is missing; restore it with `git checkout weights`")
        return spec.embedded
    if not spec.parts:
        local_dir = Path(download_dir) / spec.repo.split("/")[-1] if download_dir is not None else None
        return weights.download(spec.repo, revision=revision, allow_patterns=spec.files, local_dir=local_dir)
    # Each repository is downloaded on its own; the model's folder links them (or, with download_dir, holds them)
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(download_dir) / spec.name if download_dir is not None else Path(HF_HUB_CACHE) / "minidit" / spec.name
    local_copy = "where there is network, make the folder with " + " and ".join(
        f"`hf download {repo} --local-dir DIR/{sub}`" for sub, repo in _repositories(spec)) + " and pass it"
    for (sub, repo), files, rev in zip(_repositories(spec), [spec.files, *[part.files for part in spec.parts]],
                                       [revision, *[None] * len(spec.parts)]):
        target = folder / sub
        if download_dir is not None:
            weights.download(repo, revision=rev, allow_patterns=files, local_dir=target, local_copy=local_copy)
            continue
        snapshot = weights.download(repo, revision=rev, allow_patterns=files, local_copy=local_copy)
        folder.mkdir(parents=True, exist_ok=True)  # once a download has worked: no empty folder left offline
        if target.is_symlink() or target.exists():
            if target.is_symlink() and target.resolve() == snapshot.resolve():
                continue
            if not target.is_symlink():
                raise MiniditError(f"{target} is in the way of a link to the download of {repo}: move it away")
            target.unlink()
        target.symlink_to(snapshot, target_is_directory=True)
    return folder


def _repositories(spec: ModelSpec) -> list[tuple[str, str]]:
    """(sub-folder, repository) of each repository a model assembled from several needs, its own first."""
    return [(spec.folder, spec.repo), *[(part.folder, part.repo) for part in spec.parts]]


def _example(spec: ModelSpec) -> str:
    if spec.repo is None:
        return f"as {spec.embedded} is"
    if not spec.parts:
        return f"made by `hf download {spec.repo}`"
    return "made by " + " and ".join(f"`hf download {repo} --local-dir DIR/{sub}`" for sub, repo in _repositories(spec))


def load_backbone(name: str = "dit-tiny", *, weights_dir: str | Path | None = None, revision: str | None = None,
                  dtype: str = "fp32", device: str = "cpu", **options) -> Recipe:
    """A ready-to-sample recipe (backbone, scheduler config, labels) for a model name from `MODELS`; `options` are
    those the recipe declares (e.g. height=512)."""
    spec = model_spec(name)
    folder = resolve_weights(spec, weights_dir, revision)
    return recipe_class(spec.family)(folder, dtype=weights.parse_dtype(dtype), device=device, **options)


def sample(recipe: Recipe, prompt: str, *, steps: int | None = None, scheduler: str | None = None,
           guidance: float | None = None, seed: int = 0, record: bool = False,
           prev_on_host: bool = False, ffn: bool = False, plan=None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Sample one prompt. With `record`, also return its float64 sums [layer, stream, branch, tensor, d, 7], the
    tensors K, V, A, and with `ffn` F after them (the blocks' feed-forward output). With `plan` (a caching plan,
    `minidit.caching.load(path)`), sample with it: its steps and scheduler are the defaults."""
    if plan is not None:
        return _sample_with_plan(recipe, prompt, plan, steps, scheduler, guidance, seed, record)
    steps = recipe.default_steps if steps is None else steps
    guidance = recipe.default_guidance if guidance is None else guidance
    name = scheduler or recipe.default_scheduler
    if name not in recipe.schedulers:
        raise MiniditError(f"{recipe.name} has no scheduler {name!r}; choose one of {', '.join(recipe.schedulers)}")
    sched = recipe.make_scheduler(name, steps)
    if not record:
        return recipe.generate([prompt], seed, sched, guidance), None
    recorder = Recorder(recipe.attention_layers(), branches=recipe.branches(guidance), num_steps=steps,
                        device=recipe.device, prev_on_host=prev_on_host, tensors=tensors_to_record(ffn))
    with recorder.attach(recipe.model):
        latents = recipe.generate([prompt], seed, sched, guidance)
    return latents, recorder.finish()[0]


def _sample_with_plan(recipe: Recipe, prompt: str, plan, steps, scheduler, guidance, seed, record):
    from minidit.caching.cache import PlanCache

    if record:
        raise MiniditError("sample(record=True) with a caching plan: a reused layer has no K, V or A at the steps it "
                           "skips; record without the plan")
    steps = plan.steps if steps is None else steps
    name = scheduler or plan.scheduler
    layers = recipe.attention_layers()
    # a recipe does not know its registry name: the layer names (and their count) stand for the model
    plan.check_against(plan.model, [layer.name for layer in layers], steps, name)
    guidance = recipe.default_guidance if guidance is None else guidance
    with PlanCache(recipe.model, layers, plan).sampling():
        return recipe.generate([prompt], seed, recipe.make_scheduler(name, steps), guidance), None


__all__ = ["MODELS", "load_backbone", "resolve_weights", "sample"]
