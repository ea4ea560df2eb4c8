"""Run directories on a local disk or in object storage (``gs://bucket/run``, ``s3://...``).

A TPU pod slice has no filesystem that all its hosts see, so its runs keep their workdir in a
bucket: checkpoints (orbax writes ``gs://`` itself, arrays through tensorstore), TensorBoard
events (written locally and uploaded: mtlx.train.logs), ``metrics.jsonl``,
``eval_results.json``, plots and the affinity report. Local paths stay ``pathlib.Path``; a URL becomes an ``etils.epath.Path``
(``gs://`` through gcsfs: ``pip install 'mtlx[gcs]'``), which has the same methods
(``/``, ``mkdir``, ``exists``, ``read_text``, ``write_text``, ``open``).

Object stores have neither rename nor append, so the two helpers below write differently:
- ``write_atomic``: locally a temporary file renamed over the target (readers never see half a
  file); in a bucket one upload, which the store publishes whole when it completes.
- ``LineLog``: locally a file appended to. In a bucket, ``ObjectAppender``: in gs:// each
  append uploads the new lines as a small object and composes it onto the log (GCS compose: a
  server-side concatenation that replaces the object whole), so a long run does not upload
  its whole log at each interval; the object is written whole at the first append and every
  ``ObjectAppender.REWRITE_EVERY`` appends (GCS caps a composite object at 1,024 components).
  Other schemes rewrite the object at each append. TensorBoard's event files go up the same
  way (mtlx.train.logs).

Inputs in a bucket (``data.data_root``, ``data.tokenizer``, ``model.checkpoint``): readers,
tokenizers and Hugging Face loaders want local files, so ``local_copy`` downloads the object
or directory tree once per host into a cache (``$MTLX_REMOTE_CACHE``, default
``~/.cache/mtlx/remote``) and again when its listing (names, sizes, times) changes.

``pathlib.Path("gs://b/run")`` reads as ``gs:/b/run`` (pathlib collapses the double slash), so
``as_path`` refuses a path in that form with a message saying to pass the URL as a string.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any, Optional, Union

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_COLLAPSED = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]{1,}:/[^/]")  # 'gs:/b/x' (not 'C:/x')

PathLike = Union[str, os.PathLike]


def is_url(p: Any) -> bool:
    """True for 'scheme://...' other than file://."""
    s = os.fspath(p)
    return bool(_URL.match(s)) and not s.startswith("file://")


def as_path(p: PathLike):
    """A local path as ``pathlib.Path`` (file:// stripped); a URL as ``etils.epath.Path``."""
    s = os.fspath(p)
    if s.startswith("file://"):
        return pathlib.Path(s[len("file://"):])
    if is_url(s):
        from etils import epath
        return epath.Path(s)
    if _COLLAPSED.match(s) and not os.path.exists(s.split("/", 1)[0]):
        scheme = s.split(":", 1)[0]
        raise ValueError(f"path {s!r} looks like a {scheme}:// URL whose '//' was collapsed by "
                         f"pathlib.Path; pass the URL as a string ('{scheme}://{s[len(scheme) + 2:]}')")
    return pathlib.Path(s)


def directory_string(p: PathLike) -> str:
    """A directory as the string libraries take: a URL unchanged (no trailing '/'), a local
    path made absolute."""
    path = as_path(p)
    if is_url(path):
        return os.fspath(path).rstrip("/")
    return os.path.abspath(os.fspath(path))


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
    """Writes ``data`` so that readers see the old content or the new, never half of it."""
    path = as_path(path)
    raw = data.encode() if isinstance(data, str) else data
    if is_url(path):
        path.write_bytes(raw)  # an object appears whole when its upload completes
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def savefig(fig, path: PathLike, **kwargs) -> None:
    """``fig.savefig`` to a local path or a URL (rendered in memory, then one upload)."""
    path = as_path(path)
    if not is_url(path):
        fig.savefig(path, **kwargs)
        return
    buf = io.BytesIO()
    fig.savefig(buf, format=kwargs.pop("format", path.suffix.lstrip(".") or "png"), **kwargs)
    write_atomic(path, buf.getvalue())


def _filesystem(path):
    """The fsspec filesystem etils.epath reads and writes ``path`` through: one instance, one
    listing cache, so what this module changes behind epath's back (a compose) is forgotten
    where epath would read it."""
    try:
        return path._backend.fs(os.fspath(path))
    except AttributeError:  # an etils without its fsspec backend attribute
        import fsspec
        return fsspec.filesystem(os.fspath(path).split("://", 1)[0])


def _forget_listings(fs, url: str) -> None:
    """Drops the cached listings of ``url``, its parents and everything under it."""
    key = fs._strip_protocol(url).rstrip("/")
    for cached in [k for k in list(fs.dircache) if k.startswith(key + "/")]:
        fs.dircache.pop(cached, None)
    fs.invalidate_cache(url)


