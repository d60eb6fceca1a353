"""Alignment vectors: `theta_base + sum_i lambda_i * (theta_aligned_i - theta_base)`.

A vector is the difference between an aligned and a base checkpoint of one architecture, stored as safetensors
with metadata. It is extracted and applied in blocks of rows of one tensor at a time (`BLOCK_BYTES`), so peak
memory stays near a few blocks, not one tensor and never one model.
The vector of a CLM adapter is `trained layer - identity init`; `weights` mode is exactly that vector applied to the
identity layer, and several adapters' vectors compose the same way.

Exactness: a vector is stored in a wider dtype than its checkpoints (float32 for 16-bit models, float64 for float32
ones), so that lambda 1 gives back the aligned weights bit for bit and lambda 0 the base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn


logger = logging.getLogger(__name__)


PathLike = Union[str, Path]
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


class VectorError(ValueError):
    """A vector that does not fit its model or checkpoint, or a bad scale."""


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


class Checkpoint:
    """Tensors of a local safetensors checkpoint (one file, or shards with an index), read one at a time."""

    def __init__(self, path: PathLike):
        path = Path(path)
        if path.is_file() and path.suffix == ".safetensors":
            files = [path]
            self.directory = path.parent
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
            self.directory = path
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
            self.directory = path
        else:
            raise FileNotFoundError(f"No safetensors checkpoint at {path} (only safetensors are read).")
        self.where: dict[str, Path] = {}
        self.metadata: dict[str, str] = {}
        self.meta: dict[str, tuple[str, list[int]]] = {}
        for f in files:
            header = _read_header(f)
            self.metadata.update(header.get("__metadata__") or {})
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = f
                    self.meta[name] = (info["dtype"], info["shape"])
        self.files = files

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        """Rows [start, end) along the first dimension (a 0-d tensor whole), read without loading the rest."""
        with safe_open(self.where[name], framework="pt") as f:
            if not self.meta[name][1]:
                return f.get_tensor(name)
            return f.get_slice(name)[rows[0]:rows[1]]


BLOCK_BYTES = 8 << 20  # working size of one block of rows, in the wide dtype


def _row_blocks(shape: Sequence[int], itemsize: int, budget: Optional[int] = None) -> list[tuple[int, int]]:
    """Blocks of rows of a tensor of `shape`, each about `budget` (default BLOCK_BYTES) bytes at `itemsize`."""
    budget = BLOCK_BYTES if budget is None else budget
    if not shape:
        return [(0, 1)]
    per_row = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, budget // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)] or [(0, 0)]


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file; one clear error for anything that is not one (empty, random bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise VectorError(f"{path} is not a safetensors file (its {size} bytes hold no valid header).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise VectorError(f"{path} is not a safetensors file (its header is not a JSON object).")
    return header


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise VectorError(f"a vector's scale must be a finite number, got {scale!r}.")
    return float(scale)


class _StreamWriter:
    """Writes a safetensors file tensor by tensor (header first, from known shapes), atomically."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, list[int]]], metadata: dict[str, str]):
        header, offset = {"__metadata__": metadata}, 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.order = [name for name, _, _ in specs]
        self.i = 0

    def write(self, name: str, blocks: Iterator[torch.Tensor]) -> None:
        """The tensor `name`, as its blocks of rows in order."""
        assert name == self.order[self.i], (name, self.order[self.i])
        for block in blocks:
            if block.numel():
                self.f.write(memoryview(block.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.i += 1

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _dtype_of(st_name: str) -> torch.dtype:
    for dtype, name in _ST_DTYPES.items():
        if name == st_name:
            return dtype
    raise VectorError(f"tensors of safetensors dtype {st_name} are not supported; supported: "
                      f"{sorted(_ST_DTYPES.values())}.")


def _diff_blocks(b: Checkpoint, a: Checkpoint, name: str, wide: torch.dtype) -> Iterator[torch.Tensor]:
    itemsize = torch.empty((), dtype=wide).element_size()
    for rows in _row_blocks(b.meta[name][1], itemsize):
        yield a.get_rows(name, rows).to(wide).sub_(b.get_rows(name, rows).to(wide))


def extract(base: PathLike, aligned: PathLike, out: PathLike) -> dict:
    """Write the vector `aligned - base` of two checkpoints of one architecture to `out` (.safetensors).

    Streams in blocks of rows, tensor by tensor; only tensors that differ are stored. Returns the metadata written.

    Example:
        ```py
        >>> extract("base_dir", "dpo_dir", "dpo.safetensors")
        ```
    """
    out = Path(out)
    if out.exists():
        raise VectorError(f"{out} already exists (a vector never overwrites a file, least of all an input); choose a "
                          "new path.")
    b, a = Checkpoint(base), Checkpoint(aligned)
    missing, extra = sorted(set(b.names()) - set(a.names())), sorted(set(a.names()) - set(b.names()))
    if missing or extra:
        raise VectorError(
            f"{aligned} and {base} are not the same architecture: {len(missing)} tensor(s) only in the base "
            f"(e.g. {missing[:1]}), {len(extra)} only in the aligned checkpoint (e.g. {extra[:1]})."
        )
    wrong = [n for n in b.names() if b.meta[n][1] != a.meta[n][1]]
    if wrong:
        raise VectorError(f"shapes differ for {len(wrong)} tensor(s), e.g. {wrong[0]}: {b.meta[wrong[0]][1]} vs "
                          f"{a.meta[wrong[0]][1]}.")
    specs, norms, dtypes, base_sums = [], {}, set(), {}
    for name in b.names():  # pass 1: which tensors differ, and their norms
        dtype = _dtype_of(b.meta[name][0])
        if not dtype.is_floating_point:
            tb, ta = b.get(name), a.get(name)
            if not torch.equal(tb, ta):
                raise VectorError(f"non-float tensor {name} differs between the checkpoints.")
            continue
        dtypes.add(str(dtype).removeprefix("torch."))
        wide = _wide(dtype)
        sq, nonzero = 0.0, 0
        for block in _diff_blocks(b, a, name, wide):
            nonzero += int(torch.count_nonzero(block))
            sq += float(block.square().sum())
        if nonzero:
            specs.append((name, wide, list(b.meta[name][1])))
            norms[name] = math.sqrt(sq)
            base_sums[name] = _tensor_sum(b.get(name))
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "peft-clm alignment vector",
        "base": str(base),
        "aligned": str(aligned),
        "source_dtypes": ",".join(sorted(dtypes)),
        "n_tensors_total": str(len(b.names())),
        "n_tensors_differ": str(len(specs)),
        "total_norm": repr(math.sqrt(sum(v * v for v in norms.values()))),
        "norms": json.dumps(norms),
        # what the vector was taken from: the architecture is checked on apply, the base's sums warn on another base
        "base_model_type": _model_type(b.directory) or "",
        "base_sums": json.dumps(base_sums),
    }
    writer = _StreamWriter(out, specs, metadata)
    try:
        for name, wide, _ in specs:  # pass 2: write
            writer.write(name, _diff_blocks(b, a, name, wide))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return metadata


def inspect_vector(path: PathLike) -> dict:
    """Metadata of a vector file: sources, dtypes, which tensors differ and their norms."""
    header = _read_header(Path(path))
    meta = dict(header.get("__metadata__", {}))
    if meta.get("format") != "peft-clm alignment vector":
        raise VectorError(f"{path} is not a peft-clm alignment vector.")
    meta["norms"] = json.loads(meta.get("norms", "{}"))
    meta["tensors"] = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items() if k != "__metadata__"}
    return meta


