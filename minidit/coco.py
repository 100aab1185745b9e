"""MS-COCO captions as a run's prompts: `--prompts coco:FILE`, the study's prompt set (1000 captions per model).

minidit ships no captions. FILE is one of:
- an official annotation file, `captions_val2014.json` or `captions_val2017.json` (also the train files), from
  https://cocodataset.org (annotations_trainval2014.zip / annotations_trainval2017.zip): `images` and
  `annotations` lists, each annotation an `image_id` and a `caption`;
- Karpathy's split file `dataset_coco.json` (from the karpathy splits for captioning, e.g. the archive
  caption_datasets.zip): an `images` list, each with `cocoid`, `split` and `sentences` (each with `raw`).

The prompts, in a stable order that does not depend on the file's order: one per image, images by ascending COCO
image id; an image's caption is its first one: the annotation with the lowest annotation id (official files), or
the first of its `sentences` (Karpathy's file, whose "test" split alone is used: the 5000 images captioning papers
evaluate on). Whitespace is collapsed; images without a caption are skipped. `--num-prompts N` takes the first N.
"""

import json
from pathlib import Path

from minidit.errors import MiniditError

KARPATHY_SPLIT = "test"


def coco_captions(file: Path) -> list[str]:
    """The first caption of every image of a COCO captions file, by ascending image id."""
    data = _read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise MiniditError(f"{file} is not a COCO captions file: expected a JSON object with an 'images' list "
                           f"(captions_val2014.json, captions_val2017.json or Karpathy's dataset_coco.json)")
    if "annotations" in data:
        by_image = _official(file, data)
    else:
        by_image = _karpathy(file, data)
    captions = [by_image[image] for image in sorted(by_image)]
    if not captions:
        raise MiniditError(f"{file} holds no captions" + ("" if "annotations" in data else
                                                         f" in Karpathy's '{KARPATHY_SPLIT}' split"))
    return captions


def _read_json(file: Path) -> object:
    if not file.is_file():
        raise MiniditError(f"COCO captions file {file} does not exist: download captions_val2014.json (COCO's "
                           f"annotations_trainval2014.zip) or Karpathy's dataset_coco.json, and pass coco:PATH")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise MiniditError(f"COCO captions file {file} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MiniditError(f"COCO captions file {file} is not valid JSON (line {e.lineno}, column {e.colno}): "
                           f"download it again") from None
    except OSError as e:
        raise MiniditError(f"cannot read COCO captions file {file}: {e.strerror}") from None


def _official(file: Path, data: dict) -> dict[int, str]:
    """image id -> the caption of its lowest annotation id."""
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise MiniditError(f"{file}: 'annotations' must be a list of {{image_id, id, caption}} objects")
    first: dict[int, tuple[int, str]] = {}
    for n, a in enumerate(annotations):
        try:
            image, key, caption = int(a["image_id"]), int(a["id"]), a["caption"]
        except (TypeError, KeyError, ValueError):
            raise MiniditError(f"{file}: annotation {n} is not an {{image_id, id, caption}} object") from None
        if not isinstance(caption, str):
            raise MiniditError(f"{file}: annotation {n} (id {key}) has a caption that is not text")
        caption = " ".join(caption.split())
        if caption and (image not in first or key < first[image][0]):
            first[image] = (key, caption)
    return {image: caption for image, (_, caption) in first.items()}


def _karpathy(file: Path, data: dict) -> dict[int, str]:
    """cocoid -> the first sentence's raw text, for the images of the test split."""
    chosen: dict[int, str] = {}
    for n, image in enumerate(data["images"]):
        try:
            split, cocoid, sentences = image["split"], int(image["cocoid"]), image["sentences"]
        except (TypeError, KeyError, ValueError):
            raise MiniditError(f"{file}: image {n} lacks 'split', 'cocoid' or 'sentences': not Karpathy's "
                               f"dataset_coco.json, nor an official file (no 'annotations')") from None
        if split != KARPATHY_SPLIT:
            continue
        raws = [" ".join(str(s.get("raw", "")).split()) for s in sentences if isinstance(s, dict)]
        raws = [r for r in raws if r]
        if raws:
            chosen[cocoid] = raws[0]
    return chosen
