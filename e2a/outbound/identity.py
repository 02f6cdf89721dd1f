"""The deployment's own mail identity: the values sending and reviewer mail share.

They come from several config sections (``smtp``, ``outbound_smtp``, ``outbound``, ``dkim``, the
top-level ``shared_domain`` and ``data_dir``); gathering them here once lets
:class:`~e2a.outbound.send.SendService` and :class:`~e2a.outbound.notify.ReviewerNotifier` take
exactly what they use instead of the whole :class:`~e2a.config.Config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2a.config import Config, DkimConfig


@dataclass(frozen=True)
class MailIdentity:
    mail_domain: str  # ``M``: Message-IDs, ``noreply@M``, reviewer mail, the deployment DKIM key
    shared_domain: str  # signed with the deployment's key too
    data_dir: str  # where generated deployment DKIM keys live (``<data_dir>/dkim/``)
    dkim: DkimConfig  # configured deployment key files and the selector
    smtp_domain: str  # trace fields of internal copies (as SMTP would write them)
    authserv_id: str  # authserv-id of their Authentication-Results
    can_relay: bool  # an outbound route exists: ``outbound_smtp.host`` or ``outbound.direct_mx``

    @classmethod
    def from_config(cls, config: Config) -> MailIdentity:
        return cls(
            mail_domain=config.mail_domain,
            shared_domain=config.shared_domain,
            data_dir=config.data_dir,
            dkim=config.dkim,
            smtp_domain=config.smtp.domain,
            authserv_id=config.smtp.effective_authserv_id,
            can_relay=bool(config.outbound_smtp.host or config.outbound.direct_mx),
        )
