"""
How a message reaches a mail server or a mailbox: the SMTP transport
(ESMTPSenderFactory over plain TCP, STARTTLS or implicit TLS, or whichever
of the two works when SMTP_TLS is unset), the maildir transport used when
no SMTP server is configured, and what their failures mean
(L{is_permanent}, L{describe_failure}).

A transport's C{deliver} makes one attempt: it returns a Deferred that
fires once the message is accepted and fails with the reason otherwise;
deciding what to do then is the outbox's job.
"""
from __future__ import annotations

import re
from email.message import EmailMessage
from email.policy import default as default_policy
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

from failnozzle.config import ConfigError
from failnozzle.shrink import shrink, wire_size
from failnozzle.spool import Maildir
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

    def keep_mode_of(self, other: object) -> None:
        """
        Take the mode C{other}, the transport this one replaces on a
        reload, found out for the same server: not found out again.
        """
        if (isinstance(other, SMTPTransport) and self._finding_mode
                and (other.host, other.port) == (self.host, self.port)):
            self.mode = other.mode
            self._finding_mode = other._finding_mode
            self._doubting_silence = other._doubting_silence

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
            if _spoke_smtp(root_error(failure)):
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
        if _spoke_smtp(root_error(second)):
            self._mode_worked(None, mode)
        elif mode == "implicit" and _points_to_other_mode(second, mode):
            # Silent at first, then in clear: a server slow to greet, to
            # be waited for from now on.
            self._doubting_silence = False
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
    error = root_error(failure)
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
    error = root_error(failure)
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
    # Not "Starting factory" and "Stopping factory" in the log for every
    # delivery and retry: the outbox says what each did.
    noisy = False

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


def root_error(failure: Failure) -> BaseException:
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
    error = root_error(failure)
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
    error = root_error(failure)
    if isinstance(error, UnconfirmedDelivery):
        cause = root_error(error.cause)
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
