"""
Tests for L{failnozzle.send}, the C{failnozzle-send} command: its
arguments, the record it builds, what it sends over real sockets on
loopback, its errors, the installed console script, and a real service
counting what it sends.
"""
import argparse
import errno
import io
import json
import os
import socket
import subprocess
import sys

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

import failnozzle
from failnozzle import send
from failnozzle.config import UniqueMessage
from failnozzle.loghandler import CLIPPED, MAX_DATAGRAM_BYTES
from failnozzle.send import (ADDRESS_VARIABLE, STDIN_LIMIT, build_record,
                             main, make_parser, parse_address, parse_where,
                             read_details)

from .common import WAIT_SECONDS, datagrams_received, start_service, udp_address
from .test_twistd import child_environment

#: The console script pip installs beside the interpreter running the tests.
SCRIPT = os.path.join(os.path.dirname(sys.executable), "failnozzle-send")


class CommandTestCase(SynchronousTestCase):
    """
    Runs L{main} in this process with a known environment, standard input
    and standard error, and listens on loopback for what it sends.
    """

    def setUp(self):
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.set_environment(None)

    def set_environment(self, address):
        """Set FAILNOZZLE_ADDRESS (None: unset) for this test only."""
        saved = os.environ.get(ADDRESS_VARIABLE)
        if address is None:
            os.environ.pop(ADDRESS_VARIABLE, None)
        else:
            os.environ[ADDRESS_VARIABLE] = address
        self.addCleanup(self._restore_environment, saved)

    def _restore_environment(self, saved):
        if saved is None:
            os.environ.pop(ADDRESS_VARIABLE, None)
        else:
            os.environ[ADDRESS_VARIABLE] = saved

    def set_stdin(self, data: bytes):
        """Standard input holding C{data}, as a real text stream would."""
        self.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    def listen(self, family=socket.AF_INET, host="127.0.0.1"):
        """A blocking UDP socket on loopback and its C{--to} address."""
        receiver = socket.socket(family, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind((host, 0))
        receiver.settimeout(WAIT_SECONDS)
        port = receiver.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return receiver, address

    def received(self, receiver) -> dict:
        """The one datagram sent, checked to fit, as JSON."""
        data = receiver.recv(65536)
        self.assertLessEqual(len(data), MAX_DATAGRAM_BYTES)
        return json.loads(data)

    def usage_error(self, argv) -> str:
        """Run C{argv}, expecting exit status 2; return what it printed."""
        with self.assertRaises(SystemExit) as raised:
            main(argv)
        self.assertEqual(raised.exception.code, 2)
        return self.stderr.getvalue()

    def send_error(self, argv) -> str:
        """Run C{argv}, expecting status 1 and one line; return the line."""
        self.assertEqual(main(argv), 1)
        [line] = self.stderr.getvalue().splitlines()
        self.assertTrue(self.stderr.getvalue().endswith("\n"))
        return line


class ParseAddressTests(SynchronousTestCase):
    """
    C{--to} and FAILNOZZLE_ADDRESS: C{HOST:PORT}, IPv6 in brackets.
    """

    def test_host_and_port(self):
        """
        A name or an IPv4 address, a colon and a port.
        """
        self.assertEqual(parse_address("failnozzle.example.com:1549"),
                         ("failnozzle.example.com", 1549))
        self.assertEqual(parse_address("127.0.0.1:12201"),
                         ("127.0.0.1", 12201))

    def test_ipv6_in_brackets(self):
        """
        An IPv6 address loses its brackets.
        """
        self.assertEqual(parse_address("[::1]:1549"), ("::1", 1549))

    def test_not_host_and_port(self):
        """
        A missing host or port, a port out of range or not a number is
        refused, quoting the text.
        """
        for text in ["failnozzle", "failnozzle:", ":1549", "[::1]",
                     "failnozzle:0", "failnozzle:65536", "failnozzle:x",
                     "failnozzle:-1"]:
            with self.assertRaises(argparse.ArgumentTypeError) as raised:
                parse_address(text)
            self.assertIn(repr(text), str(raised.exception))


class ArgumentsTests(CommandTestCase):
    """
    The command line and its usage errors.
    """

    def test_defaults(self):
        """
        Only MESSAGE is needed: kind cli, this host as source, no details,
        no location.
        """
        args = make_parser().parse_args(["nightly backup failed"])
        self.assertEqual(args.message, "nightly backup failed")
        self.assertEqual(args.kind, "cli")
        self.assertEqual(args.source, socket.gethostname())
        self.assertIsNone(args.exc_text)
        self.assertIsNone(args.where)
        self.assertIsNone(args.to)

    def test_where(self):
        """
        --where takes FILE:LINE, or a FILE alone.
        """
        self.assertEqual(parse_where("/etc/cron.daily/backup:12"),
                         ("/etc/cron.daily/backup", 12))
        self.assertEqual(parse_where("backup.sh"), ("backup.sh", None))
        self.assertEqual(parse_where("backup.sh:main"),
                         ("backup.sh:main", None))

    def test_undecodable_argument(self):
        """
        Command-line bytes that are not UTF-8 become U+FFFD, not lone
        surrogates an email cannot carry.
        """
        args = make_parser().parse_args(
            ["--kind", "job\udce9", "--where", "caf\udce9.sh:3",
             "failed on caf\udce9"])
        self.assertEqual(args.message, "failed on caf\ufffd")
        self.assertEqual(args.kind, "job\ufffd")
        self.assertEqual(args.where, ("caf\ufffd.sh", 3))

    def test_no_message(self):
        """
        Without MESSAGE the usage is printed and the status is 2.
        """
        self.assertIn("MESSAGE", self.usage_error(["--kind", "backup"]))

    def test_version(self):
        """
        --version prints failnozzle's version and exits with 0, MESSAGE or
        not.
        """
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        with self.assertRaises(SystemExit) as raised:
            main(["--version"])
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(output.getvalue(), f"failnozzle-send (failnozzle) "
                                            f"{failnozzle.__version__}\n")

    def test_bad_to(self):
        """
        A --to that is not HOST:PORT is a usage error naming --to.
        """
        printed = self.usage_error(["--to", "failnozzle.example.com", "m"])
        self.assertIn("argument --to: expected HOST:PORT, not "
                      "'failnozzle.example.com'", printed)

    def test_bad_environment_address(self):
        """
        A FAILNOZZLE_ADDRESS that is not HOST:PORT is a usage error naming
        the variable.
        """
        self.set_environment("failnozzle.example.com")
        printed = self.usage_error(["m"])
        self.assertIn(f"{ADDRESS_VARIABLE}: expected HOST:PORT, not "
                      "'failnozzle.example.com'", printed)


class AddressTests(CommandTestCase):
    """
    Where the error goes: --to, else FAILNOZZLE_ADDRESS, else failnozzle's
    default address.
    """

    def sent_to(self, argv):
        """The (host, port) L{main} sends to, without sending."""
        calls = []
        self.patch(send, "send", lambda data, *address: calls.append(address))
        self.assertEqual(main(argv), 0)
        [address] = calls
        return address

    def test_default(self):
        """
        With neither --to nor the variable, failnozzle's default UDP_BIND.
        """
        self.assertEqual(self.sent_to(["m"]), ("127.0.0.1", 1549))

    def test_empty_environment_address(self):
        """
        An empty FAILNOZZLE_ADDRESS counts as unset.
        """
        self.set_environment("")
        self.assertEqual(self.sent_to(["m"]), ("127.0.0.1", 1549))

    def test_environment(self):
        """
        FAILNOZZLE_ADDRESS replaces the default.
        """
        receiver, address = self.listen()
        self.set_environment(address)
        self.assertEqual(main(["from the environment"]), 0)
        self.assertEqual(self.received(receiver)["message"],
                         "from the environment")

    def test_to_wins(self):
        """
        --to wins over FAILNOZZLE_ADDRESS, which is then not even read.
        """
        receiver, address = self.listen()
        self.set_environment("not an address")
        self.assertEqual(main(["--to", address, "from --to"]), 0)
        self.assertEqual(self.received(receiver)["message"], "from --to")


class BuildRecordTests(SynchronousTestCase):
    """
    The record: the log handler's fields, filled from the arguments.
    """

    def test_where(self):
        """
        --where gives pathname and lineno, and filename and module as
        logging derives them.
        """
        record = build_record(message="nightly backup failed", kind="backup",
                              source="db1", exc_text="tar: cannot open",
                              where=("/etc/cron.daily/backup.sh", 12))
        self.assertEqual(record, {
            "module": "backup",
            "funcName": None,
            "filename": "backup.sh",
            "pathname": "/etc/cron.daily/backup.sh",
            "lineno": 12,
            "message": "nightly backup failed",
            "exc_text": "tar: cannot open",
            "kind": "backup",
            "source": "db1",
        })

    def test_nowhere(self):
        """
        Without --where every location field is None (null).
        """
        record = build_record(message="m", kind="cli", source="db1")
        self.assertEqual(
            {name: record[name] for name in
             ("module", "funcName", "filename", "pathname", "lineno",
              "exc_text")},
            dict.fromkeys(("module", "funcName", "filename", "pathname",
                           "lineno", "exc_text")))


class ReadDetailsTests(SynchronousTestCase):
    """
    --exc-text -: standard input, bounded.
    """

    def test_text(self):
        """
        The bytes become text; those that are not UTF-8 become U+FFFD.
        """
        self.assertEqual(read_details(io.BytesIO(b"caf\xc3\xa9 \xff\n")),
                         "caf\u00e9 \ufffd\n")

    def test_rest_drained(self):
        """
        Past what one datagram could hold, input is read to its end but
        not kept.
        """
        stream = io.BytesIO(b"x" * 1000000)
        self.assertEqual(len(read_details(stream)), STDIN_LIMIT)
        self.assertEqual(stream.tell(), 1000000)


class SendTests(CommandTestCase):
    """
    What arrives over a real UDP socket on loopback.
    """

    def test_message_kind_source(self):
        """
        The message, kind and source arrive as given, with the location of
        --where.
        """
        receiver, address = self.listen()
        self.assertEqual(main(["--kind", "backup", "--source", "db1",
                               "--where", "/etc/cron.daily/backup:7",
                               "--to", address, "nightly backup failed"]), 0)
        sent = self.received(receiver)
        self.assertEqual(sent["message"], "nightly backup failed")
        self.assertEqual(sent["kind"], "backup")
        self.assertEqual(sent["source"], "db1")
        self.assertEqual(sent["pathname"], "/etc/cron.daily/backup")
        self.assertEqual(sent["lineno"], 7)
        self.assertIsNone(sent["exc_text"])
        self.assertEqual(self.stderr.getvalue(), "")

    def test_defaults_sent(self):
        """
        Without --kind and --source the kind is cli and the source this
        host's name.
        """
        receiver, address = self.listen()
        self.assertEqual(main(["--to", address, "m"]), 0)
        sent = self.received(receiver)
        self.assertEqual(sent["kind"], "cli")
        self.assertEqual(sent["source"], socket.gethostname())

    def test_exc_text_given(self):
        """
        --exc-text TEXT sends TEXT as the details.
        """
        receiver, address = self.listen()
        self.assertEqual(main(["--exc-text", "disk full", "--to", address,
                               "m"]), 0)
        self.assertEqual(self.received(receiver)["exc_text"], "disk full")

    def test_exc_text_from_stdin(self):
        """
        --exc-text - sends standard input as the details.
        """
        receiver, address = self.listen()
        self.set_stdin(b"tar: /var/db: Cannot open\ntar: Error exit\n")
        self.assertEqual(main(["--kind", "backup", "--exc-text", "-",
                               "--to", address, "backup failed"]), 0)
        sent = self.received(receiver)
        self.assertEqual(sent["exc_text"],
                         "tar: /var/db: Cannot open\ntar: Error exit\n")
        self.assertEqual(sent["message"], "backup failed")

    def test_huge_stdin_clipped(self):
        """
        Standard input far longer than a datagram is clipped to fit, and
        marked so; the message and the other fields arrive whole.
        """
        receiver, address = self.listen()
        self.set_stdin(b"y" * 3000000)
        self.assertEqual(main(["--kind", "backup", "--exc-text", "-",
                               "--to", address, "backup failed"]), 0)
        sent = self.received(receiver)
        self.assertTrue(sent["exc_text"].startswith("yyy"))
        self.assertTrue(sent["exc_text"].endswith(CLIPPED))
        self.assertGreater(len(sent["exc_text"]), 60000)
        self.assertEqual(sent["message"], "backup failed")
        self.assertEqual(sent["kind"], "backup")
        self.assertNotIn("msg", sent)

    def test_ipv6(self):
        """
        --to [::1]:PORT sends over IPv6.
        """
        receiver, address = self.listen(socket.AF_INET6, "::1")
        self.assertEqual(main(["--to", address, "over IPv6"]), 0)
        self.assertEqual(self.received(receiver)["message"], "over IPv6")

    def test_next_address(self):
        """
        When the first address a name resolves to cannot be sent to, the
        next one is tried.
        """
        receiver, address = self.listen()
        port = receiver.getsockname()[1]
        udp = (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP, "")
        self.patch(socket, "getaddrinfo", lambda *args, **kwargs: [
            # Port 0 cannot be sent to: EINVAL.
            udp + (("127.0.0.1", 0),), udp + (("127.0.0.1", port),)])
        self.assertEqual(main(["--to", "failnozzle.example:1549",
                               "second address"]), 0)
        self.assertEqual(self.received(receiver)["message"],
                         "second address")


class SendErrorTests(CommandTestCase):
    """
    When the error cannot be sent: status 1 and one line saying why.
    """

    def test_name_does_not_resolve(self):
        """
        A name the resolver does not know.
        """
        def unknown(*args, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME,
                                  "Name or service not known")

        self.patch(socket, "getaddrinfo", unknown)
        self.assertEqual(
            self.send_error(["--to", "failnozzle.example:1549", "m"]),
            "failnozzle-send: cannot resolve failnozzle.example: "
            "Name or service not known")

    def test_name_idna_refuses(self):
        """
        A name that is not even a valid host name (an empty label) is
        reported in the same way, not as a traceback.
        """
        line = self.send_error(["--to", "failnozzle..example:1549", "m"])
        self.assertTrue(line.startswith(
            "failnozzle-send: cannot resolve failnozzle..example: "), line)

    def test_message_too_long(self):
        """
        A datagram the network refuses names the address and the reason.
        """
        def refuse(*args):
            raise OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE))

        self.patch(socket.socket, "sendto", refuse)
        self.assertEqual(
            self.send_error(["--to", "[::1]:1549", "m"]),
            "failnozzle-send: cannot send to [::1]:1549: "
            f"{os.strerror(errno.EMSGSIZE)}")

    def test_stdin_closed(self):
        """
        --exc-text - with standard input closed (C{<&-}).
        """
        self.patch(sys, "stdin", None)
        self.assertEqual(
            self.send_error(["--exc-text", "-", "--to", "127.0.0.1:9", "m"]),
            "failnozzle-send: cannot read standard input: it is closed")

    def test_stdin_unreadable(self):
        """
        --exc-text - with standard input failing to read.
        """
        class Unreadable(io.RawIOBase):
            def readable(self):
                return True

            def readinto(self, buffer):
                raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(sys, "stdin", io.TextIOWrapper(io.BufferedReader(
            Unreadable())))
        self.assertEqual(
            self.send_error(["--exc-text", "-", "--to", "127.0.0.1:9", "m"]),
            "failnozzle-send: cannot read standard input: "
            f"{os.strerror(errno.EIO)}")


