"""
Getting a message out: the SMTP transport (ESMTPSenderFactory over plain
TCP, STARTTLS or implicit TLS), the maildir transport used when no SMTP
server is configured, and the L{Outbox} that logs each outcome and lets a
clean stop wait for what is still in flight.

A transport's C{deliver} returns a Deferred that fires once the message is
accepted and fails with a reason otherwise; the outbox is where spooling and
retrying fit in.
"""
from __future__ import annotations

import itertools
import os
import socket
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import getaddresses, parseaddr
from io import BytesIO
from typing import Optional, Sequence

from cryptography.x509 import load_pem_x509_certificates
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from twisted.internet import defer, error as net_error
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.ssl import (Certificate, CertificateOptions,
                                  optionsForClientTLS, platformTrust,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from failnozzle.config import ConfigError

_log = Logger()


class MaildirTransport:
    """
    Writes each message as a file into a maildir's C{new/} (written in
    C{tmp/}, fsynced, renamed), where any mail reader can open it.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = os.path.abspath(path)
        self._clock = clock
        self._serial = itertools.count()

    def describe(self) -> str:
        return f"maildir {self.path}"

    def prepare(self) -> None:
        """
        Create the maildir if needed.

        @raise OSError: it cannot be created.
        """
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)

    def deliver(self, sender: str, recipients: Sequence[str],
                message: EmailMessage) -> defer.Deferred:
        """
        @return: a Deferred firing with the file's path.
        """
        try:
            return defer.succeed(self._write(message))
        except OSError:
            return defer.fail()

    def _write(self, message: EmailMessage) -> str:
        self.prepare()
        name = (f"{int(self._clock.seconds())}.P{os.getpid()}"
                f"Q{next(self._serial)}.{socket.gethostname()}")
        temporary = os.path.join(self.path, "tmp", name)
        final = os.path.join(self.path, "new", name)
        with open(temporary, "wb") as out:
            out.write(message.as_bytes(policy=default_policy))
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, final)
        return final


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
        self._helo_name = helo_name
        self._tls_options = (_tls_options(host, verify, ca_file)
                             if tls != "off" else None)

    def describe(self) -> str:
        return f"SMTP server {self.host}:{self.port}"

    def deliver(self, sender: str, recipients: Sequence[str],
                message: EmailMessage) -> defer.Deferred:
        """
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
            BytesIO(message.as_bytes(policy=default_policy)),
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
            factory.domain = self._helo_name.encode("idna")
        if self.tls == "implicit":
            connector = self._reactor.connectSSL(
                self.host, self.port, factory, self._tls_options,
                timeout=self.timeout)
        else:
            connector = self._reactor.connectTCP(
                self.host, self.port, factory, timeout=self.timeout)
        result.addTimeout(self.timeout, self._reactor)
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
    """

    def smtpState_disconnect(self, code: int, resp: bytes) -> None:
        # The server has answered QUIT; nothing is left to say.  A graceful
        # close would wait for the server's TLS close_notify, which some
        # servers (asyncio's on Python 3.12+) never send, until the timeout.
        self.transport.abortConnection()

    def sendError(self, exc: smtp.SMTPClientError) -> None:
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


def describe_failure(failure: Failure, timeout: float) -> str:
    """
    Why a delivery failed, in a few words a person can act on.
    """
    error = failure.value
    # ESMTPSenderFactory wraps what went wrong on the connection.
    while isinstance(error, smtp.SMTPConnectError) and error.__cause__:
        error = error.__cause__
    if isinstance(error, (defer.TimeoutError, defer.CancelledError,
                          net_error.TimeoutError, smtp.SMTPTimeoutError)):
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
    if isinstance(error, net_error.ConnectionLost):
        return "the connection was lost"
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


class Outbox:
    """
    Hands messages to a transport, logs the outcome in one line, and keeps
    track of deliveries in flight so a clean stop can wait for them.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self._in_flight: set = set()

    def send(self, message: EmailMessage) -> defer.Deferred:
        """
        Deliver one message to the addresses in its To header, from the one
        in its From header.

        @return: a Deferred that fires with True once delivered and False
            if it was not; it never fails.
        """
        subject = message["Subject"]
        sender, recipients = envelope(message)
        attempt = defer.maybeDeferred(self.transport.deliver, sender,
                                      recipients, message)

        def delivered(result: object) -> bool:
            _log.info("Sent {subject!r} to {recipients} via {transport}"
                      "{where}",
                      subject=subject, recipients=", ".join(recipients),
                      transport=self.transport.describe(),
                      where=f": {result}" if isinstance(result, str) else "")
            return True

        def failed(failure: Failure) -> bool:
            _log.error(
                "Could not send {subject!r} to {recipients} via "
                "{transport}: {reason}",
                subject=subject, recipients=", ".join(recipients),
                transport=self.transport.describe(),
                reason=describe_failure(
                    failure, getattr(self.transport, "timeout", 0)),
            )
            return False

        attempt.addCallbacks(delivered, failed)
        self._in_flight.add(attempt)
        attempt.addBoth(self._done, attempt)
        return attempt

    def _done(self, result: bool, attempt: defer.Deferred) -> bool:
        self._in_flight.discard(attempt)
        return result

    def drain(self) -> defer.Deferred:
        """A Deferred that fires when every delivery begun so far is over."""
        return defer.DeferredList(list(self._in_flight)).addCallback(
            lambda _: None)
