"""
Getting a message out: the L{Outbox} that spools each message before the
first delivery attempt, retries with backoff and gives up only into
C{failed/}; the SMTP transport (ESMTPSenderFactory over plain TCP, STARTTLS
or implicit TLS, or whichever of the two works when SMTP_TLS is unset); and
the maildir transport used when no SMTP server is configured.

A transport's C{deliver} returns a Deferred that fires once the message is
accepted and fails with the reason otherwise; deciding what to do then is
the outbox's job.
"""
from __future__ import annotations

import enum
import math
import re
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
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import (Certificate, CertificateOptions,
                                  optionsForClientTLS, platformTrust,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from failnozzle.config import ConfigError, Settings
from failnozzle.shrink import shrink, wire_size
from failnozzle.spool import BadEntry, Maildir, Spool, read_entry, written_at
from failnozzle.writer import InlineWriter, Writer

_log = Logger()


class MaildirTransport:
    """
    Delivers each message as a file into a maildir's C{new/}, where any
    mail reader can open it: the transport when no SMTP server is set.
    """

    def __init__(self, path: str, clock: IReactorTime,
                 writer: Optional[Writer] = None) -> None:
        """
        @param writer: writes the files; by default at once.
        """
        self._maildir = Maildir(path, clock)
        self._writer = writer or InlineWriter()
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
        @return: a Deferred firing with the file's path, or failing with
            the OSError that kept it from being written.
        """
        return self._writer.run(self._maildir.write, _bytes_of(message, data))


def _bytes_of(message: EmailMessage, data: Optional[bytes]) -> bytes:
    """The message with LF line ends, serialized only if not done yet."""
    return message.as_bytes(policy=default_policy) if data is None else data


#: How each TLS mode is named in the log.
_MODE_NAMES = {"starttls": "STARTTLS", "implicit": "implicit TLS",
               "off": "no TLS"}


class SMTPTransport:
    """
    Sends through an SMTP server with L{smtp.ESMTPSenderFactory}.

    One attempt per message (the outbox decides about trying again), AUTH
    only when a user is configured, TLS as configured with the server's
    certificate checked against C{host} unless C{verify} is off, and every
    attempt bounded by C{timeout} seconds.

    With C{tls} None the mode is found out: implicit TLS first on port 465,
    STARTTLS first on any other.  A server that says nothing for
    C{greeting_wait} seconds may be waiting for a TLS handshake (the
    original failnozzle spoke TLS from the first byte on any port): it is
    tried with implicit TLS; one that answers a TLS handshake in plain text
    is tried with STARTTLS.  Certificates are checked either way, and
    nothing is ever sent in clear.  The first mode a message goes through
    is kept, and logged once.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        host: str,
        port: int,
        tls: Optional[str] = None,
        verify: bool = True,
        ca_file: Optional[str] = None,
        user: Optional[str] = None,
        password: Optional[str] = None,
        timeout: float = 30.0,
        helo_name: Optional[str] = None,
        greeting_wait: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self.host = host
        self.port = port
        self.tls = tls
        #: The mode tried first; once one worked, the only one.
        self.mode = tls or ("implicit" if port == 465 else "starttls")
        self._finding_mode = tls is None
        #: Whether a STARTTLS attempt gives up on a server silent for
        #: greeting_wait: not once a server answered implicit TLS in clear.
        self._doubting_silence = True
        # Well within the attempt's timeout, which would end it first.
        self._greeting_wait = min(greeting_wait, timeout / 2)
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
        data = _bytes_of(message, data)
        mode = self.mode
        attempt = self._connect(
            mode, sender, recipients, data,
            greeting_wait=self._greeting_wait if self._finding_mode
            and mode == "starttls" and self._doubting_silence else None)
        if self._finding_mode:
            attempt.addCallbacks(
                self._mode_worked, self._try_other_mode,
                callbackArgs=(mode,),
                errbackArgs=(mode, sender, recipients, data))
        return attempt

    def _try_other_mode(self, failure: Failure, mode: str, sender: str,
                        recipients: Sequence[str], data: bytes):
        if not _points_to_other_mode(failure, mode):
            if _spoke_smtp(_root_error(failure)):
                self._mode_worked(None, mode)
            return failure
        if mode == "implicit":
            # It speaks in clear first: no need to doubt a slow greeting.
            self._doubting_silence = False
        other = "starttls" if mode == "implicit" else "implicit"
        attempt = self._connect(other, sender, recipients, data, None)
        attempt.addCallbacks(self._mode_worked, self._other_mode_failed,
                             callbackArgs=(other,),
                             errbackArgs=(failure, other))
        return attempt

    def _other_mode_failed(self, second: Failure, first: Failure,
                           mode: str) -> None:
        if _spoke_smtp(_root_error(second)):
            self._mode_worked(None, mode)
        raise BothModesFailed(first, second, mode)

    def _mode_worked(self, result: object, mode: str) -> object:
        if self._finding_mode:
            self._finding_mode = False
            self.mode = mode
            _log.info("SMTP_TLS is not set: {transport} takes mail over "
                      "{mode}, which failnozzle uses from now on",
                      transport=self.describe(), mode=_MODE_NAMES[mode])
        return result

    def _connect(self, mode: str, sender: str, recipients: Sequence[str],
                 data: bytes, greeting_wait: Optional[float]
                 ) -> defer.Deferred:
        """
        One connection in C{mode}, sending C{data}.

        @param greeting_wait: how long to wait for the server's greeting,
            if not as long as for any reply.
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
            self.describe(),
            data,
            greeting_wait,
            self._user,
            self._password,
            sender,
            list(recipients),
            BytesIO(data),
            result,
            retries=0,
            timeout=self.timeout,
            contextFactory=self._tls_options,
            heloFallback=True,
            requireAuthentication=self._user is not None,
            # With implicit TLS the connection is encrypted before SMTP
            # starts, so STARTTLS must not be asked for on top of it.
            requireTransportSecurity=mode == "starttls",
        )
        if self._helo_name:
            factory.domain = self._helo_name
        if mode == "implicit":
            connector = self._reactor.connectSSL(
                self.host, self.port, factory, self._tls_options,
                timeout=self.timeout)
        else:
            connector = self._reactor.connectTCP(
                self.host, self.port, factory, timeout=self.timeout)
        result.addTimeout(self.timeout, self._reactor)
        result.addErrback(_classify, factory)
        result.addCallback(_all_accepted)
        return result


def _points_to_other_mode(failure: Failure, mode: str) -> bool:
    """
    Whether a failure in C{mode} says the server speaks the other: silence
    where STARTTLS expects a greeting, a TLS handshake answered in plain
    text.  A certificate that fails its check points nowhere.
    """
    error = _root_error(failure)
    if mode == "starttls":
        return isinstance(error, NoGreeting)
    return isinstance(error, SSL.Error) and not _is_verify_failure(error)


def _is_verify_failure(error: SSL.Error) -> bool:
    return "certificate verify failed" in _openssl_reason(error)


def _spoke_smtp(error: BaseException) -> bool:
    """Whether a failure came after the connection's mode had worked."""
    if isinstance(error, (RecipientsRefused, MessageTooBig,
                          UnconfirmedDelivery)):
        return True
    return (isinstance(error, smtp.SMTPClientError) and error.code >= 200
            and not isinstance(error, smtp.TLSRequiredError))


class BothModesFailed(Exception):
    """
    SMTP_TLS is unset, and neither STARTTLS nor implicit TLS went through.

    @ivar first: why the first mode failed.
    @ivar second: why the other one, C{mode}, failed then.
    """

    def __init__(self, first: Failure, second: Failure, mode: str) -> None:
        super().__init__(first, second, mode)
        self.first = first
        self.second = second
        self.mode = mode


class NoGreeting(smtp.SMTPClientError):
    """
    A server said nothing within the greeting wait: it may expect TLS from
    the first byte.
    """

    def __init__(self, wait: float) -> None:
        super().__init__(-1, f"no greeting within {wait:g} s".encode(),
                         isFatal=True)
        self.wait = wait


class RecipientsRefused(Exception):
    """
    The server took the message for some of its recipients only.

    @ivar refused: C{(address, code, reply)} for each recipient it refused.
    """

    def __init__(self, refused: list) -> None:
        super().__init__(refused)
        self.refused = refused


class UnconfirmedDelivery(Exception):
    """
    The whole message went out, then no reply to its end came: the server
    may well have kept it.

    @ivar cause: what happened instead of the reply.
    """

    def __init__(self, cause: Failure) -> None:
        super().__init__(cause)
        self.cause = cause


class MessageTooBig(Exception):
    """
    The server refused the message for its size.

    @ivar sent: the size of what was offered, on the wire.
    @ivar reply: the server's refusal.
    """

    def __init__(self, sent: int, reply: smtp.SMTPClientError) -> None:
        super().__init__(sent, reply)
        self.sent = sent
        self.reply = reply


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


def _classify(failure: Failure, factory: _SenderFactory) -> Failure:
    """
    Tell the two failures the outbox meets differently: no reply after the
    end of the message (it may have been kept), and a refusal for size.

    @raise UnconfirmedDelivery: the first.
    @raise MessageTooBig: the second.
    """
    if failure.check(defer.CancelledError):
        return failure
    if factory.awaiting_reply:
        raise UnconfirmedDelivery(failure)
    error = _root_error(failure)
    if _refused_for_size(error):
        raise MessageTooBig(factory.sent_size, error)
    return failure


#: Enhanced status codes (RFC 3463) that mean "too big": X.3.4 "message
#: too big for system", X.2.3 "message length exceeds administrative limit".
_SIZE_STATUSES = {b"3.4", b"2.3"}
_ENHANCED_STATUS = re.compile(rb"\s*[245]\.(\d{1,3}\.\d{1,3})\b")


def _refused_for_size(error: BaseException) -> bool:
    """
    Whether a server's refusal is about the message's size: its enhanced
    status says so, or it is a bare 552 to the message itself (at least one
    recipient was accepted, so it is not one more recipient's refusal).
    """
    if not isinstance(error, smtp.SMTPDeliveryError):
        return False
    reply = error.resp if isinstance(error.resp, bytes) else b""
    status = _ENHANCED_STATUS.match(reply)
    if status:
        return status.group(1) in _SIZE_STATUSES
    return error.code == 552 and any(
        code in smtp.SUCCESS for _, code, _ in error.addresses or ())


class _Sender(smtp.ESMTPSender):
    """
    L{smtp.ESMTPSender} that:

      - hangs up at once after QUIT and, once the outcome is known
        (delivered, failed or cancelled), meets any later error by hanging
        up.  Twisted's sender still reports such an error to the factory's
        Deferred, which has fired and is gone by then: an AttributeError in
        the reactor, e.g. when its idle timer fires in the same reactor
        turn as our timeout, or when a server goes silent after accepting
        the message;
      - reports a connection lost while the message is being sent as such,
        not as the bare "Consumer asked us to stop producing" of Twisted's
        FileSender;
      - gives up on a server silent for the factory's C{greeting_wait};
      - cuts the message to the SIZE the server announces;
      - tells the factory while it waits for the reply to the end of the
        message.
    """

    _greeting_timer: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.factory.greeting_wait is not None:
            self._greeting_timer = self.callLater(
                self.factory.greeting_wait, self.sendError,
                NoGreeting(self.factory.greeting_wait))

    def lineReceived(self, line: bytes):
        self._stop_greeting_timer()
        return super().lineReceived(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_greeting_timer()
        # Kept for the factory: through TLS it is the real reason (such as
        # a certificate for another name), which older Twisted releases do
        # not hand on.
        self.factory.lost_reason = reason
        super().connectionLost(reason)

    def _stop_greeting_timer(self) -> None:
        if self._greeting_timer is not None and self._greeting_timer.active():
            self._greeting_timer.cancel()
        self._greeting_timer = None

    def tryTLS(self, code: int, resp: bytes, items: dict) -> None:
        self.factory.server_size = _announced_size(items.get(b"SIZE"))
        super().tryTLS(code, resp, items)

    def getMailData(self) -> BytesIO:
        data = self.factory.data
        limit = self.factory.server_size
        size = wire_size(data)
        if limit is not None and size > limit:
            try:
                data = shrink(data, limit, f"the mail server takes at most "
                                           f"{limit:,} bytes (SIZE)")
            except ValueError as error:
                # Offered whole: the server's refusal tells the outbox.
                _log.warn("Cannot cut a message of {size:,} bytes to the "
                          "{limit:,} bytes {server} takes (SIZE): {reason}",
                          size=size, limit=limit, server=self.factory.server,
                          reason=error)
            else:
                _log.info("Cutting a message of {size:,} bytes to the "
                          "{limit:,} bytes {server} takes (SIZE)", size=size,
                          limit=limit, server=self.factory.server)
        self.factory.sent_size = wire_size(data)
        return BytesIO(data)

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        super().finishedFileTransfer(lastsent)
        self.factory.awaiting_reply = True

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        self.factory.awaiting_reply = False
        super().smtpState_msgSent(code, resp)

    def smtpState_disconnect(self, code: int, resp: bytes) -> None:
        # The server has answered QUIT; nothing is left to say.  A graceful
        # close would wait for the server's TLS close_notify, which some
        # servers (asyncio's on Python 3.12+) never send, until the timeout.
        self.transport.abortConnection()

    def sendError(self, exc: Exception) -> None:
        self._stop_greeting_timer()
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


def _announced_size(value: Optional[bytes]) -> Optional[int]:
    """The limit of an EHLO's SIZE line; None for none or nonsense."""
    if value is None or not value.isdigit() or len(value) > 18:
        return None
    return int(value) or None


class _SenderFactory(smtp.ESMTPSenderFactory):
    """
    L{smtp.ESMTPSenderFactory} making L{_Sender}s whose timers run on the
    given clock (Twisted's idle timer runs on the global reactor whatever
    reactor the connection was made with), and failing with the reason the
    connection gave, the same way on every Twisted release.

    @ivar server: the server, as the log names it.
    @ivar data: the message, with LF line ends.
    @ivar greeting_wait: how long to wait for the greeting, or None to
        wait as long as for any reply.
    @ivar server_size: the SIZE the server announced, if it did.
    @ivar sent_size: the size on the wire of what was offered.
    @ivar awaiting_reply: the end of the message was sent, and no reply
        to it came yet.
    @ivar lost_reason: why the connection ended, as the protocol saw it.
    """

    protocol = _Sender

    def __init__(self, clock: IReactorTime, server: str, data: bytes,
                 greeting_wait: Optional[float], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock
        self.server = server
        self.data = data
        self.greeting_wait = greeting_wait
        self.server_size: Optional[int] = None
        self.sent_size = wire_size(data)
        self.awaiting_reply = False
        self.lost_reason: Optional[Failure] = None

    def buildProtocol(self, addr) -> _Sender:
        sender = super().buildProtocol(addr)
        sender.callLater = self._clock.callLater
        return sender

    def clientConnectionLost(self, connector, reason: Failure) -> None:
        self.currentProtocol = None
        if not self.sendFinished:
            self.sendFinished = True
            self.result.errback(self.lost_reason or reason)


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
    """
    What went wrong, looking through ESMTPSenderFactory's wrapping and, when
    both TLS modes were tried, at the last one's failure.
    """
    error = failure.value
    while True:
        if isinstance(error, BothModesFailed):
            error = error.second.value
        elif isinstance(error, smtp.SMTPConnectError) and error.__cause__:
            error = error.__cause__
        else:
            return error


def _caused_by(error: BaseException, kind: type) -> bool:
    """Whether C{error}, or any error it was raised from, is a C{kind}."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def is_permanent(failure: Failure) -> bool:
    """
    Whether trying again cannot help: the server refused for good (a 5xx
    reply), or its certificate is not valid for the name we asked for,
    however the TLS stack wrapped that.  Anything else (refused or lost
    connections, timeouts, other TLS handshake trouble, 4xx replies, no
    reply after the end of the message, a refusal for size) may pass.
    """
    error = _root_error(failure)
    if _caused_by(error, VerificationError):
        return True
    if isinstance(error, RecipientsRefused):
        return all(500 <= code <= 599 for _, code, _ in error.refused)
    return (isinstance(error, smtp.SMTPClientError)
            and isinstance(error.code, int) and 500 <= error.code <= 599)


def describe_failure(failure: Failure, timeout: float) -> str:
    """
    Why a delivery failed, in a few words a person can act on.
    """
    if isinstance(failure.value, BothModesFailed):
        both = failure.value
        return (f"{describe_failure(both.first, timeout)}; then over "
                f"{_MODE_NAMES[both.mode]}: "
                f"{describe_failure(both.second, timeout)}")
    error = _root_error(failure)
    if isinstance(error, UnconfirmedDelivery):
        cause = _root_error(error.cause)
        what = ("the server closed the connection"
                if isinstance(cause, net_error.ConnectionDone)
                else describe_failure(error.cause, timeout))
        return (f"{what} after the end of the message, before replying to "
                f"it: the server may have kept it")
    if isinstance(error, MessageTooBig):
        return (f"the server refused the message ({error.sent:,} bytes) as "
                f"too big: {_smtp_reply(error.reply)}")
    if isinstance(error, NoGreeting):
        return (f"no greeting within {error.wait:g} s (a server waiting for "
                f"TLS from the first byte?)")
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
        return ("the server does not offer STARTTLS (nothing is sent in "
                "clear unless SMTP_TLS = 'off')")
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
    sender = parseaddr(str(message.get("From", "")))[1]
    recipients = [address for _, address in getaddresses(
        [str(message.get("To", ""))]) if address]
    return sender, recipients


#: An address as the settings take it (local@domain) in printable ASCII,
#: the only kind SMTP without SMTPUTF8 carries.
_PLAIN_ADDRESS = re.compile(r"[!-;=?A-~]+@[!-;=?A-~]+")


def _sendable(data: bytes) -> tuple:
    """
    A spooled message and its envelope, if it has one SMTP can carry.

    @return: C{(message, sender, recipients)}.
    @raise ValueError: it has no usable From or To header.
    """
    try:
        message = message_from_bytes(data, _class=EmailMessage, policy=SMTP)
        sender, recipients = envelope(message)
        kind = str(message["X-Failnozzle"])
    # The email package meets odd headers with many kinds of error; after
    # a restart the spool may hold anything.
    except Exception as error:
        raise ValueError(f"its headers cannot be read ({error!r})") from None
    for name, addresses in (("From", [sender]), ("To", recipients)):
        if not addresses or not all(_PLAIN_ADDRESS.fullmatch(address)
                                    for address in addresses):
            raise ValueError(f"it has no usable {name} header")
    if not kind.isprintable():
        raise ValueError("its X-Failnozzle header is not text")
    return message, sender, recipients


class _State(enum.Enum):
    SPOOLING = "being written to the spool"
    READY = "waiting for its next attempt"
    SENDING = "in the middle of an attempt"
    FINISHING = "delivered or given up on, its file being moved"


@dataclass(frozen=True)
class Sending:
    """
    What becomes of a message handed to the outbox.

    @ivar spooled: fires with True once it is on disk, False if the spool
        could not take it (it waits in memory then, and is delivered all
        the same); never fails.
    @ivar outcome: fires with True once it is delivered (or probably
        delivered, see L{Outbox}), False once it is given up on into
        C{failed/}; never fails.
    """

    spooled: defer.Deferred
    outcome: defer.Deferred


@dataclass(eq=False)
class _Waiting:
    """
    A message the outbox is responsible for until it is delivered or given
    up on.

    @ivar data: the message as spooled, with LF line ends.
    @ivar path: its file in the spool; None while it is being written, or
        if the spool could not take it and it waits in memory only.
    @ivar recipients: the addresses it is still to reach: at first those
        of its To header, then those a server refused while taking it for
        the others.
    @ivar offered: what is offered to the server: C{data}, or C{data} cut
        (to DIGEST_MAX_BYTES, or after a server refused it for its size);
        None until the first attempt.
    @ivar failures: attempts in a row that failed for a reason worth a
        wait (the backoff doubles with each).
    @ivar unconfirmed: attempts whose end the server never answered.
    @ivar successor: the message that replaced this one (L{Outbox.replace}).
    @ivar replaced: the spool files of the messages this one replaced, to
        be removed once it is on disk or done with.
    @ivar followers: the outcomes of the messages this one replaced, to
        fire with its own.
    """

    message: EmailMessage
    data: bytes
    created: float
    sender: str
    recipients: list
    path: Optional[str] = None
    state: _State = _State.SPOOLING
    attempts: int = 0
    failures: int = 0
    unconfirmed: int = 0
    offered: Optional[bytes] = None
    attempt: Optional[defer.Deferred] = None
    retry: Optional[IDelayedCall] = None
    successor: Optional[_Waiting] = None
    replaced: list = field(default_factory=list)
    followers: list = field(default_factory=list)
    spooled: defer.Deferred = field(default_factory=defer.Deferred)
    outcome: defer.Deferred = field(default_factory=defer.Deferred)

    @property
    def kind(self) -> str:
        return str(self.message["X-Failnozzle"])

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])


class Outbox:
    """
    Never loses a message: each one is written to the spool before the
    first delivery attempt and removed only once the server accepted it.
    Temporary failures are retried with exponential backoff, from
    C{retry_min} up to C{retry_max} seconds, for at most C{lifetime}
    seconds; permanent failures and expired messages move to C{failed/}.

    A message whose whole content went out but whose end the server never
    answered may have been kept: it is tried C{unconfirmed_retries} more
    times, then moved to C{unconfirmed/} as probably delivered, its outcome
    True.  A message larger than C{max_bytes}, or than a server takes, is
    cut (see L{failnozzle.shrink}); one a server refuses for its size is
    cut to half that size and tried again at once.

    Every disk write goes through C{writer}, and every outcome is logged
    in one line.
    """

    def __init__(self, transport, spool: Spool, clock: IReactorTime,
                 retry_min: float = 30, retry_max: float = 1800,
                 lifetime: float = 5 * 24 * 3600,
                 writer: Optional[Writer] = None,
                 max_bytes: int = Settings.DIGEST_MAX_BYTES,
                 unconfirmed_retries: int = 2) -> None:
        """
        @param writer: writes the spool; by default at once, in the
            reactor's thread.
        """
        self.transport = transport
        self.spool = spool
        self._clock = clock
        self._writer = writer or InlineWriter()
        self._retry_min = retry_min
        self._retry_max = retry_max
        #: Past this many doublings the delay is retry_max anyway; capping
        #: the exponent keeps a long outage from overflowing a float.
        self._max_doublings = max(0, math.ceil(math.log2(
            retry_max / retry_min)))
        self._lifetime = lifetime
        self._max_bytes = max_bytes
        self._unconfirmed_retries = unconfirmed_retries
        self._waiting: list = []
        #: A stop began: no more retries.
        self._stopping = False
        #: The stop's wait is over: no more attempts at all.
        self._stopped = False
        self._settle_waiters: list = []

    def waiting_kinds(self) -> set:
        """
        The kinds (X-Failnozzle) of the messages not delivered yet, those
        still being spooled included.
        """
        return {waiting.kind for waiting in self._waiting
                if waiting.state is not _State.FINISHING}

    def recover(self) -> int:
        """
        Take on the messages a previous run left in the spool, and try to
        deliver them now.  An entry that is no message to send (not a
        regular file, unreadable, without a usable From or To) is moved to
        C{bad/} with one line in the log, and start-up goes on.

        @return: how many messages there were.
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
        recovered = [waiting for waiting in map(self._recovered, paths)
                     if waiting is not None]
        if recovered:
            _log.info("{count} message(s) left in the spool {path} by the "
                      "last run will be sent now", count=len(recovered),
                      path=self.spool.path)
        for waiting in recovered:
            self._waiting.append(waiting)
            waiting.spooled.callback(True)
            self._attempt(waiting)
        return len(recovered)

    def _recovered(self, path: str) -> Optional[_Waiting]:
        """The message spooled at C{path}, or None if it is none."""
        try:
            data, size = read_entry(path, self._max_bytes)
            if size > len(data):
                data = shrink(data, self._max_bytes,
                              f"only {self._max_bytes:,} bytes of it were "
                              f"read back from the spool (DIGEST_MAX_BYTES)",
                              missing=size - len(data))
            message, sender, recipients = _sendable(data)
        except OSError as error:
            self._set_aside(path, f"cannot be read ({error.strerror})")
            return None
        except BadEntry as error:
            self._set_aside(path, f"is {error}")
            return None
        except ValueError as error:
            self._set_aside(path, f"is no message to send: {error}")
            return None
        return _Waiting(message, data, written_at(path), sender, recipients,
                        path=path, state=_State.READY)

    def _set_aside(self, path: str, why: str) -> None:
        def moved(where: str) -> None:
            _log.error("Spool entry {path} {why}: moved to {where}, and "
                       "nothing is sent for it", path=path, why=why,
                       where=where)

        def not_moved(failure: Failure) -> None:
            _log.error("Spool entry {path} {why}, and cannot be moved "
                       "aside: {reason}; nothing is sent for it", path=path,
                       why=why, reason=failure.value)

        self._writer.run(self.spool.set_aside, path).addCallbacks(
            moved, not_moved)

    def send(self, message: EmailMessage) -> Sending:
        """
        Spool one message, then deliver it to the addresses in its To
        header, from the one in its From header.
        """
        return self._sending(self._queue(message))

    def replace(self, kind: str, message: EmailMessage) -> Sending:
        """
        Send C{message} instead of the messages of C{kind} still waiting
        that are not in the middle of an attempt: the pager alert that
        says it all, instead of one per window of an outage.  Their files
        leave the spool once the new one is in it, and their outcomes fire
        with its own.
        """
        new = self._queue(message)
        for old in list(self._waiting):
            if (old is not new and old.kind == kind
                    and old.state in (_State.SPOOLING, _State.READY)):
                self._supersede(old, new)
        return self._sending(new)

    @staticmethod
    def _sending(waiting: _Waiting) -> Sending:
        return Sending(waiting.spooled, waiting.outcome)

    def _queue(self, message: EmailMessage) -> _Waiting:
        data = message.as_bytes(policy=default_policy)
        sender, recipients = envelope(message)
        waiting = _Waiting(message, data, self._clock.seconds(), sender,
                           recipients)
        self._waiting.append(waiting)
        self._writer.run(self.spool.add, data).addCallbacks(
            self._spooled, self._not_spooled, callbackArgs=(waiting,),
            errbackArgs=(waiting,))
        return waiting

    def _spooled(self, path: str, waiting: _Waiting) -> None:
        waiting.path = path
        waiting.spooled.callback(True)
        if waiting.successor is not None:
            self._hand_on(waiting)
            return
        self._remove_replaced(waiting)
        self._ready(waiting)

    def _not_spooled(self, failure: Failure, waiting: _Waiting) -> None:
        error = failure.value
        _log.error("Cannot write to the spool {spool}: {reason}; "
                   "{subject!r} waits in memory only",
                   spool=self.spool.path,
                   reason=getattr(error, "strerror", None) or error,
                   subject=waiting.subject)
        waiting.spooled.callback(False)
        if waiting.successor is None:
            self._ready(waiting)

    def _ready(self, waiting: _Waiting) -> None:
        waiting.state = _State.READY
        if self._stopped:
            self._settle()
        else:
            self._attempt(waiting)

    def _supersede(self, old: _Waiting, new: _Waiting) -> None:
        _log.info("{new!r} replaces {old!r}, not delivered yet",
                  new=new.subject, old=old.subject)
        if old.retry is not None:
            old.retry.cancel()
            old.retry = None
        self._waiting.remove(old)
        old.successor = new
        new.followers += [old.outcome] + old.followers
        new.replaced += old.replaced
        if old.state is _State.READY:
            self._hand_on(old)

    def _hand_on(self, old: _Waiting) -> None:
        """Leave the spool file of a replaced message to its successor."""
        new = old.successor
        while new.successor is not None:
            new = new.successor
        if old.path is not None:
            new.replaced.append(old.path)
        if new.path is not None:
            # Safe on disk: the old files can go.  Else they go once it is
            # (or once it is done with, if the spool never took it).
            self._remove_replaced(new)

    def _remove_replaced(self, waiting: _Waiting) -> None:
        for path in waiting.replaced:
            self._writer.run(self.spool.remove, path).addErrback(
                self._not_removed, path)
        waiting.replaced = []

    def _attempt(self, waiting: _Waiting) -> None:
        waiting.retry = None
        waiting.state = _State.SENDING
        waiting.attempts += 1
        attempt = waiting.attempt = defer.maybeDeferred(
            self.transport.deliver, waiting.sender, waiting.recipients,
            waiting.message, self._cut(waiting))
        attempt.addCallbacks(self._delivered, self._failed,
                             callbackArgs=(waiting,), errbackArgs=(waiting,))

    def _cut(self, waiting: _Waiting) -> bytes:
        """What to offer: the message, cut to DIGEST_MAX_BYTES if need be."""
        if waiting.offered is None:
            try:
                waiting.offered = shrink(
                    waiting.data, self._max_bytes,
                    f"DIGEST_MAX_BYTES is {self._max_bytes:,}")
            except ValueError:
                # Offered whole: the server will say if it is too big.
                waiting.offered = waiting.data
        return waiting.offered

    def _delivered(self, result: object, waiting: _Waiting) -> None:
        waiting.attempt = None
        cut = ("" if waiting.offered is waiting.data else
               f", cut to {wire_size(waiting.offered):,} bytes")
        _log.info("Sent {subject!r} to {recipients} via {transport}"
                  "{where}{cut}",
                  subject=waiting.subject,
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(),
                  where=f": {result}" if isinstance(result, str) else "",
                  cut=cut)
        self._remove(waiting, True)

    def _remove(self, waiting: _Waiting, outcome: bool) -> None:
        """Take a message that needs no more trying out of the spool."""
        waiting.state = _State.FINISHING
        self._settle()
        if waiting.path is None:
            self._finish(waiting, outcome)
            return
        removing = self._writer.run(self.spool.remove, waiting.path)
        removing.addErrback(self._not_removed, waiting.path)
        removing.addCallback(lambda _: self._finish(waiting, outcome))

    @staticmethod
    def _not_removed(failure: Failure, path: str) -> None:
        _log.error("Cannot remove {path} from the spool: {reason}; the next "
                   "start sends it again", path=path,
                   reason=getattr(failure.value, "strerror", None)
                   or failure.value)

    def _finish(self, waiting: _Waiting, outcome: bool) -> None:
        self._waiting.remove(waiting)
        self._remove_replaced(waiting)
        for done in [waiting.outcome] + waiting.followers:
            done.callback(outcome)
        self._settle()

    def _failed(self, failure: Failure, waiting: _Waiting) -> None:
        waiting.attempt = None
        waiting.state = _State.READY
        error = _root_error(failure)
        if isinstance(error, RecipientsRefused):
            # The others have it; only those refused are to be tried again.
            waiting.recipients = [address for address, _, _
                                  in error.refused]
        reason = describe_failure(failure,
                                  getattr(self.transport, "timeout", 0))
        age = self._clock.seconds() - waiting.created
        if isinstance(error, MessageTooBig):
            self._too_big(waiting, error, reason)
        elif is_permanent(failure):
            self._give_up(waiting, reason)
        elif age >= self._lifetime:
            self._give_up(waiting, f"{reason}; still undelivered after "
                                   f"{age:.0f} s (SPOOL_LIFETIME_SECONDS)")
        elif (isinstance(error, UnconfirmedDelivery)
              and waiting.unconfirmed >= self._unconfirmed_retries):
            self._probably_delivered(waiting, reason)
        else:
            if isinstance(error, UnconfirmedDelivery):
                waiting.unconfirmed += 1
            self._retry_later(waiting, reason, age)

    def _retry_later(self, waiting: _Waiting, reason: str,
                     age: float) -> None:
        if self._stopping:
            self._stays(waiting, reason)
            return
        waiting.failures += 1
        doublings = min(waiting.failures - 1, self._max_doublings)
        delay = min(self._retry_min * 2 ** doublings, self._retry_max,
                    self._lifetime - age)
        _log.warn("Could not send {subject!r} to {recipients} via "
                  "{transport}: {reason}; attempt {attempt}, next in "
                  "{delay:g} s",
                  subject=waiting.subject,
                  recipients=", ".join(waiting.recipients),
                  transport=self.transport.describe(), reason=reason,
                  attempt=waiting.attempts, delay=delay)
        waiting.retry = self._clock.callLater(delay, self._attempt, waiting)

    def _stays(self, waiting: _Waiting, reason: str) -> None:
        """A stop is under way: the message waits for the next start."""
        _log.warn("Could not send {subject!r} via {transport}: {reason}; "
                  "{where}", subject=waiting.subject,
                  transport=self.transport.describe(), reason=reason,
                  where="it stays in the spool for the next start"
                  if waiting.path else "it could not be spooled, so it "
                  "ends with this run")
        self._settle()

    def _too_big(self, waiting: _Waiting, error: MessageTooBig,
                 reason: str) -> None:
        """Cut the message to half the size refused, and try again now."""
        limit = error.sent // 2
        try:
            waiting.offered = shrink(
                waiting.data, limit, f"the mail server refused "
                                     f"{error.sent:,} bytes of it as too big")
        except ValueError as why:
            self._give_up(waiting, f"{reason}; it cannot be cut to {limit:,} "
                                   f"bytes: {why}")
            return
        if self._stopping:
            self._stays(waiting, reason)
            return
        _log.warn("Could not send {subject!r} via {transport}: {reason}; "
                  "sending it cut to {limit:,} bytes now",
                  subject=waiting.subject,
                  transport=self.transport.describe(), reason=reason,
                  limit=limit)
        waiting.retry = self._clock.callLater(0, self._attempt, waiting)

    def _give_up(self, waiting: _Waiting, why: str) -> None:
        def kept(where: str) -> None:
            _log.error("Giving up on {subject!r} to {recipients} via "
                       "{transport}: {why}; the message is kept in {where}",
                       subject=waiting.subject,
                       recipients=", ".join(waiting.recipients),
                       transport=self.transport.describe(), why=why,
                       where=where)
            self._finish(waiting, False)

        self._keep(waiting, self.spool.give_up, self.spool.failed, kept)

    def _probably_delivered(self, waiting: _Waiting, reason: str) -> None:
        def kept(where: str) -> None:
            _log.warn("{subject!r} to {recipients} via {transport} is "
                      "probably delivered: {reason}, {count} times, so it is "
                      "not sent again; the message is kept in {where}",
                      subject=waiting.subject,
                      recipients=", ".join(waiting.recipients),
                      transport=self.transport.describe(), reason=reason,
                      count=waiting.attempts, where=where)
            self._finish(waiting, True)

        self._keep(waiting, self.spool.set_unconfirmed,
                   self.spool.unconfirmed, kept)

    def _keep(self, waiting: _Waiting, move, maildir: Maildir,
              kept) -> None:
        """Move a message done with into C{maildir}, then call C{kept}."""
        def not_kept(failure: Failure) -> str:
            return (f"nowhere: {maildir.path} cannot be written "
                    f"({getattr(failure.value, 'strerror', failure.value)}); "
                    f"the message follows\n"
                    f"{waiting.data.decode('utf-8', 'replace')}")

        waiting.state = _State.FINISHING
        self._settle()
        moving = self._writer.run(move, waiting.path, waiting.data)
        moving.addErrback(not_kept).addCallback(kept)

    def stop(self, timeout: float) -> defer.Deferred:
        """
        Stop retrying, and give the messages being spooled and the
        attempts under way up to C{timeout} seconds; what is not delivered
        by then stays in the spool.

        @return: a Deferred firing when that is done.
        """
        self._stopping = True
        for waiting in self._waiting:
            if waiting.retry is not None:
                waiting.retry.cancel()
                waiting.retry = None
        done = defer.Deferred(self._settle_waiters.remove)
        self._settle_waiters.append(done)
        self._settle()
        done.addTimeout(timeout, self._clock)
        done.addErrback(lambda failure: failure.trap(defer.TimeoutError))
        done.addCallback(self._cancel_attempts)
        return done

    def _settle(self) -> None:
        """Tell the stop once nothing is being spooled or sent."""
        if self._settle_waiters and not any(
                waiting.state in (_State.SPOOLING, _State.SENDING)
                for waiting in self._waiting):
            waiters, self._settle_waiters = self._settle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _cancel_attempts(self, _: object) -> None:
        self._stopped = True
        for waiting in list(self._waiting):
            if waiting.attempt is not None:
                waiting.attempt.cancel()
