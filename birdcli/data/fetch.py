"""`birds data fetch`: get a dataset in the Kaggle layout from a real source, verify it, move it in atomically.

Every source writes into a hidden staging folder next to the destination; only a complete, checked dataset is
renamed into place, so an interrupted fetch never leaves a half dataset that looks complete.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from birdcli.console import info, progress
from birdcli.data import layout
from birdcli.errors import BirdsError, UsageError

OFFLINE_HINT = "no network? use --source synthetic, --source dir --path FOLDER, or --source url with a local server"
MARKER = ".birdcli-fetch.json"


def fetch(
    source: str,
    root: Path,
    *,
    path: str | None = None,
    link: bool = False,
    url: str | None = None,
    sha256: str | None = None,
    hf_repo: str | None = None,
    kaggle_dataset: str = "gpiosenka/100-bird-species",
    synthetic: dict | None = None,
    max_extract_bytes: int = 20 * 2**30,
    force: bool = False,
) -> Path:
    """Fetch into `root`; a no-op when a complete dataset is already there (unless `force`)."""
    root = Path(root)
    if source == "dvc":
        return _fetch_dvc(root)
    if root.exists() and not force:
        if layout.looks_complete(root):
            info(f"[green]{root} already holds a dataset[/]; nothing to do (use --force to fetch again)")
            return root
        if any(root.iterdir()):
            raise BirdsError(
                f"{root} exists but is not a dataset in the Kaggle layout",
                "remove it, pick another --root, or pass --force",
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        if source == "synthetic":
            from birdcli.data.synthetic import generate

            s = dict(synthetic or {})
            per_split = {k: s.get(f"{k}_per_class", 10) for k in layout.SPLITS}
            info(f"generating synthetic dataset ({s.get('num_classes', 10)} species, seed {s.get('seed', 0)})")
            total = s.get("num_classes", 10) * sum(per_split.values())
            with progress() as bar:
                task = bar.add_task("drawing", total=total)
                n, size, seed = s.get("num_classes", 10), s.get("image_size", 32), s.get("seed", 0)
                generate(staging, n, per_split, size, seed, on_image=lambda: bar.advance(task))
            found = staging
        elif source == "dir":
            found = _copy_dir(path, staging, link)
        elif source == "url":
            found = _fetch_url(url, sha256, staging, max_extract_bytes)
        elif source == "hf":
            found = _fetch_hf(hf_repo, staging, max_extract_bytes)
        elif source == "kaggle":
            found = _fetch_kaggle(kaggle_dataset, staging, max_extract_bytes)
        else:
            raise UsageError(f"unknown source '{source}'", "use synthetic, dir, url, hf, kaggle or dvc")
        (found / MARKER).write_text(json.dumps({"source": source, "fetched_at": time.time()}) + "\n")
        _move_into_place(found, root, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n = sum(len(layout.split_files(root, s)) for s in layout.SPLITS)
    info(f"[green]dataset ready[/] at {root}: {len(layout.species_dirs(root, 'train'))} species, {n} images")
    return root


def _move_into_place(found: Path, root: Path, force: bool) -> None:
    if not layout.looks_complete(found):
        raise BirdsError("the fetched data is not in the Kaggle layout (train/ valid/ test/ of species folders)")
    old = None
    if root.exists():
        if not force and any(root.iterdir()):
            raise BirdsError(f"{root} appeared while fetching; not overwriting it")
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        root.rename(old)
    found.rename(root)  # atomic on one filesystem: the dataset appears whole or not at all
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _copy_dir(path: str | None, staging: Path, link: bool) -> Path:
    if not path:
        raise UsageError("--source dir needs --path FOLDER", "e.g. birds data fetch --source dir --path ~/birds")
    src = Path(path).expanduser()
    if not src.is_dir():
        raise UsageError(f"{src} is not a folder")
    top = layout.find_layout_root(src)
    if top is None:
        raise BirdsError(f"{src} is not in the Kaggle layout", "it needs train/ and valid/ or test/ of species folders")
    files = [p for p in top.rglob("*") if p.is_file() and not p.name.startswith(".")]
    with progress() as bar:
        task = bar.add_task("linking" if link else "copying", total=len(files))
        for p in files:
            dst = staging / p.relative_to(top)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if link:
                dst.symlink_to(p.resolve())
            else:
                shutil.copy2(p, dst)
            bar.advance(task)
    return staging


def download(url: str, dst: Path, sha256: str | None) -> None:
    """Stream `url` to `dst` with a progress bar; verify length and sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, dst.open("wb") as f:
            total = int(resp.headers.get("Content-Length") or 0) or None
            got = 0
            with progress() as bar:
                task = bar.add_task("downloading", total=total)
                while chunk := resp.read1(1 << 20):  # what has arrived, so the bar moves
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(task, completed=got)
    except urllib.error.HTTPError as e:
        raise BirdsError(f"download of {url} failed: HTTP {e.code} {e.reason}", "check the URL") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise BirdsError(f"download of {url} failed: {reason}", OFFLINE_HINT) from e
    if total is not None and got != total:
        raise BirdsError(f"download of {url} is truncated: {got} of {total} bytes", "try again")
    if sha256 and digest.hexdigest() != sha256.lower():
        raise BirdsError(
            f"checksum mismatch for {url}: got {digest.hexdigest()}, expected {sha256}",
            "the file is corrupt or not the one you meant; nothing was installed",
        )
    if not sha256:
        info(f"[yellow]no sha256 given[/]; downloaded file has sha256 {digest.hexdigest()}")


