"""The run directory: a manifest, one record per prompt (written atomically), and what aggregation derives.

    RUN/manifest.json        what was run: model, weights, scheduler, timesteps, sigmas, seeds, layers, versions
    RUN/prompts.txt          the prompts (or class labels) in order; record i belongs to line i
    RUN/records/000012.npz   prompt 12's float64 sums [layer, stream, branch, tensor, transition, 7]
    RUN/summary.csv, cv.csv, figures/     written by `aggregate` (a separate step)
    RUN/.lock                held by the run filling the directory (`RunDir.hold`)

Records are independent files named by prompt index, so several processes of one run (torchrun's ranks)
can fill the directory at once and a crash loses at most the prompt in flight; `--resume` skips the records
already there, and recomputes any that is damaged (unreadable, of another shape, non-finite: `sound_records`),
naming it.
Every file is written through a temporary file and a rename (`atomic_file`), so a failed write (disk full,
no permission) leaves the file as it was and reports one line naming it.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from minidit.errors import MiniditError

# The manifest keys that must agree for a resumed run to continue the same measurement ("tensors": with or without
# F, --ffn; the layers' "f_point", present only with F, is compared as part of it).
IDENTITY_KEYS = ("model", "weights", "revision", "dtype", "steps", "scheduler", "timesteps", "guidance",
                 "resolution", "frames", "seed", "prompts_sha256", "layers", "streams", "branches", "tensors",
                 "convention", "max_sequence_length", "dynamic_cfg")


class DamagedRecord(Exception):
    """A record that cannot be used; the message says why."""


LOCK = ".lock"  # RUN/.lock: held (flock) by the process that fills the run; the OS releases it when that one ends


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records = self.path / "records"
        self.manifest_path = self.path / "manifest.json"
        self.lock: int | None = None  # the open lock file while this process holds the run
        self.created: list[Path] = []  # the folders `hold` created

    def hold(self) -> None:
        """Take the run directory for this process (creating it): a second run on it is refused while this one
        lives. An flock, so the OS releases it when the process ends, however it ends (kill -9 included), and it
        is never left stuck. Under torchrun, rank 0 holds it for all ranks."""
        if self.lock is not None:
            return
        if self.path.is_dir() and not self.exists() and any(p.name != LOCK for p in self.path.iterdir()):
            raise MiniditError(f"{self.path} exists and is not a minidit run directory: choose another --out")
        self.created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # removed if no run starts
        make_folder(self.path)
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MiniditError(f"cannot create {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise MiniditError(f"{self.path} is in use by another run (process {holder}): wait for it to end, "
                                   f"or choose another --out") from None
            raise MiniditError(f"cannot lock {path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self.lock = fd

    def release(self) -> None:
        """Let the run directory go; if no run was started in it (an error before `open`), leave no trace."""
        if self.lock is None:
            return
        if not self.exists():
            (self.path / LOCK).unlink(missing_ok=True)
            for folder in self.created:  # innermost first
                with contextlib.suppress(OSError):  # not empty: something else was put there
                    folder.rmdir()
        os.close(self.lock)  # closing the file releases the flock
        self.lock = None

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def open(self, manifest: dict, prompts: list[str], *, resume: bool) -> None:
        """Create the directory for a new run, or check that `manifest` continues the run already there."""
        manifest = dict(manifest, prompts_sha256=prompts_digest(prompts))
        self.hold()
        if self.exists():
            if not resume:
                raise MiniditError(f"{self.path} already holds a run: pass --resume to continue it, or choose "
                                   f"another --out")
            old = self.manifest()
            changed = [k for k in IDENTITY_KEYS if identity(old, k) != identity(manifest, k)]
            if changed:
                raise MiniditError(f"cannot resume {self.path}: it was run with different {', '.join(changed)}; "
                                   f"use the same settings, or another --out")
            manifest = dict(old, **{k: v for k, v in manifest.items() if k not in IDENTITY_KEYS})
        make_folder(self.records)
        write_atomic(self.path / "prompts.txt", "".join(p + "\n" for p in prompts).encode("utf-8"))
        self.write_manifest(manifest)

    def manifest(self) -> dict:
        if not self.exists():
            raise MiniditError(f"{self.path} is not a minidit run directory (no manifest.json)")
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except OSError as e:
            raise MiniditError(f"cannot read {self.manifest_path}: {e.strerror}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MiniditError(f"{self.manifest_path} is damaged ({e}): it is not the manifest minidit wrote") from None

    def write_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))

    def record_path(self, index: int) -> Path:
        return self.records / f"{index:06d}.npz"

    def done(self) -> set[int]:
        """The prompts whose record file exists (see `sound_records` for whether each one can be used)."""
        return {int(p.stem) for p in self.records.glob("[0-9]*.npz")} if self.records.is_dir() else set()

    def record_shape(self) -> tuple[int, ...] | None:
        """The shape of a record's sums in this run, [layer, stream, branch, tensor, transition, 7] (None where no
        manifest says: none yet, or a hand-made one)."""
        if not self.exists():
            return None
        m = self.manifest()
        try:
            return (len(m["layers"]), len(m["streams"]), len(m["branches"]), len(m.get("tensors", "KVA")),
                    m["steps"] - 1, 7)
        except (KeyError, TypeError):
            return None

    def load_record(self, index: int, shape: tuple[int, ...] | None) -> tuple[np.ndarray, dict]:
        """Prompt `index`'s sums and meta; DamagedRecord says why they cannot be used (unreadable, not of `shape`,
        the run's `record_shape()`, non-finite sums). A crash cannot leave such a file (records are written
        atomically); a disk or a hand can."""
        try:
            with np.load(self.record_path(index)) as record:
                sums, meta = record["sums"], json.loads(str(record["meta"]))
        except Exception as e:  # noqa: BLE001 - a damaged zip raises any of several errors; each means the same
            raise DamagedRecord(f"unreadable ({type(e).__name__})") from None
        if shape is not None and sums.shape != shape:
            raise DamagedRecord(f"sums of shape {sums.shape}, not this run's {shape}")
        if not np.isfinite(sums).all():
            raise DamagedRecord("non-finite sums")
        return sums, meta

    def sound_records(self) -> tuple[set[int], dict[int, str]]:
        """The records that can be used, and the damaged ones with what is wrong (to recompute on --resume)."""
        found, shape, damage = self.done(), self.record_shape(), {}
        for i in sorted(found):
            try:
                self.load_record(i, shape)
            except DamagedRecord as e:
                damage[i] = str(e)
        return found - set(damage), damage

    def write_record(self, index: int, sums: np.ndarray, meta: dict) -> None:
        with atomic_file(self.record_path(index)) as f:
            np.savez(f, sums=sums, meta=np.array(json.dumps(meta)))

    def read_records(self) -> tuple[list[int], np.ndarray, list[dict]]:
        """All finished records: prompt indices, sums stacked as [prompt, layer, stream, branch, tensor, d, 7]."""
        shape, damage = self.record_shape(), {}
        indices, sums, metas = [], [], []
        for i in sorted(self.done()):  # each record read once: checked and kept
            try:
                record_sums, meta = self.load_record(i, shape)
            except DamagedRecord as e:
                damage[i] = str(e)
                continue
            indices.append(i)
            sums.append(record_sums)
            metas.append(meta)
        if damage:
            i, why = next(iter(damage.items()))
            more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
            raise MiniditError(f"record {self.record_path(i)} is damaged: {why}{more}; rerun the same command with "
                               f"--resume to recompute it")
        if not indices:
            raise MiniditError(f"{self.path} has no finished prompts yet: nothing to aggregate")
        return indices, np.stack(sums), metas


def identity(manifest: dict, key: str) -> str:
    """The manifest's `key` as a resumed run compares it. The layers without "f_point": where F is taken follows from
    the model, and whether there is an F at all from "tensors", which then names the difference."""
    value = manifest.get(key)
    if key == "layers" and isinstance(value, list):
        value = [{k: v for k, v in layer.items() if k != "f_point"} if isinstance(layer, dict) else layer
                 for layer in value]
    return json.dumps(value)


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_file(path: Path, text: bool = False, **open_args) -> Iterator[IO]:
    """A new file to write `path` through: a temporary file beside it, renamed over `path` when the block ends,
    so readers never see a half-written file. If the block or the write fails, the temporary file is removed
    and `path` is left as it was; an OSError (disk full, no permission) becomes one line naming `path`."""
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    try:
        with open(tmp, "x" if text else "xb", **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise MiniditError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful rename


def make_folder(path: Path) -> None:
    """`mkdir -p`, a failure reported as one line naming the folder the OS could not create and why."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MiniditError(f"cannot create the folder {path} ({e.filename}: {e.strerror})") from None


def check_creatable(path: Path) -> None:
    """Fail early, before any weights are loaded, when `path` cannot become a folder to write into: it or a
    parent is a file, or the nearest existing folder is not writable. Root passes the last test almost everywhere
    (not on a read-only file system); `make_folder` and `atomic_file` still report what the OS refuses."""
    existing = next(p for p in (path, *path.absolute().parents) if os.path.exists(p))
    what = f"--out {path}" if existing == path else f"--out {path} cannot be created: {existing}"
    if not existing.is_dir():
        raise MiniditError(f"{what} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MiniditError(f"{what} is not writable ({os.strerror(errno.EACCES)}); choose another --out")
