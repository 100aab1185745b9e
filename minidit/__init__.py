"""minidit: minimal pure-PyTorch Diffusion Transformers that expose K, V and the attention output A.

Axis vocabulary, used in every file, comment and einops pattern:

    B   batch                     T   frames (video models)
    H   latent grid height        W   latent grid width
    L   tokens                    D   model width
    Nh  attention heads           Dh  head dim (D = Nh * Dh)
    C   channels (latent or pixel)

Public API:

    minidit.load_backbone(name_or_dir)      -> model ready for sampling
    minidit.sample(...)                      -> final latents, optionally recording K/V/A statistics
    minidit.analysis.read_run(run_dir)       -> a finished run directory as numpy arrays
"""

__version__ = "0.1.0"


from minidit.errors import MiniditError

__all__ = ["MiniditError", "__version__"]
