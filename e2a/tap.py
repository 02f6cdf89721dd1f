"""twistd entry point: ``twistd -n e2a [--config e2a.yaml]``."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "Path to the YAML configuration file (default: $E2A_CONFIG or ./e2a.yaml)."],
        ["http", None, None, "Override http.listen_addr (host:port)."],
        ["smtp", None, None, "Override smtp.listen_addr (host:port)."],
    ]

    def opt_version(self) -> None:
        """Print e2a's version (and Twisted's) and exit."""
        import twisted

        from e2a import __version__

        print(f"e2a {__version__} (Twisted {twisted.__version__})")
        sys.exit(0)


def makeService(options: Options) -> Any:  # noqa: N802 - twistd API
    import dataclasses

    from e2a.config import load_config
    from e2a.errors import ConfigError
    from e2a.service import build_service

    try:
        config = load_config(options["config"])
    except ConfigError as e:
        for problem in e.problems:
            sys.stderr.write(f"e2a: config error: {problem}\n")
        raise SystemExit(2) from None
    if options["http"]:
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, listen_addr=options["http"]))
    if options["smtp"]:
        config = dataclasses.replace(config, smtp=dataclasses.replace(config.smtp, listen_addr=options["smtp"]))
    # Applied by twistd when it starts logging (e2a.logsetup); options.parent is twistd's ServerOptions.
    from twisted.internet import reactor

    from e2a.logsetup import twistd_log_observer

    observer = twistd_log_observer(config, getattr(options, "parent", None), reactor)
    from e2a.config import config_sources

    # config_sources: for the start-up log block
    return build_service(config, reactor, log_observer=observer, sources=config_sources(options["config"]))
