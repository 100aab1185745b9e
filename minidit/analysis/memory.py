"""What the analysis holds in memory, computed from the shapes: the README's memory table.

    python -m minidit.analysis.memory          # every model at its defaults (and the video models at full length)
    python -m minidit.analysis.memory --ffn    # the same with F, the feed-forward output, recorded too

The recorder (recorder.py) holds, for every capture (a layer's K, V or A, one stream of it), the previous step
until the next one arrives: captures under `GROUP_BELOW_BYTES` as two float32 buffers of their own, larger ones
as the model's own tensor (in the model's dtype) plus one float32 work buffer per capture size (on the CPU, per
chunk size: it reduces large captures in cache-sized chunks). With
`prev_on_host` the large ones move to pinned host buffers, and the accelerator keeps two staging buffers per
capture size. `held_bytes` applies these rules to a list of capture sizes; tests/test_analysis.py checks it
against what a recorder reports for real runs.
"""

import argparse
from dataclasses import dataclass

from minidit.analysis import recorder

GB = 1e9


@dataclass(frozen=True)
class Setting:
    """One model at one size, as its recorded layers see it."""

    model: str
    size: str  # what the numbers are for, e.g. "49 x 480 x 720"
    params: int  # the backbone's parameters (reference/checkpoints.md §12.1)
    layers: int
    width: int  # D: every captured token has D values
    tokens: dict[str, int]  # stream -> tokens per batch element that a layer's K, V, A and F carry
    branches: int  # guidance halves in the batch
    text_in_last: bool = True  # SD3's and Mochi's last block has no text output: no A or F of the text stream there
    text_width: int | None = None  # Mochi: the text stream's own width, its A's and F's (its K and V have `width`)

    def captures(self, tensors: str = "KVA") -> list[int]:
        """Elements per capture and branch, per layer and stream (`tensors` "KVAF": with F, --ffn)."""
        def width(stream: str, tensor: str) -> int:
            return self.text_width if stream == "txt" and tensor in "AF" and self.text_width else self.width

        per_layer = [tokens * width(stream, tensor) for stream, tokens in self.tokens.items() for tensor in tensors]
        sizes = per_layer * self.layers
        if not self.text_in_last:
            for output in set(tensors) & {"A", "F"}:
                sizes.remove(self.tokens["txt"] * width("txt", output))
        return sizes


