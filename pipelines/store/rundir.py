"""Where run directories live: `runs.path` is a local path (the config turns a `file:` URI into one)
or a Hadoop URI (hdfs://, s3a://, abfs://, ...) for jobs whose driver has no lasting disk (YARN or
Kubernetes cluster mode).

A run is a RunDir. Its files are made and read in a local directory: for a local run that directory
*is* the run, so nothing is copied; for a remote run it is a staging directory under the temp dir,
and each finished file is copied to the URI by the JVM's Hadoop FileSystem (the bytes never cross
py4j), under a hidden temporary name beside its final one, then renamed over it: a reader sees a
file whole or not at all, as with the local os.replace. Every scheme Spark is configured for works,
with no Python dependency. Hadoop is reached through the running SparkContext, or through
spark-submit's JVM before the context starts (a job reads its run's config before Spark starts).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.core.errors import UserError


def is_remote(path: str) -> bool:
    """A URI with a scheme other than file: (a drive letter is not a scheme)."""
    scheme, sep, _ = path.partition(":")
    return bool(sep) and len(scheme) >= 2 and "/" not in scheme and scheme != "file"


def local_path(path: str) -> Path:
    """A local path from a path or a file: URI."""
    if path.startswith("file:"):
        rest = path[len("file:"):]
        return Path(rest[2:] if rest.startswith("//") else rest)
    return Path(path)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _hadoop() -> tuple[Any, Any, Any]:
    """(py4j gateway, JVM, Hadoop Configuration) of the running SparkContext or spark-submit's JVM."""
    from pyspark import SparkContext

    sc = SparkContext._active_spark_context
    if sc is not None:
        return sc._gateway, sc._jvm, sc._jsc.hadoopConfiguration()
    if "PYSPARK_GATEWAY_PORT" in os.environ:   # spark-submit's JVM, before the SparkContext
        SparkContext._ensure_initialized()
        jvm = SparkContext._jvm
        if jvm is None:
            raise UserError("spark-submit's JVM did not start a py4j gateway (PYSPARK_GATEWAY_PORT is "
                            "set): cannot read a Hadoop URI for runs")
        conf = jvm.org.apache.spark.deploy.SparkHadoopUtil.get().newConfiguration(
            jvm.org.apache.spark.SparkConf())
        return SparkContext._gateway, jvm, conf
    raise UserError("a Hadoop URI for runs is read through Spark's JVM, which is not running: start "
                    "the job with spark-submit or scripts/train.sh")


