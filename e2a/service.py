"""The composition root: the only place e2a's objects are built and wired.

:func:`build_service` builds the whole object graph at once, typed, before anything runs: the
data directory and the deployment's secrets first (every component that signs or decrypts takes
its key in its constructor), then every store handle, worker, listener factory and the HTTP
API. Nothing is built later and no attribute waits for start-up to be filled in. The only
objects that exist before they can work are *handles* that are connected in ``startService``:
the :class:`~e2a.store.database.Database` pool, the LISTEN connection and the embedded
PostgreSQL server (its DSN is fixed by the data directory, so it is known up front).

``MultiService`` ignores the Deferreds its children return from ``startService``, so
:class:`E2AService` awaits each start step itself (Buildbot's AsyncMultiService rule): database
thread pools (the embedded server starts from one) → database (embedded or external) →
migrations → pool → LISTEN → WebSocket subscriptions → listeners → workers.
Stopping runs in reverse — listeners first so no new work arrives, the database last.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, task, threads
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from e2a import affinity, maillog
from e2a import metrics as metrics_module
from e2a.api import limits
from e2a.api.app import ApiApp, ApiDeps, ApiServices
from e2a.api.limits import ConnectionGuard, FdBudget, HttpLimits, guard_site
from e2a.config import (
    RUN_RECORD,
    Config,
    ConfigSources,
    SmtpConfig,
    config_sources,
    ensure_data_dir,
    listen_endpoint,
    resolve_hmac_secret,
    resolve_master_key,
    run_record,
)
from e2a.delivery.backpressure import Backpressure
from e2a.delivery.port import DeliveryPort
from e2a.delivery.websocket import WebSocketService
from e2a.delivery.worker import DeliveryService
from e2a.inbound import InboundPipeline
from e2a.mailauth import dkimkeys
from e2a.mailauth.dns import DnsClient
from e2a.mailauth.verify import MailVerifier
from e2a.metrics import E2AMetrics, instrument_site
from e2a.outbound.dkimsign import thd_load_deployment_key
from e2a.outbound.expiry import ExpiryService
from e2a.outbound.hitl import HoldReview
from e2a.outbound.identity import MailIdentity
from e2a.outbound.magiclink import ApprovalTokens
from e2a.outbound.notify import ReviewerNotifier
from e2a.outbound.relay import RouteConfig
from e2a.outbound.send import SendService
from e2a.outbound.worker import OutboundService, RetryConfig
from e2a.processes import ChildSpec, ProcessPool, adopt_listening_socket
from e2a.retention import RetentionService
from e2a.smtp.factory import SmtpFactory, load_tls_options
from e2a.smtp.recipients import AgentRecipients
from e2a.startup import describe_failure, exit_after_shutdown
from e2a.store import migrate
from e2a.store.database import Database
from e2a.store.domains import ensure_shared_domain
from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings, Supervisor
from e2a.store.events import CHANNEL_REVOKE, EventListener
from e2a.tlsreload import CertificateWatcher
from e2a.workers import WorkerPool

log = Logger()

SHUTDOWN_GRACE_SECONDS = 10

#: A stop step: a plain function, or one returning a Deferred or an awaitable.
Stopper = Callable[[], object]


@dataclass(frozen=True)
class Secrets:
    """The deployment's resolved secrets (configured, key file, or generated in the data dir)."""

    master_key: bytes  # AES-256-GCM key of the stored signing secrets and DKIM keys
    hmac_secret: str  # magic-link approval tokens


def resolve_secrets(config: Config) -> Secrets:
    """Create the data directory when needed and read (or, in development, create) the secrets."""
    fresh = not Path(config.data_dir).exists()
    data_dir = ensure_data_dir(config)
    if fresh:
        log.info("created data directory {path} (mode 0700)", path=str(data_dir))
    return Secrets(master_key=resolve_master_key(config), hmac_secret=resolve_hmac_secret(config))


