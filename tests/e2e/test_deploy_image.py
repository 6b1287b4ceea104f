"""The Dockerfile's install steps, run here the way the image runs them (no container
engine is available): the build context the dockerignore allows, a wheel built from it,
a fresh virtualenv at a fixed path with pip removed, and the entry point run as the
image's non-root UID 10001 with the image's environment.

Offline on purpose: the wheel goes in with `--no-deps`, and its runtime dependencies are
copied from this test environment's installed distributions (what `pip install` would
have put there); `pip check` then shows the wheel's declared requirements are met.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy_support import DEPLOY, K8S, dockerfile_cmd, dockerfile_instructions, final_stage
from tests.processes import LoggedProcess
from zrproxy import __version__

ROOT = Path(__file__).resolve().parents[2]
UID = 10001
pytestmark = pytest.mark.slow  # builds a wheel and a virtualenv (about 30 s)


def dockerfile_user() -> tuple[int, int]:
    (user,) = [a for ins, a in final_stage() if ins == "USER"]
    uid, gid = user.split(":")
    return int(uid), int(gid)


def image_env(venv: Path) -> dict[str, str]:
    """The final stage's ENV, with PATH pointing at our venv instead of /opt/zrproxy."""
    env: dict[str, str] = {}
    for ins, args in final_stage():
        if ins == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", args):
                env[name] = value.replace("/opt/zrproxy", str(venv)).replace(
                    "$PATH", "/usr/bin:/bin"
                )
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    return {**env, "HOME": "/nonexistent", "LANG": "C.UTF-8"}


