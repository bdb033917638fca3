"""PyTorch checkpoint files (`torch.save`) read and written as numpy, without PyTorch.

A checkpoint is a pickle whose tensors point at raw storages: in the zip format (torch >= 1.6) an
archive of `<name>/data.pkl` and one `<name>/data/<key>` entry per storage; in the legacy format
the pickles and the storages follow one another in one stream. The pickle is read by an unpickler
that knows only what a checkpoint of weights needs (the tensor rebuild functions, the storage
types, `OrderedDict`, plain containers and numbers) and refuses any other class or function,
naming it, before anything is called: reading a checkpoint cannot run code. Tensors come back as
numpy arrays on a copy-on-write memory map of the file (writable; the file is never changed), each
storage checked against the archive's CRC-32 so a damaged file is an error, not wrong weights.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import math
import mmap
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from scfm_jax import errors
from scfm_jax.output_safety import staged_output

# torch's legacy storage classes (the names its pickles use) and the numpy dtype of each
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128), "ComplexFloatStorage": np.dtype(np.complex64),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_NOT_A_CHECKPOINT = ("not a PyTorch checkpoint (neither a zip archive with data.pkl nor the legacy "
                     "torch.save format)")
_LEGACY_PROTOCOL = 1001
_ALIGNMENT = 64  # torch aligns every storage in the archive to 64 bytes (mmap-friendly)
_PADDING_FIELD = 0x4246  # the zip extra field ("FB") torch pads local headers with


class CheckpointError(errors.CheckpointError):
    """A file that is not a readable PyTorch checkpoint: truncated, corrupt or another format."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose pickle names a class or function a checkpoint of weights does not need."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """dtype and shape of a tensor that was not read (`load(..., read_tensors=False)`)."""

    dtype: np.dtype
    shape: tuple[int, ...]


def is_floating_point(array: np.ndarray) -> bool:
    """As `torch.Tensor.is_floating_point`: float16/bfloat16/float32/float64."""
    return array.dtype.kind == "f" or array.dtype == ml_dtypes.bfloat16


# ----------------------------------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Unread:
    dtype: np.dtype
    numel: int


def _index(value, what: str) -> int:
    if type(value) is not int or value < 0:
        raise CheckpointError(f"{what} must be a non-negative integer, found {value!r}")
    return value