def build_api_services(
    db: Database,
    config: Config,
    secrets: Secrets,
    reactor: Any,
    *,
    pool: ThreadPool | None,
    metrics: E2AMetrics,
    notifier: ReviewerNotifier | None = None,
    websocket: WebSocketService | None = None,
) -> ApiServices:
    """The services behind the HTTP API: one SendService and one HoldReview, shared by the API
    routes, the magic-link pages and (in a deployment) the expiry worker.

    ``pool``: the blocking thread pool for DKIM signing and key generation (None: inline, as a
    test API does). ``notifier``: reviewer mail for held messages (None: none is sent).
    """
    send = SendService(
        db, MailIdentity.from_config(config), config.outbound, config.rate_limits, secrets.master_key,
        reactor, reactor, pool, notifier=notifier, metrics=metrics,
    )
    hmac_secret = secrets.hmac_secret
    return ApiServices(
        send=send,
        hold_review=HoldReview(db, send, reactor),
        metrics=metrics,
        # Magic-link tokens: exp = approval_expires_at + hitl.token_grace (mail.md §8.4).
        approval_tokens=ApprovalTokens(hmac_secret, config.hitl.token_grace) if hmac_secret else None,
        dkim_keygen=(lambda: dkimkeys.generate_key(reactor, pool)) if pool is not None else None,
        websocket=websocket,
    )