class ConsoleScriptTests(SynchronousTestCase):
    """
    The C{failnozzle-send} script pip installed, run as a shell or cron
    would run it.
    """

    def run_script(self, args, stdin=b"", shell=None):
        """
        Run the installed script with C{args} (or the bash command
        C{shell}, with the script as $0), without FAILNOZZLE_ADDRESS.
        """
        environment = child_environment()
        environment.pop(ADDRESS_VARIABLE, None)
        command = ([SCRIPT] + args if shell is None
                   else ["bash", "-o", "pipefail", "-c", shell, SCRIPT])
        return subprocess.run(command, input=stdin, capture_output=True,
                              env=environment, timeout=WAIT_SECONDS)

    def listen(self):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(WAIT_SECONDS)
        return receiver, f"127.0.0.1:{receiver.getsockname()[1]}"

    def test_sends(self):
        """
        Piped output becomes the details of the error; the status is 0 and
        nothing is printed.
        """
        receiver, address = self.listen()
        done = self.run_script(
            ["--kind", "backup", "--exc-text", "-", "--to", address,
             "nightly backup failed"], stdin=b"rsync: connection refused\n")
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, b"", b""))
        sent = json.loads(receiver.recv(65536))
        self.assertEqual(sent["message"], "nightly backup failed")
        self.assertEqual(sent["kind"], "backup")
        self.assertEqual(sent["exc_text"], "rsync: connection refused\n")

    def test_pipeline_writer_not_killed(self):
        """
        A command writing far more than one datagram into the pipe runs to
        its end: the rest of its output is read, so it gets no SIGPIPE.
        """
        receiver, address = self.listen()
        done = self.run_script(
            [], shell=f'head -c 2000000 /dev/zero | "$0" --exc-text - '
                      f'--to {address} "backup failed"')
        self.assertEqual((done.returncode, done.stderr), (0, b""))
        self.assertTrue(json.loads(receiver.recv(65536))[
            "exc_text"].endswith(CLIPPED))

    def test_cannot_send(self):
        """
        A --to that cannot be resolved: status 1 and one line on standard
        error, no traceback.
        """
        done = self.run_script(["--to", "failnozzle..example:1549", "m"])
        self.assertEqual(done.returncode, 1)
        [line] = done.stderr.decode().splitlines()
        self.assertTrue(line.startswith("failnozzle-send: cannot resolve "),
                        line)

    def test_usage_error(self):
        """
        Without MESSAGE: status 2 and the usage.
        """
        done = self.run_script([])
        self.assertEqual(done.returncode, 2)
        self.assertIn(b"usage: failnozzle-send", done.stderr)

    def test_version(self):
        """
        The installed script prints the version of the failnozzle it runs.
        """
        done = self.run_script(["--version"])
        self.assertEqual(
            (done.returncode, done.stdout.decode(), done.stderr),
            (0, f"failnozzle-send (failnozzle) {failnozzle.__version__}\n",
             b""))

    def test_no_twisted(self):
        """
        The command never imports Twisted, so it starts quickly from cron.
        """
        done = subprocess.run(
            [sys.executable, "-c",
             "import sys, failnozzle.send; "
             "print(sorted(m for m in sys.modules if 'twisted' in m))"],
            capture_output=True, env=child_environment(),
            timeout=WAIT_SECONDS)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, b"[]\n", b""))


class EndToEndTests(TestCase):
    """
    C{failnozzle-send} into a real L{FailnozzleService}.
    """

    @defer.inlineCallbacks
    def test_counted(self):
        """
        The service counts the error under the key of its fields, for the
        source given.
        """
        service = start_service(self)
        arrived = datagrams_received(service, 1)
        host, port = udp_address(service)
        self.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(
            b"tar: /var/db: Cannot open\n")))
        self.assertEqual(main([
            "--kind", "backup", "--source", "db1", "--exc-text", "-",
            "--where", "/etc/cron.daily/backup.sh:12", "--to",
            f"{host}:{port}", "nightly backup failed"]), 0)
        yield arrived
        [entry] = service.aggregator.view().entries
        self.assertEqual(UniqueMessage(*entry.key), UniqueMessage(
            module="backup", funcName=None, filename="backup.sh",
            message="nightly backup failed",
            pathname="/etc/cron.daily/backup.sh", lineno=12,
            exc_text="tar: /var/db: Cannot open\n", kind="backup"))
        self.assertEqual(dict(entry.sources), {"db1": 1})
