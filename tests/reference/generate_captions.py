"""Reference output of Open-Sora 1.2's prompt cleaning (`text_preprocessing`) -> tests/fixtures/captions.json.

    python tests/reference/generate_captions.py [--opensora PATH]   # PATH: a git clone of hpcaitech/Open-Sora

Open-Sora is no installable library: this reads `opensora/models/text_encoder/t5.py` at the v1.2.0 tag from a
clone (default: $OPENSORA_REPO), takes its cleaning functions out of the file (the rest of the module needs
colossalai and a GPU) and runs them, with the libraries they need: `pip install ftfy beautifulsoup4`.
"""

import argparse
import ast
import json
import os
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "captions.json"
TAG, FILE = "v1.2.0", "opensora/models/text_encoder/t5.py"
FUNCTIONS = ("basic_clean", "clean_caption", "text_preprocessing")

# Prompts that exercise every step of the cleaning, and the video prompts minidit runs by default (with Open-Sora's
# aesthetic-score suffix, as its script adds it before cleaning)
PROMPTS = [
    "A Red Fox running through fresh snow, slow motion aesthetic score: 6.5.",
    "a chef tossing vegetables in a wok over a high flame aesthetic score: 6.5.",
    "Visit https://example.com/page or www.shop.net/item now",
    "an <b>old</b> house &amp; a <i>tree</i>",
    "photo by @someone123 of a bird",
    "a temple 寺院 in the mountains",
    "a long—dash and a short–dash",
    "“quoted” and ‘single’ and «guillemets»",
    "tom &quot;the cat&quot; and jerry",
    "server at 192.168.0.1 glowing",
    "news 3:45  ",
    "a line\\nbreak",
    "item #12 and #123456 and 1234567",
    "a picture file.png of a dog.jpg",
    "wow...... amazing ''' quotes",
    "***sale*** [new] {hot} (now) | a/b",
    "a lone . dot",
    "this-is-my-cute-cat_in_a_box",
    "model jc6640 and jc6640vc and 6640vc231 and j2d1a2a",
    "worldwide free shipping and free download, click for details",
    "a png image on page 4",
    "a 1920x1080 wallpaper of 3.5x2 cards",
    "a cat : sleeping,on the sofa.here",
    "\"a quoted prompt\"",
    "-leading dash and trailing plus+",
    ".hidden",
    "Rain%20falling+on+a+street",
    "  A Hummingbird Hovering At A Red Flower, Close-Up  ",
]


def official_functions(repo: Path) -> dict:
    source = subprocess.run(["git", "-C", str(repo), "show", f"{TAG}:{FILE}"], check=True, capture_output=True,
                            text=True).stdout
    tree = ast.parse(source)
    keep = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS
            or isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BAD_PUNCT_REGEX" for t in node.targets)]
    namespace: dict = {}
    exec("import html, re, ftfy\n", namespace)  # noqa: S102 - the official source, read for reference numbers
    exec(compile(ast.Module(body=keep, type_ignores=[]), FILE, "exec"), namespace)  # noqa: S102
    return namespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opensora", type=Path, default=os.environ.get("OPENSORA_REPO"),
                        help="a git clone of hpcaitech/Open-Sora (with its tags)")
    args = parser.parse_args()
    if args.opensora is None:
        raise SystemExit("pass --opensora PATH (a git clone of hpcaitech/Open-Sora) or set OPENSORA_REPO")
    commit = subprocess.run(["git", "-C", str(args.opensora), "rev-parse", f"{TAG}^{{commit}}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    official = official_functions(args.opensora)
    import bs4
    import ftfy

    cleaned = {prompt: official["text_preprocessing"](prompt) for prompt in PROMPTS}
    OUT.write_text(json.dumps({"source": {"repo": "hpcaitech/Open-Sora", "tag": TAG, "commit": commit, "file": FILE,
                                          "function": "text_preprocessing", "ftfy": ftfy.__version__,
                                          "beautifulsoup4": bs4.__version__},
                               "cleaned": cleaned}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({len(cleaned)} prompts)")


if __name__ == "__main__":
    main()