def _indices(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)):
        raise CheckpointError(f"{what} must be a tuple of integers, found {values!r}")
    return tuple(_index(v, what) for v in values)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    """torch._utils._rebuild_tensor(_v2): a view of `storage`; every index is checked to lie inside
    it (a crafted size/stride must not reach memory outside the file)."""
    if not isinstance(storage, (np.ndarray, _Unread)):
        raise CheckpointError(f"a tensor's storage must be a storage record, found "
                              f"{type(storage).__name__}")
    offset = _index(storage_offset, "storage offset")
    size, stride = _indices(size, "tensor size"), _indices(stride, "tensor stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
    numel = storage.numel if isinstance(storage, _Unread) else storage.size
    if 0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        raise CheckpointError(f"tensor of size {size}, stride {stride}, offset {offset} reaches "
                              f"past its storage of {numel} elements")
    if isinstance(storage, _Unread):
        return TensorInfo(storage.dtype, size)
    if 0 in size:
        return np.zeros(size, storage.dtype)
    if stride == _contiguous_strides(size):
        return storage[offset:offset + math.prod(size)].reshape(size)
    strided = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(strided)


def _rebuild_parameter(data, *_):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data here."""
    if not isinstance(data, (np.ndarray, TensorInfo)):
        raise CheckpointError(f"a parameter must hold a tensor, found {type(data).__name__}")
    return data


def _latin1_bytes(text, encoding="latin1"):
    """`_codecs.encode`, which protocol-2 pickles use for `bytes`; only that use is accepted."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafeCheckpointError(f"_codecs.encode is accepted only for bytes (latin1), "
                                    f"not {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names of `_ALLOWED_GLOBALS` and the storage types; storages through
    `storage(key, dtype, numel)`."""

    def __init__(self, file, storage: Callable[[str, np.dtype, int], Any]):
        super().__init__(file)
        self._storage = storage

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"refusing {module}.{name}: a checkpoint of weights needs only tensors, "
                "storages, OrderedDict and plain containers and numbers, and unpickling this "
                "name could run code (open the file with torch.load only if you trust its source)")
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"refusing the persistent record {pid!r:.80}: only tensor "
                                        "storages are read")
        storage_type, key, _, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage {key!r} has no storage type ({storage_type!r:.80})")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointError("storage views (a legacy format of torch < 0.4) are not supported")
        return self._storage(str(key), storage_type.dtype, _index(numel, "storage size"))


def _memoised(storage):
    cache = {}

    def load(key, dtype, numel):
        if key not in cache:
            cache[key] = storage(key, dtype, numel)
        found = cache[key]
        if found.dtype != dtype or (found.numel if isinstance(found, _Unread) else found.size) != numel:
            raise CheckpointError(f"storage {key} is used with two dtypes or sizes")
        return found
    return load


def _local_data_offset(mapped: mmap.mmap, info: zipfile.ZipInfo) -> int:
    start = info.header_offset
    header = mapped[start:start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"zip entry {info.filename} has no valid local header")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return start + 30 + name_length + extra_length


def _load_zip(file, mapped: mmap.mmap, read_tensors: bool):
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"truncated or corrupt zip archive ({error}); download or copy "
                              "the file again") from None
    names = archive.namelist()
    if any(name.endswith("/constants.pkl") for name in names):
        raise CheckpointError("a TorchScript archive (torch.jit.save), not a checkpoint of weights")
    pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"a zip archive with {len(pickles)} <name>/data.pkl records, not a "
                              "torch.save checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    try:
        byteorder = archive.read(prefix + "byteorder").decode() if (
            prefix + "byteorder") in names else "little"
        data_pkl = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"corrupt zip archive ({error})") from None
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"unknown byteorder record {byteorder!r}")

    def storage(key, dtype, numel):
        name = f"{prefix}data/{key}"
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"storage record {name} is missing") from None
        if info.file_size != numel * dtype.itemsize:
            raise CheckpointError(f"storage record {name} holds {info.file_size} bytes, its "
                                  f"tensors need {numel * dtype.itemsize}")
        if not read_tensors:
            return _Unread(dtype, numel)
        stored = dtype.newbyteorder("<" if byteorder == "little" else ">")
        if info.compress_type != zipfile.ZIP_STORED:  # re-zipped by another tool: read a copy
            flat = np.frombuffer(bytearray(archive.read(name)), stored)
        else:
            offset = _local_data_offset(mapped, info)
            if offset + info.file_size > len(mapped):
                raise CheckpointError(f"storage record {name} ends past the end of the file "
                                      "(truncated)")
            if zlib.crc32(memoryview(mapped)[offset:offset + info.file_size]) != info.CRC:
                raise CheckpointError(f"storage record {name} fails its CRC-32 check (corrupt "
                                      "file); download or copy it again")
            flat = np.frombuffer(mapped, stored, numel, offset)
        return flat if stored.isnative else flat.astype(dtype)

    return _RestrictedUnpickler(io.BytesIO(data_pkl), _memoised(storage)).load()


def _no_storage(key, dtype, numel):
    raise CheckpointError(f"storage {key} outside the object's pickle")


def _load_legacy(file, mapped: mmap.mmap, read_tensors: bool):
    """magic number, protocol, sys_info, the object, its storage keys, then per key (sorted) the
    element count as int64 and the elements, little-endian."""
    def header():
        return _RestrictedUnpickler(file, _no_storage).load()

    if header() != _LEGACY_MAGIC:
        raise CheckpointError(_NOT_A_CHECKPOINT)
    if header() != _LEGACY_PROTOCOL:
        raise CheckpointError("unknown legacy torch.save protocol")
    header()  # sys_info
    start, storages = file.tell(), {}

    def record(key, dtype, numel):
        storages[key] = (dtype, numel)
        return _Unread(dtype, numel)

    described = _RestrictedUnpickler(file, _memoised(record)).load()
    keys = header()
    if not read_tensors:
        return described
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise CheckpointError("the storage key list does not match the storages the tensors use")
    arrays, offset = {}, file.tell()
    for key in keys:
        dtype, numel = storages[key]
        count = struct.unpack("<q", mapped[offset:offset + 8])[0] if offset + 8 <= len(mapped) else -1
        end = offset + 8 + numel * dtype.itemsize
        if count != numel or end > len(mapped):
            raise CheckpointError(f"storage {key} is truncated or corrupt")
        flat = np.frombuffer(mapped, dtype.newbyteorder("<"), numel, offset + 8)
        arrays[key] = flat if flat.dtype.isnative else flat.astype(dtype)
        offset = end
    file.seek(start)
    return _RestrictedUnpickler(file, lambda key, dtype, numel: arrays[key]).load()


def load(path: str | os.PathLike, *, read_tensors: bool = True) -> Any:
    """The object `torch.save` wrote to `path`, tensors as numpy arrays (parameters as their data).

    Zip and legacy formats. `read_tensors=False` reads only the pickle: tensors come back as
    `TensorInfo(dtype, shape)` (to list a checkpoint's keys and shapes without reading its data).
    Raises `UnsafeCheckpointError` for a pickle naming anything but what weights need, and
    `CheckpointError` for a truncated, corrupt or non-checkpoint file, each naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                raise CheckpointError("empty file")
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            if mapped[:4] == b"PK\x03\x04":
                return _load_zip(file, mapped, read_tensors)
            if mapped[:1] == pickle.PROTO:
                return _load_legacy(file, mapped, read_tensors)
            raise CheckpointError(_NOT_A_CHECKPOINT)
    except CheckpointError as error:
        raise type(error)(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, IndexError, KeyError,
            AttributeError, struct.error, zipfile.BadZipFile, OverflowError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt PyTorch checkpoint "
                              f"({type(error).__name__}: {error})") from None


# ----------------------------------------------------------------------------------------- writing

class _Global:
    """A module-level name written into the pickle (torch's rebuild function, a storage type)
    without importing torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError(f"{self.module}.{self.name} is a name to pickle, not a function")


_REBUILD_TENSOR_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", name) for name, dtype in STORAGE_DTYPES.items()}
_PLAIN_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None), _Global)
_PLAIN_NAMES = (collections.OrderedDict, codecs.encode)  # how pickle writes OrderedDict and bytes


@dataclasses.dataclass(frozen=True, eq=False)
class _StorageRecord:
    key: str
    array: np.ndarray


def _save_global(pickler, obj: _Global):
    pickler.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    pickler.memoize(obj)


class _TorchPickler(pickle._Pickler):
    """torch.save's pickle (protocol 2, one persistent storage record per array). The pure-Python
    pickler is used because only it lets a name be written without importing its module."""

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = _save_global

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[_StorageRecord] = []
        self._by_array: dict[int, _StorageRecord] = {}

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRecord):
            return ("storage", _STORAGE_GLOBALS[obj.array.dtype], obj.key, "cpu", obj.array.size)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            if obj.dtype not in _STORAGE_GLOBALS:
                raise TypeError(f"cannot save an array of dtype {obj.dtype} as a torch tensor")
            if id(obj) not in self._by_array:
                record = _StorageRecord(str(len(self.storages)), np.ascontiguousarray(obj))
                self.storages.append(record)
                self._by_array[id(obj)] = record
            record = self._by_array[id(obj)]
            return (_REBUILD_TENSOR_V2, (record, 0, tuple(obj.shape),
                                         _contiguous_strides(obj.shape), False,
                                         collections.OrderedDict()))
        if not (isinstance(obj, _PLAIN_TYPES) or any(obj is name for name in _PLAIN_NAMES)):
            raise TypeError(f"cannot save {type(obj).__name__!r} objects in a torch checkpoint: "
                            "only dicts, lists, tuples, strings, numbers, None and numpy arrays")
        return NotImplemented


def _write_entry(archive: zipfile.ZipFile, name: str, data, align: bool = False):
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    data = memoryview(data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
    info.file_size = data.nbytes
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # as zipfile decides for its header
    if align:
        data_start = archive.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
        padding = -data_start % _ALIGNMENT
        info.extra = struct.pack("<HH", _PADDING_FIELD, padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as entry:
        entry.write(data)


def save(obj: Any, path: str | os.PathLike) -> None:
    """Writes `obj` (dicts, lists, tuples, strings, numbers, None, numpy arrays) as `torch.save`
    does in its zip format: `torch.load(path, weights_only=True)` returns the arrays as tensors.
    The file is written under a temporary name and renamed (`output_safety.staged_output`), so a
    failure leaves nothing behind."""
    pickled = io.BytesIO()
    pickler = _TorchPickler(pickled)
    pickler.dump(obj)
    with staged_output(path) as temporary, zipfile.ZipFile(temporary, "w",
                                                           zipfile.ZIP_STORED) as archive:
        _write_entry(archive, "archive/data.pkl", pickled.getvalue())
        _write_entry(archive, "archive/.format_version", b"1")
        _write_entry(archive, "archive/.storage_alignment", str(_ALIGNMENT).encode())
        _write_entry(archive, "archive/byteorder", sys.byteorder.encode())
        for record in pickler.storages:
            _write_entry(archive, f"archive/data/{record.key}", record.array, align=True)
        _write_entry(archive, "archive/version", b"3\n")
