"""Serve meddiff bundles from a real MONAI Label 0.8.5 server (its `monaibundle` sample app), offline.

Runs with any Python >= 3.10 and only the standard library (the project's `.venv` or the system python): MONAI Label
itself runs in its own environment, built by ``bash label_server/setup_env.sh`` (default ``.venv-monailabel``).

CLI::

    python label_server/serve.py --bundle bundles/lidc_ambiguous_segmentation --studies DIR [--bundle ...]
        [--set lidc_ambiguous_segmentation.num_samples=8] [--port 8000] [--workdir W] [--venv V]

For tests, `label_server` is a context manager that starts the server, waits for ``GET /info/``, and stops it
(process group killed, port checked free) on exit. Each bundle folder (``configs/``, ``models/model.pt`` and
``models/model.json``; training checkpoints are left out) is copied to ``<workdir>/apps/monaibundle/model/<name>/``;
MONAI Label reads only its ``configs/inference.json``, so ``overrides`` are written into that copy. MONAI Label
writes ``.datastore.json`` and ``labels/`` into the studies folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(os.environ.get("MEDDIFF_LABEL_VENV", REPO / ".venv-monailabel"))
BUNDLE_PARTS = ("configs", "scripts", "docs", "LICENSE", "large_files.yml", "models")


class ServerError(RuntimeError):
    """The server could not be prepared, did not come up, or did not stop."""


def label_python(venv: str | os.PathLike = DEFAULT_VENV) -> Path:
    """The python of MONAI Label's environment; `FileNotFoundError` naming setup_env.sh when it is absent."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"{python} does not exist: build MONAI Label's environment with `bash "
            f"label_server/setup_env.sh {venv}` first."
        )
    return python


def server_env(venv: str | os.PathLike = DEFAULT_VENV) -> dict[str, str]:
    """The server's environment: the torchvision stand-in on PYTHONPATH (this process only), the CPU allocator fix."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(Path(venv) / "shims"), PYTHONUNBUFFERED="1")
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736")
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def copy_bundle(bundle: str | os.PathLike, app_dir: Path, overrides: Mapping[str, Any] | None = None) -> str:
    """Copy a trained bundle to ``<app_dir>/model/<name>`` (settings in `overrides` written into its
    inference.json); return its name."""
    bundle = Path(bundle)
    if not (bundle / "models" / "model.pt").is_file():
        raise ServerError(
            f"{bundle}/models/model.pt does not exist: train the bundle first (MONAI Label would skip it)."
        )
    dest = app_dir / "model" / bundle.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("*checkpoint*", "*.lock", "__pycache__")
    for part in BUNDLE_PARTS:
        source = bundle / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=skip)
        elif source.is_file():
            shutil.copy2(source, dest / part)
    if overrides:
        config = dest / "configs" / "inference.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **overrides}, indent=2))
    return bundle.name


def prepare_app(workdir: Path, venv: str | os.PathLike = DEFAULT_VENV) -> Path:
    """``<workdir>/apps/monaibundle``, copied out of the installed MONAI Label wheel if not there yet."""
    app_dir = workdir / "apps" / "monaibundle"
    if not (app_dir / "main.py").is_file():
        command = [str(label_python(venv)), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
        done = subprocess.run(
            [*command, "--output", str(app_dir.parent)],
            env=server_env(venv),
            cwd=workdir,
            capture_output=True,
            text=True,
        )
        if done.returncode or not (app_dir / "main.py").is_file():
            raise ServerError(f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return app_dir


@dataclass
class Server:
    """A running MONAI Label server."""

    url: str
    port: int
    process: subprocess.Popen
    log_file: Path
    app_dir: Path

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 600) -> bytes:
        """GET (or POST `data`) `path`; `urllib.error.HTTPError` on a non-2xx answer."""
        req = urllib.request.Request(
            self.url + path, data=data, headers=headers or {}, method="POST" if data else "GET"
        )
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return answer.read()

    def info(self, timeout: float = 60) -> dict:
        """``GET /info/``."""
        return json.loads(self.request("/info/", timeout=timeout))

    def infer(self, model: str, image: str, params: Mapping | None = None, output: str = "image") -> bytes:
        """``POST /infer/<model>?image=<id>&output=<output>`` with `params` (per-request settings) as the form field."""
        query = urllib.parse.urlencode({"image": image, "output": output})
        body = urllib.parse.urlencode({"params": json.dumps(dict(params or {}))}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return self.request(f"/infer/{model}?{query}", body, headers)


def start_server(
    app_dir: Path,
    studies: Path,
    models: list[str],
    venv: str | os.PathLike = DEFAULT_VENV,
    port: int | None = None,
    timeout: float = 300,
    conf: Mapping[str, str] | None = None,
) -> Server:
    """Start ``monailabel start_server`` on 127.0.0.1 and wait until ``GET /info/`` answers."""
    port = port or free_port()
    if port_in_use(port):
        raise ServerError(f"port {port} is in use: choose another --port.")
    confs = {"models": ",".join(models), "zoo_source": "github", **(conf or {})}  # github: no zoo listing offline
    command = [
        str(label_python(venv)),
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for key, value in confs.items():
        command += ["--conf", key, str(value)]
    env = server_env(venv)
    env.setdefault("MONAI_LABEL_SESSION_PATH", str(app_dir.parent.parent / "sessions"))
    log_file = app_dir.parent.parent / "server.log"
    with open(log_file, "wb") as log:  # cwd: MONAI Label reads a .env file from its working directory
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=app_dir.parent.parent, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", port, process, log_file, app_dir)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise ServerError(f"MONAI Label exited with {process.returncode}; its log ends:\n{server.log_tail()}")
            try:
                server.info(timeout=10)
                return server
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(
                    f"MONAI Label did not answer /info/ within {timeout:.0f} s; its log ends:\n{server.log_tail()}"
                )
            time.sleep(0.5)
    except BaseException:  # not up (or interrupted): leave nothing running
        stop_server(server)
        raise


def stop_server(server: Server, timeout: float = 30) -> None:
    """Stop the server's whole process group (SIGTERM, then SIGKILL) and check that its port is free."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.process.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.monotonic() + timeout
    while port_in_use(server.port):
        if time.monotonic() > deadline:
            raise ServerError(f"port {server.port} is still in use after stopping MONAI Label.")
        time.sleep(0.2)