class E2AService(service.Service):
    """The whole of one e2a process, built by :func:`build_service`; see the module docstring."""

    name = "e2a"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        secrets: Secrets,
        *,
        stop_reactor_on_failure: bool = False,
        freeze_after_start: bool = False,
        child: ChildSpec | None = None,
        log_observer: ILogObserver | None = None,
        sources: ConfigSources | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.stop_reactor_on_failure = stop_reactor_on_failure
        # The process is this service's alone (twistd): once started, what start-up left is
        # frozen out of the garbage collector's walks (freeze_startup_heap). Not in a test
        # process, where it would keep every earlier test's garbage for good.
        self.freeze_after_start = freeze_after_start
        # A ChildSpec when this is one of the extra processes of ``processes: N`` (e2a.processes):
        # the parent already did the once-only start-up and bound the sockets this one adopts.
        self.child = child
        # An ILogObserver (e2a.logsetup) for twistd to log to; set on the application by setServiceParent.
        self.log_observer = log_observer
        # Where this config came from (e2a.tap); else the E2A_CONFIG/./e2a.yaml rules.
        self.config_sources = sources
        self.started: defer.Deferred[None] = defer.Deferred()
        self._stoppers: list[Stopper] = []
        self.master_key = secrets.master_key
        self.hmac_secret = secrets.hmac_secret
        self.data_dir = Path(config.data_dir).absolute()

        # ---- CPU, threads, metrics, descriptors -------------------------------------------
        # ``cpu_affinity``: the CPU this process keeps all its threads on (e2a.affinity). The
        # parent checks every process's CPU now, so a CPU a process may not use stops the start
        # with its key (a child failing on it would only be restarted, again and again).
        self.cpu = affinity.cpu_for_process(config.cpu_affinity, child.index if child is not None else 1)
        for index in [child.index] if child is not None else range(1, config.processes + 1):
            affinity.check_cpu(affinity.cpu_for_process(config.cpu_affinity, index))
        self.blocking_pool = ThreadPool(minthreads=0, maxthreads=4, name="e2a-blocking")
        # SPF/DKIM/DMARC is mostly GIL-bound Python once DNS answers are cached, so more threads
        # only compete with the reactor; but each thread can also sit in a slow DNS lookup
        # (5 s timeouts), so too few would let two bad senders stall verification for all.
        # 4 balances the two (2 and 8 threads measured within noise of each other). One call per
        # message, so its hand-off is the lean one of e2a.workers, not ThreadPool's.
        # ``colocate_threads``: unless the whole process is pinned, the pool's threads follow the
        # reactor thread's CPU, so handing a call over does not wake another CPU (e2a.affinity).
        self.thread_follower = self._thread_follower(config)
        # Sharing the reactor thread's CPU (either way above), a woken mail-auth thread would
        # preempt it only to find the GIL taken; under SCHED_BATCH it waits for its turn instead
        # (e2a.affinity.batch_threads). On CPUs of their own it measured no change: left alone.
        self.batch_mailauth_threads = self.cpu is not None or self.thread_follower is not None
        self.mailauth_pool = WorkerPool(
            reactor, 4, "e2a-mailauth", self.thread_follower, batch=self.batch_mailauth_threads
        )
        self.metrics, self._metrics_sampler = self._build_metrics()
        # The start-up plan that bounds ``http.max_connections`` so SMTP keeps its descriptors.
        self.fd_budget: FdBudget = plan_descriptors(config)

        # ---- database handles (connected in startService) ---------------------------------
        self.embedded: EmbeddedPostgres | None = None
        if child is not None:
            self.dsn = child.dsn
        elif config.database.url:
            self.dsn = config.database.url
        else:
            self.embedded = EmbeddedPostgres(EmbeddedSettings(self.data_dir / "pg"))
            self.dsn = self.embedded.dsn
        self.db = Database(self.dsn, config.database.pool_size, reactor)
        self.events = EventListener(self.dsn, reactor)
        # LISTEN lost and back: the server probably restarted, so idle pooled connections are stale
        # (in every process; with processes: N only the parent supervises the embedded server).
        self.events.on_reconnect(self.db.discard_idle)
        self.supervisor: Supervisor | None = None
        if self.embedded is not None:
            # A dead postmaster is restarted; pooled and LISTEN connections then reconnect at once.
            self.supervisor = self._build_supervisor(self.embedded)

        # ---- receive and deliver ----------------------------------------------------------
        self.dns = DnsClient(config.dns.parsed_nameservers(), float(config.dns.timeout), reactor=reactor)
        self.websocket = WebSocketService(self.db, self.events, config.websocket, config.http.public_url, reactor)
        self.metrics.watch_websockets(lambda: len(self.websocket.registry.all()))
        smtp = config.smtp
        # Verification must finish inside the SMTP store timeout, leaving time to commit.
        self.verifier = MailVerifier(self.dns, self.mailauth_pool, reactor, budget=max(1.0, smtp.store_timeout * 0.8))
        # Per-agent backpressure and fresh jobs: the one way from inbound into delivery.
        self.backpressure = Backpressure(reactor)
        self.delivery_port = DeliveryPort(config.webhooks, reactor, backpressure=self.backpressure)
        self.inbound = InboundPipeline(
            self.db, self.verifier, self.master_key, smtp.domain, smtp.effective_authserv_id,
            delivery=self.delivery_port,
            in_thread=self.mailauth_pool.run,
            metrics=self.metrics,
        )
        tls = load_tls_options(smtp.tls_cert, smtp.tls_key) if smtp.tls_enabled else None
        # RCPT remembers found agents briefly; deletions heard on LISTEN make it forget them.
        self.recipients = AgentRecipients(self.db, reactor)
        self.events.subscribe(CHANNEL_REVOKE, self.recipients.on_revoke)
        self.events.subscribe(CHANNEL_REVOKE, self.inbound.forget_agents)
        self.events.on_reconnect(self.recipients.forget_all)
        self.smtp_factory = SmtpFactory(
            smtp, self.recipients, self.inbound.accept, reactor, tls, metrics=self.metrics
        )
        # Renewed certificates are picked up without a restart (e2a.tlsreload).
        self.tls_watcher = self._build_certificate_watcher(smtp) if tls is not None else None
        self.delivery = DeliveryService(
            self.db, self.events, self.dns, config.webhooks, config.production, self.master_key, reactor,
            port=self.delivery_port, metrics=self.metrics,
        )

        # ---- send, review, relay ----------------------------------------------------------
        self.notifier = ReviewerNotifier(
            self.db, MailIdentity.from_config(config), config.hitl, config.http.public_url,
            self.master_key, self.hmac_secret, reactor, reactor, self.blocking_pool, metrics=self.metrics,
        )
        self.api_services = build_api_services(
            self.db, config, secrets, reactor,
            pool=self.blocking_pool, metrics=self.metrics, notifier=self.notifier, websocket=self.websocket,
        )
        # One review object for the API routes, the magic-link pages and the expiry worker.
        self.hold_review = self.api_services.hold_review
        self.approval_tokens = self.api_services.approval_tokens
        self.outbound = OutboundService(
            self.db, self.events, self.dns,
            RouteConfig.from_config(config),
            RetryConfig.from_sections(config.webhooks, config.outbound),
            reactor,
            metrics=self.metrics,
        )
        self.expiry = ExpiryService(self.hold_review, config.hitl.sweep_interval, reactor)
        self.retention = RetentionService(self.db, config.retention, reactor)

        # ---- HTTP API -----------------------------------------------------------------------
        self.api = ApiApp(
            ApiDeps(
                config=config, db=self.db, clock=reactor, services=self.api_services, dns=self.dns,
                master_key=self.master_key,
            )
        )
        http_limits = HttpLimits.from_config(config.http, self.fd_budget.http)
        site = instrument_site(self.api.site(), self.api.router.url_map, self.metrics)
        self.http_guard: ConnectionGuard = guard_site(site, http_limits, reactor)

        # ---- the other processes of ``processes: N`` (the parent only) ---------------------
        self.processes: ProcessPool | None = None
        if child is None and config.processes > 1:
            self.processes = ProcessPool(reactor, config, self.dsn, {})

        # Bound in startService, closed first in stopService.
        self.http_port: IListeningPort | None = None
        self.smtp_port: IListeningPort | None = None

    # ---- construction helpers -----------------------------------------------------------

    def _thread_follower(self, config: Config) -> affinity.ThreadFollower | None:
        """The mail-auth threads' :class:`~e2a.affinity.ThreadFollower`, or None: when
        ``colocate_threads`` is off, when ``cpu_affinity`` already keeps every thread on one
        CPU, or where the platform cannot tell a thread's CPU (then the setting does nothing)."""
        if not config.colocate_threads or self.cpu is not None:
            return None
        getcpu = affinity.current_cpu_reader()
        return None if getcpu is None else affinity.ThreadFollower(getcpu)

    def _build_metrics(self) -> tuple[E2AMetrics, task.LoopingCall | None]:
        """This process's metrics. With ``processes: N`` every process writes its counters into
        ``<data_dir>/metrics`` (the parent empties it first) and any process's ``/metrics``
        reports them all (e2a.metrics); WebSocket counts are then sampled into it every 5 s."""
        config = self.config
        path = None
        if config.processes > 1:
            path = metrics_module.multiprocess_dir(self.data_dir)
            metrics_module.enable_multiprocess(path, reset=self.child is None)
        built = E2AMetrics(usage_tracking=config.usage.tracking, multiprocess_dir=path)
        sampler = None
        if path is not None:
            sampler = task.LoopingCall(built.sample_websockets)
            sampler.clock = self.reactor
        return built, sampler

    def _build_supervisor(self, embedded: EmbeddedPostgres) -> Supervisor:
        async def restart() -> None:
            await threads.deferToThreadPool(self.reactor, self.blocking_pool, embedded.thd_restart)

        return Supervisor(self.reactor, embedded.is_alive, restart, [self.db.discard_idle, self.events.reconnect_now])

    def _build_certificate_watcher(self, smtp: SmtpConfig) -> CertificateWatcher:
        def apply(context: Any) -> None:
            self.smtp_factory.tls = context

        return CertificateWatcher(smtp.tls_cert, smtp.tls_key, load_tls_options, apply, self.reactor)

    def setServiceParent(self, parent: Any) -> Any:  # noqa: N802 - Twisted API
        """Also hand ``log_observer`` to a twistd application (a ``Componentized``).

        twistd attaches the service, then ``AppLogger.start`` logs to the application's
        ``ILogObserver`` component when there is one, so setting it here applies
        ``logging.format``/``logging.level`` to everything twistd logs.
        """
        set_log_observer(parent, self.log_observer)
        return super().setServiceParent(parent)

    # ---- start ------------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802 - Twisted API
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())

        def failed(failure: Failure) -> None:
            self.started.errback(failure)
            if self.stop_reactor_on_failure:
                self.started.addErrback(lambda _: None)  # reported below; nobody else awaits it
            report_start_failure(failure, self.config, self.reactor, exit_process=self.stop_reactor_on_failure)

        d.addCallbacks(lambda _: self.started.callback(None), failed)

    async def _start(self) -> None:
        if self.cpu is not None:
            # Before any thread starts: new threads inherit the pin.
            affinity.pin_process(self.cpu)
            self._stoppers.append(affinity.unpin_process)
            log.info("e2a keeps its threads on CPU {cpu} (cpu_affinity)", cpu=self.cpu)
        # Thread pools first: the embedded server is started and supervised from the blocking one.
        self.blocking_pool.start()
        self._stoppers.append(self.blocking_pool.stop)
        self.mailauth_pool.start()
        self._stoppers.append(self.mailauth_pool.stop)
        if self.thread_follower is not None:
            log.info("e2a keeps its mail-auth threads on the CPU of its main thread (colocate_threads)")
        if self.mailauth_pool.batched:
            log.info("e2a runs its mail-auth threads under SCHED_BATCH: waking one does not preempt the main thread")
        if self._metrics_sampler is not None:
            self._metrics_sampler.start(5.0, now=False)
            self._stoppers.append(self._metrics_sampler.stop)
        await self._start_database()
        # The WebSocket service subscribes to LISTEN before the HTTP listener opens.
        self.websocket.start()
        self._stoppers.append(self.websocket.stop)
        await self._ensure_deployment_rows()
        self.http_port = await self._listen("http", self.config.http.listen_addr, self.http_guard)
        self._stoppers.append(self.verifier.close)
        if self.tls_watcher is not None:
            self.tls_watcher.start()
            self._stoppers.append(self.tls_watcher.stop)
        self.smtp_port = await self._listen("smtp", self.config.smtp.listen_addr, self.smtp_factory)
        await self._start_workers()
        if self.freeze_after_start:
            freeze_startup_heap()
        if self.child is not None:
            log.info("e2a process {index} of {count} serving", index=self.child.index, count=self.child.count)
            return
        if self.processes is not None:
            assert self.http_port is not None and self.smtp_port is not None
            self.processes.start(
                {"http": self.http_port.fileno(), "smtp": self.smtp_port.fileno()}  # type: ignore[attr-defined]
            )
        self._announce()

    async def _start_database(self) -> None:
        """The database (embedded or external), migrations, the pool, then LISTEN."""
        if self.embedded is not None:
            embedded = self.embedded
            await embedded.start(self.reactor, self.blocking_pool)

            async def stop_embedded() -> None:
                await embedded.stop(self.reactor, self.blocking_pool)

            self._stoppers.append(stop_embedded)
        if self.child is not None:
            pass  # the parent migrated before it started us
        elif self.config.database.auto_migrate:
            await migrate.migrate(self.dsn, self.reactor)
        else:
            st = await migrate.status(self.dsn, self.reactor)
            if st.pending:
                raise migrate.MigrationError(
                    f"{len(st.pending)} migration(s) pending and database.auto_migrate is off; run e2a-admin migrate"
                )
        await self.db.start()
        self._stoppers.append(self.db.close)
        await self.events.start()
        self._stoppers.append(self.events.stop)
        if self.supervisor is not None:
            self.supervisor.start()
            self._stoppers.append(self.supervisor.stop)

    async def _ensure_deployment_rows(self) -> None:
        """Upsert the shared domain as a system-owned verified domain (config.md §4)."""
        if self.child is not None:
            return
        if self.config.shared_domain:
            await ensure_shared_domain(self.db, self.config.shared_domain)
        await self._ensure_deployment_dkim_keys()

    async def _ensure_deployment_dkim_keys(self) -> None:
        """Create the shared domain's and ``M``'s DKIM keys now (config.md §4, mail.md §7.5), so the
        TXT record ``e2a-admin check-config`` prints exists before the first send. A key that
        cannot be created is logged, not fatal: mail from that domain is then sent unsigned."""
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

    async def _start_workers(self) -> None:
        await self.delivery.start()
        self._stoppers.append(self.delivery.stop)
        await self.outbound.start()
        self._stoppers.append(self.outbound.stop)
        self.expiry.start()
        self._stoppers.append(self.expiry.stop)
        self.retention.start()
        self._stoppers.append(self.retention.stop)

    async def _listen(self, name: str, listen_addr: str, factory: IProtocolFactory) -> IListeningPort:
        """Bind ``listen_addr``, or, in a child process, serve the socket the parent bound."""
        if self.child is not None:
            port: IListeningPort = adopt_listening_socket(self.reactor, self.child.fds[name], factory)
            return port
        endpoint = endpoints.serverFromString(self.reactor, listen_endpoint(listen_addr))
        listening: IListeningPort = await endpoint.listen(factory)
        return listening

    def _announce(self) -> None:
        """The start-up block (e2a.maillog.started): config sources, data dir, database, addresses."""
        sources = self.config_sources or config_sources()
        config = self.config
        self._write_run_record(sources)
        maillog.started(
            config_file=sources.file,
            env_keys=sources.env_keys,
            env=config.env,
            data_dir=str(self.data_dir),
            database=(
                maillog.redact_dsn(self.dsn) if config.database.url
                else f"embedded PostgreSQL in {self.data_dir / 'pg'} ({maillog.redact_dsn(self.dsn)})"
            ),
            http=self.http_address(),
            smtp=self.smtp_address(),
            shared_domain=config.shared_domain,
            smtp_domain=config.smtp.domain,
            processes=config.processes,
        )

    def _write_run_record(self, sources: ConfigSources) -> None:
        """``<data_dir>/server.json`` for ``e2a-admin check-config`` (removed at a clean stop)."""
        path = self.data_dir / RUN_RECORD
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
        # Listeners first: no new work arrives while the rest winds down.
        for port in (self.smtp_port, self.http_port):
            if port is not None:
                await defer.maybeDeferred(port.stopListening)
        self.smtp_port = self.http_port = None
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


