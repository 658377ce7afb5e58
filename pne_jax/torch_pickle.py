"""Read PyTorch checkpoints (`torch.save` files: .pth, .pt, .bin) into NumPy, without torch.

Model-zoo weights (MMSegmentation 0.x, MMCV, timm) ship as `torch.save` pickles; this module
lets `pne_jax.pretrained` convert them on a machine without torch. `load(path)` returns the
saved object with every tensor as a C-contiguous NumPy array of the same dtype (bfloat16 and
float8 as ml_dtypes types); no returned array aliases another.

Formats: the zip archive (torch >= 1.6: `<name>/data.pkl` + `<name>/data/<key>` storages,
`byteorder` "little" or "big"; a missing byteorder record means little) and the legacy stream
(torch < 1.6: magic number, protocol, sys_info, the object, the storage keys, then each storage
as an 8-byte element count and its little-endian bytes). Storages are read with one `readinto`
per storage into the final buffer: a tensor that owns its whole storage costs no extra copy;
views (offsets, strides, transposes, expands, storage views) are bounds-checked, then copied.

Security policy. Unpickling may call any global the file names, so the unpickler resolves
globals from a fixed table and never imports anything the file names:
* allowed: the tensor rebuild functions and storage types of `torch._utils` / `torch._tensor`,
  torch dtypes (-> numpy dtypes), `torch.Size` (-> tuple), `torch.device` (-> str),
  `TorchVersion` (-> str), `collections.OrderedDict`, `copyreg._reconstructor` (inert
  classes only), `_codecs.encode` (text codecs only), numpy arrays, scalars and dtypes (numpy
  refuses object arrays from raw bytes), and builtins without side effects (set, frozenset,
  complex, slice, ...).
* refused with `UnsupportedCheckpoint` naming the global: modules and builtins that run code,
  import, or touch files or processes (os, posix, subprocess, sys, builtins.eval / exec /
  getattr / __import__, pickle, functools, operator, ...), and any other torch global, since
  that would change how tensors are built (quantized, sparse, nested tensors, whole
  `nn.Module` objects).
* anything else (e.g. mmengine's MessageHub, argparse.Namespace in timm's `args`) becomes an
  inert `Unresolved` instance whose class name says what it replaced and which keeps the
  pickled arguments and state; tensors inside it are converted like any other. No method of
  the original class runs, and no tensor depends on it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import copyreg
import dataclasses
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = ["UnsupportedCheckpoint", "Unresolved", "load"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsupportedCheckpoint(ValueError):
    """A file this loader will not read: not a checkpoint, damaged, or unsafe (one-line message)."""


class Unresolved:
    """Inert stand-in for an object of a class this loader does not import.

    `replaces` names the original global; `args`, `kwargs`, `state`, `items` and `mapping` hold
    what the pickle passed to its constructor, `__setstate__`, append and setitem.
    """

    replaces = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Unresolved:
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items, self.mapping = [], {}
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    add = append  # sets (ADDITEMS)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def __repr__(self) -> str:
        return f"<Unresolved {self.replaces} args={self.args!r} state={self.state!r}>"


# fmt: off
# torch.<Name>Storage -> dtype (UntypedStorage holds bytes); torch.<name> dtypes -> numpy.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    **{name: getattr(ml_dtypes, name) for name in (
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    ) if hasattr(ml_dtypes, name)},
}
# fmt: on

# Roots of modules whose globals run code, import, or touch files, processes or the network.
_DENIED_ROOTS = frozenset(
    "os posix nt posixpath ntpath subprocess sys shutil importlib runpy pickle _pickle "
    "pickletools marshal ctypes code codeop pty socket pdb bdb timeit multiprocessing signal "
    "webbrowser tempfile io _io operator _operator functools types inspect threading _thread "
    "asyncio pip setuptools distutils commands popen2 platform sysconfig site zipimport pkgutil "
    "ensurepip venv cProfile profile trace gc weakref atexit select selectors urllib http "
    "ftplib smtplib telnetlib xmlrpc dill cloudpickle joblib copyreg builtins".split()
)


def _bytes_like(kind: type) -> Any:
    def make(source: Any = b"", *args: Any) -> Any:
        if isinstance(source, int):  # bytes(10**12) would only allocate
            raise UnsupportedCheckpoint(f"refusing {kind.__name__}(int) in a checkpoint")
        return kind(source, *args)

    return make


_SAFE_BUILTINS = {t.__name__: t for t in (set, frozenset, complex, slice, object, bool, int)}
_SAFE_BUILTINS.update({t.__name__: t for t in (float, str, tuple, list, dict)})
_SAFE_BUILTINS.update(bytes=_bytes_like(bytes), bytearray=_bytes_like(bytearray))


class _StorageType:
    """What a pickled torch.<X>Storage class resolves to: just its dtype."""

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)


_TENSOR_TYPE = object()  # torch.Tensor / nn.Parameter as `new_type` of _rebuild_from_type_v2


@dataclasses.dataclass(slots=True, eq=False)
class _Root:
    """One stored buffer (`data/<key>` in a zip, one record of a legacy stream)."""

    key: str
    nbytes: int
    itemsize: int
    users: int = 0  # tensors still to convert; the buffer is dropped after the last
    data: np.ndarray | None = None
    offset: int | None = None  # legacy: where the bytes start in the file


@dataclasses.dataclass(slots=True, eq=False)
class _StorageRef:
    """A typed storage: `nbytes` bytes of `root` from `byte_offset` (legacy storage views)."""

    root: _Root
    dtype: np.dtype
    byte_offset: int
    nbytes: int


class _PendingTensor:
    """A tensor whose bytes are read after unpickling (legacy storages follow the pickle)."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides")

    def __init__(self, storage: Any, dtype: Any, offset: Any, shape: Any, strides: Any) -> None:
        if not isinstance(storage, _StorageRef):
            raise UnsupportedCheckpoint(f"a tensor is built from {type(storage).__name__}")
        dtype = np.dtype(dtype)
        shape, strides = tuple(shape), tuple(strides)
        ints = (offset, *shape, *strides)
        if not all(isinstance(v, int) and v >= 0 for v in ints) or len(shape) != len(strides):
            raise ValueError(f"bad tensor geometry {offset}, {shape}, {strides}")
        if 0 not in shape:
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
            if (last + 1) * dtype.itemsize > storage.nbytes:
                raise ValueError(f"tensor {shape} at {offset} overruns its storage")
            storage.root.users += 1
        self.storage, self.dtype, self.offset = storage, dtype, offset
        self.shape, self.strides = shape, strides


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any) -> Any:
    # torch._utils._rebuild_tensor and _v2 (requires_grad, hooks and metadata do not matter).
    dtype = storage.dtype if isinstance(storage, _StorageRef) else np.uint8
    return _PendingTensor(storage, dtype, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    if not isinstance(dtype, np.dtype):
        raise UnsupportedCheckpoint(f"a tensor has dtype {dtype!r}")
    return _PendingTensor(storage, dtype, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    if not isinstance(data, _PendingTensor):
        raise UnsupportedCheckpoint(f"a parameter wraps {type(data).__name__}")
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensor subclasses and tensors with Python attributes; the subclass state is dropped.
    if func not in _REBUILDERS:
        raise UnsupportedCheckpoint(f"a tensor is rebuilt by {func!r}")
    return func(*args)


def _device(kind: str, index: int | None = None) -> str:
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    # How protocol-2 pickles store bytes; only plain text codecs are allowed.
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsupportedCheckpoint(f"refusing _codecs.encode with {encoding!r}")
    return text.encode(encoding)


_np_reconstruct = np.array(0).__reduce__()[0]
_np_scalar = np.float32(0).__reduce__()[0]


def _ndarray_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsupportedCheckpoint(f"refusing a numpy array of type {subtype!r}")
    return _np_reconstruct(subtype, shape, typecode)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, Unresolved):
        return cls(state)
    if cls in (collections.OrderedDict, set, frozenset, dict, list) and base is object:
        return copyreg._reconstructor(cls, base, state)
    raise UnsupportedCheckpoint(f"refusing copyreg._reconstructor for {cls!r}")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_TYPE,
    ("torch._tensor", "Tensor"): _TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch.torch_version", "TorchVersion"): str,
    ("torch.storage", "UntypedStorage"): _StorageType(np.uint8),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("copyreg", "_reconstructor"): _copyreg_reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (m, "_reconstruct"): _ndarray_reconstruct
        for m in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(m, "scalar"): _np_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("builtins", name): value for name, value in _SAFE_BUILTINS.items()},
}


