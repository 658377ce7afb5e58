"""pne_jax.torch_pickle: torch.save checkpoints read into numpy without torch.

The default tests write checkpoints with a minimal writer of their own (stdlib pickle and
zipfile, following the layout torch's serialization code documents) and compare the loaded
arrays with the numpy arrays they started from. The parity tests (`-m parity`) read real
`torch.save` files.
"""

import argparse
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from pne_jax import torch_pickle

STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
    np.dtype(np.complex64): "ComplexFloatStorage",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- a minimal torch.save writer ---------------------------------------------------------


class Global:
    """A global pickled by name (GLOBAL opcode) without importing its module."""

    def __init__(self, module, name):
        self.module, self.name, self.__name__ = module, name, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable
        raise AssertionError


REBUILD_V2 = Global("torch._utils", "_rebuild_tensor_v2")


class Storage:
    """One storage: a flat numpy array, pickled as a persistent id."""

    def __init__(self, flat, untyped=False):
        self.flat, self.untyped = np.ascontiguousarray(flat).reshape(-1), untyped

    def raw(self, big_endian=False):
        if not big_endian or self.flat.dtype.itemsize == 1:
            return self.flat.tobytes()
        item = self.flat.dtype.itemsize // (2 if self.flat.dtype.kind == "c" else 1)
        return self.flat.view(f"u{item}").byteswap().tobytes()


class Tensor:
    """A tensor of `storage` as torch pickles it (_rebuild_tensor_v2 or _v3 with a dtype)."""

    def __init__(self, storage, offset, shape, strides, dtype=None):
        self.args = (storage, offset, tuple(shape), tuple(strides), False)
        self.dtype = dtype

    def __reduce__(self):
        hooks = collections.OrderedDict()
        if self.dtype is None:
            return REBUILD_V2, (*self.args, hooks)
        v3 = Global("torch._utils", "_rebuild_tensor_v3")
        return v3, (*self.args, hooks, Global("torch", self.dtype))


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        rebuild = Global("torch._utils", "_rebuild_parameter")
        return rebuild, (self.tensor, True, collections.OrderedDict())


