"""`--preset paper` (minidit/presets.py): every value is one the model's recipe and analyze.py accept, the study's
fixed choices hold for every model, and an unknown preset or a model without an entry is one clear error."""

import importlib.util
import json

import pytest
from conftest import ROOT

from minidit import weights
from minidit.errors import MiniditError
from minidit.models.latte import LatteConfig
from minidit.pipelines import ALIASES, MODELS, model_spec, recipe, recipe_class
from minidit.pipelines.mochi import DEFAULT_FRAMES as MOCHI_DEFAULT_FRAMES
from minidit.pipelines.mochi import VAE_TEMPORAL as MOCHI_TEMPORAL
from minidit.pipelines.opensora import VAE_SCALE as OPENSORA_VAE_SCALE
from minidit.presets import PAPER, PRESETS, preset
from minidit.schedulers.rflow import FRAMES_PER_CHUNK

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)

STUDY_MODELS = ["pixart-1024", "sd3", "flux-dev", "latte", "cogvideox-5b", "opensora", "mochi"]
VIDEO_MODELS = {"latte", "cogvideox-5b", "opensora", "mochi"}
SPATIAL_MULTIPLE = 16  # 8x VAE and 2x2 patches (FLUX: 2x2 packing): every model but Open-Sora
COGVIDEOX_VAE = ROOT / "tests" / "fixtures" / "cogvideox" / "CogVideoX-5b" / "vae" / "config.json"


def test_the_study_models_and_no_other():
    assert sorted(PAPER) == sorted(STUDY_MODELS)
    for name in PAPER:
        assert name in MODELS and MODELS[name].embedded is None, name


@pytest.mark.parametrize("model", STUDY_MODELS)
def test_every_value_is_accepted_by_the_recipe(model):
    settings, recipe_type = PAPER[model], recipe_class(model_spec(model).family)
    args = preset("paper", model)
    assert settings.scheduler in recipe_type.schedulers
    assert set(args) - {"steps", "scheduler", "guidance", "seed", "dtype", "num_prompts"} <= set(recipe_type.options)
    assert ("frames" in args) == (model in VIDEO_MODELS) == ("frames" in recipe_type.options)
    weights.parse_dtype(settings.dtype)
    assert settings.steps >= 2 and settings.num_prompts >= 1
    assert recipe.text_length(settings.max_sequence_length, 1, None, model) == settings.max_sequence_length


@pytest.mark.parametrize("model", STUDY_MODELS)
def test_analyze_takes_the_preset_as_its_flags(model):
    """The keys are analyze.py's argument names: as flags they parse back to the same values, and analyze.py's own
    option check passes them to the recipe."""
    args = preset("paper", model)
    argv = ["--model", model]
    for name, value in args.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    parsed = analyze.parse_args(argv)
    sweepable = ("steps", "scheduler", "seed")  # flags that take a list (a sweep, or seeds): one value is a list of one
    assert {name: getattr(parsed, name) for name in args} == {
        name: [value] if name in sweepable else value for name, value in args.items()}
    options = analyze.recipe_options(recipe_class(model_spec(model).family), parsed)
    assert options == {k: v for k, v in args.items() if k in recipe.OPTIONS}


def test_the_study_left_steps_guidance_and_scheduler_at_the_pipeline_defaults():
    """No script passes steps, guidance or a scheduler: each is the pipeline's default, which minidit's recipe
    shares (so these presets differ from a plain run only where the study's scripts set something)."""
    for model, settings in PAPER.items():
        recipe_type = recipe_class(model_spec(model).family)
        assert (settings.steps, settings.guidance, settings.scheduler) == \
               (recipe_type.default_steps, recipe_type.default_guidance, recipe_type.default_scheduler), model


def test_seed_42_and_the_prompt_counts():
    assert {model: s.seed for model, s in PAPER.items()} == dict.fromkeys(STUDY_MODELS, 42)
    assert {model: s.num_prompts for model, s in PAPER.items()} == {**dict.fromkeys(STUDY_MODELS, 1000), "mochi": 100}


def test_sizes():
    for model, s in PAPER.items():
        if model == "opensora":  # any size of at least one 2x2 patch of latent cells; 240p at 9:16
            assert min(s.height, s.width) >= 2 * OPENSORA_VAE_SCALE and (s.height, s.width) == (240, 426)
        else:
            assert recipe.image_size(s.height, s.width, 0, SPATIAL_MULTIPLE, model) == (s.height, s.width)


def test_frames_follow_each_video_model_rule():
    frames = {model: PAPER[model].frames for model in VIDEO_MODELS}
    cogvideox_temporal = json.loads(COGVIDEOX_VAE.read_text())["temporal_compression_ratio"]
    assert recipe.video_frames(frames["cogvideox-5b"], 49, cogvideox_temporal, "CogVideoX") == 9  # 4k + 1
    assert recipe.video_frames(frames["mochi"], MOCHI_DEFAULT_FRAMES, MOCHI_TEMPORAL, "Mochi") == 49  # 6k + 1
    assert frames["opensora"] == 1 or frames["opensora"] >= FRAMES_PER_CHUNK
    assert frames["latte"] == LatteConfig.video_length  # its temporal table's rows (or 1, an image)
    with pytest.raises(MiniditError, match="4k"):  # the validator is not vacuous
        recipe.video_frames(frames["cogvideox-5b"] + 1, 49, cogvideox_temporal, "CogVideoX")


def test_entries_say_where_they_come_from_and_how_they_differ():
    for model, s in PAPER.items():
        assert s.source, model
        assert all(d.endswith(".") for d in s.deviations), model
    assert PAPER["cogvideox-5b"].dtype == "bf16" and any("fp16" in d for d in PAPER["cogvideox-5b"].deviations)
    assert any("1710977262" in d for d in PAPER["mochi"].deviations)
    assert any("1024" in d for d in PAPER["opensora"].deviations)


def test_an_alias_gives_its_model_entry():
    for alias, name in ALIASES.items():
        if name in PAPER:
            assert preset("paper", alias) == preset("paper", name)
    assert preset("paper", "flux") == preset("paper", "flux-dev")


def test_unknown_preset():
    with pytest.raises(MiniditError, match=r"unknown preset 'papers'; choose one of paper$"):
        preset("papers", "flux-dev")
    assert list(PRESETS) == ["paper"]


@pytest.mark.parametrize("model", ["dit-xl-256", "dit", "pixart-512", "flux-schnell", "cogvideox-2b", "flux-tiny",
                                   "dit-tiny"])
def test_a_model_the_study_did_not_run(model):
    with pytest.raises(MiniditError, match="the study did not run it") as error:
        preset("paper", model)
    assert str(error.value).startswith(f"--preset paper has no settings for {model_spec(model).name}:")
    assert all(name in str(error.value) for name in STUDY_MODELS)
    assert "\n" not in str(error.value)


def test_an_unknown_model():
    with pytest.raises(MiniditError, match="unknown model 'flux-devv'; choose one of"):
        preset("paper", "flux-devv")