class _Unpickler(pickle.Unpickler):
    """Restricted unpickler: globals from `_ALLOWED`, placeholders, or UnsupportedCheckpoint."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="utf-8")
        self.roots: dict[str, _Root] = {}
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (__builtin__, copy_reg) as pickle maps them; no Python 3 module has them.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.cuda") and name.endswith("Storage"):
            if name in _STORAGE_DTYPES:
                return _StorageType(_STORAGE_DTYPES[name])
            raise UnsupportedCheckpoint(f"{qualname} (quantized storage) is not supported")
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        root = module.split(".")[0]
        if root in _DENIED_ROOTS:
            raise UnsupportedCheckpoint(
                f"it calls {qualname}, which can run code; refusing to load it "
                "(only tensors and plain containers are read)"
            )
        if root == "torch":
            raise UnsupportedCheckpoint(
                f"it holds a {qualname} object, which this loader does not rebuild (only "
                "dense tensors, dtypes, devices and sizes); re-save a state_dict() of dense tensors"
            )
        if qualname not in self._placeholders:
            self._placeholders[qualname] = type(
                f"Unresolved[{qualname}]", (Unresolved,), {"replaces": qualname}
            )
        return self._placeholders[qualname]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise ValueError(f"unknown persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4:  # legacy: the class of a pickled nn.Module
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise ValueError(f"unknown persistent id {pid[:1]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
            raise ValueError(f"bad storage record {pid[:5]!r}")
        dtype, key = storage_type.dtype, str(key)
        root = self.roots.get(key)
        if root is None:
            root = self.roots[key] = _Root(key, numel * dtype.itemsize, dtype.itemsize)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageRef(root, dtype, 0, root.nbytes)
        _view_key, offset, size = view  # pre-1.0 storage views: elements of `dtype`
        start, nbytes = offset * dtype.itemsize, size * dtype.itemsize
        if offset < 0 or size < 0 or start + nbytes > root.nbytes:
            raise ValueError(f"storage view {view!r} overruns storage {key}")
        return _StorageRef(root, dtype, start, nbytes)


def _damaged(path: str, error: BaseException) -> UnsupportedCheckpoint:
    detail = " ".join(str(error).split()) or type(error).__name__
    return UnsupportedCheckpoint(f"checkpoint {path} is truncated or damaged: {detail}")


def _unpickle(file: BinaryIO, path: str) -> tuple[Any, dict[str, _Root]]:
    unpickler = _Unpickler(file)
    try:
        return unpickler.load(), unpickler.roots
    except UnsupportedCheckpoint as e:
        raise UnsupportedCheckpoint(f"checkpoint {path}: {e}") from None
    except Exception as e:  # pickle errors, EOF, bad arguments to an allowed global
        raise _damaged(path, e) from None


def _file_order(flat: np.ndarray, dtype: np.dtype, big_endian: bool) -> tuple[np.ndarray, Any]:
    """`flat` (bytes) viewed in the file's byte order, and the function making it native."""
    if not big_endian or dtype.itemsize == 1:
        return flat.view(dtype), None
    if dtype.kind in "biufc":
        return flat.view(dtype.newbyteorder(">")), lambda a: a.astype(dtype, order="C")
    swapped = np.dtype(f">u{dtype.itemsize}")  # ml_dtypes types: swap them as integers
    return flat.view(swapped), lambda a: a.astype(swapped.newbyteorder("="), order="C").view(dtype)


