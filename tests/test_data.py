"""Dataset loaders (l2l_fast.data): the real MNIST of ../shared, synthetic IDX and CIFAR-10 files, and the
download path against a local HTTP server. Nothing here reaches beyond 127.0.0.1: every test runs with a
fresh cache folder, no L2L_FAST_* variables, no proxies, and mirrors pointing at a closed local port.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from l2l_fast.data import (CIFAR10Error, CIFAR10Unavailable, IDXError, MNISTUnavailable, cifar10, load_cifar10,
                           load_mnist, mnist, read_idx)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# Published md5s of the uncompressed files.
RAW_MD5 = {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
           "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
           "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
           "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}
CLOSED = "http://127.0.0.1:9/"  # discard port, nothing listens: an accidental download fails at once
MNIST_NAMES = [n for pair in mnist.FILES.values() for n in pair]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> Path:
    """Fresh cache folder (returned), no data/mirror/proxy variables, closed mirrors, empty loader caches."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for var in ("L2L_FAST_DATA", mnist.MIRRORS_ENV, cifar10.MIRRORS_ENV, "http_proxy", "https_proxy",
                "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mnist, "MIRRORS", [CLOSED])
    monkeypatch.setattr(cifar10, "MIRRORS", [CLOSED])
    load_mnist.cache_clear()
    load_cifar10.cache_clear()
    yield tmp_path / "xdg" / "l2l_fast"
    load_mnist.cache_clear()
    load_cifar10.cache_clear()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# synthetic files
def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of ``array``, written independently of the loader's parser."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int16): 0x0B, np.dtype(np.float32): 0x0D}[array.dtype]
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def synthetic_mnist(seed: int = 0, n_train: int = 12, n_test: int = 5) -> dict[str, bytes]:
    """{raw IDX file name: content} of a tiny MNIST; images [n, 28, 28] uint8, labels [n] in 0..9."""
    rng = np.random.default_rng(seed)
    out = {}
    for (images, labels), n in zip(mnist.FILES.values(), (n_train, n_test)):
        out[images] = idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        out[labels] = idx_bytes(rng.integers(0, 10, n, dtype=np.uint8))
    return out


