"""
Tests for L{failnozzle.tap} and the twistd plugin.
"""
import io
import os
import resource
import socket
import subprocess
import sys

import trustme
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import failnozzle
from failnozzle.check import check_config
from failnozzle.service import FailnozzleService
from failnozzle.tap import (FILES_BESIDES_CONNECTIONS, MAX_HTTP_CONNECTIONS,
                            Options, makeService,
                            raise_open_files_limit)
from tests.common import WAIT_SECONDS, make_settings
from tests.test_twistd import child_environment


def options(*argv):
    parsed = Options()
    parsed.parseOptions(list(argv))
    return parsed


def serving(*argv):
    """Options for a service to make: HTTP on a free port, as UDP."""
    return options(*argv, "--http", "127.0.0.1:0")


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
                       "--smtp", "--smtp-ingest", "--check", "--version"):
            self.assertIn(option, text)

    def test_version(self):
        """
        --version prints failnozzle's version, not Twisted's, and exits
        with 0.
        """
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        error = self.assertRaises(SystemExit, options, "--version")
        self.assertEqual(error.code, 0)
        self.assertEqual(output.getvalue(),
                         f"failnozzle {failnozzle.__version__}\n")


class CheckTests(SynchronousTestCase):
    """
    C{--check}: every problem of the settings start-up would find, without
    binding, creating or sending anything.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, name, text):
        """Write C{text} into a file of the test's directory; its path."""
        path = os.path.join(self.directory, name)
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
        return path

    def check(self, *argv):
        """
        Parse C{argv} plus --check; return the exit status and the lines
        printed.
        """
        output = io.StringIO()
        self.patch(sys, "stdout", output)
        error = self.assertRaises(SystemExit, options, *argv, "--check")
        return error.code, output.getvalue().splitlines()

    def test_valid(self):
        """
        Valid settings: one line saying so, status 0.  Nothing is bound
        (UDP_BIND is a port another socket holds) and nothing is created
        (the spool, state and maildir paths stay absent).
        """
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        paths = {name: os.path.join(self.directory, name.lower())
                 for name in ("SPOOL_DIR", "STATE_FILE", "MAILDIR")}
        path = self.write("site.py", f"UDP_BIND = ('127.0.0.1', {port})\n"
                          + "".join(f"{name} = {value!r}\n"
                                    for name, value in paths.items()))
        status, lines = self.check("--config", path,
                                   "--smtp-ingest", f"127.0.0.1:{port}")
        self.assertEqual((status, lines), (0, [
            f"failnozzle: the settings are valid (config file {path!r})"]))
        self.assertEqual(sorted(os.listdir(self.directory)), ["site.py"])

    def test_every_problem(self):
        """
        Every problem is printed, one line each, with the notices; the
        status is 1.  Start-up's own checks are made too: a template that
        does not compile, a CA file and an ingest certificate that hold no
        certificate.
        """
        os.mkdir(os.path.join(self.directory, "templates"))
        self.write("templates/body.txt", "{% for x in %}\n")
        not_pem = self.write("not.pem", "no certificate here\n")
        path = self.write("site.py", f"""\
UDP_BIND = ('127.0.0.1', 0)
BASE_DIR = 'unused'
SMTP_PORT = 70000
SMTP_HOST = 'smtp.example.com'
REPORT_FROM = 'nozzle@example.com'
SMTP_CA_FILE = {not_pem!r}
EMAIL_TEMPLATE_DIR = {os.path.join(self.directory, "templates")!r}
EMAIL_BODY_TEMPLATE = 'body.txt'
SMTP_INGEST_BIND = ('127.0.0.1', 0)
SMTP_INGEST_TLS_CERT = SMTP_INGEST_TLS_KEY = {not_pem!r}
""")
        status, lines = self.check("--config", path)
        self.assertEqual(status, 1)
        self.assertEqual(len(lines), 6, lines)
        without_mail_in = self.write("nomail.py", open(path).read().replace(
            "SMTP_INGEST_BIND = ('127.0.0.1', 0)\n", ""))
        _, fewer = self.check("--config", without_mail_in)
        self.assertEqual(len(fewer), 5, "no mail-in: its files are not read")
        self.assertEqual(lines[:2], [
            "failnozzle: SMTP_PORT must be a port number (1-65535), not 70000",
            "failnozzle: REPORT_TO is required when SMTP_HOST is set"])
        self.assertTrue(lines[2].startswith(
            "failnozzle: EMAIL_BODY_TEMPLATE: template 'body.txt' line 1: "),
            lines[2])
        self.assertEqual(lines[3:], [
            f"failnozzle: SMTP_CA_FILE: no PEM certificate in {not_pem!r}",
            f"failnozzle: SMTP_INGEST_TLS_CERT: no PEM certificate in "
            f"{not_pem!r}",
            f"failnozzle: notice: config file {path!r}: BASE_DIR is not a "
            f"setting and is ignored"])

    def test_template_not_utf8(self):
        """
        A template that is not UTF-8 (Latin-1, as templates of the
        original's days may be) is one line, at --check and at start-up,
        not a traceback.
        """
        os.mkdir(os.path.join(self.directory, "templates"))
        with open(os.path.join(self.directory, "templates", "body.txt"),
                  "wb") as template:
            template.write(b"caf\xe9 {{ total }}\n")
        path = self.write("site.py", f"""\
UDP_BIND = ('127.0.0.1', 0)
EMAIL_TEMPLATE_DIR = {os.path.join(self.directory, "templates")!r}
EMAIL_BODY_TEMPLATE = 'body.txt'
""")
        [problem], _ = check_config(path)
        self.assertTrue(problem.startswith(
            "EMAIL_BODY_TEMPLATE: cannot read template 'body.txt': 'utf-8' "
            "codec can't decode byte 0xe9"), problem)
        error = self.assertRaises(SystemExit, makeService,
                                  options("--config", path),
                                  MemoryReactorClock())
        self.assertEqual(str(error), f"failnozzle: {problem}")

    def test_good_certificates(self):
        """
        A real CA file and ingest certificate and key pass.
        """
        authority = trustme.CA()
        ca_file = os.path.join(self.directory, "ca.pem")
        authority.cert_pem.write_to_path(ca_file)
        server = authority.issue_cert("localhost")
        cert = os.path.join(self.directory, "cert.pem")
        key = os.path.join(self.directory, "key.pem")
        server.cert_chain_pems[0].write_to_path(cert)
        server.private_key_pem.write_to_path(key)
        path = self.write("site.py", f"""\
UDP_BIND = ('127.0.0.1', 0)
SMTP_HOST = 'localhost'
REPORT_FROM = 'nozzle@example.com'
REPORT_TO = 'ops@example.com'
SMTP_CA_FILE = {ca_file!r}
SMTP_INGEST_TLS_CERT = {cert!r}
SMTP_INGEST_TLS_KEY = {key!r}
""")
        self.assertEqual(check_config(path), ([], []))

    def test_refused_setting_not_checked_again(self):
        """
        A template directory that does not exist is one problem, not also
        one for each template that is then not found.
        """
        path = self.write("site.py", "UDP_BIND = ('127.0.0.1', 0)\n"
                          "EMAIL_TEMPLATE_DIR = '/no/such/templates'\n"
                          "EMAIL_BODY_TEMPLATE = 'body.txt'\n")
        problems, _ = check_config(path)
        self.assertEqual(problems, [
            "EMAIL_TEMPLATE_DIR: no such directory '/no/such/templates'"])

    def test_options_checked(self):
        """
        The options are checked with the file: --smtp without the
        recipients it needs.
        """
        status, lines = self.check("--udp", "127.0.0.1:0",
                                   "--smtp", "smtp.example.com:25")
        self.assertEqual((status, lines), (1, [
            "failnozzle: REPORT_FROM is required when SMTP_HOST is set",
            "failnozzle: REPORT_TO is required when SMTP_HOST is set"]))

    def test_without_config(self):
        """
        Without --config the defaults are checked; the UDP_BIND notice
        says that only this machine can send.
        """
        status, lines = self.check()
        self.assertEqual(status, 0)
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("notice: UDP_BIND is not set", lines[0])
        self.assertEqual(lines[1], "failnozzle: the settings are valid (no "
                                   "config file)")

    def test_unreadable_config(self):
        """
        A config file that does not exist is the one problem.
        """
        missing = os.path.join(self.directory, "missing.py")
        self.assertEqual(self.check("--config", missing), (1, [
            f"failnozzle: cannot read config file {missing!r}: No such file "
            f"or directory"]))