def _to_numpy(t: _PendingTensor, read: Any, big_endian: bool) -> np.ndarray:
    """The tensor's own C-contiguous array; reads its storage on first use."""
    if 0 in t.shape:
        return np.zeros(t.shape, t.dtype)
    ref, root, size = t.storage, t.storage.root, t.dtype.itemsize
    if root.data is None:
        root.data = read(root)
    raw = root.data
    root.users -= 1
    if root.users == 0:
        root.data = None  # the storage's last tensor: the buffer goes with it
    numel = math.prod(t.shape)
    dense = [math.prod(t.shape[i + 1 :]) for i in range(len(t.shape))]
    contiguous = all(n == 1 or s == d for n, s, d in zip(t.shape, t.strides, dense, strict=True))
    whole = ref.byte_offset == 0 and t.offset == 0 and numel * size == root.nbytes
    if whole and contiguous and root.users == 0 and raw.flags.writeable:
        view, finish = _file_order(raw, t.dtype, big_endian)  # owns its storage: no copy
        view = view.reshape(t.shape)
        return view if finish is None else finish(view)
    start = ref.byte_offset + t.offset * size
    last = sum((n - 1) * s for n, s in zip(t.shape, t.strides, strict=True))
    flat, finish = _file_order(raw[start : start + (last + 1) * size], t.dtype, big_endian)
    strided = np.lib.stride_tricks.as_strided(
        flat, t.shape, [s * size for s in t.strides], writeable=False
    )
    return np.array(strided, order="C", copy=True) if finish is None else finish(strided)


