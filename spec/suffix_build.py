"""Builds spec/suffix_core.cpp into a CPython extension on first use and loads it.

The same path serves `pip install -e` checkouts and the GPU machine, which runs the repository from
PYTHONPATH without installing it: the module is compiled with the system C++ compiler against this
interpreter's headers (the ones Triton's launcher build needs too) into a cache directory keyed by the source,
the flags and the interpreter, once per machine; later imports only load it (~1 ms).
Cache: $GLINT_CACHE_DIR, else $XDG_CACHE_HOME/glint, else ~/.cache/glint (a temp dir if none is writable).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

MODULE_NAME = "glint_suffix_core"
SOURCE = Path(__file__).with_name("suffix_core.cpp")
CXX_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing")


def cache_dir() -> Path:
    if os.environ.get("GLINT_CACHE_DIR"):
        return Path(os.environ["GLINT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glint"


def _compiler() -> str:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    raise RuntimeError(
        "spec.suffix_index needs a C++ compiler to build its core (spec/suffix_core.cpp) on first use: "
        "none of $CXX, c++, g++, clang++ was found. Install g++ (e.g. apt-get install g++)."
    )


def _python_include() -> str:
    inc = sysconfig.get_paths()["include"]
    if not (Path(inc) / "Python.h").exists():
        raise RuntimeError(
            f"spec.suffix_index needs this interpreter's C headers to build its core; {inc}/Python.h is missing "
            f"(install the python{sys.version_info.major}.{sys.version_info.minor}-dev package or equivalent)."
        )
    return inc


def _target(directory: Path) -> Path:
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(CXX_FLAGS).encode())
    h.update(sys.version.encode())
    h.update(ext.encode())
    return directory / f"{MODULE_NAME}-{h.hexdigest()[:16]}{ext}"


def _writable_dir() -> Path:
    for d in (cache_dir() / "suffix_core", Path(tempfile.gettempdir()) / f"glint-{os.getuid()}" / "suffix_core"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return d
        except OSError:
            continue
    raise RuntimeError(f"no writable cache directory for the suffix core (tried {cache_dir()} and the temp dir)")


def _compile(target: Path) -> None:
    cxx = _compiler()
    include = _python_include()
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    cmd = [*cxx.split(), *CXX_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"building the suffix-index core failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(tmp, target)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load_core() -> ModuleType:
    """The compiled core module (building it first if this machine has no copy of this source's build)."""
    target = _target(cache_dir() / "suffix_core")
    if not target.exists():
        target = _target(_writable_dir())
        if not target.exists():
            _compile(target)
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(target))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(target), loader=loader)
    if spec is None:
        raise RuntimeError(f"cannot load the suffix-index core from {target}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module
