"""Signed remote control: a worker obeys a pidbox command only if a trusted identity with
the right role signed it.

Celery's remote control (shutdown, pool_grow, rate_limit, revoke, inspect ...) is a
message on the `<control_exchange>.pidbox` fanout exchange; any process that can
write to the broker could send one. Bulwark's app plugs in `SignedControl`
(`Bulwark.control_cls`), whose mailbox:

- signs every command it publishes (`SignedMailbox._publish`): the `bulwark_sig`
  header holds the claims (identity, key id, issued-at, expiry, jti) and an
  Ed25519 signature over them, the mailbox's exchange name and the whole message
  (method, arguments, destination, pattern, matcher, ticket, reply_to), so
  `app.control.broadcast`, `inspect`, `revoke` ... and Flower, which uses
  `app.control`, all sign the same way;
- makes the worker's pidbox node a `VerifyingNode` (Celery's `Pidbox` bootstep
  builds it with `app.control.mailbox.Node`): before a command addressed to this
  worker is dispatched, its signature, key, validity, expiry, reply address, the
  sender's role (`roles_for`) and its jti (accepted once per worker) are checked. A
  refused command is not run, is logged as a warning with its reason and audited
  (`control.rejected`); an accepted operator command is audited (`control.accepted`).

With BULWARK_SECURITY=off both sides behave as plain Celery. `operator_actor()` names
the operator in the audit records of the `bulwark` commands that change the fleet.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis
from celery.app.control import Control
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kombu.common import maybe_declare
from kombu.matcher import match
from kombu.pidbox import Mailbox, Node
from kombu.utils import json as kombu_json

from policies import keys
from policies.replay import keep_for
from policies.signing import SIG_HEADER, Claims, canonical, check_signed
from policies.trust import TrustStore
from workers.resources import broker_redis
from workers.security.audit import record
from workers.security.context import Security, security
from workers.settings import get_settings

__all__ = [
    "ACCEPTED",
    "ANY_TRUSTED",
    "AUDIT_IF_CHANGED",
    "CONTROL_TTL",
    "FLEET",
    "REJECTED",
    "ControlVerified",
    "SignedControl",
    "SignedMailbox",
    "VerifyingNode",
    "check_control",
    "operator_actor",
    "roles_for",
    "sign_control",
]

logger = logging.getLogger(__name__)

#: Audit actions of this module.
ACCEPTED, REJECTED = "control.accepted", "control.rejected"
#: Seconds a signed control command stays valid after it is issued.
CONTROL_TTL = 60.0
_DOMAIN = b"bulwark-control-v1\n"

#: Reads that show the fleet's shape, not its tasks: any trusted identity may send them.
ANY_TRUSTED = frozenset(
    {"ping", "clock", "stats", "registered", "dump_tasks", "active_queues", "revoked",
     "dump_revoked"}
)  # fmt: skip
#: Reads that show tasks (their arguments) or the configuration, and the fleet's own
#: traffic (mingle's `hello` also merges revoked ids; gossip's `election`; `heartbeat`):
#: the fleet's identities (worker, operator).
FLEET = frozenset(
    {"active", "dump_active", "reserved", "dump_reserved", "scheduled", "dump_schedule",
     "query_task", "conf", "dump_conf", "report", "memsample", "hello", "heartbeat",
     "election"}
)  # fmt: skip
#: Everything else changes a worker (shutdown, pool_restart, pool_grow/shrink, autoscale,
#: rate_limit, time_limit, revoke*, terminate, add/cancel_consumer, enable/disable_events)
#: or is costly (objgraph, memdump), and so is any command this list does not know:
#: operators only.
OPERATOR_ONLY = ("operator",)
#: Operator commands audited only when they changed something (their reply when they did
#: not): Flower sends `enable_events` to every worker every 5 s, which would flood the log.
AUDIT_IF_CHANGED: Mapping[str, Any] = {"enable_events": {"ok": "task events already enabled"}}


def roles_for(method: str) -> tuple[str, ...]:
    """The roles that may send command `method` (deny by default: operator only)."""
    if method in ANY_TRUSTED:
        return ("producer", "worker", "operator")
    if method in FLEET:
        return ("worker", "operator")
    return OPERATOR_ONLY


def operator_actor() -> str:
    """`operator:<name>` of whoever runs this process: its identity, else the OS user."""
    name = get_settings().security.identity
    if not name:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):
            name = "unknown"
    return f"operator:{name}"


# -- the signature (pure) ---------------------------------------------------------------------


def plain(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as both ends see it: through kombu's JSON and back (tuples are lists,
    a datetime is kombu's tagged object)."""
    encoded: str = kombu_json.dumps(dict(message))  # type: ignore[no-untyped-call]
    return json.loads(encoded)  # type: ignore[no-any-return]