class HadoopFS:
    """The few Hadoop FileSystem calls a run store needs, on the URIs of one filesystem."""

    def __init__(self, uri: str) -> None:
        self._gateway, self._jvm, conf = _hadoop()
        self._fs = self._path(uri).getFileSystem(conf)
        self._fc = self._jvm.org.apache.hadoop.fs.FileContext.getFileContext(self._fs.getUri(), conf)

    def _path(self, uri: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(uri)

    def exists(self, uri: str) -> bool:
        return bool(self._fs.exists(self._path(uri)))

    def names(self, uri: str) -> list[str]:
        """The entries of a directory ([] when it does not exist)."""
        if not self.exists(uri):
            return []
        return [status.getPath().getName() for status in self._fs.listStatus(self._path(uri))]

    def read(self, uri: str) -> bytes | None:
        """A small file's bytes (metadata, never arrays), or None when it does not exist."""
        if not self.exists(uri):
            return None
        stream = self._fs.open(self._path(uri))
        try:
            return bytes(stream.readAllBytes())
        finally:
            stream.close()

    def put(self, local: Path, uri: str, private: bool = False) -> None:
        """Copy a local file to `uri` atomically: to a hidden name beside it, then rename over it.
        `private`: permission 0600 before the rename."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        tmp = join(parent, f".{name}.tmp-{socket.gethostname()}-{os.getpid()}")
        self._fs.copyFromLocalFile(False, True, self._path(local.resolve().as_uri()), self._path(tmp))
        if private:
            permission = self._jvm.org.apache.hadoop.fs.permission.FsPermission.valueOf("-rw-------")
            self._fs.setPermission(self._path(tmp), permission)
        overwrite = self._gateway.new_array(self._jvm.org.apache.hadoop.fs.Options.Rename, 1)
        overwrite[0] = self._jvm.org.apache.hadoop.fs.Options.Rename.OVERWRITE
        self._fc.rename(self._path(tmp), self._path(uri), overwrite)

    def get(self, uri: str, local: Path) -> None:
        """Copy a file to a local path (raw local FS: no .crc beside it)."""
        self._fs.copyToLocalFile(False, self._path(uri), self._path(local.resolve().as_uri()), True)

    def create_new(self, uri: str, data: bytes) -> bool:
        """Create a small file that must not exist yet (atomic on HDFS); False when it exists."""
        try:
            stream = self._fs.create(self._path(uri), False)
        except Exception:  # noqa: BLE001 - py4j wraps FileAlreadyExistsException
            if self.exists(uri):
                return False
            raise
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()
        return True

    def rename(self, src: str, dst: str) -> bool:
        """Rename without overwriting: False when `src` is gone (another job moved it first)."""
        try:
            return bool(self._fs.rename(self._path(src), self._path(dst)))
        except Exception:  # noqa: BLE001 - some filesystems raise instead of returning false
            return False

    def delete(self, uri: str) -> None:
        self._fs.delete(self._path(uri), True)


class RunDir:
    """One run directory. `uri` is where it lives and what records and summaries name; `local` is
    where its files are written and read: the run itself, or for a remote run (`fs` set) a staging
    directory made when first needed."""

    def __init__(self, uri: str, local: Path | None = None, fs: HadoopFS | None = None) -> None:
        self.uri, self._local, self.fs = uri, local, fs

    @property
    def local(self) -> Path:
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix=f"fedspark-{self.name}-"))
        return self._local

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rpartition("/")[2]

    def __str__(self) -> str:
        return self.uri

    def child(self, rel: str) -> str:
        """The URI (or local path) of a file or directory in the run, for writers that take one
        (Spark's own: MLlib models, RDD checkpoints)."""
        return join(self.uri, rel) if self.fs else str(self.local / rel)

    def file(self, rel: str) -> Path:
        """The local file to write `rel` to (its directory made)."""
        path = self.local / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, *rels: str, private: bool = False) -> None:
        """Make finished local files visible at the run's URI, in the order given (`private`:
        readable by this user only)."""
        if self.fs:
            for rel in rels:
                self.fs.put(self.local / rel, join(self.uri, rel), private)

    def exists(self, rel: str) -> bool:
        return self.fs.exists(join(self.uri, rel)) if self.fs else (self.local / rel).exists()

    def read(self, rel: str) -> bytes | None:
        """A small file (JSON, YAML) of the run, or None."""
        if self.fs:
            return self.fs.read(join(self.uri, rel))
        path = self.local / rel
        return path.read_bytes() if path.is_file() else None

    def names(self, rel: str) -> list[str]:
        """The visible entries of a directory of the run (no hidden temporary files)."""
        if self.fs:
            found = self.fs.names(join(self.uri, rel))
        else:
            found = os.listdir(self.local / rel) if (self.local / rel).is_dir() else []
        return sorted(n for n in found if not n.startswith("."))

    def fetch(self, rel: str) -> Path | None:
        """The local path of a file of the run, copied from the URI first for a remote run; None
        when it does not exist."""
        path = self.local / rel
        if self.fs is None:
            return path if path.is_file() else None
        if not self.fs.exists(join(self.uri, rel)):
            return None
        self.fs.get(join(self.uri, rel), self.file(rel))
        return path

    def close(self) -> None:
        """Drop a remote run's staging directory (everything in it was published)."""
        if self.fs and self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None


def open_run(location: str | Path) -> RunDir:
    """The run directory at a local path, a file: URI or a Hadoop URI (which need not exist yet)."""
    location = str(location)
    if is_remote(location):
        uri = location.rstrip("/")
        return RunDir(uri, fs=HadoopFS(uri))
    path = local_path(location)
    return RunDir(str(path), path)


def claim_run(runs_path: str, name: str, marker: str, data: bytes) -> RunDir | None:
    """Create run directory `name` under runs_path, or None when a run of that name exists. The
    claim is atomic: an exclusive mkdir locally; on a Hadoop filesystem an exclusive create of the
    file `marker` holding `data` (the caller writes the marker of a local run)."""
    if is_remote(runs_path):
        run_dir = open_run(join(runs_path, name))
        if run_dir.fs is None:   # open_run gives a remote location a HadoopFS
            raise RuntimeError(f"run directory {run_dir.uri} has no Hadoop filesystem")
        if run_dir.fs.create_new(join(run_dir.uri, marker), data):
            return run_dir
        run_dir.close()
        return None
    root = local_path(runs_path)
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / name).mkdir()
    except FileExistsError:
        return None
    return RunDir(str(root / name), root / name)


def run_files(runs_path: str, marker: str) -> Iterator[tuple[str, bytes]]:
    """(run name, contents of its `marker` file) for every run directory under runs_path."""
    if is_remote(runs_path):
        fs = HadoopFS(runs_path)
        for name in fs.names(runs_path):
            if not name.startswith("."):
                data = fs.read(join(runs_path, name, marker))
                if data is not None:
                    yield name, data
        return
    for path in local_path(runs_path).glob(f"*/{marker}"):
        try:
            yield path.parent.name, path.read_bytes()
        except OSError:
            continue