class ObjectAppender:
    """Keeps an object in a bucket equal to a growing stream of bytes (a log, an event file).

    ``append(new, whole)``: in gs://, the first call and every ``REWRITE_EVERY``-th after it
    upload ``whole()`` (the stream so far); the calls between upload only ``new`` as a part
    object and compose it onto the object (a server-side concatenation that replaces the
    object whole), then delete the part. GCS caps a composite object at 1,024 components,
    hence the periodic whole write. Other schemes upload ``whole()`` at every call.

    A compose is conditional on the generation this appender last wrote (GCS's
    ``ifGenerationMatch``): when a compose's reply is lost, the client's retry is refused (412)
    instead of composing the part a second time, and the object's size tells whether the first
    attempt took. If the object holds anything but the bytes appended so far (a retry on a
    store that ignores the condition, another writer), it is written whole. Part objects are
    named ``.mtlx-part.*`` beside the object: nothing TensorBoard takes for an event file.
    """
    REWRITE_EVERY = 512

    def __init__(self, url: PathLike):
        self.path = as_path(url)
        self._url = os.fspath(self.path)
        self._gcs = _filesystem(self.path) if self._url.startswith("gs://") else None
        self._composed = None   # parts composed since the last whole write; None: none yet
        self._size = 0          # bytes the object holds after this appender's last write
        self._generation = None  # the object's generation then (the compose's condition)
        parent, _, name = self._url.rpartition("/")
        self._part_prefix = (f"{parent}/.mtlx-part.{hashlib.sha256(name.encode()).hexdigest()[:12]}"
                             f".{os.getpid()}")

    def written_whole(self, size: int) -> None:
        """The object has just been written whole (``size`` bytes): the next append may
        compose."""
        self._composed, self._size = 0, size
        if self._gcs is not None:
            _forget_listings(self._gcs, self._url)
            self._generation = self._gcs.info(self._url).get("generation")

    def _write_whole(self, whole) -> None:
        data = whole()
        write_atomic(self.path, data)
        self.written_whole(len(data))

    def append(self, new: bytes, whole) -> None:
        if not new:
            return
        if self._gcs is None or self._composed is None or self._composed >= self.REWRITE_EVERY:
            self._write_whole(whole)
            return
        part = f"{self._part_prefix}.{self._composed}"
        self._gcs.pipe_file(part, new)
        try:
            meta = self._compose(part)
        finally:
            try:
                self._gcs.rm_file(part)
            except Exception as e:  # a stray part object must not stop a run
                logging.getLogger(__name__).warning("could not delete %s: %s", part, e)
        if int(meta["size"]) != self._size + len(new):
            logging.getLogger(__name__).warning(
                "%s holds %s bytes after a compose, %d expected: writing it whole",
                self._url, meta["size"], self._size + len(new))
            self._write_whole(whole)
            return
        self._composed += 1
        self._size, self._generation = int(meta["size"]), meta.get("generation")

    def _compose(self, part: str) -> dict:
        """Composes [object, part] onto the object, if it is still at the generation written
        last; returns the object's metadata after it (its size says whether the part is in)."""
        bucket, key, _ = self._gcs.split_path(self._url)
        try:
            return self._gcs.call(
                "POST", "b/{}/o/{}/compose", bucket, key, json_out=True,
                ifGenerationMatch=self._generation, headers={"Content-Type": "application/json"},
                json={"kind": "storage#composeRequest",
                      "sourceObjects": [{"name": key}, {"name": self._gcs.split_path(part)[1]}],
                      "destination": {"name": key, "bucket": bucket}})
        except FileExistsError:  # 412: the object moved on; an earlier attempt may have taken
            return self._gcs.info(self._url)
        finally:
            _forget_listings(self._gcs, self._url)


class LineLog:
    """Appends lines to a text file (a local file or an object; see the module docstring).

    Existing content is kept: a resumed run appends to its log (in a bucket, the object is
    written whole at the first append, then appended to by ``ObjectAppender``). ``written``:
    the content ``path`` holds, as the caller has just written or read it whole; it is not
    read back, and in a bucket the appends compose onto it from the first.
    """

    def __init__(self, path: PathLike, written: Optional[str] = None):
        self.path = as_path(path)
        self._remote = is_url(self.path)
        if self._remote:
            self._object = ObjectAppender(self.path)
            if written is not None:
                self._text = written
                self._object.written_whole(len(written.encode()))
            else:
                self._text = self.path.read_text() if self.path.exists() else ""

    def append(self, text: str) -> None:
        if not self._remote:
            with open(self.path, "a") as f:
                f.write(text)
            return
        self._text += text
        self._object.append(text.encode(), lambda: self._text.encode())


def _walk(d):
    for child in sorted(d.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from _walk(child)
        else:
            yield child


def local_copy(p: Optional[PathLike], *, what: str = "path",
               cache_dir: Optional[PathLike] = None) -> Optional[PathLike]:
    """``p`` itself when local (or None); for a URL, a local copy of the object or directory
    tree it names (see the module docstring). ``what`` names the config key in errors."""
    if p is None or not is_url(p):
        return p
    src = as_path(p)
    url = os.fspath(src).rstrip("/")
    _forget_listings(_filesystem(src), url)  # the store as it is now, not as first listed
    if not src.exists():
        raise FileNotFoundError(f"{what}: {url} does not exist")
    files = list(_walk(src)) if src.is_dir() else [src]
    stats = [f.stat() for f in files]
    listing = [[os.fspath(f.relative_to(src)) if f != src else "", st.length, st.mtime]
               for f, st in zip(files, stats)]
    root = pathlib.Path(cache_dir or os.environ.get("MTLX_REMOTE_CACHE")
                        or pathlib.Path.home() / ".cache" / "mtlx" / "remote").expanduser().absolute()
    home = root / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = home / "data" / (src.name or "root")  # apart from the marker and the lock
    marker = home / "listing.json"
    wanted = json.dumps({"url": url, "files": listing})
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the processes of one host download it once
        if not (dest.exists() and marker.exists() and marker.read_text() == wanted):
            _download(files, listing, home, dest)
            write_atomic(marker, wanted)
    return dest


def _download(files, listing, home: pathlib.Path, dest: pathlib.Path) -> None:
    tmp = home / f".download{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for f, (rel, _, _) in zip(files, listing):
        target = tmp / rel if rel else tmp
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