class Call:
    """`func(*args)` in the pickle, for any global."""

    def __init__(self, module, name, *args, state=None):
        self.func, self.args, self.state = Global(module, name), args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def tensor(array):
    """A tensor owning a storage of `array`'s elements."""
    array = np.asarray(array)
    strides = [s // array.itemsize for s in np.empty_like(array, order="C").strides]
    return Tensor(Storage(array), 0, array.shape, strides)


class Writer(pickle._Pickler):
    """Pickler emitting Global markers as GLOBAL opcodes and storages as persistent ids."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, legacy, views=None):
        super().__init__(file, protocol=2)
        self.legacy, self.views, self.storages = legacy, views or {}, {}

    def save_marker(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_marker

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        key = self.storages.setdefault(id(obj), (str(len(self.storages)), obj))[0]
        name = "UntypedStorage" if obj.untyped else STORAGE_NAMES[obj.flat.dtype]
        module = "torch.storage" if obj.untyped else "torch"
        pid = ("storage", Global(module, name), key, "cuda:0", obj.flat.size)
        return (*pid, self.views.get(id(obj))) if self.legacy else pid


def write_zip(path, obj, byteorder="little", extra=()):
    """The zip layout of torch >= 1.6: <name>/data.pkl, <name>/data/<key>, byteorder."""
    buf = io.BytesIO()
    writer = Writer(buf, legacy=False)
    writer.dump(obj)
    data = buf.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        if byteorder is not None:
            z.writestr("archive/byteorder", byteorder)
        for key, storage in writer.storages.values():
            z.writestr(f"archive/data/{key}", storage.raw(big_endian=byteorder == "big"))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/.data/version", "3\n")
        for name, payload in extra:
            z.writestr(name, payload)
    return path


def write_legacy(path, obj, views=None):
    """The stream of torch < 1.6: magic, protocol, sys_info, object, keys, sized storages."""
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        writer = Writer(f, legacy=True, views=views)
        writer.dump(obj)
        storages = dict(writer.storages.values())
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            f.write(struct.pack("<q", storages[key].flat.size) + storages[key].raw())
    return path


WRITERS = {"zip": write_zip, "legacy": write_legacy}


# --- round trips -------------------------------------------------------------------------


def arrays_by_dtype():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 3)) * 50
    out = {
        str(np.dtype(d)): values.astype(d)
        for d in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.int32)
    }
    out.update(int8=values.astype(np.int8), uint8=np.abs(values).astype(np.uint8))
    out.update(bool=values > 0, int16=values.astype(np.int16))
    out.update(complex64=(values + 1j * values).astype(np.complex64))
    return out


def views_of(base):
    """Tensors sharing `base`'s storage, with the numpy arrays they must equal."""
    storage = Storage(base)
    s = base.shape[1]
    cases = {  # name: (offset, shape, strides, expected)
        "full": (0, base.shape, (s, 1), base),
        "transposed": (0, base.shape[::-1], (1, s), base.T),
        "block": (s + 2, (2, 3), (s, 1), base[1:3, 2:5]),
        "column": (1, (base.shape[0],), (s,), base[:, 1]),
        "scalar": (s + 1, (), (), base[1, 1]),
        "expanded": (s, (3, s), (0, 1), np.broadcast_to(base[1], (3, s))),
        "empty": (0, (0, 3), (3, 1), np.zeros((0, 3), base.dtype)),
    }
    tensors = {k: Tensor(storage, *v[:3]) for k, v in cases.items()}
    return tensors, {k: v[3] for k, v in cases.items()}


def assert_same(actual, expected):
    """Same dtype, shape and bytes (bfloat16 and NaN compare as bits)."""
    expected = np.array(expected, order="C")
    assert isinstance(actual, np.ndarray) and actual.flags.c_contiguous
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = actual.reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(bits, expected.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_round_trip_dtypes_views_and_nesting(tmp_path, fmt):
    by_dtype = arrays_by_dtype()
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    views, expected_views = views_of(base)
    words = np.array([1, 2, 65535], np.uint16)
    state_dict = collections.OrderedDict(
        [(f"w.{k}", tensor(v)) for k, v in by_dtype.items()]
        + [(f"view.{k}", v) for k, v in views.items()]
        + [
            ("param", Parameter(tensor(base[0]))),
            (
                "uint16",
                Tensor(Storage(words.view(np.uint8), untyped=True), 0, (3,), (1,), "uint16"),
            ),
        ]
    )
    meta = {
        "epoch": 3,
        "CLASSES": ("road", "car"),
        "PALETTE": [[1, 2, 3]],
        "config": "model=dict()",
    }
    meta.update(
        hook_msgs={"best_score": 0.5}, misc=[set([1, 2]), complex(1, 2), slice(1, 3), b"\x00"]
    )
    same = tensor(base)
    bare = [np.arange(3, dtype=np.int32), np.ones(2, np.float64)]  # storages saved as such
    ckpt = {"state_dict": state_dict, "meta": meta, "shared": [same, (same, None)]}
    ckpt["storages"] = [Storage(a) for a in bare]
    out = torch_pickle.load(WRITERS[fmt](tmp_path / "ckpt.pth", ckpt))

    assert isinstance(out["state_dict"], collections.OrderedDict)
    assert list(out["state_dict"]) == list(state_dict)
    loaded = out["state_dict"]
    for k, v in by_dtype.items():
        assert_same(loaded[f"w.{k}"], v)
    for k, v in expected_views.items():
        assert_same(loaded[f"view.{k}"], v)
    assert_same(loaded["param"], base[0])
    assert_same(loaded["uint16"], words)
    assert out["meta"] == meta
    assert out["shared"][0] is out["shared"][1][0]  # one tensor pickled twice stays one array
    for actual, expected in zip(out["storages"], bare, strict=True):
        assert_same(actual, expected)
    # Views of one storage come back as independent arrays.
    loaded["view.full"][0, 0] = -1
    assert loaded["view.transposed"][0, 0] == 0 and loaded["view.expanded"][0, 0] == 6


def test_legacy_storage_views(tmp_path):
    # torch < 1.0 pickled views of storages: (view key, element offset, element count).
    root = Storage(np.arange(10, dtype=np.int64))
    t = Tensor(root, 1, (2, 2), (2, 1))
    path = write_legacy(tmp_path / "old.pth", {"t": t}, views={id(root): ("v0", 3, 6)})
    np.testing.assert_array_equal(torch_pickle.load(path)["t"], [[4, 5], [6, 7]])


def test_big_endian_and_missing_byteorder(tmp_path):
    arrays = {k: arrays_by_dtype()[k] for k in ("float32", "bfloat16", "int64", "complex64")}
    ckpt = {k: tensor(v) for k, v in arrays.items()}
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    ckpt["transposed"] = Tensor(Storage(base), 0, (4, 3), (1, 4))
    big = torch_pickle.load(write_zip(tmp_path / "big.pt", ckpt, byteorder="big"))
    none = torch_pickle.load(write_zip(tmp_path / "none.pt", ckpt, byteorder=None))
    for out in (big, none):
        for k, v in arrays.items():
            assert_same(out[k], v)
        assert_same(out["transposed"], base.T)
        assert out["float32"].dtype.isnative


def test_unknown_objects_become_placeholders(tmp_path):
    # mmengine checkpoints hold a MessageHub; timm's train script saves argparse.Namespace.
    weights = np.arange(6, dtype=np.float32)
    hub_state = {"runtime_info": {"iter": 5}, "buffer": tensor(weights)}
    ckpt = {
        "state_dict": {"w": tensor(weights)},
        "message_hub": Call("mmengine.logging.message_hub", "MessageHub", "hub", state=hub_state),
        "args": argparse.Namespace(lr=0.1, model="resnet50"),
    }
    out = torch_pickle.load(write_zip(tmp_path / "mmengine.pth", ckpt))
    assert_same(out["state_dict"]["w"], weights)
    hub = out["message_hub"]
    assert isinstance(hub, torch_pickle.Unresolved)
    assert "mmengine.logging.message_hub.MessageHub" in type(hub).__name__
    assert hub.replaces == "mmengine.logging.message_hub.MessageHub" and hub.args == ("hub",)
    assert hub.state["runtime_info"] == {"iter": 5}
    assert_same(hub.state["buffer"], weights)
    assert out["args"].replaces == "argparse.Namespace"
    assert out["args"].state == {"lr": 0.1, "model": "resnet50"}


# --- refusals and errors -----------------------------------------------------------------

CODE_GLOBALS = [
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "check_call"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("__builtin__", "eval"),  # Python 2 spelling
]


@pytest.mark.parametrize("module,name", CODE_GLOBALS)
def test_code_execution_is_refused_and_not_run(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if name != "eval" else f"open({str(marker)!r}, 'w')"
    ckpt = {
        "state_dict": {"w": tensor(np.ones(2, np.float32))},
        "meta": Call(module, name, command),
    }
    for fmt, writer in WRITERS.items():
        path = writer(tmp_path / f"evil.{fmt}", ckpt)
        shown = "builtins" if module == "__builtin__" else module
        with pytest.raises(torch_pickle.UnsupportedCheckpoint, match=rf"{shown}\.{name}.*run code"):
            torch_pickle.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name,message",
    [
        ("torch._utils", "_rebuild_qtensor", "torch._utils._rebuild_qtensor"),
        ("torch.nn.modules.conv", "Conv2d", "state_dict"),
        ("torch", "QInt8Storage", "quantized"),
    ],
)
def test_torch_objects_not_rebuilt_are_refused(tmp_path, module, name, message):
    path = write_zip(tmp_path / "q.pth", {"w": Call(module, name, 1)})
    with pytest.raises(torch_pickle.UnsupportedCheckpoint, match=message):
        torch_pickle.load(path)


@pytest.mark.parametrize(
    "offset,shape,strides",
    [(0, (7,), (1,)), (4, (3,), (1,)), (0, (2, 3), (4, 1)), (0, (2,), (-1,)), (-1, (1,), (1,))],
)
def test_tensors_overrunning_their_storage_are_refused(tmp_path, offset, shape, strides):
    ckpt = {"w": Tensor(Storage(np.zeros(6, np.float32)), offset, shape, strides)}
    with pytest.raises(torch_pickle.UnsupportedCheckpoint, match="truncated or damaged"):
        torch_pickle.load(write_zip(tmp_path / "bad.pth", ckpt))


def test_truncated_files(tmp_path):
    ckpt = {"state_dict": {"w": tensor(np.arange(1000, dtype=np.float32))}}
    for fmt, writer in WRITERS.items():
        data = writer(tmp_path / f"full.{fmt}", ckpt).read_bytes()
        for cut in (40, len(data) // 2, len(data) - 10):
            path = tmp_path / f"cut{cut}.{fmt}"
            path.write_bytes(data[:cut])
            with pytest.raises(torch_pickle.UnsupportedCheckpoint, match="truncated or damaged"):
                torch_pickle.load(path)


def test_not_a_checkpoint(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    files = {
        "notes.txt": (b"hello, this is text\n", "not a torch.save checkpoint"),
        "empty.pth": (b"", "empty"),
        "model.safetensors": (struct.pack("<Q", len(header)) + header + bytes(4), "safetensors"),
        "plain.pkl": (pickle.dumps({"w": [1.0]}, protocol=2), "plain pickle"),
    }
    for name, (data, message) in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(torch_pickle.UnsupportedCheckpoint, match=message):
            torch_pickle.load(tmp_path / name)
    np.savez(tmp_path / "w.npz", w=np.ones(2))
    with pytest.raises(torch_pickle.UnsupportedCheckpoint, match=r"\.npz"):
        torch_pickle.load(tmp_path / "w.npz")
    np.save(tmp_path / "w.npy", np.ones(2))
    with pytest.raises(torch_pickle.UnsupportedCheckpoint, match=r"\.npy"):
        torch_pickle.load(tmp_path / "w.npy")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        torch_pickle.load(tmp_path / "missing.pth")


def test_torchscript_archives_are_refused(tmp_path):
    extra = [("archive/constants.pkl", b""), ("archive/code/__torch__/m.py", b"")]
    path = write_zip(tmp_path / "scripted.pt", {"w": tensor(np.ones(2))}, extra=extra)
    with pytest.raises(torch_pickle.UnsupportedCheckpoint, match="TorchScript"):
        torch_pickle.load(path)


# --- parity with real torch.save (opt-in) ------------------------------------------------


def torch_state_dict(torch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 50
    sd = collections.OrderedDict()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64):
        sd[str(dtype)] = x.to(dtype)
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        sd[str(dtype)] = x.abs().to(dtype)
    sd.update(complex=torch.complex(x, -x), uint16=x.abs().to(torch.int32).to(torch.uint16))
    sd.update(transposed=x.t(), block=x[1:3, 2:5], column=x[:, 1], scalar=x[1, 1])
    sd.update(bf16_view=sd["torch.bfloat16"][:, 2:], expanded=x[0].expand(3, 6))
    sd.update(empty=torch.zeros(0, 3), param=torch.nn.Parameter(x[0].clone()))
    return sd


def assert_matches_torch(torch, actual, expected):
    expected = expected.detach()
    if expected.dtype == torch.bfloat16:
        assert actual.dtype == ml_dtypes.bfloat16
        actual, expected = actual.view(np.int16), expected.contiguous().view(torch.int16)
    assert_same(actual, expected.contiguous().numpy())


@pytest.mark.parity
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_parity_torch_save(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    sd = torch_state_dict(torch)
    path = tmp_path / "sd.pth"
    torch.save(
        {"state_dict": sd, "meta": {"epoch": 1}}, path, _use_new_zipfile_serialization=zip_format
    )
    out = torch_pickle.load(path)
    assert list(out["state_dict"]) == list(sd) and out["meta"] == {"epoch": 1}
    for k, v in sd.items():
        assert_matches_torch(torch, out["state_dict"][k], v)


@pytest.mark.parity
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_parity_module_state_dict(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    model(torch.randn(2, 3, 8, 8))  # moves the running statistics, counts one batch
    sd = model.state_dict()
    path = tmp_path / "model.pth"
    torch.save({"state_dict": sd}, path, _use_new_zipfile_serialization=zip_format)
    out = torch_pickle.load(path)["state_dict"]
    assert list(out) == list(sd)
    assert out["1.num_batches_tracked"].dtype == np.int64 and out["1.num_batches_tracked"] == 1
    for k, v in sd.items():
        assert_matches_torch(torch, out[k], v)
