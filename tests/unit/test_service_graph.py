"""The composition root builds the whole object graph before anything starts (e2a/service.py)."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest

from twisted.internet import task

from e2a.config import Config, DatabaseConfig, HttpConfig, SmtpConfig
from e2a.service import E2AService, FailedStart, build_service, freeze_startup_heap


def _config(tmp_path: Path, **overrides: object) -> Config:
    config = Config(
        data_dir=str(tmp_path / "data"),
        shared_domain="agents.test",
        # Never connected: building opens no connection.
        database=DatabaseConfig(url="host=127.0.0.1 port=1 dbname=none", pool_size=2),
        http=HttpConfig(listen_addr="127.0.0.1:0"),
        smtp=SmtpConfig(listen_addr="127.0.0.1:0", domain="mx.e2a.test"),
    )
    return dataclasses.replace(config, **overrides)


def _built(config: Config) -> E2AService:
    built = build_service(config, task.Clock(), standalone=False)
    assert isinstance(built, E2AService)
    return built


def test_build_service_wires_every_component_before_start(tmp_path: Path) -> None:
    """Every worker, listener factory and API service exists, shared where it must be, unstarted."""
    svc = _built(_config(tmp_path))
    assert not svc.running and svc.http_port is None and svc.smtp_port is None
    # one delivery port between the accept path and the webhook worker
    assert svc.inbound.delivery is svc.delivery_port and svc.delivery.port is svc.delivery_port
    # one review object for the API routes, the magic-link pages and the expiry worker
    services = svc.api.deps.services
    assert services.hold_review is svc.hold_review is svc.expiry.review
    assert services.send is svc.hold_review.send and services.send.notifier is svc.notifier
    assert services.websocket is svc.websocket and services.metrics is svc.metrics
    assert services.approval_tokens is not None and services.dkim_keygen is not None
    # every component counts into the same metrics
    for component in (svc.inbound, svc.smtp_factory, svc.delivery, svc.outbound, services.send, svc.notifier):
        assert component.metrics is svc.metrics
    # the database handles exist with their DSN, not connected
    assert svc.db.dsn == svc.events._dsn == svc.config.database.url
    assert svc.embedded is None and svc.supervisor is None and svc.processes is None


def test_build_service_with_embedded_postgres_knows_its_dsn_up_front(tmp_path: Path) -> None:
    """Without database.url the embedded server's socket DSN is fixed by the data dir."""
    svc = _built(_config(tmp_path, database=DatabaseConfig(url="")))
    assert svc.embedded is not None and svc.supervisor is not None
    assert svc.db.dsn == svc.embedded.dsn == svc.dsn


def test_build_service_resolves_the_secrets_into_the_data_dir(tmp_path: Path) -> None:
    """A development build creates the data dir with a master key and HMAC secret, reused next time."""
    config = _config(tmp_path)
    first, second = _built(config), _built(config)
    assert len(first.master_key) == 32 and first.hmac_secret
    assert (first.master_key, first.hmac_secret) == (second.master_key, second.hmac_secret)
    assert (tmp_path / "data" / "master.key").exists()


def test_build_service_failure_raises_in_tests_and_defers_under_twistd(tmp_path: Path) -> None:
    """A data_dir that cannot be created: tests get the error, twistd a FailedStart to report."""
    (tmp_path / "file").write_text("not a directory")
    config = _config(tmp_path, data_dir=str(tmp_path / "file" / "data"))
    with pytest.raises(OSError):
        build_service(config, task.Clock(), standalone=False)
    assert isinstance(build_service(config, task.Clock(), standalone=True), FailedStart)


def test_only_a_process_of_its_own_freezes_the_startup_heap(tmp_path: Path) -> None:
    """twistd's service (standalone) freezes what start-up left out of the garbage collector's
    walks; a service embedded in another process (the tests) leaves that process's heap alone."""
    assert _built(_config(tmp_path)).freeze_after_start is False
    own = build_service(_config(tmp_path), task.Clock(), standalone=True)
    assert isinstance(own, E2AService) and own.freeze_after_start is True


def test_freeze_startup_heap_takes_live_objects_out_of_collection() -> None:
    """After it, a full collection no longer walks the objects alive at the call."""
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
