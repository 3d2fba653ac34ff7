"""
Getting a message out: the L{Outbox} that spools each message before the
first delivery attempt, retries with backoff and gives up only into
C{failed/}; the SMTP transport (ESMTPSenderFactory over plain TCP, STARTTLS
or implicit TLS); and the maildir transport used when no SMTP server is
configured.

A transport's C{deliver} returns a Deferred that fires once the message is
accepted and fails with the reason otherwise; deciding what to do then is
the outbox's job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP, default as default_policy
from email.utils import getaddresses, parseaddr
from io import BytesIO
from typing import Optional, Sequence

from cryptography.x509 import load_pem_x509_certificates
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import defer, error as net_error
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.ssl import (Certificate, CertificateOptions,
                                  optionsForClientTLS, platformTrust,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from failnozzle.config import ConfigError
from failnozzle.spool import Maildir, Spool, written_at

_log = Logger()


class MaildirTransport:
    """
    Delivers each message as a file into a maildir's C{new/}, where any
    mail reader can open it: the transport when no SMTP server is set.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self._maildir = Maildir(path, clock)
        self.path = self._maildir.path

    def describe(self) -> str:
        return f"maildir {self.path}"

    def prepare(self) -> None:
        """
        Create the maildir if needed.

        @raise OSError: it cannot be created.
        """
        self._maildir.prepare()

    def deliver(self, sender: str, recipients: Sequence[str],
                message: EmailMessage,
                data: Optional[bytes] = None) -> defer.Deferred:
        """
        @param data: C{message} as bytes, if the caller has them already.
        @return: a Deferred firing with the file's path.
        """
        try:
            return defer.succeed(self._maildir.write(
                _bytes_of(message, data)))
        except OSError:
            return defer.fail()


def _bytes_of(message: EmailMessage, data: Optional[bytes]) -> bytes:
    """The message with LF line ends, serialized only if not done yet."""
    return message.as_bytes(policy=default_policy) if data is None else data


