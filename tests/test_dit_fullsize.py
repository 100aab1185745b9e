"""Full-size DiT-XL/2 on the meta device (no weights): parameter count, key sets and shapes in both checkpoint
layouts, and load_dit's handling of the real Hub config and of original `.pt` files.

Expected values: checkpoints.md §9.4 and §12.1 (749,826,464 parameters and 538 tensors in the diffusers layout;
292 tensors and 675,129,632 parameters in the original, pos_embed included), diffusers' DiTTransformer2DModel
built on meta (live, or the committed tests/fixtures/dit/xl2_keys.json it produced), and the port of
facebookresearch/DiT models.py in tests/reference/generate.py.
"""

import json
from dataclasses import replace
from functools import cache

import pytest
import torch
from conftest import FIXTURES, LIVE, reference_generator

from minidit import weights
from minidit.models import dit
from minidit.models.dit import PRESETS, DiT, load_dit, original_keys, original_to_hub

HUB_PARAMS, HUB_TENSORS = 749_826_464, 538
ORIGINAL_PARAMS, ORIGINAL_TENSORS = 675_129_632, 292




G = reference_generator()


@cache
def key_table() -> dict:
    return json.loads((FIXTURES / "xl2_keys.json").read_text())


def shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def table_shapes(layout: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in key_table()[layout].items()}


def meta_tensors(table: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in table.items()}


@cache
def minidit_meta(preset: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DiT(PRESETS[preset])
    return shapes(model.state_dict()), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", ["DiT-XL/2-256", "DiT-XL/2-512"])
def test_parameter_count_and_keys(preset):
    table, params = minidit_meta(preset)
    assert params == HUB_PARAMS
    assert len(table) == HUB_TENSORS
    # the committed list, produced by diffusers' DiTTransformer2DModel on meta (no pos_embed buffer is stored)
    assert table == table_shapes("diffusers")


@LIVE
def test_keys_equal_live_diffusers():
    """diffusers' class from the byte-exact Hub config.json, through the legacy Transformer2DModel remapping."""
    diffusers = G._quiet_diffusers()
    config = json.loads((FIXTURES / "hub-xl2-256" / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        reference = diffusers.Transformer2DModel.from_config(config)
    assert type(reference).__name__ == "DiTTransformer2DModel"
    expected = shapes(reference.state_dict())
    assert minidit_meta("DiT-XL/2-256")[0] == expected
    assert table_shapes("diffusers") == expected  # the committed list is still what diffusers builds


def test_original_key_count_and_shapes():
    """The original layout: original_keys + pos_embed, against the port of facebookresearch/DiT on meta."""
    with torch.device("meta"):
        port = G.OriginalDiT()
    expected = shapes(port.state_dict())
    assert sum(v.numel() for v in port.state_dict().values()) == ORIGINAL_PARAMS
    assert expected == table_shapes("original")
    keys = original_keys(28) + list(dit.ORIGINAL_IGNORED)
    assert len(keys) == len(set(keys)) == ORIGINAL_TENSORS
    assert set(keys) == set(expected)
    assert expected["pos_embed"] == (1, 256, 1152)


def test_original_to_hub_maps_onto_the_hub_keys_with_their_shapes():
    original = meta_tensors(table_shapes("original"))
    del original["pos_embed"]
    hub = original_to_hub(original, 28)
    assert shapes(hub) == table_shapes("diffusers")
    assert len(hub) == HUB_TENSORS


def test_load_dit_reads_the_real_hub_config(monkeypatch):
    """The byte-exact 602 B config.json (legacy class, ignored keys, no norm_eps) gives the DiT-XL/2-256 preset;
    the weights are meta tensors of the Hub shapes, handed over where load_dit reads the folder."""
    folder = FIXTURES / "hub-xl2-256" / "transformer"
    assert (folder / "config.json").stat().st_size == 602
    monkeypatch.setattr(weights, "load_folder", lambda path, dtype=None: meta_tensors(table_shapes("diffusers")))
    model = load_dit(folder, device="meta")
    assert model.config == PRESETS["DiT-XL/2-256"]
    assert model.config.norm_eps == 1e-5 and model.config.freq_shift == 1.0
    assert sum(p.numel() for p in model.parameters()) == HUB_PARAMS
    assert load_dit(folder, device="meta", convention="original").config == replace(
        PRESETS["DiT-XL/2-256"], norm_eps=1e-6, freq_shift=0.0)


@pytest.mark.parametrize("tokens, preset", [(256, "DiT-XL/2-256"), (1024, "DiT-XL/2-512")])
def test_load_dit_original_pt_guesses_the_preset(tmp_path, monkeypatch, tokens, preset):
    """An original `.pt` carries no config: the pos_embed length (256 or 1024 tokens) names the preset."""
    path = tmp_path / "DiT-XL-2.pt"
    path.write_bytes(b"")  # stands for the file; its content comes from the patched reader below
    original = meta_tensors(table_shapes("original"))
    original["pos_embed"] = torch.empty(1, tokens, 1152, device="meta")
    monkeypatch.setattr(weights, "load_file", lambda p, dtype=None: dict(original))
    model = load_dit(path, device="meta")
    assert model.config == replace(PRESETS[preset], norm_eps=1e-6, freq_shift=0.0)
    assert sum(p.numel() for p in model.parameters()) == HUB_PARAMS
