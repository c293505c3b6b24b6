"""Loading a DCP checkpoint without unpickling arbitrary objects.

`torch.distributed.checkpoint` (torch 2.13) reads its `.metadata` file with a plain
`pickle.load` (`FileSystemReader.read_metadata`) and every non-tensor value (an
optimizer's `lr`, `betas`, ...) with `torch.load(weights_only=False)`
(`DefaultLoadPlanner.load_bytes`). Either executes code from a crafted file. The two
subclasses here close both doors:

- :class:`SafeFileSystemReader` unpickles the metadata with an allow-list: only the
  dataclasses of `torch.distributed.checkpoint` and the few torch values they hold
  (`torch.Size`, dtypes, layouts, memory formats, a path). Anything else raises
  `pickle.UnpicklingError` before it is constructed.
- :class:`SafeLoadPlanner` loads non-tensor values with `torch.load(weights_only=True)`,
  torch's own restricted unpickler (primitives, containers, tensors).

The manager additionally verifies every file's checksum against the JSON manifest before
this reader opens anything, so a truncated or corrupted file is rejected without being
parsed at all.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

_DCP_PREFIX = "torch.distributed.checkpoint."
# Functions / classes outside DCP that its metadata legitimately pickles (found by
# recording `find_class` calls on metadata written by torch 2.13).
_EXTRA_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                  ("collections", "OrderedDict")}
_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _EXTRA_ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUE_TYPES):
            return getattr(torch, name)
        if module.startswith(_DCP_PREFIX):
            obj = super().find_class(module, name)
            # Types (dataclasses, enums) and plain dicts of constants only: never a
            # function, whose call during unpickling could have side effects.
            if isinstance(obj, (type, dict)):
                return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, "
                                     "which is not allowed")


def safe_unpickle_metadata(data: bytes) -> Metadata:
    """Unpickle DCP `.metadata` bytes with the allow-list; raise on anything else."""
    meta = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(meta, Metadata):
        raise pickle.UnpicklingError(f"checkpoint metadata is a {type(meta).__name__}, "
                                     "not DCP Metadata")
    return meta


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is unpickled through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_unpickle_metadata(f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
