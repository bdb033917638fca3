"""The PyTorch checkpoint reader/writer: same tensors as torch.load, no code run, clear errors."""
import collections
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from shared_helpers import shared_path
from scfm_jax.interop import torch_checkpoint
from scfm_jax.interop.torch_checkpoint import CheckpointError, UnsafeCheckpointError

FIXTURES = [("scfoundation-tiny", "models.ckpt"), ("scmulan-tiny", "ckpt.pt")]
NO_TORCH = "PyTorch is not installed: the comparison with torch.load needs it"


def _fixture(folder, name):
    return shared_path("fixtures", folder, name)


def _assert_same_as_torch(ours, theirs, torch, where="checkpoint"):
    """Every tensor equal in dtype, shape and values; every other value and key order equal."""
    if isinstance(theirs, torch.Tensor):
        theirs = theirs.detach()
        assert isinstance(ours, np.ndarray), where
        assert ours.shape == tuple(theirs.shape), where
        if theirs.dtype == torch.bfloat16:
            assert ours.dtype == ml_dtypes.bfloat16, where
            np.testing.assert_array_equal(ours.astype(np.float32), theirs.float().numpy(), where)
        else:
            assert ours.dtype == theirs.numpy().dtype, where
            np.testing.assert_array_equal(ours, theirs.numpy(), where)
        return 1
    if isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        return sum(_assert_same_as_torch(ours[k], theirs[k], torch, f"{where}[{k!r}]")
                   for k in theirs)
    if isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)) and len(ours) == len(theirs), where
        return sum(_assert_same_as_torch(a, b, torch, f"{where}[{i}]")
                   for i, (a, b) in enumerate(zip(ours, theirs)))
    assert type(ours) is type(theirs) and ours == theirs, where
    return 0


@pytest.mark.parametrize("folder,name", FIXTURES)
def test_fixture_checkpoints_read_identically_to_torch_load(folder, name):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    path = _fixture(folder, name)
    tensors = _assert_same_as_torch(torch_checkpoint.load(path),
                                    torch.load(path, map_location="cpu", weights_only=True), torch)
    assert tensors == {"models.ckpt": 3 * 77, "ckpt.pt": 17}[name]


def test_legacy_format_reads_identically_to_torch_load(tmp_path):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    original = torch.load(_fixture("scmulan-tiny", "ckpt.pt"), weights_only=True)
    matrix = torch.arange(24.0).reshape(4, 6)
    original["extra"] = {"transposed": matrix.T, "view": matrix[1:3, 2:], "half": matrix.half(),
                         "bfloat16": matrix.bfloat16(), "parameter": torch.nn.Parameter(matrix),
                         "long": torch.arange(3), "scalar": torch.tensor(2.5), "size": matrix.shape}
    for zip_format in (False, True):
        path = tmp_path / f"zip_{zip_format}.pt"
        torch.save(original, path, _use_new_zipfile_serialization=zip_format)
        assert _assert_same_as_torch(torch_checkpoint.load(path),
                                     torch.load(path, weights_only=True), torch) == 17 + 7


def test_reading_the_fixtures_needs_no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # any `import torch` now fails
    checkpoint = torch_checkpoint.load(_fixture("scfoundation-tiny", "models.ckpt"))
    assert list(checkpoint) == ["gene", "cell", "rde"]
    weight = checkpoint["cell"]["state_dict"]["model.pos_emb.weight"]
    assert weight.dtype == np.float32 and weight.shape == (203, 32) and np.isfinite(weight).all()


def test_read_tensors_false_lists_shapes_without_data():
    path = _fixture("scmulan-tiny", "ckpt.pt")
    listed, loaded = torch_checkpoint.load(path, read_tensors=False), torch_checkpoint.load(path)
    assert listed["model_args"] == loaded["model_args"]
    for key, array in loaded["model"].items():
        assert listed["model"][key] == torch_checkpoint.TensorInfo(array.dtype, array.shape)


