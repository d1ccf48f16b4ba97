"""`birds data fetch` from every source that can exist here: synthetic, dir, url (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from birdcli.data import layout
from birdcli.data.fetch import extract, fetch
from birdcli.errors import BirdsError
from tests.conftest import run_birds

SMALL = {"num_classes": 3, "train_per_class": 4, "valid_per_class": 2, "test_per_class": 2, "image_size": 16}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_and_in_kaggle_layout(tmp_path: Path):
    a = fetch("synthetic", tmp_path / "a", synthetic={**SMALL, "seed": 3})
    b = fetch("synthetic", tmp_path / "b", synthetic={**SMALL, "seed": 3})
    ta, tb = _tree(a), _tree(b)
    ta.pop(".birdcli-fetch.json"), tb.pop(".birdcli-fetch.json")
    assert ta == tb
    assert (
        layout.species_dirs(a, "train") == layout.species_dirs(a, "test") and len(layout.species_dirs(a, "train")) == 3
    )
    rows = layout.read_csv(a)
    assert rows and len(rows) == 3 * (4 + 2 + 2)
    assert (a / "birds.csv").read_text().splitlines()[0] == "class id,filepaths,labels,data set,scientific name"
    c = fetch("synthetic", tmp_path / "c", synthetic={**SMALL, "seed": 4})
    assert _tree(c)["train/" + layout.species_dirs(c, "train")[0] + "/001.jpg"] != ta[next(k for k in ta if "001" in k)]


def test_rerun_is_a_noop_and_force_refetches(tmp_path: Path):
    root = fetch("synthetic", tmp_path / "raw", synthetic=SMALL)
    stamp = (root / ".birdcli-fetch.json").stat().st_mtime_ns
    fetch("synthetic", root, synthetic=SMALL)
    assert (root / ".birdcli-fetch.json").stat().st_mtime_ns == stamp
    fetch("synthetic", root, synthetic=SMALL, force=True)
    assert (root / ".birdcli-fetch.json").stat().st_mtime_ns != stamp


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("mine")
    with pytest.raises(BirdsError, match="not a dataset"):
        fetch("synthetic", tmp_path / "raw", synthetic=SMALL)
    assert (tmp_path / "raw" / "notes.txt").read_text() == "mine"


def test_dir_source_copies_real_photos(tmp_path: Path, birds_mini: Path):
    r = run_birds("data", "fetch", "--source", "dir", "--path", str(birds_mini), "--root", str(tmp_path / "raw"))
    assert r.returncode == 0, r.stderr
    assert layout.species_dirs(tmp_path / "raw", "train") == layout.species_dirs(birds_mini, "train")
    assert (tmp_path / "raw" / "birds.csv").read_bytes() == (birds_mini / "birds.csv").read_bytes()
    linked = fetch("dir", tmp_path / "linked", path=str(birds_mini), link=True)
    first = next((linked / "train").rglob("*.jpg"))
    assert first.is_symlink()


def test_dir_source_errors(tmp_path: Path):
    r = run_birds("data", "fetch", "--source", "dir", "--root", str(tmp_path / "raw"))
    assert r.returncode == 2 and "--path" in r.stderr
    (tmp_path / "junk").mkdir()
    r = run_birds("data", "fetch", "--source", "dir", "--path", str(tmp_path / "junk"), "--root", str(tmp_path / "r"))
    assert r.returncode == 1 and "Kaggle layout" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- url, over real HTTP


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    truncate: set[str] = set()
    slow: set[str] = set()

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.truncate:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        step = 1024 if self.path in self.slow else len(body)
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            if self.path in self.slow:
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()


@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory) -> bytes:
    src = fetch("synthetic", tmp_path_factory.mktemp("src") / "birds", synthetic=SMALL)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"birds-525/{p.relative_to(src).as_posix()}")  # wrapped in a folder, as archives are
    return buf.getvalue()


def _tar(members: dict[str, bytes], links: dict[str, str] | None = None, absolute: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def test_url_zip_with_checksum(tmp_path: Path, server, dataset_zip: bytes):
    base, handler = server
    handler.files["/birds.zip"] = dataset_zip
    sha = hashlib.sha256(dataset_zip).hexdigest()
    r = run_birds(
        "data",
        "fetch",
        "--source",
        "url",
        "--url",
        f"{base}/birds.zip",
        "--sha256",
        sha,
        "--root",
        str(tmp_path / "raw"),
    )
    assert r.returncode == 0, r.stderr
    assert len(layout.species_dirs(tmp_path / "raw", "train")) == 3 and (tmp_path / "raw" / "birds.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_url_tar_gz(tmp_path: Path, server, dataset_zip: bytes):
    base, handler = server
    with zipfile.ZipFile(io.BytesIO(dataset_zip)) as zf:
        handler.files["/birds.tar.gz"] = _tar({n: zf.read(n) for n in zf.namelist()})
    root = fetch("url", tmp_path / "raw", url=f"{base}/birds.tar.gz")
    assert layout.looks_complete(root)


@pytest.mark.parametrize(
    "case, message",
    [
        ("checksum", "checksum mismatch"),
        ("truncated", "truncated"),
        ("traversal", "outside the target folder"),
        ("absolute", "outside the target folder"),
        ("symlink", "link"),
        ("zip-symlink", "symbolic link"),
        ("missing", "404"),
        ("not-archive", "neither a zip nor a tar"),
        ("bomb", "more than"),
    ],
)
def test_url_failures_install_nothing(tmp_path: Path, server, dataset_zip: bytes, case: str, message: str):
    base, handler = server
    path, sha, cap = f"/{case}.bin", None, 2**30
    if case == "checksum":
        handler.files[path], sha = dataset_zip, "0" * 64
    elif case == "truncated":
        handler.files[path] = dataset_zip
        handler.truncate.add(path)
    elif case == "traversal":
        handler.files[path] = _tar({"train/X/1.jpg": b"x", "../../evil.txt": b"pwned"})
    elif case == "absolute":
        handler.files[path] = _tar({"/tmp/evil-birdcli.txt": b"pwned"})
    elif case == "symlink":
        handler.files[path] = _tar({"train/X/1.jpg": b"x"}, links={"train/X/2.jpg": "/etc/passwd"})
    elif case == "zip-symlink":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            info = zipfile.ZipInfo("train/X/link.jpg")
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
        handler.files[path] = buf.getvalue()
    elif case == "not-archive":
        handler.files[path] = b"hello, not an archive"
    elif case == "bomb":
        handler.files[path], cap = dataset_zip, 1000
    with pytest.raises(BirdsError, match=message):
        fetch("url", tmp_path / "raw", url=f"{base}{path}", sha256=sha, max_extract_bytes=cap)
    assert not (tmp_path / "raw").exists()
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil-birdcli.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "staging files left behind"


def test_interrupted_fetch_leaves_no_dataset(tmp_path: Path, server, dataset_zip: bytes):
    base, handler = server
    handler.files["/slow.zip"] = dataset_zip
    handler.slow.add("/slow.zip")
    proc = subprocess.Popen(
        [sys.executable, "-m", "birdcli", "data", "fetch", "--source", "url", "--url", f"{base}/slow.zip",
         "--root", str(tmp_path / "raw")],
        env={**os.environ, "BIRDS_QUIET": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60

    def downloading() -> bool:  # the archive is being written next to the staging folder
        return any(p.name.endswith("slow.zip") and p.stat().st_size > 0 for p in tmp_path.iterdir())

    while time.time() < deadline and not downloading():
        assert proc.poll() is None, "fetch ended before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "raw").exists() and not layout.looks_complete(tmp_path / "raw")
    # the next fetch works despite the leftovers
    handler.slow.discard("/slow.zip")
    assert layout.looks_complete(fetch("url", tmp_path / "raw", url=f"{base}/slow.zip"))


def test_safe_extract_direct(tmp_path: Path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(_tar({"ok/file.txt": b"fine"}))
    extract(archive, tmp_path / "out", 2**20)
    assert (tmp_path / "out" / "ok" / "file.txt").read_text() == "fine"


def test_offline_sources_fail_with_one_clear_line(tmp_path: Path):
    env = {"HF_HUB_OFFLINE": "1", "KAGGLE_USERNAME": "", "KAGGLE_KEY": "", "KAGGLE_CONFIG_DIR": str(tmp_path)}
    r = run_birds(
        "data", "fetch", "--source", "hf", "--hf-repo", "someone/birds", "--root", str(tmp_path / "a"), env=env
    )
    assert r.returncode == 1 and "--source synthetic" in r.stderr and "Traceback" not in r.stderr
    r = run_birds("data", "fetch", "--source", "kaggle", "--root", str(tmp_path / "b"), env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "kaggle" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1
    r = run_birds(
        "data", "fetch", "--source", "url", "--url", "http://127.0.0.1:9/x.zip", "--root", str(tmp_path / "c")
    )
    assert r.returncode == 1 and "download" in r.stderr and "Traceback" not in r.stderr
    r = run_birds("data", "fetch", "--source", "nope", "--root", str(tmp_path / "d"))
    assert r.returncode == 2