class OpenFilesLimitTests(SynchronousTestCase):
    """
    raise_open_files_limit: the soft limit up to what is needed, within
    the hard one.
    """

    def raised(self, soft, hard, needed):
        calls = []
        said = raise_open_files_limit(
            needed, lambda _: (soft, hard),
            lambda _, limits: calls.append(limits))
        return calls, said

    def test_raised(self):
        self.assertEqual(self.raised(1024, 524288, 1228),
                         ([(1228, 524288)], None))
        self.assertEqual(self.raised(1024, resource.RLIM_INFINITY, 1228),
                         ([(1228, resource.RLIM_INFINITY)], None))

    def test_enough_already(self):
        self.assertEqual(self.raised(4096, 524288, 1228), ([], None))
        self.assertEqual(self.raised(resource.RLIM_INFINITY,
                                     resource.RLIM_INFINITY, 1228),
                         ([], None))

    def test_hard_limit_too_low(self):
        """
        Up to the hard limit, and what it means said in one line.
        """
        calls, said = self.raised(256, 1024, 1228)
        self.assertEqual(calls, [(1024, 1024)])
        self.assertIn("failnozzle may hold 1,228 files open at once", said)
        self.assertIn("only 1,024", said)
        self.assertIn("LimitNOFILE=", said)


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
        service = makeService(serving(*argv), MemoryReactorClock())
        for sock in service.listeners.bound.values():
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
        self.assertEqual(set(service.listeners.bound), {"UDP_BIND", "HTTP_BIND"})
        sock = service.listeners.bound["UDP_BIND"]
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")

    def in_child(self, then: str, *argv: str, reactor: str = "None",
                 limit_files: int = 0) -> bytes:
        """
        In a child process, make the service of C{argv} (with UDP and HTTP
        on free ports) on C{reactor} (an expression; None: the real one),
        then run C{then}; what it printed.

        @param limit_files: the child's soft limit on open files, if set.
        """
        script = ("import resource, sys; from failnozzle.tap import "
                  "Options, makeService; options = Options(); "
                  "options.parseOptions(sys.argv[1:]); "
                  f"makeService(options, {reactor}); {then}")

        def limited() -> None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, hard))

        done = subprocess.run(
            [sys.executable, "-c", script, "--udp", "127.0.0.1:0",
             "--http", "127.0.0.1:0", *argv],
            capture_output=True, cwd=self.mktemp_dir(),
            env=child_environment(), timeout=WAIT_SECONDS,
            preexec_fn=limited if limit_files else None)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_redis_only_for_a_cluster(self):
        """
        Without CLUSTER_URL the daemon never imports redis-py (6.6 MB of
        its memory); with it, it does.
        """
        cluster = os.path.abspath(
            self.config("CLUSTER_URL = 'redis://127.0.0.1:1/0'\n"))
        check = "print('redis' in sys.modules)"
        memory = ("__import__('twisted.internet.testing', fromlist=['_'])"
                  ".MemoryReactorClock()")
        self.assertEqual(
            [self.in_child(check, reactor=memory),
             self.in_child(check, "--config", cluster, reactor=memory)],
            [b"False\n", b"True\n"])

    def test_open_files_limit_raised(self):
        """
        Started under systemd's soft limit of 1,024 open files, fewer than
        its HTTP and mail connections may take, the daemon raises it to
        what it needs (the hard limit allows it here).
        """
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        mail = os.path.abspath(self.config(
            "SMTP_INGEST_BIND = ('127.0.0.1', 0)\n"))
        needed = (FILES_BESIDES_CONNECTIONS + MAX_HTTP_CONNECTIONS
                  + make_settings().SMTP_INGEST_MAX_CONNECTIONS)
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SkipTest(f"this machine's hard limit on open files, "
                           f"{hard}, is below {needed}")
        printed = self.in_child(
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
            "--config", mail, limit_files=1024)
        self.assertEqual(int(printed), needed)

    def mktemp_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_gelf_bind(self):
        """
        GELF_BIND opens a second socket; one that cannot be bound stops
        start-up naming GELF_BIND.
        """
        path = self.config("GELF_BIND = ('127.0.0.1', 0)\n")
        service = self.make("--config", path, "--udp", "127.0.0.1:0")
        self.assertEqual(set(service.listeners.bound),
                         {"UDP_BIND", "GELF_BIND", "HTTP_BIND"})
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