def test_loaded_arrays_are_writable_and_leave_the_file_alone(tmp_path):
    path = tmp_path / "copy.ckpt"
    path.write_bytes(_fixture("scfoundation-tiny", "models.ckpt").read_bytes())
    before = path.read_bytes()
    weight = torch_checkpoint.load(path)["gene"]["state_dict"]["model.norm.weight"]
    expected = weight + 1
    weight += 1
    np.testing.assert_array_equal(weight, expected)
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------ unsafe pickles

class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _zip_checkpoint(path, data_pkl: bytes, storages=None):
    """A torch-style archive around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for key, payload in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", payload)
        archive.writestr("archive/version", "3\n")
    return path


def test_pickle_that_would_call_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps({"state_dict": _RunsCommand(f"touch {marker}")}, protocol=2)
    # the control: the very same bytes run the command through plain pickle
    control = tmp_path / "ctl"  # as long as "ran", so only the path changes in the bytes
    pickle.loads(payload.replace(str(marker).encode(), str(control).encode()))
    assert control.exists()

    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(b"".join(pickle.dumps(header, protocol=2) for header in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001})) + payload)
    for path in (_zip_checkpoint(tmp_path / "zip.pt", payload), legacy):
        with pytest.raises(UnsafeCheckpointError,
                           match=rf"{path.name}: refusing {os.system.__module__}\.system"):
            torch_checkpoint.load(path)
        assert not marker.exists()


def test_any_class_a_state_dict_does_not_need_is_refused_by_name(tmp_path):
    path = _zip_checkpoint(tmp_path / "numpy.pt", pickle.dumps({"w": np.zeros(3)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing numpy\..*_reconstruct"):
        torch_checkpoint.load(path)
    path = _zip_checkpoint(tmp_path / "counter.pt",
                           pickle.dumps(collections.Counter("ab"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing collections\.Counter"):
        torch_checkpoint.load(path)


def _opcodes(value) -> bytes:
    """pickle opcodes of one plain value, without the protocol header and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _tensor_pickle(size, stride, offset=0, numel=4) -> bytes:
    """data.pkl of one float32 tensor over storage "0", as torch writes it."""
    storage = (b"(" + _opcodes("storage") + b"ctorch\nFloatStorage\n" + _opcodes("0")
               + _opcodes("cpu") + _opcodes(numel) + b"tQ")
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _opcodes(offset)
            + _opcodes(tuple(size)) + _opcodes(tuple(stride)) + b"\x89"
            + b"ccollections\nOrderedDict\n)R" + b"tR.")


def test_tensor_views_are_bounded_by_their_storage(tmp_path):
    storage = {"0": np.arange(4, dtype=np.float32).tobytes()}
    strided = _zip_checkpoint(tmp_path / "strided.pt", _tensor_pickle((2,), (2,), offset=1), storage)
    np.testing.assert_array_equal(torch_checkpoint.load(strided), [1.0, 3.0])
    for name, size, stride, offset in [("long", (5,), (1,), 0), ("stride", (3,), (2,), 0),
                                       ("offset", (2, 2), (2, 1), 1)]:
        path = _zip_checkpoint(tmp_path / f"{name}.pt", _tensor_pickle(size, stride, offset), storage)
        with pytest.raises(CheckpointError, match="reaches past its storage of 4 elements"):
            torch_checkpoint.load(path)
    wrong_size = _zip_checkpoint(tmp_path / "size.pt", _tensor_pickle((2,), (1,), numel=8), storage)
    with pytest.raises(CheckpointError, match="holds 16 bytes, its tensors need 32"):
        torch_checkpoint.load(wrong_size)


# ------------------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_truncated_archive_is_a_clear_error(tmp_path, keep):
    data = _fixture("scmulan-tiny", "ckpt.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[:max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: .*(truncated|not a PyTorch)"):
        torch_checkpoint.load(path)


