"""Reference SSIM values for minidit/caching/report.py's `ssim` -> tests/fixtures/ssim.json.

    pip install scikit-image==0.25.2 && python tests/reference/generate_ssim.py

scikit-image's structural_similarity with Wang et al.'s settings (an 11-tap Gaussian window of sigma 1.5, the
population covariance, data range 255), per image of a batch, averaged: the image pairs are those of
tests/test_cache.py's `ssim_pair` (seeded integer images, the same on every machine).
"""

import json
import sys
from pathlib import Path

import numpy as np
import skimage
from skimage.metrics import structural_similarity

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]
from test_cache import ssim_pair  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "ssim.json"
CASES = [(0, 4), (1, 20), (2, 60), (3, 0)]  # (seed, noise amplitude in uint8 levels)


def main() -> None:
    cases = []
    for seed, noise in CASES:
        a, b = ssim_pair(seed, noise)
        values = [structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=255, channel_axis=-1) for x, y in zip(a, b)]
        cases.append({"seed": seed, "noise": noise, "ssim": float(np.mean(values))})
    OUT.write_text(json.dumps({"generator": f"scikit-image {skimage.__version__} structural_similarity",
                               "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}: {cases}")


if __name__ == "__main__":
    main()
