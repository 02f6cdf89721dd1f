"""The composition root: the only place e2a's objects are built and wired, in start order.

``MultiService`` ignores the Deferreds its children return from ``startService``, so
:class:`E2AService` awaits each step itself (Buildbot's AsyncMultiService rule): database first
(embedded or external) → migrations → pool → LISTEN → thread pools → listeners and workers.
Stopping runs in reverse — listeners first so no new work arrives, the database last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from e2a.config import (
    Config,
    ensure_data_dir,
    listen_endpoint,
    resolve_hmac_secret,
    resolve_master_key,
)
from e2a.store import migrate
from e2a.store.database import Database
from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings
from e2a.store.events import EventListener

log = Logger()

SHUTDOWN_GRACE_SECONDS = 10


class E2AService(service.Service):
    name = "e2a"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        stop_reactor_on_failure: bool = False,
        child: Any = None,
        log_observer: Any = None,
    ) -> None:
        self.config = config
        # An ILogObserver (e2a.logsetup) for twistd to log to; set on the application by setServiceParent.
        self.log_observer = log_observer
        # A ChildSpec when this is one of the extra processes of ``processes: N`` (e2a.processes):
        # the parent already did the once-only start-up and bound the sockets this one adopts.
        self.child = child
        self.processes: Any = None
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.reactor = reactor
        self.embedded: EmbeddedPostgres | None = None
        self.db: Database | None = None
        self.events: EventListener | None = None
        self.dsn = ""
        self.blocking_pool = ThreadPool(minthreads=0, maxthreads=4, name="e2a-blocking")
        # SPF/DKIM/DMARC is mostly GIL-bound Python once DNS answers are cached, so more threads
        # only compete with the reactor; but each thread can also sit in a slow DNS lookup
        # (5 s timeouts), so too few would let two bad senders stall verification for all.
        # 4 balances the two (2 and 8 threads measured within noise of each other).
        self.mailauth_pool = ThreadPool(minthreads=0, maxthreads=4, name="e2a-mailauth")
        self.master_key = b""
        self.hmac_secret = ""
        self.http_port: Any = None
        # The HTTP connection caps and deadlines (e2a.api.limits); ``fd_budget`` is the start-up
        # plan that bounds ``http.max_connections`` so SMTP keeps its descriptors.
        self.http_guard: Any = None
        self.fd_budget: Any = None
        self.smtp_port: Any = None
        self.smtp_factory: Any = None
        self.api: Any = None
        self.dns: Any = None
        self.verifier: Any = None
        self.delivery: Any = None
        self.websocket: Any = None
        self.outbound: Any = None
        self.retention: Any = None
        self.hold_review: Any = None
        self.approval_tokens: Any = None
        self.expiry: Any = None
        self.inbound: Any = None
        self.backpressure: Any = None
        # e2a.metrics.E2AMetrics: this process's counters (and the usage.tracking switch).
        self.metrics: Any = None
        self._stoppers: list[Any] = []
        self.started: defer.Deferred[None] = defer.Deferred()
        # e2a.config.ConfigSources of this config (set by e2a.tap; else E2A_CONFIG/./e2a.yaml rules).
        self.config_sources: Any = None

    def setServiceParent(self, parent: Any) -> Any:  # noqa: N802 - Twisted API
        """Also hand ``log_observer`` to a twistd application (a ``Componentized``).

        twistd attaches the service, then ``AppLogger.start`` logs to the application's
        ``ILogObserver`` component when there is one, so setting it here applies
        ``logging.format``/``logging.level`` to everything twistd logs.
        """
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)

    # ---- start ------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 - Twisted API
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())

        def failed(failure: Any) -> None:
            # One line naming what failed and its key; the traceback only at logging.level: debug.
            from e2a.startup import describe_failure, exit_after_shutdown

            code, line = describe_failure(failure.value, self.config, [f[0] for f in failure.frames])
            if self.config.logging.level == "debug":
                from twisted.logger import LogLevel

                log.failure("e2a failed to start", failure, level=LogLevel.debug)
            log.critical("e2a: {line}", line=line)
            self.started.errback(failure)
            if self.stop_reactor_on_failure:
                self.started.addErrback(lambda _: None)  # reported above; nobody else awaits it
                exit_after_shutdown(code)
                if self.reactor.running:
                    self.reactor.stop()
                else:  # failed before twistd started the reactor (e.g. the data directory)
                    self.reactor.callWhenRunning(self.reactor.stop)

        d.addCallbacks(lambda _: self.started.callback(None), failed)

    async def _start(self) -> None:
        config = self.config
        fresh = not Path(config.data_dir).exists()
        data_dir = ensure_data_dir(config)
        if fresh:
            log.info("created data directory {path} (mode 0700)", path=str(data_dir))
        self.fd_budget = plan_descriptors(config)
        self.master_key = resolve_master_key(config)
        self.hmac_secret = resolve_hmac_secret(config)
        self.blocking_pool.start()
        self._stoppers.append(self.blocking_pool.stop)
        self.mailauth_pool.start()
        self._stoppers.append(self.mailauth_pool.stop)
        self.metrics = self._build_metrics(data_dir)

        if self.child is not None:
            self.dsn = self.child.dsn
        elif config.database.url:
            self.dsn = config.database.url
        else:
            self.embedded = EmbeddedPostgres(EmbeddedSettings(Path(data_dir) / "pg"))
            self.dsn = await self.embedded.start(self.reactor, self.blocking_pool)
            embedded = self.embedded

            async def stop_embedded() -> None:
                await embedded.stop(self.reactor, self.blocking_pool)

            self._stoppers.append(stop_embedded)

        if self.child is not None:
            pass  # the parent migrated before it started us
        elif config.database.auto_migrate:
            await migrate.migrate(self.dsn, self.reactor)
        else:
            st = await migrate.status(self.dsn, self.reactor)
            if st.pending:
                raise migrate.MigrationError(
                    f"{len(st.pending)} migration(s) pending and database.auto_migrate is off; run e2a-admin migrate"
                )

        self.db = Database(self.dsn, config.database.pool_size, self.reactor)
        await self.db.start()
        self._stoppers.append(self.db.close)
        self.events = EventListener(self.dsn, self.reactor)
        await self.events.start()
        self._stoppers.append(self.events.stop)
        # LISTEN lost and back: the server probably restarted, so idle pooled connections are stale
        # (in every process; with processes: N only the parent supervises the embedded server).
        self.events.on_reconnect(self.db.discard_idle)
        if self.embedded is not None:
            # A dead postmaster is restarted; pooled and LISTEN connections then reconnect at once.
            from e2a.store.embedded import supervise

            supervisor = supervise(
                self.embedded, self.reactor, self.blocking_pool, [self.db.discard_idle, self.events.reconnect_now]
            )
            self._stoppers.append(supervisor.stop)
        from e2a.delivery.websocket import WebSocketService

        self.websocket = WebSocketService(
            self.db, self.events, config.websocket, config.http.public_url, self.reactor
        )
        self.websocket.start()
        self._stoppers.append(self.websocket.stop)
        self.metrics.watch_websockets(lambda: len(self.websocket.registry.all()))

        self.dns = self._build_dns()
        await self._ensure_deployment_rows()
        await self._start_http()
        await self._start_smtp()
        await self._start_workers()
        if self.child is not None:
            log.info("e2a process {index} of {count} serving", index=self.child.index, count=self.child.count)
            return
        if config.processes > 1:
            from e2a.processes import ProcessPool

            self.processes = ProcessPool(
                self.reactor, config, self.dsn, {"http": self.http_port.fileno(), "smtp": self.smtp_port.fileno()}
            )
            self.processes.start()
        self._announce(data_dir)

    def _announce(self, data_dir: Path) -> None:
        """The start-up block (e2a.maillog.started): config sources, data dir, database, addresses."""
        from e2a import maillog
        from e2a.config import config_sources

        sources = self.config_sources or config_sources()
        config = self.config
        self._write_run_record(data_dir, sources)
        maillog.started(
            config_file=sources.file,
            env_keys=sources.env_keys,
            env=config.env,
            data_dir=str(data_dir),
            database=(
                maillog.redact_dsn(self.dsn) if config.database.url
                else f"embedded PostgreSQL in {Path(data_dir) / 'pg'} ({maillog.redact_dsn(self.dsn)})"
            ),
            http=self.http_address(),
            smtp=self.smtp_address(),
            shared_domain=config.shared_domain,
            smtp_domain=config.smtp.domain,
            processes=config.processes,
        )

    def _write_run_record(self, data_dir: Path, sources: Any) -> None:
        """``<data_dir>/server.json`` for ``e2a-admin check-config`` (removed at a clean stop)."""
        import json
        import os
        from datetime import UTC, datetime

        from e2a.config import RUN_RECORD, run_record

        path = Path(data_dir) / RUN_RECORD
        now = datetime.fromtimestamp(self.reactor.seconds(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        record = run_record(self.config, sources, os.getpid(), now)
        try:
            tmp = path.with_name(f".{RUN_RECORD}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError as e:
            log.warn("cannot write {path}: {error}", path=str(path), error=str(e))
            return

        def remove() -> None:
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass

        self._stoppers.insert(0, remove)  # stoppers run last-first: this one runs last

    def _build_metrics(self, data_dir: Path) -> Any:
        """This process's metrics. With ``processes: N`` every process writes its counters into
        ``<data_dir>/metrics`` (the parent empties it first) and any process's ``/metrics``
        reports them all (e2a.metrics); WebSocket counts are sampled into it every 5 s."""
        from e2a import metrics

        config = self.config
        path = None
        if config.processes > 1:
            path = metrics.multiprocess_dir(data_dir)
            metrics.enable_multiprocess(path, reset=self.child is None)
        built = metrics.E2AMetrics(usage_tracking=config.usage.tracking, multiprocess_dir=path)
        if path is not None:
            from twisted.internet import task

            sampler = task.LoopingCall(built.sample_websockets)
            sampler.clock = self.reactor
            sampler.start(5.0, now=False)
            self._stoppers.append(sampler.stop)
        return built

    def _build_dns(self) -> Any:
        try:
            from e2a.mailauth.dns import DnsClient
        except ImportError:
            return None
        return DnsClient(self.config.dns.parsed_nameservers(), float(self.config.dns.timeout), reactor=self.reactor)

    async def _ensure_deployment_rows(self) -> None:
        """Upsert the shared domain as a system-owned verified domain (config.md §4)."""
        from e2a.store.domains import ensure_shared_domain

        assert self.db is not None
        if self.config.shared_domain and self.child is None:
            await ensure_shared_domain(self.db, self.config.shared_domain)
        if self.child is None:
            await self._ensure_deployment_dkim_keys()

    async def _ensure_deployment_dkim_keys(self) -> None:
        """Create the shared domain's and ``M``'s DKIM keys now (config.md §4, mail.md §7.5), so the
        TXT record ``e2a-admin check-config`` prints exists before the first send. A key that
        cannot be created is logged, not fatal: mail from that domain is then sent unsigned."""
        from twisted.internet import threads

        from e2a.outbound.dkimsign import thd_load_deployment_key

        config = self.config
        domains = sorted({d.lower() for d in (config.shared_domain, config.mail_domain) if d})
        pending = [
            threads.deferToThreadPool(
                self.reactor, self.blocking_pool, thd_load_deployment_key,
                config.data_dir, domain, config.dkim.keys, config.dkim.selector,
            )
            for domain in domains
        ]
        for domain, d in zip(domains, pending, strict=True):
            try:
                await d
            except (OSError, ValueError) as e:
                log.warn("DKIM key for {domain} unavailable: {error}", domain=domain, error=str(e))

    async def _start_http(self) -> None:
        from e2a.api.app import ApiApp, ApiDeps

        assert self.db is not None
        deps = ApiDeps(config=self.config, db=self.db, clock=self.reactor, dns=self.dns, master_key=self.master_key)
        deps.extras["service"] = self
        deps.extras["websocket"] = self.websocket
        deps.extras["metrics"] = self.metrics
        from e2a.outbound.send import SendService

        deps.extras["send"] = SendService(
            self.db, self.config, self.master_key, self.reactor, self.reactor, self.blocking_pool
        )
        from e2a.outbound.hitl import HoldReview
        from e2a.outbound.magiclink import ApprovalTokens

        # One review object for the API routes, the magic-link pages and the expiry worker.
        deps.extras["send"].metrics = self.metrics
        self.hold_review = HoldReview(self.db, deps.extras["send"], self.reactor)
        deps.extras["hold_review"] = self.hold_review
        # Magic-link tokens: exp = approval_expires_at + hitl.token_grace (mail.md §8.4).
        self.approval_tokens = ApprovalTokens(self.hmac_secret, self.config.hitl.token_grace)
        deps.extras["approval_tokens"] = self.approval_tokens
        from e2a.outbound.notify import ReviewerNotifier

        deps.extras["send"].notifier = ReviewerNotifier(
            self.db, self.config, self.master_key, self.hmac_secret, self.reactor, self.reactor, self.blocking_pool
        )
        deps.extras["send"].notifier.metrics = self.metrics
        deps.extras["hmac_secret"] = self.hmac_secret  # magic-link pages (e2a.api.magiclink_pages)
        from e2a.mailauth import dkimkeys

        deps.extras["dkim_keygen"] = lambda: dkimkeys.generate_key(self.reactor, self.blocking_pool)
        self.api = ApiApp(deps)
        from e2a.api.limits import HttpLimits, guard_site

        limits = HttpLimits.from_config(self.config.http, self.fd_budget.http if self.fd_budget else None)
        from e2a.metrics import instrument_site

        site = instrument_site(self.api.site(), self.api.router.url_map, self.metrics)
        self.http_guard = guard_site(site, limits, self.reactor)
        self.http_port = await self._listen("http", self.config.http.listen_addr, self.http_guard)

    async def _start_smtp(self) -> None:
        from e2a.delivery.backpressure import Backpressure
        from e2a.inbound import InboundPipeline
        from e2a.mailauth.verify import MailVerifier
        from e2a.smtp.recipients import AgentRecipients
        from e2a.smtp.server import SmtpFactory, load_tls_options

        assert self.db is not None
        smtp = self.config.smtp
        # Fed by the DeliveryService (_start_workers), awaited by every cloud-bound accept.
        self.backpressure = Backpressure(self.reactor)
        # Verification must finish inside the SMTP store timeout, leaving time to commit.
        self.verifier = MailVerifier(
            self.dns, self.mailauth_pool, self.reactor, budget=max(1.0, smtp.store_timeout * 0.8)
        )
        self._stoppers.append(self.verifier.close)
        self.inbound = InboundPipeline(
            self.db, self.verifier, self.master_key, smtp.domain, smtp.effective_authserv_id,
            backpressure=self.backpressure,
            in_thread=lambda fn, *args: threads.deferToThreadPool(self.reactor, self.mailauth_pool, fn, *args),
        )
        tls = load_tls_options(smtp.tls_cert, smtp.tls_key) if smtp.tls_enabled else None
        self.inbound.metrics = self.metrics
        self.smtp_factory = SmtpFactory(smtp, AgentRecipients(self.db), self.inbound.accept, self.reactor, tls)
        self.smtp_factory.metrics = self.metrics
        if tls is not None:  # renewed certificates are picked up without a restart (e2a.tlsreload)
            self._watch_certificates(smtp)
        self.smtp_port = await self._listen("smtp", smtp.listen_addr, self.smtp_factory)

    def _watch_certificates(self, smtp: Any) -> None:
        from e2a.smtp.server import load_tls_options
        from e2a.tlsreload import CertificateWatcher

        def apply(context: Any) -> None:
            self.smtp_factory.tls = context

        watcher = CertificateWatcher(smtp.tls_cert, smtp.tls_key, load_tls_options, apply, self.reactor)
        watcher.start()
        self.tls_watcher = watcher
        self._stoppers.append(watcher.stop)

    async def _listen(self, name: str, listen_addr: str, factory: Any) -> Any:
        """Bind ``listen_addr``, or, in a child process, serve the socket the parent bound."""
        if self.child is not None:
            from e2a.processes import adopt_listening_socket

            return adopt_listening_socket(self.reactor, self.child.fds[name], factory)
        endpoint = endpoints.serverFromString(self.reactor, listen_endpoint(listen_addr))
        return await endpoint.listen(factory)

    async def _start_workers(self) -> None:
        from e2a.delivery.worker import DeliveryService

        assert self.db is not None and self.events is not None
        config = self.config
        self.delivery = DeliveryService(
            self.db, self.events, self.dns, config.webhooks, config.production, self.master_key, self.reactor,
            backpressure=self.backpressure,
        )
        self.delivery.metrics = self.metrics
        await self.delivery.start()
        self._stoppers.append(self.delivery.stop)
        if self.inbound is not None:
            # Fresh webhook jobs go from the accept straight to this worker (e2a.inbound).
            self.inbound.fresh_jobs = self.delivery

        from e2a.outbound.relay import RouteConfig
        from e2a.outbound.worker import OutboundService, RetryConfig

        self.outbound = OutboundService(
            self.db,
            self.events,
            self.dns,
            RouteConfig.from_config(config),
            RetryConfig.from_sections(config.webhooks, config.outbound),
            self.reactor,
        )
        self.outbound.metrics = self.metrics
        await self.outbound.start()
        self._stoppers.append(self.outbound.stop)

        from e2a.outbound.expiry import ExpiryService

        self.expiry = ExpiryService(self.hold_review, config.hitl.sweep_interval, self.reactor)
        self.expiry.start()
        self._stoppers.append(self.expiry.stop)

        from e2a.retention import RetentionService

        self.retention = RetentionService(self.db, config.retention, self.reactor)
        self.retention.start()
        self._stoppers.append(self.retention.stop)

    def http_address(self) -> str:
        return _address(self.http_port)

    def smtp_address(self) -> str:
        return _address(self.smtp_port)

    # ---- stop -------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802 - Twisted API
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # The other processes first: they share our sockets and our (embedded) database.
        if self.processes is not None:
            await self.processes.stop(SHUTDOWN_GRACE_SECONDS + 5)
            self.processes = None
        # Listeners first: no new work arrives while the rest winds down.
        for port in (self.smtp_port, self.http_port):
            if port is not None:
                await port.stopListening()
        self.smtp_port = self.http_port = None
        if self.smtp_factory is not None:
            # 421 4.3.2 to open sessions; a client that stops reading is not waited for forever.
            d = self.smtp_factory.shutdown()
            d.addTimeout(SHUTDOWN_GRACE_SECONDS, self.reactor)
            try:
                await d
            except defer.TimeoutError:
                log.warn("SMTP sessions still open after {s} s; closing anyway", s=SHUTDOWN_GRACE_SECONDS)
        while self._stoppers:
            stop = self._stoppers.pop()
            try:
                result = stop()
                if hasattr(result, "__await__") or isinstance(result, defer.Deferred):
                    await result
            except Exception:
                log.failure("error while stopping e2a")
        log.info("e2a stopped")


def plan_descriptors(config: Config) -> Any:
    """Raise the open-file limit, log it, and share it out (e2a.api.limits.plan_fd_budget).

    Raises ConfigError when SMTP's share does not fit; lowers the HTTP cap, with a warning,
    when only HTTP's does not.
    """
    from e2a.api import limits

    before, after = limits.raise_nofile_limit()
    budget = limits.plan_fd_budget(
        after, limits.open_fd_count(), config.smtp.max_connections, config.http.max_connections,
        config.database.pool_size,
    )
    shown = "unlimited" if after < 0 else str(after)
    log.info("open-file limit {limit} (soft limit was {before}); {plan}",
             limit=shown, before="unlimited" if before < 0 else before, plan=budget.describe())
    if budget.http_lowered:
        log.warn(
            "http.max_connections lowered from {configured} to {http} so that SMTP keeps its "
            "descriptors under the open-file limit {limit}; raise the limit to serve more",
            configured=budget.http_configured, http=budget.http, limit=shown,
        )
    return budget


def _address(port: Any) -> str:
    if port is None:
        return "-"
    host = port.getHost()
    return f"{host.host}:{host.port}"


def build_service(
    config: Config, reactor: Any | None = None, *, standalone: bool = True, log_observer: Any = None
) -> E2AService:
    """Build the root service. Only this module (and the twistd entry points) touch the reactor.

    ``standalone`` (twistd): a failed start stops the reactor so the process exits instead of
    idling half-started. Tests embedding the service pass False and await ``service.started``.
    ``log_observer`` (e2a.tap): set on the twistd application as its ``ILogObserver``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return E2AService(config, reactor, stop_reactor_on_failure=standalone, log_observer=log_observer)
