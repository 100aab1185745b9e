"""Checkpoint files: Hub download, safetensors (single and sharded), torch pickles, strict loading with a report.

This module knows no model. Each model file keeps its own key map and calls:

    folder = download(repo_id, revision=..., allow_patterns=[...])   # or a local folder in the Hub layout
    sd = load_folder(folder / "transformer")                          # one file, or shards + index.json
    with torch.device("meta"): model = Model(cfg)
    load_into(model, sd, dtype=..., device=...)                       # strict: names and shapes checked

A second checkpoint layout goes through the model's rename table and `rename` (see "rename tables" below).
Every failure a user can fix raises `MiniditError` with a message saying what to do.
"""

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minidit.errors import MiniditError

# The file names a component folder may hold, in order of preference (diffusers, then transformers names).
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")  # pytorch_model: transformers' .bin name
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


# ---- the Hub --------------------------------------------------------------------------------------------

def download(repo_id: str, *, revision: str | None = None, allow_patterns: tuple[str, ...] = (),
             local_dir: str | Path | None = None, local_copy: str | None = None) -> Path:
    """Fetch only the files of `repo_id` at `revision` that match `allow_patterns`; returns the snapshot folder.

    `local_copy` says how to make the folder --weights takes instead (default: `hf download` of this repository).
    Where a folder offers both safetensors and `.bin` weights, only the safetensors are fetched. Files land
    in the user's Hub cache (HF_HOME) unless `local_dir` is given; the token comes from HF_TOKEN or
    `hf auth login`. Works offline when the files are already cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    local_copy = local_copy or f"download it where there is network (`hf download {repo_id}`) and pass that folder"
    offline_help = (f"{local_copy} with --weights DIR (for a gated repository log in first with `hf auth login` or "
                    f"set HF_TOKEN), or connect and retry")
    try:
        try:
            listed = snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns), dry_run=True)
            patterns = prefer_safetensors([info.filename for info in listed])
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
            raise
        except (OSError, TypeError):  # offline (DryRunError), or a huggingface_hub without dry_run
            patterns = list(allow_patterns)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_dir=local_dir))
    except GatedRepoError:
        raise MiniditError(f"{where} is gated: accept its licence on its Hub page, then log in with "
                           f"`hf auth login` or set HF_TOKEN, and retry") from None
    except RevisionNotFoundError:
        raise MiniditError(f"{repo_id} has no revision {revision!r}: check --revision") from None
    except RepositoryNotFoundError:
        raise MiniditError(f"{repo_id} was not found on the Hub (or is private and no token was given): check the "
                           f"name, or log in with `hf auth login`") from None
    except LocalEntryNotFoundError:
        raise MiniditError(f"cannot reach the Hugging Face Hub and {where} is not in the local cache: "
                           f"{offline_help}") from None
    except (HfHubHTTPError, OSError) as e:  # other network failures
        raise MiniditError(f"could not download {where} ({type(e).__name__}); {offline_help}") from None


def prefer_safetensors(files: list[str]) -> list[str]:
    """Drop `.bin` weights from folders that also offer safetensors."""
    with_safetensors = {str(Path(f).parent) for f in files if f.endswith((".safetensors", ".safetensors.index.json"))}
    pickled = (".bin", ".bin.index.json")
    return [f for f in files if not (f.endswith(pickled) and str(Path(f).parent) in with_safetensors)]


# ---- reading files -----------------------------------------------------------------------------------

def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MiniditError(f"{path} is missing: the folder is not in the Hub layout this model needs")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MiniditError(f"{path} is not valid JSON ({e}); download it again") from None


def safetensors_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names, dtypes and shapes of a safetensors file, read from its header alone (no tensor is loaded).

    Also checks that the file is long enough to hold every tensor the header lists.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise MiniditError(f"{path} is truncated (only {size} bytes): delete it and download it again")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise MiniditError(f"{path} is not a safetensors file or is truncated: delete it and download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MiniditError(f"{path} has a corrupt safetensors header: delete it and download it again") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise MiniditError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}): "
                           f"delete it and download it again")
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


def load_file(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One checkpoint file: safetensors, or a torch pickle (`.bin`, `.pt`, `.pth`) read with weights_only.

    With `dtype`, floating tensors are cast one by one as they are read, so that an fp32 file loaded in bf16
    never needs its full fp32 size in memory (T5-XXL: 19 GB in fp32, 9.5 GB in bf16).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MiniditError(f"{path} is missing: download the checkpoint again or check --weights")
    cast = (lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t)  # noqa: E731
    if path.suffix == ".safetensors":
        safetensors_header(path)  # clear errors for truncated or foreign files
        with safe_open(path, framework="pt") as f:
            return {key: cast(f.get_tensor(key)) for key in f.keys()}
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean the same to the user
        raise MiniditError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}); "
                           f"it may be truncated: delete it and download it again") from None
    for wrapper in ("ema", "state_dict"):  # training checkpoints (DiT) and released .pth files (PixArt)
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    return {key: cast(tensor) for key, tensor in sd.items()}


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The names a component's weights may have, in order of preference: safetensors before `.bin`, an index before
    a single file. A variant (diffusers' `variant="bf16"`) puts its name before the extension: the shards
    `diffusion_pytorch_model.bf16-00001-of-00003.safetensors`, their index
    `diffusion_pytorch_model.safetensors.index.bf16.json`."""
    tag = f".{variant}" if variant else ""
    return [folder / f for ext in (".safetensors", ".bin") for name in WEIGHT_NAMES
            for f in (f"{name}{ext}.index{tag}.json", f"{name}{tag}{ext}")]