def _input(claims: Claims, mailbox: str, message: Mapping[str, Any]) -> bytes:
    return _DOMAIN + canonical(
        {"claims": asdict(claims), "mailbox": mailbox, "message": plain(message)}
    )


def sign_control(
    key: Ed25519PrivateKey, claims: Claims, mailbox: str, message: Mapping[str, Any]
) -> dict[str, Any]:
    """The `bulwark_sig` header of a control message: the claims and their signature."""
    signature = key.sign(_input(claims, mailbox, message))
    return {**asdict(claims), "sig": base64.b64encode(signature).decode()}


@dataclass(frozen=True, slots=True)
class ControlVerified:
    """Who sent a command, as its good signature says; `refused` is why it may not run
    (its role), or None."""

    claims: Claims
    role: str
    refused: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.claims.iss}"


def check_control(
    trust: TrustStore,
    mailbox: str,
    reply_exchange: str,
    message: Mapping[str, Any],
    sig: Any,
    *,
    now: float,
    skew: float = 30.0,
) -> ControlVerified | str:
    """Verify a received control command: signature, key, validity, expiry, reply address,
    then the sender's role. A string: refused, and the sender is not proven; a
    `ControlVerified` with `refused`: a trusted sender that may not send this command.
    The replay check (a jti once per worker) needs Redis and is the caller's."""
    checked = check_signed(
        trust, sig, lambda claims: _input(claims, mailbox, message), now=now, skew=skew,
        who="identity",
    )  # fmt: skip
    if isinstance(checked, str):
        return checked.replace("message is not signed", "command is not signed")
    claims, identity = checked
    method = message.get("method")
    if not isinstance(method, str):
        return "method is not text"
    reply_to = message.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, dict)
        and reply_to.get("exchange") == reply_exchange
        and isinstance(reply_to.get("routing_key"), str)
    ):
        return f"reply_to is not this mailbox's reply exchange ({reply_exchange})"
    allowed = roles_for(method)
    refused = None
    if identity.role not in allowed:
        refused = (
            f"{identity.role} {claims.iss!r} may not send {method!r} (needs {' or '.join(allowed)})"
        )
    return ControlVerified(claims, identity.role, refused)


def _claimed_actor(sig: Any) -> str:
    """Who a refused command says it is from (not proven): `unverified:<iss>`, or 'unsigned'."""
    iss = sig.get("iss") if isinstance(sig, dict) else None
    return f"unverified:{iss[:128]}" if isinstance(iss, str) else "unsigned"


# -- Celery / kombu ---------------------------------------------------------------------------


