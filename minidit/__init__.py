"""minidit: minimal pure-PyTorch Diffusion Transformers that expose K, V and the attention output A.

Axis vocabulary, used in every file, comment and einops pattern:

    B   batch                     T   frames (video models)
    H   latent grid height        W   latent grid width
    L   tokens                    D   model width
    Nh  attention heads           Dh  head dim (D = Nh * Dh)
    C   channels (latent or pixel)

Public API (see minidit/api.py):

    minidit.load_backbone(name_or_dir)   -> a recipe (the contract: minidit/pipelines/recipe.py, `Recipe`)
    minidit.sample(recipe, prompt, ...)  -> final latents, and the K/V/A sums when recording
    minidit.analysis.read_run(run_dir)   -> a finished run directory as numpy arrays
"""

__version__ = "0.1.0"

from minidit import analysis  # noqa: E402
from minidit.api import load_backbone, sample  # noqa: E402
from minidit.errors import MiniditError  # noqa: E402

__all__ = ["MiniditError", "analysis", "load_backbone", "sample", "__version__"]
