# twistd -ny e2a.tac — the same service as `twistd -n e2a`, configured by $E2A_CONFIG or ./e2a.yaml.
import sys

from twisted.application import service
from twisted.internet import reactor
from twisted.logger import ILogObserver

from e2a.config import load_config
from e2a.errors import ConfigError
from e2a.logsetup import build_log_observer
from e2a.service import build_service

try:
    _config = load_config()
except ConfigError as _e:
    for _problem in _e.problems:
        sys.stderr.write(f"e2a: config error: {_problem}\n")
    raise SystemExit(2) from None

application = service.Application("e2a")
# logging.format/level: `twistd -ny` without --logfile writes to stdout, so do we (e2a.logsetup).
application.setComponent(ILogObserver, build_log_observer(_config, sys.stdout))
build_service(_config, reactor).setServiceParent(application)
