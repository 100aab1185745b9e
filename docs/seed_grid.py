"""Draw docs/dit-tiny-seeds.png: dit-tiny's samples for every class (columns) and seeds 0-5 (rows).

    python docs/seed_grid.py [out.png]      # 48 samples, DDIM 50 steps, guidance 4, about a minute on a CPU
"""

import sys

import matplotlib

import minidit

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SEEDS = range(6)


def main(out: str = "docs/dit-tiny-seeds.png") -> None:
    recipe = minidit.load_backbone("dit-tiny")
    classes = recipe.default_prompts()
    fig, axes = plt.subplots(len(SEEDS), len(classes), figsize=(10, 8))
    for j, name in enumerate(classes):
        for i, seed in enumerate(SEEDS):
            latents, _ = minidit.sample(recipe, name, seed=seed)
            axes[i, j].imshow(recipe.decode(latents)[0])
            axes[i, j].axis("off")
        axes[0, j].set_title(name, fontsize=8)
    fig.savefig(out, dpi=60)


if __name__ == "__main__":
    main(*sys.argv[1:])