def write_files(folder: Path, files: dict[str, bytes], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def expected_mnist(files: dict[str, bytes], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = mnist.FILES[split]
    x = np.frombuffer(files[images], np.uint8, offset=16).reshape(-1, 784)
    y = np.frombuffer(files[labels], np.uint8, offset=8)
    return torch.tensor(x, dtype=torch.float32) / 255, torch.tensor(y, dtype=torch.int64)


def assert_mnist(loaded, files: dict[str, bytes], split: str) -> None:
    x, y = loaded
    ex, ey = expected_mnist(files, split)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, ex, rtol=0, atol=0)
    torch.testing.assert_close(y, ey, rtol=0, atol=0)


def cifar_batches(seed: int = 0, n: int = 20) -> dict[str, dict]:
    """{batch name: pickled-dict content} like cifar-10-batches-py, n images per batch."""
    rng = np.random.default_rng(seed)
    return {name: {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   b"labels": [int(v) for v in rng.integers(0, 10, n)],
                   b"filenames": [f"img{i}.png".encode() for i in range(n)]}
            for name in cifar10.BATCHES["train"] + cifar10.BATCHES["test"]}


def cifar_tarball(batches: dict[str, dict], skip: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, batch in batches.items():
            if name in skip:
                continue
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def assert_cifar(loaded, batches: dict[str, dict], split: str) -> None:
    x, y = loaded
    names = cifar10.BATCHES[split]
    data = np.concatenate([batches[n][b"data"] for n in names])
    labels = sum((batches[n][b"labels"] for n in names), [])
    assert x.shape == (len(data), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # row layout: 1024 red, then green, then blue, each a row-major 32x32 plane
    assert x[3, 1, 2, 5] == data[3, 1024 + 2 * 32 + 5] / np.float32(255)
    torch.testing.assert_close(x, torch.tensor(data.reshape(-1, 3, 32, 32), dtype=torch.float32) / 255,
                               rtol=0, atol=0)
    assert y.tolist() == labels


# ---------------------------------------------------------------------------------------------
# local mirror server
class Server:
    """http.server on 127.0.0.1 in a thread: ``routes`` maps a URL path to bytes; anything else is 404."""

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def serve(self, mirror: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` under ``/<mirror>/``; returns that mirror's base URL."""
        for name, data in files.items():
            self.routes[f"/{mirror}/{name}"] = data
        return f"{self.url}/{mirror}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def mnist_gz(monkeypatch) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(raw synthetic MNIST files, {name.gz: gzip bytes}), with mnist.MD5 patched to the synthetic md5s."""
    files = synthetic_mnist(seed=1)
    gz = {name + ".gz": gzip.compress(data, mtime=0) for name, data in files.items()}
    for name, data in gz.items():
        monkeypatch.setitem(mnist.MD5, name, md5(data))
    return files, gz


def corrupted(gz: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data[:-1] + bytes([data[-1] ^ 0xFF]) for name, data in gz.items()}


# ---------------------------------------------------------------------------------------------
# real MNIST
needs_shared = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(),
                                  reason=f"the shared MNIST folder {SHARED_DATA / 'mnist'} is absent")


@needs_shared
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_mnist(split, n):
    x, y = load_mnist(split, SHARED_DATA, download=False)
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert y.min() == 0 and y.max() == 9 and torch.bincount(y).min() > n // 20
    # The shared .gz files are recompressed (their md5 differs from the published .gz md5s); their contents
    # are the official bytes, so check the uncompressed md5s, then every value against the raw bytes.
    raw = {}
    for name in mnist.FILES[split]:
        raw[name] = gzip.decompress((SHARED_DATA / "mnist" / (name + ".gz")).read_bytes())
        assert md5(raw[name]) == RAW_MD5[name], name
    images, labels = (np.frombuffer(raw[name], np.uint8, offset=off) for name, off in zip(mnist.FILES[split], (16, 8)))
    assert torch.equal(torch.round(x * 255).to(torch.uint8), torch.from_numpy(images.reshape(n, 784).copy()))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


@needs_shared
def test_real_mnist_via_env_is_cached(monkeypatch):
    monkeypatch.setenv("L2L_FAST_DATA", str(SHARED_DATA))
    x, y = load_mnist("test", download=False)
    again = load_mnist("test", SHARED_DATA / "." / "mnist" / "..")  # same resolved files: same tensors
    assert again[0] is x and again[1] is y


# ---------------------------------------------------------------------------------------------
# synthetic IDX files
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("layout", ["flat", "mnist-subdir"])
def test_synthetic_mnist(tmp_path, gz, layout):
    files = synthetic_mnist()
    write_files(tmp_path / "mnist" if layout == "mnist-subdir" else tmp_path, files, gz=gz)
    for split in ("train", "test"):
        assert_mnist(load_mnist(split, tmp_path, download=False), files, split)


def test_explicit_dir_beats_env(tmp_path, monkeypatch):
    a, b = synthetic_mnist(seed=2), synthetic_mnist(seed=3)
    write_files(tmp_path / "a", a)
    write_files(tmp_path / "b" / "mnist", b, gz=False)
    monkeypatch.setenv("L2L_FAST_DATA", str(tmp_path / "a"))
    assert_mnist(load_mnist("test"), a, "test")
    assert_mnist(load_mnist("test", tmp_path / "b"), b, "test")


def test_replaced_file_is_reread(tmp_path):
    first, second = synthetic_mnist(seed=4), synthetic_mnist(seed=5, n_test=7)
    write_files(tmp_path, first, gz=False)
    assert_mnist(load_mnist("test", tmp_path), first, "test")
    write_files(tmp_path, second, gz=False)
    assert_mnist(load_mnist("test", tmp_path), second, "test")


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 7,
                                   np.linspace(-1, 1, 6, dtype=np.float32)], ids=["int16-3d", "float32-1d"])
def test_read_idx_other_types(tmp_path, array):
    (tmp_path / "x.idx").write_bytes(idx_bytes(array))
    out = read_idx(tmp_path / "x.idx")
    assert out.dtype.isnative and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def _images(files):
    return files["train-images-idx3-ubyte"]


CORRUPT = {  # name: (images file bytes from a good one, expected message)
    "empty": (lambda b: b"", "too short"),
    "bad-magic": (lambda b: b"\x01\x02" + b[2:], "magic number"),
    "bad-type": (lambda b: b[:2] + b"\x07" + b[3:], "magic number"),
    "zero-dims": (lambda b: b[:3] + b"\x00" + b[4:], "magic number"),
    "truncated-header": (lambda b: b[:10], "truncated IDX header"),
    "truncated-body": (lambda b: b[:-10], "truncated"),
    "trailing-bytes": (lambda b: b + b"\x00" * 3, "trailing bytes"),
    "truncated-gzip": (lambda b: gzip.compress(b)[:200], "gzip"),
    "garbage-gzip": (lambda b: b"\x1f\x8b" + b"not gzip at all" * 4, "gzip"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_idx(tmp_path, case):
    files = synthetic_mnist()
    mangle, message = CORRUPT[case]
    write_files(tmp_path, files, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(mangle(_images(files)))
    with pytest.raises(IDXError, match=message) as info:
        load_mnist("train", tmp_path, download=False)
    assert "train-images-idx3-ubyte" in str(info.value)


@pytest.mark.parametrize("case,message", [
    ("wrong-image-size", r"\[N, 28, 28\]"), ("count-mismatch", "5 images but .* 4 labels"),
    ("label-out-of-range", "out of range"), ("float-labels", "uint8 labels")])
def test_wrong_mnist_contents(tmp_path, case, message):
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.zeros(5, np.uint8)
    if case == "wrong-image-size":
        images = np.zeros((5, 27, 28), np.uint8)
    elif case == "count-mismatch":
        labels = labels[:4]
    elif case == "label-out-of-range":
        labels[2] = 10
    else:
        labels = labels.astype(np.float32)
    write_files(tmp_path, {"t10k-images-idx3-ubyte": idx_bytes(images), "t10k-labels-idx1-ubyte": idx_bytes(labels)})
    with pytest.raises(IDXError, match=message):
        load_mnist("test", tmp_path, download=False)


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
    with pytest.raises(ValueError, match="split"):
        load_cifar10("validation")


def test_missing_without_download(tmp_path):
    with pytest.raises(MNISTUnavailable, match="L2L_FAST_DATA=<dir> or pass --data-dir") as info:
        load_mnist("train", tmp_path, download=False)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value) and str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(CIFAR10Unavailable, match="cifar-10-batches-py"):
        load_cifar10("test", tmp_path, download=False)


# ---------------------------------------------------------------------------------------------
# MNIST download
def test_download_mnist(tmp_path, server, mnist_gz, isolated):
    files, gz = mnist_gz
    mnist.MIRRORS[:] = [server.serve("good", gz)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_mnist(load_mnist("train", empty), files, "train")  # explicit folder lacks them: fetched into cache
    assert sorted(os.listdir(isolated / "mnist")) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert os.listdir(empty) == []
    assert len(server.requests) == 2
    load_mnist.cache_clear()
    assert_mnist(load_mnist("train"), files, "train")  # found in the cache folder: no new request
    assert_mnist(load_mnist("test"), files, "test")
    assert len(server.requests) == 4
    assert sorted(os.listdir(isolated / "mnist")) == sorted(gz)


def test_download_falls_over_to_next_mirror(server, mnist_gz, isolated):
    files, gz = mnist_gz
    bad = server.serve("bad", corrupted(gz))
    missing = f"{server.url}/missing/"
    good = server.serve("good", gz)
    mnist.MIRRORS[:] = [bad, missing, good]
    assert_mnist(load_mnist("test"), files, "test")
    assert server.requests == [f"/{m}/t10k-{k}-idx{d}-ubyte.gz" for k, d in (("images", 3), ("labels", 1))
                               for m in ("bad", "missing", "good")]
    assert sorted(os.listdir(isolated / "mnist")) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_download_mirrors_from_env(server, mnist_gz, monkeypatch):
    files, gz = mnist_gz
    bad, good = server.serve("bad", corrupted(gz)), server.serve("good", gz)
    monkeypatch.setenv(mnist.MIRRORS_ENV, f"{bad}, {good}")  # replaces mnist.MIRRORS (the closed port)
    assert_mnist(load_mnist("test"), files, "test")
    assert server.requests[:2] == ["/bad/t10k-images-idx3-ubyte.gz", "/good/t10k-images-idx3-ubyte.gz"]


def test_download_all_mirrors_bad(server, mnist_gz, isolated):
    _, gz = mnist_gz
    mnist.MIRRORS[:] = [server.serve("bad", corrupted(gz)), f"{server.url}/missing/", CLOSED]
    with pytest.raises(MNISTUnavailable) as info:
        load_mnist("train")
    message = str(info.value)
    for needed in ("train-images-idx3-ubyte.gz", "does not match", "404", "L2L_FAST_DATA=<dir>", "--data-dir",
                   "t10k-labels-idx1-ubyte.gz", CLOSED):
        assert needed in message
    assert os.listdir(isolated / "mnist") == []  # no partial or corrupt file left behind


# ---------------------------------------------------------------------------------------------
# CIFAR-10
@pytest.mark.parametrize("layout", ["tarball", "cifar10-subdir-tarball", "extracted", "batches-folder"])
def test_synthetic_cifar10(tmp_path, layout):
    batches = cifar_batches()
    if layout.endswith("tarball"):
        folder = tmp_path / "cifar10" if layout.startswith("cifar10") else tmp_path
        folder.mkdir(exist_ok=True)
        (folder / cifar10.TARBALL).write_bytes(cifar_tarball(batches))
        data_dir = tmp_path
    else:
        data_dir = tmp_path if layout == "extracted" else tmp_path / cifar10.FOLDER
        (tmp_path / cifar10.FOLDER).mkdir()
        for name, batch in batches.items():
            (tmp_path / cifar10.FOLDER / name).write_bytes(pickle.dumps(batch, protocol=2))
    for split in ("train", "test"):
        assert_cifar(load_cifar10(split, data_dir, download=False), batches, split)
    assert load_cifar10("test", data_dir)[0] is load_cifar10("test", data_dir)[0]


def test_cifar10_str_keys(tmp_path):
    """Python 2 pickles (the official batches) load with str keys under latin1; both kinds are accepted."""
    batches = {n: {k.decode(): v for k, v in b.items()} for n, b in cifar_batches(seed=6).items()}
    (tmp_path / cifar10.TARBALL).write_bytes(cifar_tarball(batches))
    x, y = load_cifar10("test", tmp_path, download=False)
    assert y.tolist() == batches["test_batch"]["labels"]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("case,message", [
    ("truncated", "corrupt or truncated tarball"), ("missing-batch", "lacks cifar-10-batches-py/test_batch"),
    ("wrong-shape", r"uint8 \[n, 3072\]"), ("few-labels", "integer labels"), ("no-labels", "lacks"),
    ("code-in-pickle", "not allowed")])
def test_corrupt_cifar10(tmp_path, case, message):
    batches = cifar_batches()
    skip = ()
    if case == "missing-batch":
        skip = ("test_batch",)
    elif case == "wrong-shape":
        batches["test_batch"][b"data"] = batches["test_batch"][b"data"].reshape(-1, 1536)
    elif case == "few-labels":
        batches["test_batch"][b"labels"].pop()
    elif case == "no-labels":
        del batches["test_batch"][b"labels"]
    elif case == "code-in-pickle":
        batches["test_batch"][b"labels"] = _Evil()
    tarball = cifar_tarball(batches, skip=skip)
    (tmp_path / cifar10.TARBALL).write_bytes(tarball[: len(tarball) // 2] if case == "truncated" else tarball)
    with pytest.raises(CIFAR10Error, match=message):
        load_cifar10("test", tmp_path, download=False)


def test_download_cifar10(server, monkeypatch, isolated):
    batches = cifar_batches(seed=7)
    tarball = cifar_tarball(batches)
    monkeypatch.setitem(cifar10.MD5, cifar10.TARBALL, md5(tarball))
    cifar10.MIRRORS[:] = [server.serve("bad", {cifar10.TARBALL: tarball[:-5]}),
                          server.serve("good", {cifar10.TARBALL: tarball})]
    assert_cifar(load_cifar10("train"), batches, "train")
    assert os.listdir(isolated / "cifar10") == [cifar10.TARBALL]
    assert server.requests == ["/bad/cifar-10-python.tar.gz", "/good/cifar-10-python.tar.gz"]


def test_download_cifar10_all_bad(server, monkeypatch, isolated):
    monkeypatch.setenv(cifar10.MIRRORS_ENV, server.serve("bad", {cifar10.TARBALL: b"not a tarball"}))
    with pytest.raises(CIFAR10Unavailable, match="cifar-10-python.tar.gz") as info:
        load_cifar10("test")
    assert "L2L_FAST_DATA=<dir>" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    assert os.listdir(isolated / "cifar10") == []


def test_unwritable_cache(tmp_path, monkeypatch, server, mnist_gz):
    _, gz = mnist_gz
    mnist.MIRRORS[:] = [server.serve("good", gz)]
    (tmp_path / "blocker").write_text("a file where the cache folder should go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocker"))
    with pytest.raises(MNISTUnavailable, match="(?s)cannot write into the download folder .*L2L_FAST_DATA=<dir>"):
        load_mnist("test")
