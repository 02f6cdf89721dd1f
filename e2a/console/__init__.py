"""The web console: server-rendered HTML pages under ``/console/`` (docs/decisions.md, "Web console").

:mod:`e2a.console.render` holds the pure rendering (``twisted.web.template`` tags, so every
dynamic value is escaped by the flattener); :mod:`e2a.console.routes` the Klein routes, the
session cookie and CSRF checks. Everything shown or changed goes through the stores and
services the API uses.
"""