def _load_vectors(vectors: Sequence[tuple[PathLike, float]]) -> list[tuple[Checkpoint, float]]:
    loaded = []
    for path, scale in vectors:
        inspect_vector(path)
        loaded.append((Checkpoint(path), _check_scale(scale)))
    return loaded


def _check_fits(vectors, shapes: dict[str, tuple], what: str) -> None:
    for ckpt, _ in vectors:
        for name in ckpt.names():
            if name not in shapes:
                raise VectorError(f"the vector's tensor {name} is not in {what}; the vector is for another "
                                  "architecture.")
            if tuple(ckpt.meta[name][1]) != tuple(shapes[name]):
                raise VectorError(f"shape of {name}: vector {tuple(ckpt.meta[name][1])} vs {what} "
                                  f"{tuple(shapes[name])}.")


def _tensor_sum(tensor: torch.Tensor) -> float:
    """A fingerprint of a tensor's values: their sum in float64 (exact under an upcast to a wider float)."""
    return float(tensor.detach().to(torch.float64).sum())


def _model_type(directory: Path) -> Optional[str]:
    config = Path(directory) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except (ValueError, OSError):
        return None


def _check_source(vectors, model_type: Optional[str], get: Callable[[str], torch.Tensor], what: str) -> None:
    """Refuse vectors of another architecture; warn when the target is not the checkpoint a vector was taken
    from (checked on up to three of the tensors it changes)."""
    for ckpt, _ in vectors:
        meta = ckpt.metadata
        source = meta.get("base_model_type")
        if source and model_type and source != model_type:
            raise VectorError(f"the vector {ckpt.files[0]} was extracted from a {source!r} checkpoint; {what} is a "
                              f"{model_type!r} model. Vectors only apply to their own architecture.")
        sums = json.loads(meta.get("base_sums", "{}"))
        for name in sorted(sums, key=lambda n: math.prod(ckpt.meta[n][1]))[:3]:
            got = _tensor_sum(get(name))
            if not math.isclose(got, sums[name], rel_tol=1e-9, abs_tol=1e-9):
                logger.warning("%s is not the checkpoint the vector %s was extracted from (%s differs), or it was "
                               "loaded in another dtype; the vector is applied anyway.", what, ckpt.files[0], name)
                break