def held_bytes(captures: list[int], branches: int, itemsize: int, prev_on_host: bool = False,
               cpu: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) the recorder holds for captures of these sizes (elements per branch) in a model
    dtype of `itemsize` bytes on an accelerator (or, `cpu`, on the CPU, where its work buffers are chunk-sized),
    not counting the float32 sums (a few numbers per capture and step)."""
    small = [n for n in captures if branches * n * itemsize < recorder.GROUP_BELOW_BYTES]
    large = [n for n in captures if branches * n * itemsize >= recorder.GROUP_BELOW_BYTES]
    device = sum(2 * 4 * branches * n for n in small)  # two float32 buffers, one per step parity
    work = {min(n, recorder.CPU_CHUNK) if cpu else n for n in large}
    device += sum(4 * branches * n for n in work)  # the float32 work buffer of each size
    held = sum(itemsize * branches * n for n in large)  # the previous step of every large capture
    if prev_on_host:  # on the host; the device stages two of each size
        return device + sum(2 * itemsize * branches * n for n in set(large)), held
    return device + held, 0


T5_XXL = 4_762_310_656
SETTINGS = [
    Setting("dit-xl-256", "256 x 256", 749_826_464, 28, 1152, {"img": 256}, 2),
    Setting("pixart-1024", "1024 x 1024", 611_349_152, 28, 1152, {"img": 4096}, 2),
    Setting("sd3", "1024 x 1024", 2_028_328_000, 24, 1536, {"img": 4096, "txt": 333}, 2, text_in_last=False),
    Setting("flux-dev", "1024 x 1024", 11_901_408_320, 57, 3072, {"img": 4096, "txt": 512}, 1),
    # Latte: spatial layers see (B T) x 1024 tokens, temporal (B L) x 16: 16,384 per batch element either way
    Setting("latte", "16 x 512 x 512", 1_057_246_880, 56, 1152, {"img": 16 * 1024}, 2),
    Setting("cogvideox-2b", "49 x 480 x 720", 1_693_783_872, 30, 1920, {"img": 13 * 1350, "txt": 226}, 2),
    Setting("cogvideox-5b", "49 x 480 x 720", 5_570_283_072, 42, 3072, {"img": 13 * 1350, "txt": 226}, 2),
    # Open-Sora 1.2: 17 frames -> 5 latent frames, 8x VAE, 2x2 patches (53 latent columns padded to 54); spatial and
    # temporal layers see every video token. Its default (the v1.2.0 sample config), then its longest: 16 s at 720p
    # (the README of v1.2.0). The backbone's size counts the null caption, a 1.2 M-value buffer.
    Setting("opensora", "51 x 240 x 426", 1_208_872_772, 56, 1152, {"img": 15 * 15 * 27}, 2),
    Setting("opensora", "408 x 720 x 1280", 1_208_872_772, 56, 1152, {"img": 120 * 45 * 80}, 2),
    # Mochi: 6 frames -> 1 latent frame (+1), 8x VAE, 2x2 patches: 1,590 tokens a latent frame at 480 x 848; T5 pads
    # to 256 tokens, all of them in K and V. Its default (MochiPipeline's 19 frames), then its longest, 163 frames.
    Setting("mochi", "19 x 480 x 848", 10_027_677_744, 48, 3072, {"img": 4 * 1590, "txt": 256}, 2,
            text_in_last=False, text_width=1536),
    Setting("mochi", "163 x 480 x 848", 10_027_677_744, 48, 3072, {"img": 28 * 1590, "txt": 256}, 2,
            text_in_last=False, text_width=1536),
]
TEXT_ENCODER = {"dit-xl-256": 0, "flux-dev": T5_XXL + 123_060_480, "sd3": T5_XXL + 123_650_304 + 694_659_840}
TEXT_ENCODER_FLOAT32 = {"opensora"}  # NOTE(official): Open-Sora runs T5 in float32 whatever the run's dtype


def table(itemsize: int = 2, ffn: bool = False) -> str:
    """The README's table (markdown), in a model dtype of `itemsize` bytes (2: bf16, the default on a GPU); with
    `ffn`, for runs that record F too."""
    tensors = "KVAF" if ffn else "KVA"
    rows = ["| model | frames x height x width | backbone | text encoders (released after encoding) | "
            f"previous {', '.join(tensors)} (default: accelerator) | `--prev-on-host`: accelerator | "
            "`--prev-on-host`: host |",
            "|---|---|---|---|---|---|---|"]
    for s in SETTINGS:
        captures = s.captures(tensors)
        device, _ = held_bytes(captures, s.branches, itemsize)
        staging, host = held_bytes(captures, s.branches, itemsize, prev_on_host=True)
        text = TEXT_ENCODER.get(s.model, T5_XXL) * (4 if s.model in TEXT_ENCODER_FLOAT32 else itemsize)
        rows.append(f"| {s.model} | {s.size} | {s.params * itemsize / GB:.1f} GB | "
                    f"{text / GB:.1f} GB | {device / GB:.1f} GB | {staging / GB:.2f} GB | "
                    f"{host / GB:.1f} GB |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--itemsize", type=int, default=2, help="bytes per value of the model dtype (default 2)")
    parser.add_argument("--ffn", action="store_true", help="runs that record F too (analyze.py --ffn)")
    args = parser.parse_args()
    print(table(args.itemsize, args.ffn))


if __name__ == "__main__":
    main()
