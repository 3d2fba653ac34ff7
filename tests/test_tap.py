"""
Tests for L{failnozzle.tap} and the twistd plugin.
"""
import socket

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.service import FailnozzleService
from failnozzle.tap import Options, makeService


def options(*argv):
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


class OptionsTests(SynchronousTestCase):
    """
    Command-line options override the config file.
    """

    def test_overrides(self):
        """
        --udp, --flush-seconds, --maildir, --smtp and --smtp-ingest
        become settings.
        """
        parsed = options("--udp", "[::1]:2000", "--flush-seconds", "2.5",
                         "--maildir", "/var/mail/nozzle",
                         "--smtp", "mail.example.com:587",
                         "--smtp-ingest", ":2525")
        self.assertEqual(parsed.overrides, {
            "UDP_BIND": ("::1", 2000),
            "FLUSH_SECONDS": 2.5,
            "MAILDIR": "/var/mail/nozzle",
            "SMTP_HOST": "mail.example.com",
            "SMTP_PORT": 587,
            "SMTP_INGEST_BIND": ("0.0.0.0", 2525),
        })

    def test_none(self):
        """
        Without options nothing is overridden.
        """
        self.assertEqual(options().overrides, {})

    def test_bad_address(self):
        """
        A --udp that is not HOST:PORT is a usage error naming the option.
        """
        error = self.assertRaises(UsageError, options, "--udp", "localhost")
        self.assertIn("--udp", str(error))

    def test_smtp_needs_host(self):
        """
        --smtp :25 names no server: a usage error, not 0.0.0.0.
        """
        error = self.assertRaises(UsageError, options, "--smtp", ":25")
        self.assertIn("--smtp", str(error))

    def test_bad_number(self):
        """
        A --flush-seconds that is not a number is a usage error.
        """
        self.assertRaises(UsageError, options, "--flush-seconds", "soon")

    def test_help_lists_options(self):
        """
        --help documents every option.
        """
        text = str(Options())
        for option in ("--config", "--udp", "--flush-seconds", "--maildir",
                       "--smtp", "--smtp-ingest"):
            self.assertIn(option, text)


class MakeServiceTests(SynchronousTestCase):
    """
    makeService: settings in, service out, or one line saying what is
    wrong.
    """

    def config(self, text):
        path = self.mktemp()
        with open(path, "w") as out:
            out.write(text)
        return path

    def make(self, *argv):
        service = makeService(options(*argv), MemoryReactorClock())
        for sock in service._sockets.values():
            self.addCleanup(sock.close)
        return service

    def test_service(self):
        """
        The service has the file's settings, overridden by the options,
        and a socket bound where UDP_BIND says.
        """
        path = self.config("FLUSH_SECONDS = 5\nSERVER_NAME = 'nozzle1'\n")
        service = self.make("--config", path, "--udp", "127.0.0.1:0",
                            "--flush-seconds", "3")
        self.assertIsInstance(service, FailnozzleService)
        self.assertEqual(service.settings.FLUSH_SECONDS, 3)
        self.assertEqual(service.settings.SERVER_NAME, "nozzle1")
        [sock] = service._sockets.values()
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")

    def test_gelf_bind(self):
        """
        GELF_BIND opens a second socket; one that cannot be bound stops
        start-up naming GELF_BIND.
        """
        path = self.config("GELF_BIND = ('127.0.0.1', 0)\n")
        service = self.make("--config", path, "--udp", "127.0.0.1:0")
        self.assertEqual(set(service._sockets), {"UDP_BIND", "GELF_BIND"})
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        path = self.config(f"GELF_BIND = ('127.0.0.1', {port})\n")
        error = self.assertRaises(SystemExit, makeService,
                                  options("--config", path,
                                          "--udp", "127.0.0.1:0"),
                                  MemoryReactorClock())
        self.assertEqual(
            str(error), f"failnozzle: GELF_BIND: cannot listen on "
                        f"127.0.0.1:{port}: Address already in use")

    def test_config_error_one_line(self):
        """
        A config error stops start-up with one line naming the setting.
        """
        path = self.config("FLUSH_SECONDS = 'soon'\n")
        error = self.assertRaises(SystemExit, makeService,
                                  options("--config", path),
                                  MemoryReactorClock())
        self.assertEqual(
            str(error), "failnozzle: FLUSH_SECONDS must be a number, not "
                        "'soon'")

    def test_template_error(self):
        """
        A template that cannot be found stops start-up the same way.
        """
        path = self.config("EMAIL_BODY_TEMPLATE = 'nope.txt'\n"
                           "UDP_BIND = ('127.0.0.1', 0)\n")
        error = self.assertRaises(SystemExit, makeService,
                                  options("--config", path),
                                  MemoryReactorClock())
        self.assertEqual(str(error), "failnozzle: EMAIL_BODY_TEMPLATE: "
                                     "template 'nope.txt' not found")

    def test_port_in_use(self):
        """
        A UDP port that is taken stops start-up naming UDP_BIND.
        """
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        error = self.assertRaises(SystemExit, makeService,
                                  options("--udp", f"127.0.0.1:{port}"),
                                  MemoryReactorClock())
        self.assertEqual(
            str(error), f"failnozzle: UDP_BIND: cannot listen on "
                        f"127.0.0.1:{port}: Address already in use")


class SMTPIngestTests(SynchronousTestCase):
    """
    makeService with SMTP_INGEST_BIND.
    """

    def test_bound(self):
        """
        The TCP socket is bound and listening before the service starts.
        """
        service = makeService(options("--udp", "127.0.0.1:0",
                                      "--smtp-ingest", "127.0.0.1:0"),
                              MemoryReactorClock())
        for bound in service._sockets.values():
            self.addCleanup(bound.close)
        sock = service._sockets["SMTP_INGEST_BIND"]
        self.assertEqual(sock.type, socket.SOCK_STREAM)
        with socket.create_connection(sock.getsockname()):
            pass

    def test_port_in_use(self):
        """
        A TCP port another socket listens on stops start-up naming
        SMTP_INGEST_BIND.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = self.assertRaises(
            SystemExit, makeService,
            options("--udp", "127.0.0.1:0",
                    "--smtp-ingest", f"127.0.0.1:{port}"),
            MemoryReactorClock())
        self.assertEqual(
            str(error), f"failnozzle: SMTP_INGEST_BIND: cannot listen on "
                        f"127.0.0.1:{port}: Address already in use")


class PluginTests(SynchronousTestCase):
    """
    twistd finds the plugin.
    """

    def test_found(self):
        """
        The failnozzle service maker is among twistd's plugins and points
        at failnozzle.tap.
        """
        [maker] = [plugin for plugin in getPlugins(IServiceMaker)
                   if plugin.tapname == "failnozzle"]
        self.assertIs(maker.options, Options)