def build_context(target: Path) -> Path:
    """What BuildKit sends: only the paths deploy/Dockerfile.dockerignore re-includes."""
    target.mkdir()
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        if not line.startswith("!"):
            continue
        source = ROOT / line[1:].rstrip("/")
        assert source.exists(), f"the dockerignore re-includes a missing path: {line}"
        if source.is_dir():
            shutil.copytree(
                source, target / source.name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(source, target)
    return target


def runtime_closure(requirements: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions that satisfy `requirements`, transitively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [Requirement(r) for r in requirements]
    while pending:
        req = pending.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = req.name.lower().replace("_", "-")
        if key in found:
            continue
        dist = importlib.metadata.distribution(req.name)
        assert dist.version in req.specifier or not req.specifier, (req, dist.version)
        found[key] = dist
        pending += [Requirement(r) for r in dist.requires or ()]
    return list(found.values())


def copy_distribution(dist: importlib.metadata.Distribution, site: Path) -> None:
    for file in dist.files or ():
        if ".." in file.parts or "__pycache__" in file.parts:
            continue  # console scripts live outside site-packages; no bytecode
        source = Path(str(file.locate()))
        if source.is_file():
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, site / file)


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[Path, Path]]:
    """(venv, config): the image's /opt/zrproxy and /etc/zrproxy/config.toml, root-owned."""
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling not installed: cannot build the wheel offline")
    # Not under pytest's tmp_path: its parent is 0700, so UID 10001 could not reach it.
    top = Path(tempfile.mkdtemp(prefix="zrproxy-image-", dir="/tmp"))
    try:
        context = build_context(top / "src")
        dist = top / "dist"
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
                *("--no-build-isolation", "--no-index", "--no-cache-dir"),
                *("-w", str(dist), str(context)),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        (wheel,) = dist.glob("zrproxy-*.whl")
        venv = top / "opt" / "zrproxy"
        # The Dockerfile: python -m venv /opt/zrproxy && pip install . && pip uninstall pip
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--no-cache-dir"]
        subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
        site = next((venv / "lib").glob("python3*/site-packages"))
        requires = importlib.metadata.distribution("zrproxy").requires or []
        for distribution in runtime_closure([r for r in requires if "extra ==" not in r]):
            copy_distribution(distribution, site)
        checked = subprocess.run([*pip, "check"], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        subprocess.run([*pip, "uninstall", "--yes", "pip", "setuptools"], check=True)
        etc = top / "etc" / "zrproxy"
        etc.mkdir(parents=True)
        shutil.copy(K8S / "config.toml", etc / "config.toml")
        for path in [top, *top.rglob("*")]:  # readable by all, writable by root only
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                extra = stat.S_IRGRP | stat.S_IROTH
                if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                    extra |= stat.S_IXGRP | stat.S_IXOTH
                path.chmod((mode | extra) & ~(stat.S_IWGRP | stat.S_IWOTH))
        yield venv, etc / "config.toml"
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def as_image_user() -> list[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to run as the image's UID")
    uid, gid = dockerfile_user()
    assert uid == UID
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd="/", capture_output=True, text=True, timeout=60, check=False
    )


def upstream_env(venv: Path) -> dict[str, str]:
    """The image's environment plus what the Secret provides (envFrom)."""
    return {**image_env(venv), "OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "sk-test"}


def test_the_wheel_carries_license_and_version(image: tuple[Path, Path]) -> None:
    venv, _ = image
    site = next((venv / "lib").glob("python3*/site-packages"))
    (info,) = site.glob("zrproxy-*.dist-info")
    metadata = (info / "METADATA").read_text()
    assert f"\nVersion: {__version__}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    assert (info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert not (venv / "bin" / "pip").exists(), "the image removes pip"


def test_version_and_check_config_as_the_image_user(
    image: tuple[Path, Path], as_image_user: list[str]
) -> None:
    venv, config = image
    entry = [str(venv / "bin" / dockerfile_cmd()[0])]
    result = run([*as_image_user, *entry, "--version"], image_env(venv))
    assert (result.returncode, result.stdout) == (0, f"zrproxy {__version__}\n"), result.stderr
    result = run([*as_image_user, *entry, "check-config", str(config)], upstream_env(venv))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("config ok")
    # Without the Secret's variables the same image refuses the config, naming the key.
    result = run([*as_image_user, *entry, "check-config", str(config)], image_env(venv))
    assert result.returncode == 2 and "upstreams[0].api_key_env" in result.stderr


def test_serve_as_the_image_user_passes_the_healthcheck(
    image: tuple[Path, Path], as_image_user: list[str]
) -> None:
    venv, config = image
    before = sorted(p.relative_to(venv) for p in venv.rglob("*"))
    cmd = dockerfile_cmd()
    assert cmd[1:3] == ["serve", "--config"]
    # The image's CMD, with this machine's config path and free loopback ports.
    argv = [str(venv / "bin" / cmd[0]), "serve", "--config", str(config)]
    argv += ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    proc = LoggedProcess([*as_image_user, *argv], env=upstream_env(venv))
    try:
        ready = proc.wait_for(r"zrproxy ready: api=(\S+) admin=http://127\.0\.0\.1:(\d+)", 60)
        status = Path(f"/proc/{proc.proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{UID}\s+{UID}\s+{UID}\s+{UID}$", status, re.MULTILINE)
        # The image's ENV picks the allocator: serve starts on it, without a re-exec.
        assert "allocator malloc" in proc.output()
        assert "restarting" not in proc.output()
        (check,) = [a for ins, a in dockerfile_instructions() if ins == "HEALTHCHECK"]
        code = check.split('"-c", "', 1)[1].rsplit('"]', 1)[0]
        probe = code.replace("127.0.0.1:9090", f"127.0.0.1:{ready.group(2)}")
        python = str(venv / "bin" / "python")
        env = {**image_env(venv), "no_proxy": "*"}
        assert run([*as_image_user, python, "-c", probe], env).returncode == 0
    finally:
        assert proc.stop() == 0, proc.output()
    assert '"message": "hardening: core dumps off, dumpable off' in proc.output()
    # Nothing was written into the image's tree (no bytecode, no state).
    assert sorted(p.relative_to(venv) for p in venv.rglob("*")) == before