def _apply_one(tensor: torch.Tensor, name: str, vectors, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """`tensor + sum scale_i * vector_i[name]` in the wide dtype, rounded once; `rows` when `tensor` is a block."""
    wide = _wide(tensor.dtype)
    acc = None
    for ckpt, scale in vectors:
        if name in ckpt.where and scale != 0.0:
            part = ckpt.get(name) if rows is None else ckpt.get_rows(name, rows)
            delta = part.to(device=tensor.device, dtype=wide) * scale
            acc = delta if acc is None else acc + delta
    return tensor if acc is None else (tensor.to(wide) + acc).to(tensor.dtype)


def apply_to_checkpoint(base: PathLike, vectors: Sequence[tuple[PathLike, float]], out: PathLike) -> Path:
    """`base + sum scale_i * vector_i`, streamed to a new plain HF checkpoint directory `out` (dtype preserved).

    Written to a temporary directory and renamed: a failure leaves nothing behind.
    """
    ckpt = Checkpoint(base)
    loaded = _load_vectors(vectors)
    _check_fits(loaded, {n: ckpt.meta[n][1] for n in ckpt.names()}, f"the checkpoint {base}")
    _check_source(loaded, _model_type(ckpt.directory), ckpt.get, f"the checkpoint {base}")
    out = Path(out)
    if out.exists():
        raise VectorError(f"{out} already exists; choose a new output directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700); the result is a normal directory
    try:
        for item in ckpt.directory.iterdir():  # config, tokenizer, index: copied as they are
            if item.suffix != ".safetensors" and item.is_file():
                shutil.copy2(item, tmp / item.name)
        for f in ckpt.files:
            names = [n for n in ckpt.names() if ckpt.where[n] == f]
            specs = []
            for n in names:
                dtype_name, shape = ckpt.meta[n]
                specs.append((n, _dtype_of(dtype_name), shape))
            writer = _StreamWriter(tmp / f.name, specs, {"format": "pt"})
            try:
                for n, dtype, shape in specs:
                    blocks = _row_blocks(shape, 8)  # sized for the widest working dtype, float64
                    writer.write(n, (_apply_one(ckpt.get_rows(n, rows), n, loaded, rows) for rows in blocks))
                writer.close()
            except BaseException:
                writer.abort()
                raise
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class AppliedVectors:
    """Vectors applied in place to a model; `undo()` restores the original tensors bit for bit."""

    model: nn.Module
    originals: dict[str, torch.Tensor]

    def undo(self) -> None:
        params = dict(self.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, original in self.originals.items():
                params[name].copy_(original)  # through the parameter: its version moves, so caches of it refresh
        self.originals = {}


def apply_to_model(model: nn.Module, vectors: Sequence[tuple[PathLike, float]]) -> AppliedVectors:
    """Add `sum scale_i * vector_i` to a loaded model's weights in place; keep the originals for `undo()`.

    Example:
        ```py
        >>> handle = apply_to_model(model, [("helpful.safetensors", 0.7), ("concise.safetensors", 1.2)])
        >>> ...
        >>> handle.undo()
        ```
    """
    loaded = _load_vectors(vectors)
    params = dict(model.state_dict(keep_vars=True))
    _check_fits(loaded, {n: tuple(p.shape) for n, p in params.items()}, "the model")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    _check_source(loaded, model_type, lambda n: params[n], "the model")
    touched = sorted({n for ckpt, _ in loaded for n in ckpt.names()})
    originals = {n: params[n].detach().clone() for n in touched}  # checked in full first: nothing half-applied
    with torch.no_grad():
        for n in touched:
            params[n].copy_(_apply_one(params[n].detach(), n, loaded))
    return AppliedVectors(model, originals)


@contextlib.contextmanager
def applied(model: nn.Module, vectors: Sequence[tuple[PathLike, float]]) -> Iterator[nn.Module]:
    """Context manager form of `apply_to_model`: the model is restored on exit."""
    handle = apply_to_model(model, vectors)
    try:
        yield model
    finally:
        handle.undo()


def adapter_vector(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The alignment vector of a CLM adapter: its trained layer minus the identity initialisation.

    Keys are parameter names inside the decoder layer. `weights` mode runs `w0 + sum_i a_i * vector_i`.
    """
    layer = peft_model.base_model.clm_layer()
    w0 = layer.identity_parameters()
    return {k: (v.detach() - w0[k].detach()) for k, v in layer.adapter_parameters(adapter_name).items()}