class HTTPBindTests(SynchronousTestCase):
    """
    makeService with HTTP_BIND in use: fatal where it was asked for, a
    notice where it was left at its default (a config of the original's).
    """

    def hold(self, port: int) -> socket.socket:
        taken = socket.socket()
        self.addCleanup(taken.close)
        try:
            taken.bind(("127.0.0.1", port))
            taken.listen(1)
        except OSError:
            pass  # Held by another process: in use all the same.
        return taken

    def test_asked_for(self):
        taken = self.hold(0)
        port = taken.getsockname()[1]
        error = self.assertRaises(SystemExit, makeService,
                                  options("--udp", "127.0.0.1:0", "--http",
                                          f"127.0.0.1:{port}"),
                                  MemoryReactorClock())
        self.assertEqual(
            str(error), f"failnozzle: HTTP_BIND: cannot listen on "
                        f"127.0.0.1:{port}: Address already in use")

    def test_default(self):
        self.hold(1550)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = makeService(options("--udp", "127.0.0.1:0"),
                              MemoryReactorClock())
        for sock in service.listeners.bound.values():
            self.addCleanup(sock.close)
        self.assertEqual(set(service.listeners.bound), {"UDP_BIND"})
        [notice] = [formatEvent(event) for event in events
                    if "HTTP_BIND" in formatEvent(event)]
        self.assertEqual(notice, "Config: HTTP_BIND: cannot listen on "
                                 "127.0.0.1:1550: Address already in use; "
                                 "no status page, metrics or control (set "
                                 "HTTP_BIND, or --http, to another port)")


class SMTPIngestTests(SynchronousTestCase):
    """
    makeService with SMTP_INGEST_BIND.
    """

    def test_bound(self):
        """
        The TCP socket is bound and listening before the service starts.
        """
        service = makeService(serving("--udp", "127.0.0.1:0",
                                      "--smtp-ingest", "127.0.0.1:0"),
                              MemoryReactorClock())
        for bound in service.listeners.bound.values():
            self.addCleanup(bound.close)
        sock = service.listeners.bound["SMTP_INGEST_BIND"]
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