class FailedStart(service.Service):
    """What :func:`build_service` returns to twistd when the process cannot even be built (the
    data directory cannot be created, a secret or TLS file is unreadable, the descriptor plan
    does not fit): at start it reports the one line and stops, like a failed start-up step."""

    name = "e2a"

    def __init__(self, failure: Failure, config: Config, reactor: Any, log_observer: ILogObserver | None) -> None:
        self.failure = failure
        self.config = config
        self.reactor = reactor
        self.log_observer = log_observer
        self.started: defer.Deferred[None] = defer.Deferred()
        self.started.addErrback(lambda _: None)  # reported at start; nobody else awaits it

    def setServiceParent(self, parent: Any) -> Any:  # noqa: N802 - Twisted API
        set_log_observer(parent, self.log_observer)
        return super().setServiceParent(parent)

    def startService(self) -> None:  # noqa: N802 - Twisted API
        super().startService()
        self.started.errback(self.failure)
        report_start_failure(self.failure, self.config, self.reactor, exit_process=True)


def freeze_startup_heap() -> None:
    """Collect once, then take every object alive after start-up out of the cyclic garbage
    collector's walks (``gc.freeze``).

    WHY: a full collection walks every object the collector tracks. Start-up leaves about
    90,000 (modules, the config, Twisted's and the libraries' state), and under load a full
    collection came every few seconds and held the reactor 40–60 ms each time: every message in
    flight waited that long for its ``250`` (docs/performance.md, "Python's garbage
    collector"). Frozen, they are never walked again; a full collection then took about 2 ms.
    The cost: an object from start-up that later becomes cyclic garbage is never freed, and
    start-up makes few of those, once.
    """
    gc.collect()
    gc.freeze()