class SMTPTransport:
    """
    Sends through an SMTP server with L{smtp.ESMTPSenderFactory}.

    One attempt per message (the outbox decides about trying again), AUTH
    only when a user is configured, TLS as configured with the server's
    certificate checked against C{host} unless C{verify} is off, and every
    attempt bounded by C{timeout} seconds.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        host: str,
        port: int,
        tls: str = "starttls",
        verify: bool = True,
        ca_file: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        timeout: float = 30.0,
        helo_name: Optional[str] = None,
    ) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.tls = tls
        self._user = user.encode("utf-8") if user else None
        self._password = password.encode("utf-8") if password else None
        self.timeout = timeout
        self._helo_name = _helo_name(helo_name) if helo_name else None
        self._tls_options = (_tls_options(host, verify, ca_file)
                             if tls != "off" else None)

    def describe(self) -> str:
        return f"SMTP server {self.host}:{self.port}"

    def deliver(self, sender: str, recipients: Sequence[str],
                message: EmailMessage,
                data: Optional[bytes] = None) -> defer.Deferred:
        """
        @param data: C{message} as bytes, if the caller has them already.
        @return: a Deferred firing once the server accepted the message, or
            failing with the reason it did not.
        """
        def cancel(_: defer.Deferred) -> None:
            # Finished first, so that nothing the connection still does
            # reports to the cancelled Deferred (see _Sender).
            factory.sendFinished = True
            if factory.currentProtocol is not None:
                factory.currentProtocol.transport.abortConnection()
            else:
                connector.disconnect()

        result = defer.Deferred(cancel)
        factory = _SenderFactory(
            self._reactor,
            self._user,
            self._password,
            sender,
            list(recipients),
            # The client turns each LF into CRLF itself.
            BytesIO(_bytes_of(message, data)),
            result,
            retries=0,
            timeout=self.timeout,
            contextFactory=self._tls_options,
            heloFallback=True,
            requireAuthentication=self._user is not None,
            # With implicit TLS the connection is encrypted before SMTP
            # starts, so STARTTLS must not be asked for on top of it.
            requireTransportSecurity=self.tls == "starttls",
        )
        if self._helo_name:
            factory.domain = self._helo_name
        if self.tls == "implicit":
            connector = self._reactor.connectSSL(
                self.host, self.port, factory, self._tls_options,
                timeout=self.timeout)
        else:
            connector = self._reactor.connectTCP(
                self.host, self.port, factory, timeout=self.timeout)
        result.addTimeout(self.timeout, self._reactor)
        result.addCallback(_all_accepted)
        return result


class RecipientsRefused(Exception):
    """
    The server took the message for some of its recipients only.

    @ivar refused: C{(address, code, reply)} for each recipient it refused.
    """

    def __init__(self, refused: list) -> None:
        super().__init__(refused)
        self.refused = refused


def _all_accepted(result: tuple) -> tuple:
    """
    Pass on the result of a delivery only if every recipient was accepted:
    ESMTPSenderFactory calls it a success once one was, so the others
    (a greylisting 451, say) would otherwise be lost without a word.

    @raise RecipientsRefused: some were not.
    """
    _, addresses = result
    refused = [(address.decode("ascii"), code,
                reply.decode("utf-8", "replace"))
               for address, code, reply in addresses
               if code not in smtp.SUCCESS]
    if refused:
        raise RecipientsRefused(refused)
    return result


class _Sender(smtp.ESMTPSender):
    """
    L{smtp.ESMTPSender} that hangs up at once after QUIT and, once the
    outcome is known (delivered, failed or cancelled), meets any later error
    by hanging up.

    Twisted's sender still reports such an error to the factory's Deferred,
    which has fired and is gone by then: an AttributeError in the reactor,
    e.g. when its idle timer fires in the same reactor turn as our timeout,
    or when a server goes silent after accepting the message.

    A connection lost while the message is being sent is reported as such,
    not as the bare "Consumer asked us to stop producing" of Twisted's
    FileSender.
    """

    def smtpState_disconnect(self, code: int, resp: bytes) -> None:
        # The server has answered QUIT; nothing is left to say.  A graceful
        # close would wait for the server's TLS close_notify, which some
        # servers (asyncio's on Python 3.12+) never send, until the timeout.
        self.transport.abortConnection()

    def sendError(self, exc: Exception) -> None:
        if not isinstance(exc, smtp.SMTPClientError):
            # Only FileSender fails with anything else, when the connection
            # ends in the middle of the message.
            lost = smtp.SMTPConnectError(
                -1, "connection lost while sending the message", isFatal=True)
            lost.__cause__ = net_error.ConnectionLost()
            exc = lost
        if self.factory.sendFinished:
            smtp.SMTPClient.sendError(self, exc)
        else:
            super().sendError(exc)


class _SenderFactory(smtp.ESMTPSenderFactory):
    """
    L{smtp.ESMTPSenderFactory} making L{_Sender}s whose idle timer runs on
    the given clock: Twisted's runs on the global reactor whatever reactor
    the connection was made with.
    """

    protocol = _Sender

    def __init__(self, clock: IReactorTime, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock

    def buildProtocol(self, addr) -> _Sender:
        sender = super().buildProtocol(addr)
        sender.callLater = self._clock.callLater
        return sender


def _helo_name(name: str) -> bytes:
    """SERVER_NAME as HELO wants it; a name IDNA refuses is kept as ASCII."""
    try:
        return name.encode("idna")
    except UnicodeError:
        return name.encode("ascii", "replace")


def _tls_options(host: str, verify: bool, ca_file: Optional[str]):
    """
    TLS client options: checked against C{host} unless told otherwise,
    trusting every certificate in C{ca_file} (it may be a bundle) if given,
    else the system's CAs.

    @raise ConfigError: C{ca_file} cannot be read or holds no certificate.
    """
    if not verify:
        return CertificateOptions()
    if ca_file is None:
        return optionsForClientTLS(host, trustRoot=platformTrust())
    try:
        with open(ca_file, "rb") as pem:
            certificates = load_pem_x509_certificates(pem.read())
    except OSError as error:
        raise ConfigError(f"SMTP_CA_FILE: cannot read {ca_file!r}: "
                          f"{error.strerror}") from None
    except ValueError:
        raise ConfigError(
            f"SMTP_CA_FILE: no PEM certificate in {ca_file!r}") from None
    trust = trustRootFromCertificates(
        [Certificate(X509.from_cryptography(c)) for c in certificates])
    return optionsForClientTLS(host, trustRoot=trust)


def _root_error(failure: Failure) -> BaseException:
    """What went wrong, looking through ESMTPSenderFactory's wrapping."""
    error = failure.value
    while isinstance(error, smtp.SMTPConnectError) and error.__cause__:
        error = error.__cause__
    return error


