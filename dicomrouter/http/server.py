"""The HTTP listener: an aiohttp application on its own thread and event loop inside the router."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

from aiohttp import web

from dicomrouter.config import HttpSettings
from dicomrouter.http.deps import DEPS, HttpDeps
from dicomrouter.logging import get_logger
from dicomrouter.net.tls import listening_context

log = get_logger(__name__)


class HttpListenError(OSError):
    """The HTTP port cannot be opened (busy, no such address); the message names it."""


RouteModule = Callable[[web.Application, HttpDeps], None]


def make_http_app(deps: HttpDeps, route_modules: Sequence[RouteModule]) -> web.Application:
    """The aiohttp application: each module registers its routes given the dependencies."""
    app = web.Application(client_max_size=64 * 1024**2)
    app[DEPS] = deps
    for add_routes in route_modules:
        add_routes(app, deps)
    return app


class HttpFront:
    """Serves one aiohttp application on `settings` from a background thread; stop() is clean."""

    def __init__(
        self,
        app: web.Application,
        settings: HttpSettings,
        host: str | None = None,
        port: int | None = None,
    ):
        self.app = app
        self.settings = settings
        self.host = host if host is not None else settings.host
        self.port = port if port is not None else settings.port
        self.address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> tuple[str, int]:
        """Bind and serve; raise OSError (port busy) or TLSSetupError here, not in the thread."""
        ssl_context = listening_context(self.settings.tls) if self.settings.tls else None
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            # In-flight requests (a long WADO stream) get a few seconds when the router stops.
            self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
            await self._runner.setup()
            site = web.TCPSite(
                self._runner, self.host, self.port, ssl_context=ssl_context, reuse_address=True
            )
            await site.start()
            bound = self._runner.addresses
            self.address = tuple(bound[0][:2]) if bound else (self.host, self.port)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(serve())
            except BaseException as exc:  # reported by start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="http-front", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(
                f"the HTTP port {self.host}:{self.port} did not start in {timeout_s}s"
            )
        if failure:
            self._thread.join(timeout_s)
            self._loop.close()
            self._loop = None
            if isinstance(failure[0], OSError):
                raise HttpListenError(
                    f"cannot open the HTTP port {self.host}:{self.port}: {failure[0]}"
                ) from failure[0]
            raise failure[0]
        assert self.address is not None
        log.info(
            "http_listening",
            host=self.address[0],
            port=self.address[1],
            tls=ssl_context is not None,
        )
        return self.address

    @property
    def running(self) -> bool:
        return self._loop is not None and self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the listener and open connections, then end the loop and its thread."""
        if not self.running:
            return
        assert self._loop is not None and self._runner is not None
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            future.result(timeout_s)
        except Exception:
            log.exception("http_stop_failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._loop = None
        log.info("http_stopped")
