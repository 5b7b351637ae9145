"""A real container engine for tests/test_container.py (no tests here).

::

    mmdebstrap (the host's Debian mirror) --podman import--> rootfs image   (cached by key)
        + the host's CA certificates and pip configuration --> base image   (cached by key)
            --podman build --build-arg BASE_IMAGE=base--> cacheport image  (layer cache)

Podman runs rootful and daemonless with settings of its own -- ``containers.conf``
(runc, cgroupfs, file events, ulimits within this process's hard limits),
``storage.conf`` and ``registries.conf`` -- named by ``CONTAINERS_*`` variables in
its environment only, so the host's global configuration is never read or changed.
No registry is reachable: every image is made here, and ``--pull=never`` says so.

The base is what a new user's ``python:3.11-slim`` stands for: Debian's python3 and
venv, plus what pip needs to reach the package index this machine reaches (its CA
bundle, its pip configuration files and ``PIP_*`` variables). The expensive part
(mmdebstrap, about 80 s) is keyed by the mirror, suite and package list; the cheap
trust layer by the certificates' and configuration's content, which can change
between machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from tests.support import ROOT

CACHE = Path(os.environ.get("CACHEPORT_PODMAN_CACHE", "/var/tmp/cacheport-podman"))
RUN_DIR = Path(os.environ.get("CACHEPORT_PODMAN_RUN", "/run/cacheport-podman"))
ROOTFS_REPO = "localhost/cacheport-test-rootfs"
BASE_REPO = "localhost/cacheport-test-base"
# One tag per work tree: two trees on one machine share the cache, not the image.
IMAGE = f"localhost/cacheport-test:{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
RECIPE = "1"  # bump when the way the rootfs is made changes
TOOLS = ("podman", "runc", "mmdebstrap")
# Podman lowers its own RLIMIT_NPROC (to 32768, seen here) before conmon starts the
# runtime, and runc cannot raise a limit without CAP_SYS_RESOURCE: ask for less.
NPROC = 4096


def unavailable() -> str | None:
    """Why no container engine can run here, or None when one can."""
    if not sys.platform.startswith("linux"):
        return "podman needs Linux"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"not installed: {', '.join(missing)} (scripts/test.sh installs podman, runc "
                "and mmdebstrap with apt-get)")
    if os.geteuid() != 0:
        return "these tests run podman rootful; run them as root (CI does)"
    return None


class Podman:
    """``podman`` with this module's own configuration files (``CONTAINERS_*``)."""

    def __init__(self) -> None:
        conf = RUN_DIR / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], NPROC)
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
        self.nofile = nofile
        (conf / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{RUN_DIR / "libpod"}"\n')
        (conf / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{CACHE / "storage"}"\n'
            f'runroot = "{RUN_DIR / "storage"}"\n')
        (conf / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(conf / "registries.conf"),
        }

    def __call__(self, *args: str, timeout: float = 60, check: bool = True,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *args], capture_output=True, text=True,
                                timeout=timeout, env=self.env, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0

    def drop_other_tags(self, repo: str, keep: str) -> None:
        """Remove older keys of ``repo`` so the cache holds one of each."""
        listed = self("images", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False)
        for name in listed.stdout.split():
            if name != keep and name.startswith(repo + ":"):
                self("rmi", "-f", name, check=False)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time on this machine (two test runs share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME")


def _is_debian_archive(uri: str) -> bool:
    return urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1] in ("debian", "debian-security")


def debian_sources() -> list[str]:
    """The ``deb`` lines of the Debian mirror apt uses here (deb822 ``.sources`` files and
    one-line ``.list`` files), as one-line entries for mmdebstrap."""
    lines: list[str] = []
    apt = Path("/etc/apt")
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for raw in stanza.splitlines():
                if raw.startswith("#") or ":" not in raw:
                    continue
                key, value = raw.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes") == "no" or "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                if _is_debian_archive(uri):
                    for suite in fields.get("suites", "").split():
                        lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if not path.exists():
            continue
        for raw in path.read_text().splitlines():
            words = raw.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                uri = next(w for w in words[1:] if not w.startswith("["))
                if _is_debian_archive(uri):
                    lines.append(" ".join(words))
    if not lines:
        raise RuntimeError("no Debian mirror found in /etc/apt/sources.list(.d)")
    return lines


def _key(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def _trust_files() -> dict[str, Path]:
    """Image path -> host file: CA certificates and pip configuration, as this machine has
    them, so pip inside a build reaches the index the host reaches."""
    files: dict[str, Path] = {}
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        files[str(bundle)] = bundle
    local_cas = Path("/usr/local/share/ca-certificates")
    if local_cas.is_dir():
        for cert in sorted(local_cas.rglob("*.crt")):
            files[str(cert)] = cert
    for name in ("/etc/pip.conf", "/etc/xdg/pip"):
        path = Path(name)
        if path.is_file():
            files[name] = path
        elif path.is_dir():
            for item in sorted(p for p in path.rglob("*") if p.is_file()):
                files[str(item)] = item
    user_conf = Path.home() / ".config" / "pip"
    if user_conf.is_dir():  # the build runs as root in the image
        for item in sorted(p for p in user_conf.rglob("*") if p.is_file()):
            files["/root/.config/pip/" + str(item.relative_to(user_conf))] = item
    return files


def _pip_env() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("PIP_")}


def base_image(podman: Podman, timeout: float = 600) -> str:
    """The base image's name, built now only when no image has its key."""
    sources = "\n".join(debian_sources()) + "\n"
    codename = _codename()
    rootfs = f"{ROOTFS_REPO}:{_key(RECIPE, codename, sources, *BASE_PACKAGES)}"
    trust = _trust_files()
    env = _pip_env()
    contents = (f"{target}={path.read_text(errors='replace')}" for target, path in trust.items())
    base = f"{BASE_REPO}:{_key(rootfs, json.dumps(env), *contents)}"
    with _locked():
        if podman.has_image(base):
            return base
        if not podman.has_image(rootfs):
            _build_rootfs(podman, rootfs, codename, sources, timeout)
            podman.drop_other_tags(ROOTFS_REPO, rootfs)
        with tempfile.TemporaryDirectory(prefix="cacheport-base-") as tmp:
            context = Path(tmp)
            for target, source in trust.items():
                dest = context / "trust" / target.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)
            (context / "trust").mkdir(exist_ok=True)
            env_lines = "".join(f"ENV {k}={json.dumps(v)}\n" for k, v in env.items())
            (context / "Containerfile").write_text(f"FROM {rootfs}\nCOPY trust/ /\n{env_lines}")
            podman("build", "--pull=never", "--network", "host", "--format", "docker",
                   "-t", base, str(context), timeout=timeout)
        podman.drop_other_tags(BASE_REPO, base)
        return base


