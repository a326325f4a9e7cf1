"""Run the app with uvicorn: in the foreground (`serve`) or on a background thread (`BackgroundServer`,
for tests, notebooks and the serving benchmark)."""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger("deltakv.serve")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, host: str, port: int, log_level: str, timeout_keep_alive: int = 5):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=timeout_keep_alive,
                          access_log=log_level == "debug", lifespan="on")


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM: uvicorn shuts down, the engine loop stops)."""
    import uvicorn

    try:
        uvicorn.Server(_uvicorn_config(app, host, port, log_level)).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass


class BackgroundServer:
    """`with BackgroundServer(app) as srv: srv.url` - uvicorn on a free port (port=0) of `host`, on a
    daemon thread; stopped (and the engine loop with it) on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 startup_timeout: float = 60.0):
        import uvicorn

        self.sock = _bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(_uvicorn_config(app, host, self.port, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="deltakv-serve", daemon=True)
        self.startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died during startup (see the log)")
            if time.monotonic() - t0 > self.startup_timeout:
                raise TimeoutError(f"the server did not start within {self.startup_timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False
