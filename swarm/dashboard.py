"""The live dashboard: one small page and the JSON it polls, served from the peer's network loop.

``/`` is the page (swarm/static/index.html), ``/api/status`` is exactly what the peer's
``get_status`` returns, ``/static/`` holds the page's script, style and the vendored
charting library (swarm/static/NOTICE), so the page works with no internet. The page names
everything it loads by a relative URL, so it works under whatever address, port (or path,
behind a proxy) it is reached by; by default it listens on 127.0.0.1 only (``--dashboard-host``).
The server runs on the peer's network loop, beside the swarm's protocols, so it does
little there: files from disk and one status snapshot per poll, from the liveness view the
heartbeat keeps (no DHT read). Training runs on the main thread and never waits for it.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Awaitable, Callable

from aiohttp import web

from swarm.config import ConfigError

log = logging.getLogger("swarm")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
NO_CACHE = {"Cache-Control": "no-store"}  # the page and its data change while the run goes on
# Peer names come from other peers' DHT records: the page puts them in with textContent, and should a script
# ever slip through anyway, the browser runs none but the peer's own files, and the page loads nothing and
# talks to nothing else.
SECURITY = {
    "Content-Security-Policy": "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def start_dashboard(port: int, get_status: Callable[[], Awaitable[dict]],
                          host: str = "127.0.0.1") -> web.AppRunner:
    """Serve the dashboard on host:port (``runner.addresses`` lists where it listens); the caller awaits
    ``runner.cleanup()`` to stop it.

    A port already taken is the user's to fix, so it is a ConfigError (one line, exit 2).
    """

    async def page(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC_DIR, "index.html"), headers=NO_CACHE)

    async def status(_request: web.Request) -> web.Response:
        try:
            return web.json_response(await get_status(), headers=NO_CACHE)
        except Exception as e:  # e.g. a DHT read timing out: the page says so and polls again
            log.debug("dashboard status failed: %s", e)
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=503, headers=NO_CACHE)

    async def secure(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY)

    app = web.Application()
    app.on_response_prepare.append(secure)
    app.router.add_get("/", page)
    app.router.add_get("/api/status", status)
    app.router.add_static("/static/", STATIC_DIR)
    runner = web.AppRunner(app, access_log=None)  # a poll every 2 s would flood the peer's log
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--dashboard-port {port} is in use: pick another port") from None
        raise ConfigError(f"--dashboard-host {host}: cannot listen there on port {port}: {e.strerror or e}") from None
    return runner