def is_permanent(failure: Failure) -> bool:
    """
    Whether trying again cannot help: the server refused for good (a 5xx
    reply), or its certificate is not valid for the name we asked for.
    Anything else (refused or lost connections, timeouts, TLS handshake
    trouble, 4xx replies) may pass.
    """
    error = _root_error(failure)
    if isinstance(error, VerificationError):
        return True
    if isinstance(error, RecipientsRefused):
        return all(500 <= code <= 599 for _, code, _ in error.refused)
    return (isinstance(error, smtp.SMTPClientError)
            and isinstance(error.code, int) and 500 <= error.code <= 599)


def describe_failure(failure: Failure, timeout: float) -> str:
    """
    Why a delivery failed, in a few words a person can act on.
    """
    error = _root_error(failure)
    if isinstance(error, defer.CancelledError):
        # Only a stop cancels an attempt; a timeout is a TimeoutError.
        return "cut short by the stop (SHUTDOWN_TIMEOUT_SECONDS)"
    if isinstance(error, (defer.TimeoutError, net_error.TimeoutError,
                          smtp.SMTPTimeoutError)):
        return f"no answer within {timeout:g} s"
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net_error.DNSLookupError):
        return "host name not found"
    if isinstance(error, SSL.Error):
        return f"TLS failed: {_openssl_reason(error)}"
    if isinstance(error, VerificationError):
        return (f"TLS failed: the server's certificate is not valid for "
                f"{_mismatched_names(error)}")
    if isinstance(error, smtp.AUTHDeclinedError):
        return f"AUTH rejected: {_smtp_reply(error)}"
    if isinstance(error, smtp.AUTHRequiredError):
        return "the server offers no AUTH method we can use"
    if isinstance(error, smtp.TLSRequiredError):
        return "the server does not offer STARTTLS (SMTP_TLS = 'starttls')"
    if isinstance(error, smtp.SMTPClientError):
        return f"the server replied {_smtp_reply(error)}"
    if isinstance(error, RecipientsRefused):
        return "the server refused " + "; ".join(
            f"{address}: {code} {' '.join(reply.split())}"
            for address, code, reply in error.refused)
    if isinstance(error, net_error.ConnectionLost):
        return "the connection was lost"
    if isinstance(error, net_error.ConnectionDone):
        # A server that hangs up in mid conversation closes cleanly.
        return "the server closed the connection before accepting the message"
    return f"{type(error).__name__}: {error}"


def _smtp_reply(error: smtp.SMTPClientError) -> str:
    response = error.resp
    if isinstance(response, bytes):
        response = response.decode("utf-8", "replace")
    return f"{error.code} {' '.join(str(response).split())}"


def _mismatched_names(error: VerificationError) -> str:
    """The names we asked a certificate for that it does not carry."""
    names = []
    for mismatch in error.errors:
        wanted = mismatch.mismatched_id
        name = (getattr(wanted, "hostname", None)
                or getattr(wanted, "ip", None) or wanted)
        names.append(name.decode("ascii") if isinstance(name, bytes)
                     else str(name))
    return ", ".join(names)


def _openssl_reason(error: SSL.Error) -> str:
    """The readable part of pyOpenSSL's nested error tuples."""
    reasons = [part[2] for part in (error.args[0] if error.args else [])
               if isinstance(part, tuple) and len(part) == 3]
    return "; ".join(reasons) or str(error)


def envelope(message: EmailMessage) -> tuple:
    """
    The bare addresses SMTP's MAIL FROM and RCPT TO want, from headers that
    may say C{Error Reporter <errors@example.com>}.
    """
    sender = parseaddr(str(message["From"]))[1]
    recipients = [address for _, address in getaddresses(
        [str(message["To"])]) if address]
    return sender, recipients


