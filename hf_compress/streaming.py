"""Compress-on-load without a dense copy of the model.

``AutoCompressed*.from_pretrained(dense, compression_config=plan)`` without calibration builds the model with its
parameters on the meta device (``accelerate.init_empty_weights``), then reads each target module's tensors from the
checkpoint's safetensors file(s) just before compressing it, and the rest of the tensors at the end. Tensors are read
with plain ``seek``/``read`` (no memory map), so the process holds at most the compressed model, the dense modules
that stay dense and one dense target at a time: a model larger than RAM can be compressed if its compressed form
fits. Methods that need calibration activations (a forward pass of the dense model) use the regular path.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

# safetensors dtype tags -> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsReader:
    """Random access to the tensors of one or more ``.safetensors`` files, one tensor read at a time.

    Unlike ``safe_open`` it does not memory-map the files, so tensors read and dropped leave no resident pages.
    """

    def __init__(self, files: list[Path]) -> None:
        self.index: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for path in files:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            _check_layout(path, header, 8 + size)
            for key, info in header.items():
                self.index[key] = (path, info, 8 + size)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def dtype(self, key: str) -> torch.dtype | None:
        return _DTYPES.get(self.index[key][1]["dtype"])

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (its stored dtype and shape), read from disk into fresh memory."""
        path, info, base = self.index[key]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"hf_compress: {path.name}: tensor {key!r} has dtype {info['dtype']}, which "
                             "low-memory loading does not read; pass low_memory=False.")
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"hf_compress: {path}: tensor {key!r} is cut short (the file is truncated); "
                                 "download or save the checkpoint again.")
        flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(info["shape"])


def _check_layout(path: Path, header: dict[str, Any], base: int) -> None:
    """Raise unless the tensors of a safetensors ``header`` tile its data section and the file holds all of it (as
    ``safe_open`` checks; a truncated file would otherwise read as zeros)."""
    from math import prod

    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], key) for key, info in header.items())
    at = 0
    for start, end, key in spans:
        info = header[key]
        dtype = _DTYPES.get(info["dtype"])
        if start != at or (dtype is not None and end - start != prod(info["shape"]) * dtype.itemsize):
            raise ValueError(f"hf_compress: {path}: the safetensors header is inconsistent at tensor {key!r}; the "
                             "file is damaged: download or save the checkpoint again.")
        at = end
    if path.stat().st_size != base + at:
        raise ValueError(f"hf_compress: {path} holds {path.stat().st_size} bytes, its header describes {base + at} "
                         "(truncated or damaged); download or save the checkpoint again.")


def _release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; elsewhere nothing). Layer-sized blocks freed
    during the streamed load otherwise stay resident: glibc raises its mmap threshold after the first large free,
    so later ones come from the heap, and the peak grew by ~0.15x the dense size on SmolLM2."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or ``None`` where there is none."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def checkpoint_files(path: str | Path, hub: dict[str, Any]) -> list[Path] | None:
    """The safetensors file(s) of a local folder or Hub repo (single or sharded), or ``None`` if there are none."""
    from transformers.utils.hub import cached_file

    def find(name: str) -> Path | None:
        local = Path(path) / hub.get("subfolder", "") / name
        if Path(path).is_dir():
            return local if local.is_file() else None
        try:
            got = cached_file(str(path), name, _raise_exceptions_for_missing_entries=False, **hub)
        except OSError:
            return None
        return Path(got) if got else None

    single = find("model.safetensors")
    if single is not None:
        return [single]
    index = find("model.safetensors.index.json")
    if index is None:
        return None
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = [find(s) for s in shards]
    return None if any(f is None for f in files) else files  # type: ignore[misc]