def set_log_observer(parent: Any, observer: ILogObserver | None) -> None:
    if observer is not None and hasattr(parent, "setComponent"):
        parent.setComponent(ILogObserver, observer)


def report_start_failure(failure: Failure, config: Config, reactor: Any, *, exit_process: bool) -> None:
    """One line naming what failed and its key (the traceback only at logging.level: debug);
    with ``exit_process`` the reactor stops and the process exits with the failure's code."""
    assert failure.value is not None
    code, line = describe_failure(failure.value, config, [f[0] for f in failure.frames])
    if config.logging.level == "debug":
        log.failure("e2a failed to start", failure, level=LogLevel.debug)
    log.critical("e2a: {line}", line=line)
    if not exit_process:
        return
    exit_after_shutdown(code)
    if reactor.running:
        reactor.stop()
    else:  # failed before twistd started the reactor (e.g. the data directory)
        reactor.callWhenRunning(reactor.stop)


def plan_descriptors(config: Config) -> FdBudget:
    """Raise the open-file limit, log it, and share it out (e2a.api.limits.plan_fd_budget).

    Raises ConfigError when SMTP's share does not fit; lowers the HTTP cap, with a warning,
    when only HTTP's does not.
    """
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


def _address(port: IListeningPort | None) -> str:
    if port is None:
        return "-"
    host = port.getHost()
    return f"{host.host}:{host.port}"  # type: ignore[attr-defined]


def build_service(
    config: Config,
    reactor: Any,
    *,
    standalone: bool = True,
    log_observer: ILogObserver | None = None,
    sources: ConfigSources | None = None,
    child: ChildSpec | None = None,
) -> E2AService | FailedStart:
    """Build the root service and its whole object graph. ``reactor`` comes from the entry
    point (e2a.tap, e2a.tac, e2a.child); nothing below this module imports the global one.

    ``standalone`` (twistd): a failed start stops the reactor so the process exits instead of
    idling half-started, and a graph that cannot be built becomes a :class:`FailedStart` that
    reports the failure once twistd logs. Tests embedding the service pass False: a build
    failure raises here, a start failure fails ``service.started``.
    ``log_observer`` (e2a.tap): set on the twistd application as its ``ILogObserver``.
    ``sources``: where the config came from, for the start-up log block.
    ``child``: this is one of the extra processes of ``processes: N`` (e2a.child).
    """
    try:
        secrets = resolve_secrets(config)
        return E2AService(
            config, reactor, secrets,
            stop_reactor_on_failure=standalone, freeze_after_start=standalone, child=child, log_observer=log_observer, sources=sources,
        )
    except Exception:
        if not standalone:
            raise
        return FailedStart(Failure(), config, reactor, log_observer)