@dataclass(eq=False)
class _Waiting:
    """
    A message the outbox is responsible for until it is delivered or given
    up on.

    @ivar path: its file in the spool; None if the spool could not take it
        and it waits in memory only.
    @ivar recipients: the addresses it is still to reach: at first those
        of its To header, then those a server refused while taking it for
        the others.
    @ivar outcome: fires with True when delivered, False when given up on.
    """

    message: EmailMessage
    data: bytes
    path: Optional[str]
    created: float
    attempts: int = 0
    attempt: Optional[defer.Deferred] = None
    retry: Optional[IDelayedCall] = None
    outcome: defer.Deferred = field(default_factory=defer.Deferred)
    sender: str = field(init=False)
    recipients: list = field(init=False)

    def __post_init__(self) -> None:
        self.sender, self.recipients = envelope(self.message)

    @property
    def kind(self) -> str:
        return str(self.message["X-Failnozzle"])


class Outbox:
    """
    Never loses a message: each one is written to the spool before the
    first delivery attempt and removed only once the server accepted it.
    Temporary failures are retried with exponential backoff, from
    C{retry_min} up to C{retry_max} seconds, for at most C{lifetime}
    seconds; permanent failures and expired messages move to C{failed/}.
    Every outcome is logged in one line.
    """

    def __init__(self, transport, spool: Spool, clock: IReactorTime,
                 retry_min: float = 30, retry_max: float = 1800,
                 lifetime: float = 5 * 24 * 3600) -> None:
        self.spool = spool
        self._clock = clock
        self._waiting: list = []
        self._stopping = False
        self.configure(transport, retry_min, retry_max, lifetime)

    def configure(self, transport, retry_min: float, retry_max: float,
                  lifetime: float) -> None:
        """
        Take new settings (a reload): the next attempts use C{transport}
        and the new delays; messages waiting keep their place.
        """
        self.transport = transport
        self._retry_min = retry_min
        self._retry_max = retry_max
        #: Past this many doublings the delay is retry_max anyway; capping
        #: the exponent keeps a long outage from overflowing a float.
        self._max_doublings = max(0, math.ceil(math.log2(
            retry_max / retry_min)))
        self._lifetime = lifetime

    def waiting_kinds(self) -> set:
        """The kinds (X-Failnozzle) of the messages not delivered yet."""
        return {waiting.kind for waiting in self._waiting}

    def recover(self) -> int:
        """
        Take on the messages a previous run left in the spool, and try to
        deliver them now.

        @return: how many there were.
        """
        try:
            paths = self.spool.waiting.messages()
        except (FileNotFoundError, NotADirectoryError):
            # No spool, so nothing in it; the failure to create it was
            # reported when it happened.
            return 0
        except OSError as error:
            _log.error("Cannot read the spool {path}: {reason}",
                       path=self.spool.path, reason=error.strerror)
            return 0
        for path in paths:
            try:
                with open(path, "rb") as stored:
                    data = stored.read()
            except OSError as error:
                _log.error("Cannot read spooled message {path}: {reason}",
                           path=path, reason=error.strerror)
                continue
            message = message_from_bytes(data, _class=EmailMessage,
                                         policy=SMTP)
            self._take(_Waiting(message, data, path, written_at(path)))
        if paths:
            _log.info("{count} message(s) left in the spool {path} by the "
                      "last run will be sent now", count=len(paths),
                      path=self.spool.path)
        return len(paths)

    def send(self, message: EmailMessage) -> defer.Deferred:
        """
        Spool one message and deliver it to the addresses in its To
        header, from the one in its From header.

        @return: a Deferred firing with True once it is delivered, or False
            once it is given up on; it never fails.
        """
        data = message.as_bytes(policy=default_policy)
        try:
            path = self.spool.add(data)
        except OSError as error:
            path = None
            _log.error("Cannot write to the spool {spool}: {reason}; "
                       "{subject!r} waits in memory only",
                       spool=self.spool.path, reason=error.strerror,
                       subject=message["Subject"])
        waiting = _Waiting(message, data, path, self._clock.seconds())
        self._take(waiting)
        return waiting.outcome

    def _take(self, waiting: _Waiting) -> None:
        self._waiting.append(waiting)
        self._attempt(waiting)

    def _attempt(self, waiting: _Waiting) -> None:
        waiting.retry = None
        waiting.attempts += 1
        attempt = waiting.attempt = defer.maybeDeferred(
            self.transport.deliver, waiting.sender, waiting.recipients,
            waiting.message, waiting.data)
        attempt.addCallbacks(self._delivered, self._failed,
                             callbackArgs=(waiting,), errbackArgs=(waiting,))

    def _delivered(self, result: object, waiting: _Waiting) -> None:
        waiting.attempt = None
        self._waiting.remove(waiting)
        _log.info("Sent {subject!r} to {recipients} via {transport}{where}",
                  subject=waiting.message["Subject"],
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(),
                  where=f": {result}" if isinstance(result, str) else "")
        if waiting.path is not None:
            try:
                self.spool.remove(waiting.path)
            except OSError as error:
                _log.error("Cannot remove delivered message {path} from the "
                           "spool: {reason}; the next start sends it again",
                           path=waiting.path, reason=error.strerror)
        waiting.outcome.callback(True)

    def _failed(self, failure: Failure, waiting: _Waiting) -> None:
        waiting.attempt = None
        if isinstance(failure.value, RecipientsRefused):
            # The others have it; only those refused are to be tried again.
            waiting.recipients = [address for address, _, _
                                  in failure.value.refused]
        reason = describe_failure(failure,
                                  getattr(self.transport, "timeout", 0))
        age = self._clock.seconds() - waiting.created
        if is_permanent(failure) or age >= self._lifetime:
            why = reason if is_permanent(failure) else (
                f"{reason}; still undelivered after {age:.0f} s "
                f"(SPOOL_LIFETIME_SECONDS)")
            self._give_up(waiting, why)
            return
        if self._stopping:
            _log.warn("Could not send {subject!r} via {transport}: {reason}; "
                      "it stays in the spool for the next start",
                      subject=waiting.message["Subject"],
                      transport=self.transport.describe(), reason=reason)
            return
        doublings = min(waiting.attempts - 1, self._max_doublings)
        delay = min(self._retry_min * 2 ** doublings, self._retry_max,
                    self._lifetime - age)
        _log.warn("Could not send {subject!r} to {recipients} via "
                  "{transport}: {reason}; attempt {attempt}, next in "
                  "{delay:g} s",
                  subject=waiting.message["Subject"],
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(), reason=reason,
                  attempt=waiting.attempts, delay=delay)
        waiting.retry = self._clock.callLater(delay, self._attempt, waiting)

    def _give_up(self, waiting: _Waiting, why: str) -> None:
        self._waiting.remove(waiting)
        try:
            where = self.spool.give_up(waiting.path, waiting.data)
        except OSError as error:
            where = (f"nowhere: {self.spool.failed.path} cannot be written "
                     f"({error.strerror}); the message follows\n"
                     f"{waiting.data.decode('utf-8', 'replace')}")
        _log.error("Giving up on {subject!r} to {recipients} via "
                   "{transport}: {why}; the message is kept in {where}",
                   subject=waiting.message["Subject"],
                   recipients=", ".join(waiting.recipients),
                   transport=self.transport.describe(), why=why, where=where)
        waiting.outcome.callback(False)

    def stop(self, timeout: float) -> defer.Deferred:
        """
        Stop retrying, and give the attempts under way up to C{timeout}
        seconds; what is not delivered by then stays in the spool.

        @return: a Deferred firing when that is done.
        """
        self._stopping = True
        for waiting in self._waiting:
            if waiting.retry is not None:
                waiting.retry.cancel()
                waiting.retry = None
        attempts = [w.attempt for w in self._waiting if w.attempt is not None]
        done = defer.DeferredList(attempts)
        done.addTimeout(timeout, self._clock)
        done.addErrback(lambda failure: failure.trap(defer.TimeoutError))
        done.addCallback(self._cancel_attempts)
        return done

    def _cancel_attempts(self, _: object) -> None:
        for waiting in list(self._waiting):
            if waiting.attempt is not None:
                waiting.attempt.cancel()
