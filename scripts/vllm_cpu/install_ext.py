#!/usr/bin/env python3
"""Install CPU-built vLLM extension modules into an installed vllm package
(used by scripts/build_vllm_cpu.sh).  Run it with the target venv's python.

Usage:
  install_ext.py check  VERSION
      exit 0 iff vllm==VERSION is installed with our CPU extensions
      (marker present and matching the installed files), else 1.
  install_ext.py install VERSION PRODUCT_DIR
      1. remove every extension module of the installed vllm package that
         links CUDA libraries (the PyPI wheel's _C_stable_libtorch, _moe_C,
         _flashmla_C, cumem_allocator, vllm_flash_attn/..., and its CUDA
         builds of spinloop/fs_io_C): they cannot be loaded without CUDA and
         some imports only catch ModuleNotFoundError;
      2. copy PRODUCT_DIR/*.so (our CPU _C, spinloop, fs_io_C) into vllm/;
      3. update the dist-info RECORD (so ``pip uninstall vllm`` removes the
         new files) and write the marker vllm/.functok_cpu_ext.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import shutil
import sys
from importlib import metadata
from pathlib import Path

MARKER = ".functok_cpu_ext"
CUDA_LIBS = (b"libcudart.so", b"libcuda.so", b"libtorch_cuda.so", b"libc10_cuda.so", b"libnvrtc.so")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dist(version: str):
    try:
        d = metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return None
    return d if d.version == version else None


def pkg_dir(d) -> Path:
    return Path(d.locate_file("vllm"))


def links_cuda(path: Path) -> bool:
    # DT_NEEDED names are plain strings in .dynstr; a byte search is enough
    # and needs no binutils.
    data = path.read_bytes()
    return any(lib in data for lib in CUDA_LIBS)


def check(version: str) -> int:
    d = dist(version)
    if d is None:
        return 1
    marker = pkg_dir(d) / MARKER
    if not marker.is_file():
        return 1
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return 1
    if info.get("vllm") != version:
        return 1
    for name in info.get("files", {}):
        f = pkg_dir(d) / name
        if not f.is_file() or f.stat().st_size != info["sizes"][name]:
            return 1
    return 0 if info.get("files") else 1


def record_line(root: Path, path: Path) -> list[str]:
    digest = hashlib.sha256(path.read_bytes()).digest()
    b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return [path.relative_to(root).as_posix(), f"sha256={b64}", str(path.stat().st_size)]


def install(version: str, product_dir: Path) -> int:
    d = dist(version)
    if d is None:
        print(f"install_ext.py: vllm=={version} is not installed", file=sys.stderr)
        return 1
    vdir = pkg_dir(d)
    site = Path(d.locate_file(""))
    products = sorted(product_dir.glob("*.so"))
    if not any(p.name.startswith("_C.") for p in products):
        print(f"install_ext.py: no _C*.so in {product_dir}", file=sys.stderr)
        return 1

    removed = []
    ours = {p.name for p in products}
    for so in sorted(vdir.rglob("*.so")):
        if so.parent == vdir and so.name in ours:
            continue  # replaced below
        if links_cuda(so):
            so.unlink()
            removed.append(so.relative_to(vdir).as_posix())
    if removed:
        print("install_ext.py: removed CUDA extension modules: " + " ".join(removed))

    installed = {}
    for p in products:
        dst = vdir / p.name
        shutil.copy2(p, dst)
        installed[p.name] = dst
        print(f"install_ext.py: installed {dst} ({dst.stat().st_size} bytes)")

    marker = vdir / MARKER
    marker.write_text(
        json.dumps(
            {
                "vllm": version,
                "files": {n: sha256(f) for n, f in installed.items()},
                "sizes": {n: f.stat().st_size for n, f in installed.items()},
                "removed": removed,
            },
            indent=1,
        )
        + "\n"
    )

    # Keep RECORD truthful: drop removed files, add ours and the marker.
    record = Path(d._path) / "RECORD"  # type: ignore[attr-defined]
    if record.is_file():
        with open(record, newline="") as f:
            rows = list(csv.reader(f))
        ours = {f.relative_to(site).as_posix() for f in [*installed.values(), marker]}
        gone = {(vdir / r).relative_to(site).as_posix() for r in removed}
        rows = [r for r in rows if r and r[0] not in ours and r[0] not in gone]
        rows += [record_line(site, f) for f in [*installed.values(), marker]]
        with open(record, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    return 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "check":
        return check(sys.argv[2])
    if len(sys.argv) == 4 and sys.argv[1] == "install":
        return install(sys.argv[2], Path(sys.argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
