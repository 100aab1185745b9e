"""`--prompts coco:FILE`: the first caption of each image of a COCO captions file, in both formats (the official
annotation files and Karpathy's split file), in a stable order; malformed files are one-line errors."""

import importlib.util
import json

import pytest
from conftest import ROOT

from minidit.coco import coco_captions
from minidit.errors import MiniditError

spec = importlib.util.spec_from_file_location("analyze", ROOT / "analyze.py")
analyze = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze)

# An official file in the layout of captions_val2014.json, out of order on purpose: image 42 has two captions (the
# lower annotation id, 7, comes later in the list), image 9 one with extra whitespace, image 77 only an empty one
OFFICIAL = {
    "info": {"description": "COCO 2014 Dataset"}, "licenses": [],
    "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
               {"id": 9, "file_name": "COCO_val2014_000000000009.jpg"},
               {"id": 77, "file_name": "COCO_val2014_000000000077.jpg"}],
    "annotations": [{"image_id": 42, "id": 31, "caption": "A dog on a couch."},
                    {"image_id": 9, "id": 12, "caption": "  A plate of food \n with broccoli. "},
                    {"image_id": 42, "id": 7, "caption": "A brown dog sleeping on a sofa."},
                    {"image_id": 77, "id": 3, "caption": "   "}],
}
# Karpathy's dataset_coco.json: only the test split counts, by cocoid, first sentence's raw text
KARPATHY = {"dataset": "coco", "images": [
    {"filepath": "val2014", "filename": "a.jpg", "imgid": 0, "split": "test", "cocoid": 500,
     "sentences": [{"raw": "A man riding a wave on a surfboard.", "tokens": [], "imgid": 0, "sentid": 0},
                   {"raw": "A surfer in the ocean.", "tokens": [], "imgid": 0, "sentid": 1}]},
    {"filepath": "val2014", "filename": "b.jpg", "imgid": 1, "split": "train", "cocoid": 5,
     "sentences": [{"raw": "Not in the test split.", "tokens": [], "imgid": 1, "sentid": 2}]},
    {"filepath": "val2014", "filename": "c.jpg", "imgid": 2, "split": "test", "cocoid": 120,
     "sentences": [{"raw": "Two giraffes  near a tree.", "tokens": [], "imgid": 2, "sentid": 3}]},
]}


def write(tmp_path, data, name="captions.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_official_file_first_caption_per_image_by_image_id(tmp_path):
    assert coco_captions(write(tmp_path, OFFICIAL)) == ["A plate of food with broccoli.",
                                                        "A brown dog sleeping on a sofa."]


def test_order_does_not_depend_on_the_files_order(tmp_path):
    shuffled = dict(OFFICIAL, annotations=OFFICIAL["annotations"][::-1], images=OFFICIAL["images"][::-1])
    assert coco_captions(write(tmp_path, shuffled)) == coco_captions(write(tmp_path, OFFICIAL, "other.json"))


def test_karpathy_file_test_split_by_cocoid(tmp_path):
    assert coco_captions(write(tmp_path, KARPATHY)) == ["Two giraffes near a tree.",
                                                        "A man riding a wave on a surfboard."]


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", r"is not valid JSON \(line 1, column 2\)"),
    ([1, 2], r"is not a COCO captions file: expected a JSON object with an 'images' list"),
    ({"images": [], "annotations": {"a": 1}}, r"'annotations' must be a list"),
    ({"images": [], "annotations": [{"image_id": 1, "caption": "no id"}]}, r"annotation 0 is not an"),
    ({"images": [], "annotations": [{"image_id": 1, "id": 2, "caption": 3}]}, r"caption that is not text"),
    ({"images": [], "annotations": []}, r"holds no captions$"),
    ({"images": [{"file_name": "x.jpg"}]}, r"image 0 lacks 'split', 'cocoid' or 'sentences'"),
    ({"images": [dict(KARPATHY["images"][1])]}, r"holds no captions in Karpathy's 'test' split"),
])
def test_malformed_files_are_one_line_errors(tmp_path, content, match):
    with pytest.raises(MiniditError, match=match) as info:
        coco_captions(write(tmp_path, content))
    assert "\n" not in str(info.value)


def test_missing_file_says_where_captions_come_from(tmp_path):
    with pytest.raises(MiniditError, match=r"does not exist: download captions_val2014.json"):
        coco_captions(tmp_path / "captions_val2014.json")


def test_num_prompts_takes_the_first(tmp_path):
    path = write(tmp_path, OFFICIAL)
    prompts, source = analyze.read_prompts(f"coco:{path}", 1, [])
    assert prompts == ["A plate of food with broccoli."] and source == f"coco:{path}"
    with pytest.raises(MiniditError, match=r"--num-prompts 3 asks for more prompts than the 2 available"):
        analyze.read_prompts(f"coco:{path}", 3, [])


def test_analyze_runs_on_coco_captions(tmp_path, capsys):
    """flux-tiny on the first two captions: prompts.txt holds them in order, the manifest names the source."""
    path = write(tmp_path, OFFICIAL)
    out = tmp_path / "run"
    code = analyze.main(["--prompts", f"coco:{path}", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "prompts.txt").read_text(encoding="utf-8").splitlines() == coco_captions(path)
    assert json.loads((out / "manifest.json").read_text())["prompt_source"] == f"coco:{path}"


def test_a_bad_coco_file_fails_before_loading(tmp_path, capsys):
    code = analyze.main(["--prompts", f"coco:{write(tmp_path, '[]')}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not a COCO captions file" in err[0]
    assert not (tmp_path / "run").exists()
