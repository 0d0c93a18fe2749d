"""The HTTP face of the router: one aiohttp listener (``router.http``) for metrics, health, the admin
API, the status page and DICOMweb.

How another module adds routes
-------------------------------
Write a function ``add_routes(app: web.Application, deps: HttpDeps) -> None`` that registers its
handlers (``app.router.add_get(...)``), keeping whatever it needs from ``deps`` in a closure or
under its own ``web.AppKey``. Add it to the ``route_modules`` list that ``dicomrouter/app.py``
passes to :func:`dicomrouter.http.server.make_http_app` (the one wiring place). ``HttpDeps`` holds
the router's services (config holder, catalog, spool, queue, audit, metrics, ...).

Handlers are ``async``; anything that blocks (database, files, the network) goes through
``await asyncio.to_thread(...)`` so one slow request never holds up the others.

Authentication
--------------
A handler that needs a client calls, first thing::

    caller = require_client(request)                 # 401 (+ WWW-Authenticate) without valid credentials
    caller = require_role(request, "admin")          # also 403 unless the client has the role

Both return a :class:`dicomrouter.routing.access.Caller` (``kind="client"``, ``roles``,
``client`` = its ClientConfig, ``address`` = the HTTP peer), so the DICOM access rules
(``may_read(caller, server)``, ``may_write``) apply unchanged. ``client_of(request)`` returns the
caller or None without refusing. Refusals are raised as aiohttp HTTP exceptions and audited
(operation ``http``, outcome ``unauthorized`` / ``forbidden``). Routes without a call are public
(``/healthz``, ``/readyz``, ``/metrics``).

Credentials: ``Authorization: Basic`` with the client's AE title as user and its token as password,
or ``Authorization: Bearer <token>``; the config holds only ``clients[].http_token_sha256``
(``dicomrouter clients token AE`` makes one).
"""