def _fetch_url(url: str | None, sha256: str | None, staging: Path, cap: int) -> Path:
    if not url:
        raise UsageError("--source url needs --url", "e.g. --url https://host/birds.zip --sha256 HEX")
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
    archive = staging.parent / f".{staging.name}-{name}"
    try:
        download(url, archive, sha256)
        extract(archive, staging / "x", cap)
    finally:
        archive.unlink(missing_ok=True)
    return _layout_in(staging / "x", url)


def _layout_in(folder: Path, what: str) -> Path:
    top = layout.find_layout_root(folder)
    if top is None:
        raise BirdsError(f"{what} holds no dataset in the Kaggle layout (train/ valid/ test/ of species folders)")
    return top


def extract(archive: Path, dest: Path, cap: int) -> None:
    """Extract a .zip or .tar(.gz/.bz2/.xz) refusing absolute paths, `..`, links, devices and size bombs."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            total = 0
            for m in infos:
                _check_member_name(m.filename, archive)
                if stat.S_ISLNK(m.external_attr >> 16):
                    raise BirdsError(f"refusing {archive.name}: member {m.filename!r} is a symbolic link")
                total += m.file_size
                if total > cap:
                    raise BirdsError(f"refusing {archive.name}: it extracts to more than {cap / 2**30:.1f} GiB")
            with progress() as bar:
                task = bar.add_task("extracting", total=len(infos))
                for m in infos:
                    zf.extract(m, dest)
                    bar.advance(task)
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise BirdsError(f"{archive.name} is neither a zip nor a tar archive: {e}") from e
    with tf:
        members = tf.getmembers()
        total = 0
        for t in members:
            _check_member_name(t.name, archive)
            if t.issym() or t.islnk():
                raise BirdsError(f"refusing {archive.name}: member {t.name!r} is a link")
            if not (t.isfile() or t.isdir()):
                raise BirdsError(f"refusing {archive.name}: member {t.name!r} is a device or special file")
            total += t.size
            if total > cap:
                raise BirdsError(f"refusing {archive.name}: it extracts to more than {cap / 2**30:.1f} GiB")
        with progress() as bar:
            task = bar.add_task("extracting", total=len(members))
            for t in members:
                tf.extract(t, dest, filter="data")
                bar.advance(task)


def _check_member_name(name: str, archive: Path) -> None:
    p = name.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in p.split("/"):
        raise BirdsError(f"refusing {archive.name}: member {name!r} would extract outside the target folder")


def _fetch_hf(repo: str | None, staging: Path, cap: int) -> Path:
    if not repo:
        raise UsageError("--source hf needs a dataset repository", "pass --hf-repo OWNER/NAME")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    info(f"downloading Hugging Face dataset {repo}")
    try:
        snapshot_download(repo_id=repo, repo_type="dataset", local_dir=staging / "hf")
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise BirdsError(f"cannot download Hugging Face dataset {repo}: {type(e).__name__}", OFFLINE_HINT) from e
    for archive in sorted((staging / "hf").rglob("*")):
        if archive.name.endswith((".zip", ".tar", ".tar.gz", ".tgz")):
            extract(archive, staging / "hf" / archive.name.split(".")[0], cap)
    return _layout_in(staging / "hf", f"Hugging Face dataset {repo}")


def _fetch_kaggle(slug: str, staging: Path, cap: int) -> Path:
    try:
        import kaggle  # noqa: F401  (authenticates at import time)
        from kaggle import api
    except ImportError as e:
        raise BirdsError("the kaggle client is not installed", "pip install 'birdcli[kaggle]'") from e
    except Exception as e:  # the client raises bare errors when credentials are missing
        raise BirdsError(
            f"kaggle credentials missing or invalid: {e}",
            "put kaggle.json in ~/.kaggle or set KAGGLE_USERNAME/KAGGLE_KEY; or use --source synthetic|dir|url",
        ) from e
    info(f"downloading Kaggle dataset {slug}")
    try:
        api.dataset_download_files(slug, path=str(staging / "dl"), unzip=False, quiet=False)
    except Exception as e:
        raise BirdsError(f"kaggle download of {slug} failed: {e}", OFFLINE_HINT) from e
    for archive in sorted((staging / "dl").glob("*.zip")):
        extract(archive, staging / "x", cap)
        archive.unlink()
    return _layout_in(staging / "x", f"Kaggle dataset {slug}")


def _fetch_dvc(root: Path) -> Path:
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError as e:
        raise BirdsError("dvc is not installed", "pip install 'dvc[gs]'") from e
    try:
        repo = Repo()
    except DvcException as e:
        raise BirdsError("not inside a DVC repository", "run from the project folder (with .dvc/)") from e
    info(f"dvc pull {root}")
    try:
        with repo:
            # Data added with `dvc add` is pulled through its .dvc file: once the folder is gone, DVC reads a bare
            # path as a dvc.yaml stage name and fails. A pipeline output (the fetch stage's) is pulled by its path.
            dvc_file = root.with_name(root.name + ".dvc")
            repo.pull(targets=[str(dvc_file if dvc_file.is_file() else root)])
    except DvcException as e:
        raise BirdsError(f"dvc pull of {root} failed: {e}", "check `dvc remote list` and your credentials") from e
    if not layout.looks_complete(root):
        raise BirdsError(f"dvc pull finished but {root} holds no dataset", "is it tracked? see `dvc status`")
    return root


def dvc_add(root: Path) -> None:
    """Track the fetched data with `dvc add` so `dvc push` sends it to the remote."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            repo.add(str(root))
    except DvcException as e:
        raise BirdsError(f"dvc add {root} failed: {e}") from e
    info(f"tracked {root} with DVC ({root}.dvc); `dvc push` uploads it")