def has_weights(folder: str | Path, variant: str | None = None) -> bool:
    """Whether a component folder holds weights (of `variant`, None = the full-precision files)."""
    return any(f.is_file() for f in _weight_files(Path(folder), variant))


def find_weights(folder: str | Path, variant: str | None = None) -> Path:
    """The weight file (or shard index) of a component folder, safetensors preferred over `.bin`; `variant` picks
    diffusers' variant files (e.g. "bf16") instead of the full-precision ones."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MiniditError(f"{folder} does not exist: pass a folder in the Hub layout with --weights DIR")
    for candidate in _weight_files(folder, variant):
        if candidate.is_file():
            return candidate
    example = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    raise MiniditError(f"{folder} holds no {variant + ' ' if variant else ''}weights (expected e.g. {example} or a "
                       f"*.safetensors.index{'.' + variant if variant else ''}.json with its shards)")


def load_folder(folder: str | Path, dtype: torch.dtype | None = None, variant: str | None = None
                ) -> dict[str, torch.Tensor]:
    """All tensors of a component folder (of `variant`, see `find_weights`): a single file, or the shards listed by
    its index.json; floating tensors cast to `dtype` as they are read (see `load_file`)."""
    path = find_weights(folder, variant)
    if ".index" not in path.name:
        return load_file(path, dtype)
    index = read_json(path)
    weight_map: dict[str, str] = index.get("weight_map", {})
    sd: dict[str, torch.Tensor] = {}
    stored = 0  # bytes of the shards' tensors as stored, for the index's total_size
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / shard
        if shard_path.suffix == ".safetensors":
            tensors = load_file(shard_path, dtype)
            stored += sum(_stored_bytes(name, shape) for name, shape in safetensors_header(shard_path).values())
        else:
            tensors = load_file(shard_path)
            stored += sum(t.numel() * t.element_size() for t in tensors.values())
            tensors = {k: t.to(dtype) if dtype is not None and t.is_floating_point() else t for k, t in tensors.items()}
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            raise MiniditError(f"{shard_path} does not hold the tensors its index lists "
                               f"({len(set(tensors) ^ listed)} differ): download the checkpoint again")
        sd.update(tensors)
    total = index.get("metadata", {}).get("total_size")
    if total is not None and int(total) != stored:
        raise MiniditError(f"{path} says the shards hold {total} bytes, they hold {stored}: download again")
    return sd


def _stored_bytes(dtype_name: str, shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count * SAFETENSORS_DTYPES[dtype_name]


# ---- rename tables: a second checkpoint layout -----------------------------------------------------------
#
# A model file writes a second layout (e.g. FLUX's BFL single file) as a table, one row per source tensor: a Hub key
# or a named operation. "{i}" (any "{name}") is a block index, expanded over the blocks `rename` is given for it:
#     "blocks.{i}.attn.qkv.weight": split("transformer_blocks.{i}.attn1.to_{}.weight", "q", "k", "v"),

@dataclass(frozen=True)
class Rule:
    """One source tensor -> the Hub tensors `targets`, made by `make` (a plain rename passes it through)."""
    targets: tuple[str, ...]
    make: Callable[[torch.Tensor], Sequence[torch.Tensor]] = lambda t: [t]
    shared: bool = False  # the targets have a block index the source key lacks: one copy per block


def split(target: str, *parts: str, sizes: tuple[int, ...] | None = None) -> Rule:
    """A fused tensor cut along dim 0 into `target` with "{}" replaced by each of `parts`, in order: equal parts,
    or parts in the proportions `sizes` (FLUX's linear1 is q, k, v, mlp = 1:1:1:4)."""
    sizes = sizes or (1,) * len(parts)
    return Rule(tuple(target.replace("{}", part) for part in parts),
                lambda t: t.split([len(t) // sum(sizes) * size for size in sizes]))


def swap_halves(target: str) -> Rule:
    """(a, b) stored where the Hub layout keeps (b, a) along dim 0, e.g. (shift, scale) -> (scale, shift)."""
    return Rule((target,), lambda t: [torch.cat(t.chunk(2)[::-1])])


def shared(target: str) -> Rule:
    """One tensor copied into every block: `target` has a block index, the source key none."""
    return Rule((target,), shared=True)


DROP = Rule((), lambda t: [])  # a source tensor with no Hub counterpart (e.g. a fixed table), ignored if present


def as_rule(rule: str | Rule) -> Rule:
    return Rule((rule,)) if isinstance(rule, str) else rule


def weight_and_bias(modules: dict[str, str | Rule]) -> dict[str, Rule]:
    """Module rows -> tensor rows: each row stands for the module's `.weight` and `.bias`."""
    rules = {src: as_rule(rule) for src, rule in modules.items()}
    return {f"{src}.{param}": replace(rule, targets=tuple(f"{t}.{param}" for t in rule.targets))
            for src, rule in rules.items() for param in ("weight", "bias")}


def block_indices(pattern: str, blocks: dict[str, Sequence[int]]) -> list[dict[str, int]]:
    """[{name: 0}, {name: 1}, ...] over the blocks of the index "{name}" in `pattern`; [{}] if it has none."""
    names = [name for name in blocks if f"{{{name}}}" in pattern]
    assert len(names) <= 1, f"{pattern} has more than one block index"
    return [{name: i} for name in names for i in blocks[name]] if names else [{}]


def source_keys(table: dict[str, str | Rule], blocks: dict[str, Sequence[int]]) -> dict[str, tuple[Rule, list]]:
    """Every source key `table` names -> its rule and, for each of the rule's targets, the Hub keys it makes."""
    rows = {}
    for pattern, rule in table.items():
        rule = as_rule(rule)
        for index in block_indices(pattern, blocks):
            key = pattern.format(**index)
            assert key not in rows, f"the rename table names {key} twice"
            copies = lambda t: block_indices(t, blocks) if rule.shared else [index]  # shared: one per block
            rows[key] = rule, [[target.format(**i) for i in copies(target)] for target in rule.targets]
    return rows


def rename(sd: dict[str, torch.Tensor], table: dict[str, str | Rule], *, blocks: dict[str, Sequence[int]],
           source: str) -> dict[str, torch.Tensor]:
    """Apply a rename table: `sd` must hold exactly the table's source keys (DROP rows may be absent); returns
    the Hub-layout state dict, each Hub key made once. `source` says what `sd` is, for the error message."""
    rows = source_keys(table, blocks)
    missing = sorted(k for k, (rule, _) in rows.items() if k not in sd and rule is not DROP)
    unexpected = sorted(set(sd) - set(rows))
    if missing or unexpected:
        problems = [f"{verb} {len(keys)} {what} (e.g. {', '.join(keys[:3])})" for verb, what, keys in (
            ("lacks", "of its tensors", missing), ("holds", "it should not", unexpected)) if keys]
        raise MiniditError(f"{source} {' and '.join(problems)}: is it the right file, and the right config?")
    out = {}
    for key, (rule, targets) in rows.items():
        if key not in sd:
            continue  # an absent DROP row
        for hub_keys, tensor in zip(targets, rule.make(sd[key]), strict=True):
            for hub_key in hub_keys:
                assert hub_key not in out, f"the rename table makes {hub_key} twice"
                out[hub_key] = tensor
    return out


# ---- loading into a model ----------------------------------------------------------------------------

def key_report(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Lines describing missing, unexpected and mis-shaped keys (empty when the two sets agree)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    lines = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    if misshaped:
        k = misshaped[0]
        lines.append(f"{len(misshaped)} with the wrong shape (e.g. {k}: expected {tuple(expected[k])}, "
                     f"found {tuple(found[k])})")
    return lines


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], *, dtype: torch.dtype, device: str | torch.device,
              source: str) -> None:
    """Strictly load `sd` into `model` (built on the meta device), casting floating tensors to `dtype`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = key_report(expected, {k: tuple(v.shape) for k, v in sd.items()})
    if report:
        raise MiniditError(f"{source} does not match {type(model).__name__}: {'; '.join(report)}. "
                           f"Is it the right model, or a different config?")
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise MiniditError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]

