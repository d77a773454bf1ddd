#!/usr/bin/env python3
"""Download the sdist of a package from the package index and check its
sha256 (used by scripts/build_vllm_cpu.sh).

Usage: fetch_sdist.py NAME VERSION DEST_DIR

``pip download --no-binary :all: vllm==X`` cannot be used: pip insists on
preparing the sdist's metadata, which for vLLM runs its CUDA-oriented
setup.py and fails.  So the file link is looked up in the PEP 503 "simple"
index page of the package (the same page pip reads) and downloaded directly.
The index is $PIP_INDEX_URL, else pip's configured ``index-url``, else
https://pypi.org/simple.  Prints the path of the downloaded file.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        for key in ("global.index-url", "install.index-url", "download.index-url"):
            try:
                out = subprocess.run(
                    [sys.executable, "-m", "pip", "config", "get", key],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except (OSError, subprocess.SubprocessError):
                break
            if out.returncode == 0 and out.stdout.strip():
                url = out.stdout.strip()
                break
    url = url or "https://pypi.org/simple"
    if url.startswith("file:"):
        sys.exit(f"fetch_sdist.py: index {url} is a local directory; set PIP_INDEX_URL")
    return url.rstrip("/")


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: fetch_sdist.py NAME VERSION DEST_DIR")
    name, version, dest = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    filename = f"{name}-{version}.tar.gz"
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / filename

    page_url = f"{index_url()}/{name}/"
    print(f"fetch_sdist.py: reading {page_url}", file=sys.stderr)
    req = urllib.request.Request(page_url, headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=120) as r:
        page = r.read().decode("utf-8", "replace")
    links = [
        html.unescape(h)
        for h in re.findall(r'href="([^"]+)"', page)
        if urllib.parse.urlsplit(html.unescape(h)).path.endswith("/" + filename)
        or html.unescape(h).split("#")[0].endswith(filename)
    ]
    if not links:
        sys.exit(f"fetch_sdist.py: {filename} not found on {page_url}")
    link = urllib.parse.urljoin(page_url, links[0])
    url, _, frag = link.partition("#")
    want = frag[len("sha256=") :] if frag.startswith("sha256=") else None

    if target.is_file() and want and hashlib.sha256(target.read_bytes()).hexdigest() == want:
        print(target)
        return

    print(f"fetch_sdist.py: downloading {url}", file=sys.stderr)
    part = target.with_suffix(".part")
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as r, open(part, "wb") as f:
        for chunk in iter(lambda: r.read(1 << 20), b""):
            h.update(chunk)
            f.write(chunk)
    if want and h.hexdigest() != want:
        part.unlink()
        sys.exit(f"fetch_sdist.py: sha256 mismatch for {url}: {h.hexdigest()} != {want}")
    if not want:
        print("fetch_sdist.py: WARNING: index gave no sha256, not verified", file=sys.stderr)
    part.rename(target)
    print(target)


if __name__ == "__main__":
    main()