def _materialize(obj: Any, read: Any, big_endian: bool) -> Any:
    """`obj` with every pending tensor (and bare storage) replaced by its array."""
    memo: dict[int, Any] = {}

    def walk(x: Any) -> Any:
        kind = type(x)
        if kind in (str, int, float, bool, bytes, type(None), np.ndarray):
            return x
        key = id(x)
        if key in memo:
            return memo[key]
        if kind is _PendingTensor:
            memo[key] = _to_numpy(x, read, big_endian)
        elif kind is _StorageRef:
            whole = _PendingTensor(x, x.dtype, 0, (x.nbytes // x.dtype.itemsize,), (1,))
            memo[key] = _to_numpy(whole, read, big_endian)
        elif isinstance(x, dict):
            memo[key] = x
            for k, v in x.items():
                x[k] = walk(v)
        elif isinstance(x, list):
            memo[key] = x
            x[:] = [walk(v) for v in x]
        elif kind is tuple:
            memo[key] = tuple(walk(v) for v in x)
        elif isinstance(x, Unresolved):
            memo[key] = x
            x.args, x.state = walk(x.args), walk(x.state)
            walk(x.kwargs), walk(x.items), walk(x.mapping)
        else:
            return x
        return memo[key]

    return walk(obj)


def _read_exact(file: BinaryIO, offset: int, nbytes: int) -> np.ndarray:
    """`nbytes` bytes at `offset`, read straight into a fresh buffer."""
    buf = np.empty(nbytes, np.uint8)
    file.seek(offset)
    if file.readinto(memoryview(buf)) != nbytes:
        raise EOFError(f"{nbytes} bytes at {offset} run past the end of the file")
    return buf


def _zip_reader(file: BinaryIO, archive: zipfile.ZipFile, prefix: str, path: str) -> Any:
    """Reads `<prefix>data/<key>` straight from the file into one buffer (members are stored)."""

    def read(root: _Root) -> np.ndarray:
        name = f"{prefix}data/{root.key}"
        try:
            info = archive.getinfo(name)
            if info.file_size < root.nbytes:
                raise ValueError(f"{name} holds {info.file_size} bytes, {root.nbytes} expected")
            if info.compress_type != zipfile.ZIP_STORED:  # re-zipped by hand; torch never does
                return np.frombuffer(bytearray(archive.read(name)), np.uint8)[: root.nbytes]
            file.seek(info.header_offset)
            header = file.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise ValueError(f"bad local header of {name}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            return _read_exact(file, info.header_offset + 30 + name_len + extra_len, root.nbytes)
        except (KeyError, ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise _damaged(path, e) from None

    return read


def _load_zip(file: BinaryIO, path: str) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _damaged(path, e) from None
    with archive:
        names = archive.namelist()
        if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):  # as torch.load checks
            raise UnsupportedCheckpoint(
                f"{path} is a TorchScript archive (torch.jit.save), not a state dict; "
                "save model.state_dict() with torch.save instead"
            )
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
        if not pickles:
            npz = names and all(n.endswith(".npy") for n in names)
            what = "a NumPy .npz archive" if npz else "a zip archive without data.pkl"
            raise UnsupportedCheckpoint(f"{path} is {what}, not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            has_order = f"{prefix}byteorder" in names
            byteorder = archive.read(f"{prefix}byteorder") if has_order else b"little"
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise _damaged(path, e) from None
        if byteorder not in (b"little", b"big"):
            raise _damaged(path, ValueError(f"unknown byteorder {byteorder[:16]!r}"))
        obj, _ = _unpickle(io.BytesIO(data), path)
        read = _zip_reader(file, archive, prefix, path)
        return _materialize(obj, read, big_endian=byteorder.decode() != sys.byteorder)


def _load_legacy(file: BinaryIO, path: str, file_size: int) -> Any:
    magic, _ = _unpickle(file, path)
    if magic != _LEGACY_MAGIC:
        raise UnsupportedCheckpoint(
            f"{path} is a plain pickle, not a torch.save checkpoint (no torch magic number)"
        )
    protocol, _ = _unpickle(file, path)
    if protocol != _LEGACY_PROTOCOL:
        raise UnsupportedCheckpoint(f"{path}: unknown torch legacy protocol {protocol!r}")
    sys_info, _ = _unpickle(file, path)
    obj, roots = _unpickle(file, path)
    keys, _ = _unpickle(file, path)
    big_prefix = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    try:
        if not isinstance(keys, list) or set(map(str, keys)) != set(roots):
            raise ValueError("the storage list does not match the tensors")
        offset = file.tell()
        for key in map(str, keys):  # each storage: int64 element count, then its bytes
            root = roots[key]
            file.seek(offset)
            prefix = file.read(8)
            if len(prefix) != 8:
                raise EOFError(f"storage {key} starts past the end of the file")
            count = int.from_bytes(prefix, "little", signed=True)
            if big_prefix and count * root.itemsize != root.nbytes:
                count = int.from_bytes(prefix, "big", signed=True)  # torch < 1.2 on big-endian
            if count * root.itemsize != root.nbytes:
                raise ValueError(f"storage {key} holds {count} elements, expected another size")
            root.offset, offset = offset + 8, offset + 8 + root.nbytes
            if offset > file_size:
                raise EOFError(f"storage {key} runs past the end of the file")
    except (ValueError, EOFError, OSError) as e:
        raise _damaged(path, e) from None

    def read(root: _Root) -> np.ndarray:
        return _read_exact(file, root.offset, root.nbytes)

    # Legacy storages are always written little-endian, whatever the machine.
    return _materialize(obj, read, big_endian=sys.byteorder != "little")


def _sniff(head: bytes, path: str, file_size: int) -> str:
    """'zip' or 'legacy', or UnsupportedCheckpoint saying what the file is instead."""
    if not head:
        raise UnsupportedCheckpoint(f"{path} is empty, not a torch checkpoint")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy"
    if len(head) > 262 and head[257:262] == b"ustar":
        what = "a tar archive (torch < 0.1.10); load and re-save it with a newer torch"
    elif head[:6] == b"\x93NUMPY":
        what = "a NumPy .npy file; load it with numpy.load"
    elif len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < file_size:
        what = "a safetensors file; load it with the safetensors path (safetensors.numpy.load_file)"
    elif head[:4] == b"\x89HDF":
        what = "an HDF5 file (Keras?)"
    else:
        what = f"not a torch.save checkpoint (it starts with {head[:12]!r})"
    raise UnsupportedCheckpoint(f"{path} is {what}")


def load(path: str | os.PathLike[str]) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array.

    Dicts, OrderedDicts, lists, tuples, strings and numbers are kept; tensors become
    C-contiguous arrays of their dtype. Raises FileNotFoundError, or UnsupportedCheckpoint
    for files that are not readable checkpoints (see the module docstring for the policy).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass the checkpoint file inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        kind = _sniff(file.read(512), path, file_size)
        file.seek(0)
        if kind == "zip":
            return _load_zip(file, path)
        return _load_legacy(file, path, file_size)
