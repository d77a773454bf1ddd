"""The set-up's installs through uv (`scripts/uv_pip.py`) take packages from where pip would: pip's real configuration
(a file of its own here, the machine's files and PIP_* variables set aside) read by `pip config list` becomes uv's
flags and environment, pip's later settings replacing earlier ones, and a setting uv has no equivalent for is named."""

import importlib.util
import os
import sys

import pytest

from functok_vllm.paths import ROOT

spec = importlib.util.spec_from_file_location("uv_pip", ROOT / "scripts" / "uv_pip.py")
uv_pip = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_pip)


@pytest.fixture
def pip_config(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("PIP_") or key in uv_pip.ENVIRONMENT.values():  # a variable already set is kept as set
            monkeypatch.delenv(key)
    path = tmp_path / "pip.conf"
    monkeypatch.setenv("PIP_CONFIG_FILE", str(path))
    monkeypatch.setenv("PIP_FIND_LINKS", "/srv/wheels")  # the environment replaces the file's value
    return path


def flag_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, part in enumerate(cmd) if part == flag]


def test_pip_settings_become_uv_flags_and_environment(pip_config, capsys):
    pip_config.write_text(
        "[global]\n"
        "index-url = https://mirror.example/simple\n"
        "extra-index-url = file:///opt/a/simple file:///opt/b/simple\n"
        "find-links = /opt/wheels\n"
        "constraint = /etc/pins.txt\n"
        "cert = /etc/ssl/ca.pem\n"
        "timeout = 90\n"
        "no-cache-dir = 1\n"
        "break-system-packages = 1\n"
    )
    cmd, env = uv_pip.uv_command(["-q", "-e", "."])
    assert cmd[:3] == [str(uv_pip.Path(sys.executable).with_name("uv")), "pip", "install"]
    assert flag_values(cmd, "--python") == [sys.executable]
    assert flag_values(cmd, "--index-strategy") == ["unsafe-best-match"]  # pip's choice: the best of every index
    assert flag_values(cmd, "--index-url") == ["https://mirror.example/simple"]
    assert flag_values(cmd, "--extra-index-url") == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert flag_values(cmd, "--find-links") == ["/srv/wheels"]
    assert flag_values(cmd, "--constraint") == ["/etc/pins.txt"]
    assert cmd[-3:] == ["-q", "-e", "."]
    assert env["SSL_CERT_FILE"] == "/etc/ssl/ca.pem" and env["UV_HTTP_TIMEOUT"] == "90"
    assert env["UV_LINK_MODE"] == "copy"
    err = capsys.readouterr().err
    assert "break-system-packages='1' has no uv equivalent" in err and "no-cache-dir" not in err


def test_no_pip_configuration_is_plain_uv(pip_config):
    pip_config.write_text("")
    cmd, _ = uv_pip.uv_command(["torch"])
    assert "--index-url" not in cmd and "--extra-index-url" not in cmd and cmd[-1] == "torch"