def test_truncated_legacy_file_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(1000.0)}, whole, _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        path = tmp_path / "cut.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\.pt: .*(truncated|corrupt)"):
            torch_checkpoint.load(path)


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def test_corrupt_storage_and_pickle_are_caught_by_their_crc(tmp_path):
    source = _fixture("scmulan-tiny", "ckpt.pt")
    data = source.read_bytes()
    with zipfile.ZipFile(source) as archive:
        storage = archive.getinfo("ckpt/data/3")
        pickled = archive.getinfo("ckpt/data.pkl")
    name_and_extra = struct.unpack("<HH", data[storage.header_offset + 26:storage.header_offset + 30])
    inside_storage = storage.header_offset + 30 + sum(name_and_extra) + storage.file_size // 2
    path = tmp_path / "corrupt.pt"
    path.write_bytes(_flip_byte(data, inside_storage))
    with pytest.raises(CheckpointError, match=r"ckpt/data/3 fails its CRC-32 check"):
        torch_checkpoint.load(path)
    path.write_bytes(_flip_byte(data, pickled.header_offset + 120))
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: corrupt zip archive .*CRC"):
        torch_checkpoint.load(path)


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    cases = {"empty.pt": (b"", "empty file"),
             "text.pt": (b"gene_name\tindex\nA\t0\n", "not a PyTorch checkpoint"),
             "h5.pt": (b"\x89HDF\r\n\x1a\n" + bytes(100), "not a PyTorch checkpoint")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name}: .*{message}"):
            torch_checkpoint.load(tmp_path / name)
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as archive:
        archive.writestr("script/data.pkl", b"")
        archive.writestr("script/constants.pkl", b"")
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        torch_checkpoint.load(tmp_path / "script.pt")


# ------------------------------------------------------------------------------ writing

def _arrays():
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {"matrix": matrix, "transposed": matrix.T, "scalar": np.array(7, np.int64),
            "empty": np.zeros((0, 3), np.float16), "bool": np.array([True, False]),
            "bfloat16": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16),
            "int8": np.arange(-3, 3, dtype=np.int8), "same_matrix": matrix}


def _config():
    return {"n_layer": 2, "dropout": 0.0, "bias": True, "name": "tiny", "none": None,
            "shape": (3, 4), "list": [1, "a"], "bytes": b"\x00\xff"}


def test_save_round_trip_and_storage_alignment(tmp_path):
    path = tmp_path / "saved.pt"
    torch_checkpoint.save({"model_args": _config(), "model": _arrays()}, path)
    loaded = torch_checkpoint.load(path)
    assert loaded["model_args"] == _config()
    assert list(loaded["model"]) == list(_arrays())
    for key, array in _arrays().items():
        assert loaded["model"][key].dtype == array.dtype and loaded["model"][key].shape == array.shape
        np.testing.assert_array_equal(loaded["model"][key], array, key)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        storages = [info for info in archive.infolist() if "/data/" in info.filename]
    assert len(storages) == 7  # the matrix saved twice is one storage
    for info in storages:
        name_and_extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        assert (info.header_offset + 30 + sum(name_and_extra)) % 64 == 0, info.filename


def test_save_refuses_what_torch_load_could_not_read_and_leaves_nothing(tmp_path):
    path = tmp_path / "bad.pt"
    with pytest.raises(TypeError, match="cannot save 'object' objects"):
        torch_checkpoint.save({"model": object()}, path)
    with pytest.raises(TypeError, match="dtype uint16"):
        torch_checkpoint.save({"model": np.zeros(2, np.uint16)}, path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_saved_checkpoint_loads_in_torch(tmp_path):
    torch = pytest.importorskip("torch", reason=NO_TORCH)
    path = tmp_path / "for_torch.pt"
    torch_checkpoint.save({"model_args": _config(), "model": _arrays()}, path)
    for mmap in (False, True):
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        assert loaded["model_args"] == _config()
        assert _assert_same_as_torch(_arrays(), loaded["model"], torch) == 8
        assert loaded["model"]["same_matrix"].data_ptr() == loaded["model"]["matrix"].data_ptr()