def _build_rootfs(podman: Podman, name: str, codename: str, sources: str,
                  timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="cacheport-rootfs-", dir=CACHE) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        excludes = [f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "locale")]
        result = subprocess.run(
            ["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", "--format=tar",
             f"--include={','.join(BASE_PACKAGES)}", *excludes, codename, str(tarball), "-"],
            input=sources, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap exited {result.returncode}:\n{result.stderr[-3000:]}")
        podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), name, timeout=timeout)


def build_image(podman: Podman, base: str, timeout: float = 600) -> None:
    """The project's Dockerfile, built as a user would, on ``base`` through its argument.

    Docker image format, which keeps the HEALTHCHECK (OCI has no field for it).
    """
    with _locked():
        podman("build", "--pull=never", "--network", "host", "--format", "docker",
               "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE, "-f",
               str(ROOT / "Dockerfile"), str(ROOT), timeout=timeout)
        # Earlier builds' layers, but not today's: the build stage's apt layer (a minute
        # of downloads) is dangling once built and must stay to be reused.
        podman("image", "prune", "-f", "--filter", "until=24h", check=False)


# -- the settings deploy/compose.yaml gives the container, as ``podman run`` options -----

COMPOSE = ROOT / "deploy" / "compose.yaml"
# Production paths in compose.yaml and the docs; a test puts its own in their place.
CONF_DIR = "/etc/cacheport"
STATE_VOLUME = "cacheport-state"


def _seconds(value: str | int) -> int:
    text = str(value).strip()
    if text.endswith("m"):
        return int(float(text[:-1]) * 60)
    return int(float(text.rstrip("s")))


def compose_run_options(conf_dir: str = CONF_DIR, volume: str = STATE_VOLUME,
                        ulimits: bool = True) -> list[str]:
    """``podman run`` options for the compose file's service: the one source the tests
    run the image with and the docs' run lines are checked against.

    ``ulimits=False`` leaves the limits to containers.conf: the compose file's nofile is
    above this machine's hard limit, and a ``--ulimit`` option replaces podman's whole
    default list (so its NPROC default, which runc may not raise here, would come back).
    """
    import yaml

    service = yaml.safe_load(COMPOSE.read_text())["services"]["cacheport"]
    options = ["--network", service["network_mode"], "--restart", service["restart"]]
    if service.get("read_only"):
        options.append("--read-only")
    options += ["--stop-timeout", str(_seconds(service["stop_grace_period"]))]
    for name, limit in service.get("ulimits", {}).items() if ulimits else ():
        soft, hard = (limit, limit) if isinstance(limit, int) else (limit["soft"], limit["hard"])
        options += ["--ulimit", f"{name}={soft}:{hard}"]
    for entry in service.get("volumes", []):
        source, target, *mode = str(entry).split(":")
        source = {CONF_DIR: conf_dir, STATE_VOLUME: volume}.get(source, source)
        options += ["-v", ":".join([source, target, *mode])]
    return options