def _resolve_dtype(dtype: Any, config: Any, reader: SafetensorsReader) -> torch.dtype:
    """What ``from_pretrained`` would use: an explicit dtype, else (``"auto"``) the config's, else the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    cfg_dtype = getattr(config, "dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = getattr(torch, cfg_dtype, None)
    if isinstance(cfg_dtype, torch.dtype):
        return cfg_dtype
    for key in reader.index:
        found = reader.dtype(key)
        if found is not None and found.is_floating_point:
            return found
    return torch.get_default_dtype()


class _Filler:
    """Maps each meta parameter of ``model`` to a checkpoint key and fills modules on demand (ties preserved)."""

    def __init__(self, model: nn.Module, reader: SafetensorsReader) -> None:
        self.model, self.reader = model, reader
        prefix = getattr(model, "base_model_prefix", "")
        self.key: dict[str, str] = {}  # canonical parameter name -> checkpoint key
        self.alias: dict[str, str] = {}  # any parameter name -> canonical name
        self.group: dict[str, list[str]] = {}  # canonical name -> all names sharing that parameter
        seen: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            canon = seen.setdefault(id(param), name)
            self.alias[name] = canon
            self.group.setdefault(canon, []).append(name)
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for target, source in tied.items():  # transformers ties these after loading; do it by name here
            if target in self.alias and source in self.alias and self.alias[target] != self.alias[source]:
                old, new = self.alias[target], self.alias[source]
                for n in self.group.pop(old):
                    self.alias[n] = new
                    self.group[new].append(n)

        def lookup(name: str) -> str | None:
            cands = [name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else f"{prefix}.{name}"]
            return next((c for c in cands if c in reader), None)

        self.missing: list[str] = []
        self.filled: set[str] = set()  # canonical names already read: each tied group is read once
        for canon, names in self.group.items():
            key = next((k for k in map(lookup, names) if k is not None), None)
            if key is None:
                self.missing.append(canon)
            else:
                self.key[canon] = key
        self.buffers = {n: k for n, _ in model.named_buffers() if (k := lookup(n)) is not None}

    def fill(self, prefix: str = "") -> None:
        """Read every still-empty parameter (and stored buffer) under module ``prefix`` from the checkpoint."""
        root = self.model.get_submodule(prefix) if prefix else self.model
        dot = f"{prefix}." if prefix else ""
        for name, param in list(root.named_parameters(prefix=prefix, remove_duplicate=False)):
            if not param.is_meta:
                continue
            canon = self.alias[name]
            if canon in self.filled:  # a tie partner listed before its group was filled: read once
                continue
            tensor = self.reader.get(self.key[canon]).to(param.dtype)
            new = nn.Parameter(tensor, requires_grad=param.requires_grad)
            for other in self.group[canon]:
                mod_name, _, attr = other.rpartition(".")
                try:
                    owner = self.model.get_submodule(mod_name)
                except AttributeError:  # replaced by a compressed layer already
                    continue
                current = owner._parameters.get(attr)
                if current is not None and current.is_meta:
                    owner._parameters[attr] = new
            self.filled.add(canon)
        for name, key in list(self.buffers.items()):
            if name.startswith(dot) or not prefix:
                mod_name, _, attr = name.rpartition(".")
                try:
                    owner = self.model.get_submodule(mod_name)
                except AttributeError:
                    continue
                old = owner._buffers.get(attr)
                if old is not None:
                    owner._buffers[attr] = self.reader.get(key).to(old.dtype if old.is_floating_point() else None)
                self.buffers.pop(name)


HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "subfolder", "trust_remote_code")
_LOW_MEMORY_KWARGS = {"dtype", *HUB_KWARGS}  # what the streamed load understands
# from_pretrained kwargs that are loading options, never config attributes (the others set the config when named so)
LOADER_KWARGS = {"dtype", "torch_dtype", "device_map", "quantization_config", "attn_implementation", "max_memory",
                 "offload_folder", "offload_state_dict", "low_cpu_mem_usage", "output_loading_info", "state_dict",
                 "use_safetensors", "weights_only", "key_mapping", "tp_plan", "tp_size", "device_mesh",
                 "variant", "gguf_file", "adapter_name", "adapter_kwargs", "generation_config"}


def low_memory_obstacle(config: Any, plan: Any, calibration: Any, kwargs: dict[str, Any]) -> str:
    """Why compress-on-load must materialize the dense model first ("" if it need not)."""
    if plan is None:
        return "no compression_config was given"
    if calibration is not None:
        return "calibration activations need a forward pass of the dense model"
    if (getattr(config, "compression_config", None) or {}).get("layers"):
        return "the checkpoint is already compressed"
    by_module = isinstance(kwargs.get("dtype"), dict)
    extra = sorted(set(kwargs) - _LOW_MEMORY_KWARGS) + ["dtype (per-module dict)"] * by_module
    return f"loading kwargs {extra} need transformers' own loader" if extra else ""


def load_compressed_low_memory(
    model_class: type, path: str | Path, config: Any, plan: Any, dtype: Any = None,
    hub: dict[str, Any] | None = None, progress: bool = True,
) -> nn.Module | None:
    """Build ``model_class`` on meta, compress each target of ``plan`` as its dense tensors are read, fill the rest.

    Returns ``None`` (the caller then loads normally) if the checkpoint has no safetensors files or its tensor
    names do not cover the model's parameters (e.g. legacy names transformers renames on load).
    """
    from accelerate import init_empty_weights

    from .compress import compress

    hub = {k: v for k, v in (hub or {}).items() if k != "trust_remote_code"}  # file lookup kwargs only
    files = checkpoint_files(path, hub)
    if not files:
        return None
    reader = SafetensorsReader(files)
    torch_dtype = _resolve_dtype(dtype, config, reader)
    with init_empty_weights(include_buffers=False):
        model = model_class._from_config(config, dtype=torch_dtype)
    filler = _Filler(model, reader)
    if filler.missing:
        warnings.warn(f"hf_compress: low-memory loading found no checkpoint tensor for {filler.missing[:4]}; "
                      "loading the dense model first instead.", UserWarning, stacklevel=3)
        return None
    def before(name: str) -> None:
        _release_freed_memory()  # the previous target's dense weights, freed, back to the OS before the next read
        filler.fill(name)

    compress(model, plan, calibration=None, progress=progress, before_target=before)
    _release_freed_memory()
    filler.fill()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"hf_compress: low-memory loading left {left[:4]} unfilled; pass low_memory=False.")
    model.config.name_or_path = str(path)
    if model.can_generate():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path, **hub)
        except OSError:
            pass
    return model.eval()