def _node_key(hostname: str, jti: str) -> str:
    node = hashlib.sha256(hostname.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return keys.key("control", node, f"jti:{jti}")


class VerifyingNode(Node):
    """A worker's pidbox node that dispatches only commands it may obey."""

    hostname: str
    mailbox: Any

    def handle_message(self, body: Any, message: Any = None) -> Any:
        context = security()
        if not context.enabled:
            return super().handle_message(body, message)
        if not isinstance(body, dict):
            self._refuse(body, "unsigned", "command is not an object", None)
            return None
        if not self._for_me(body):
            return None  # another worker's: not ours to judge
        headers = getattr(message, "headers", None)
        sig = headers.get(SIG_HEADER) if isinstance(headers, dict) else None
        verdict = self._check(context, body, sig)
        if isinstance(verdict, str):
            self._refuse(body, _claimed_actor(sig), verdict, None)
            return None
        if verdict.refused is not None:
            self._refuse(body, verdict.actor, verdict.refused, verdict)
            return None
        method = body["method"]
        if roles_for(method) != OPERATOR_ONLY:
            return super().handle_message(body, message)  # a read: not audited
        if method not in AUDIT_IF_CHANGED:
            self._accepted(verdict, body)  # before: `shutdown` does not return
            return super().handle_message(body, message)
        reply = super().handle_message(body, message)
        if reply != AUDIT_IF_CHANGED[method]:
            self._accepted(verdict, body)
        return reply

    def _accepted(self, verdict: ControlVerified, body: Mapping[str, Any]) -> None:
        record(ACCEPTED, actor=verdict.actor, method=body["method"],
               arguments=_short(body.get("arguments")), jti=verdict.claims.jti,
               worker=self.hostname)  # fmt: skip

    def _for_me(self, body: Mapping[str, Any]) -> bool:
        """kombu's own addressing (`Node.handle_message`), for hostile values too."""
        destination, pattern, matcher = (body.get(k) for k in ("destination", "pattern",
                                                              "matcher"))  # fmt: skip
        try:
            if destination:
                return self.hostname in destination
            if pattern and matcher:
                return bool(match(self.hostname, pattern, matcher))
        except Exception:
            return False
        return True

    def _check(self, context: Security, body: Mapping[str, Any], sig: Any) -> ControlVerified | str:
        problem = context.verifying_problem()
        if problem is not None:
            return problem
        assert context.trust is not None
        now = time.time()
        verdict = check_control(
            context.trust.get(),
            self.mailbox.exchange.name,
            self.mailbox.reply_exchange.name,
            body,
            sig,
            now=now,
            skew=context.settings.clock_skew,
        )
        if isinstance(verdict, str) or verdict.refused is not None:
            return verdict
        claims = verdict.claims
        try:
            first = broker_redis().set(
                _node_key(self.hostname, claims.jti), "1", nx=True, ex=keep_for(claims.exp)
            )
        except redis.RedisError as exc:
            return f"replay record unreachable ({type(exc).__name__}); not run"
        if not first:
            return f"replayed command (jti {claims.jti} already seen by this worker)"
        return verdict

    def _refuse(self, body: Any, actor: str, reason: str, verified: ControlVerified | None) -> None:
        method = str(body.get("method") if isinstance(body, dict) else None)[:100]
        logger.warning(
            "control command %s refused: %s",
            method,
            reason,
            extra={"method": method, "reason": reason, "actor": actor},
        )
        record(REJECTED, actor=actor, method=method, reason=reason, worker=self.hostname)
        reply_to = body.get("reply_to") if isinstance(body, dict) else None
        if verified is not None and reply_to is not None:
            # A trusted sender whose role falls short hears why; its (signed, checked)
            # reply address is safe to write to. A forged command gets no reply at all.
            try:
                self.reply({self.hostname: {"error": f"refused: {reason}"}},
                           exchange=reply_to["exchange"], routing_key=reply_to["routing_key"],
                           ticket=body.get("ticket"))  # fmt: skip
            except Exception:
                logger.exception("could not reply to a refused control command")


def _short(arguments: Any) -> str:
    try:
        return canonical(plain({"a": arguments})["a"]).decode()[:300]
    except (TypeError, ValueError, RecursionError):
        return "<not JSON>"


class SignedMailbox(Mailbox):
    """kombu's pidbox mailbox, signing what it publishes; its nodes verify."""

    node_cls = VerifyingNode
    connection: Any
    exchange: Any
    reply_exchange: Any

    def _publish(
        self,
        type: str,
        arguments: Any,
        destination: Any = None,
        reply_ticket: Any = None,
        channel: Any = None,
        timeout: float | None = None,
        serializer: Any = None,
        producer: Any = None,
        pattern: Any = None,
        matcher: Any = None,
    ) -> None:
        # kombu 5.7's `Mailbox._publish`, with the signature header: kombu builds the
        # message and its headers in this one method, with no hook in between.
        message: dict[str, Any] = {
            "method": type,
            "arguments": arguments,
            "destination": destination,
            "pattern": pattern,
            "matcher": matcher,
        }
        chan = channel or self.connection.default_channel
        exchange = self.exchange
        if reply_ticket:
            maybe_declare(self.reply_queue(chan))
            message.update(
                ticket=reply_ticket,
                reply_to={"exchange": self.reply_exchange.name, "routing_key": self.oid},
            )
        headers: dict[str, Any] = {
            "clock": self.clock.forward(),
            "expires": time.time() + timeout if timeout else 0,
        }
        self._sign(message, headers)
        serializer = serializer or self.serializer
        with self.producer_or_acquire(producer, chan) as prod:
            prod.publish(
                message,
                exchange=exchange.name,
                declare=[exchange],
                headers=headers,
                serializer=serializer,
                retry=True,
            )

    def _sign(self, message: dict[str, Any], headers: dict[str, Any]) -> None:
        context = security()
        if not context.enabled:
            return
        problem = context.signing_problem()
        if problem is not None:
            logger.error("control command %s sent unsigned: %s", message["method"], problem)
            return
        assert context.key is not None and context.identity is not None
        assert context.kid is not None
        now = int(time.time())
        claims = Claims(context.identity, context.kid, now, int(now + CONTROL_TTL),
                        uuid.uuid4().hex)  # fmt: skip
        headers[SIG_HEADER] = sign_control(context.key, claims, self.exchange.name, message)


class SignedControl(Control):  # type: ignore[misc]
    """`app.control` whose commands are signed, and whose worker nodes verify them."""

    Mailbox = SignedMailbox