@contextmanager
def label_server(
    bundles: list[str | os.PathLike],
    studies: str | os.PathLike,
    venv: str | os.PathLike = DEFAULT_VENV,
    workdir: str | os.PathLike | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    port: int | None = None,
    timeout: float = 300,
    conf: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Serve `bundles` (trained bundle folders) over `studies`; `overrides` maps a bundle name to inference settings."""
    label_python(venv)
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="meddiff-label-") if own else workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        app_dir = prepare_app(work, venv)
        names = [copy_bundle(b, app_dir, (overrides or {}).get(Path(b).name)) for b in bundles]
        server = start_server(app_dir, Path(studies).resolve(), names, venv, port, timeout, conf)
        try:
            yield server
        finally:
            stop_server(server)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        bundle, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {item!r}: write BUNDLE_NAME.SETTING=VALUE (VALUE as JSON, else a string).")
        try:
            overrides.setdefault(bundle, {})[name] = json.loads(value)
        except ValueError:
            overrides.setdefault(bundle, {})[name] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    """Serve bundles until interrupted (Ctrl-C)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", action="append", required=True, help="a trained bundle folder (repeatable)")
    parser.add_argument("--studies", required=True, help="folder of images (.png, .jpg, .nii.gz, ...) to serve")
    parser.add_argument("--venv", default=str(DEFAULT_VENV), help="MONAI Label's environment (setup_env.sh)")
    parser.add_argument("--workdir", help="where the app, the log and sessions go (default: a temporary folder)")
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the server to answer")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="BUNDLE.SETTING=VALUE",
        help="an inference.json setting of the served copy, e.g. lidc_ambiguous_segmentation.seed=1",
    )
    args = parser.parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):  # the server runs in its own session: stop it on either
        signal.signal(signum, interrupt)
    try:
        with label_server(
            args.bundle, args.studies, args.venv, args.workdir, _parse_set(args.set), args.port, args.timeout
        ) as server:
            models = {name: model.get("labels") for name, model in server.info()["models"].items()}
            print(f"MONAI Label serving {models} at {server.url} (log: {server.log_file}); Ctrl-C stops it", flush=True)
            server.process.wait()
            raise ServerError(
                f"MONAI Label exited with {server.process.returncode}; its log ends:\n{server.log_tail()}"
            )
    except KeyboardInterrupt:
        pass
    except (FileNotFoundError, ServerError) as err:
        raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
