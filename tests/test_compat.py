"""
What was written for the original failnozzle works unchanged: its command
line (C{python -m failnozzle.server [CONFIG]}, in every supervisor config),
the modules its configs imported (C{failnozzle.server},
C{failnozzle.settings}), and configs in its style; and the new C{--check}
and C{--version} of the real C{twistd failnozzle}.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap

from twisted.internet import defer, error
from twisted.trial.unittest import SynchronousTestCase

import failnozzle
from failnozzle import server
from failnozzle import settings as settings_module
from failnozzle.config import (SETTING_NAMES, UniqueMessage, changed_settings,
                               default_value, load_settings)

from .common import (WAIT_SECONDS, maildir_files, read_message, record,
                     send_datagrams)
from .test_twistd import (TwistdProcess, _TwistdTestCase, child_environment,
                          lines_of, spawn_twistd)

#: C{python -m failnozzle.server}, as supervisor runs it.
SERVER = [sys.executable, "-m", "failnozzle.server"]


def write(directory: str, name: str, text: str) -> str:
    """Write C{text} (dedented) into C{directory}/C{name}; its path."""
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as out:
        out.write(textwrap.dedent(text))
    return path


class ServerModuleTests(SynchronousTestCase):
    """
    L{failnozzle.server}: the names configs of the original imported from
    it, and nothing done on import.
    """

    def test_unique_message(self):
        """
        C{UniqueMessage} is the default UNIQUE_MSG_TUPLE, with the
        original's fields.
        """
        self.assertIs(server.UniqueMessage, UniqueMessage)
        self.assertIs(load_settings(None)[0].UNIQUE_MSG_TUPLE,
                      server.UniqueMessage)
        self.assertEqual(server.UniqueMessage._fields,
                         ("module", "funcName", "filename", "message",
                          "pathname", "lineno", "exc_text", "kind"))

    def test_default_fake_record(self):
        """
        The original's default INTERNAL_ERROR_FUNC, C{_default_fake_record},
        makes a record of every UniqueMessage field, telling the count
        and the error.
        """
        made = server._default_fake_record(3, ValueError("bad datagram"))
        self.assertLessEqual(set(UniqueMessage._fields), set(made))
        self.assertIn("3", made["exc_text"])
        self.assertIn("bad datagram", made["exc_text"])

    def test_config_importing_from_server(self):
        """
        A config of the original's style that builds its UNIQUE_MSG_TUPLE
        on UniqueMessage and wraps the default INTERNAL_ERROR_FUNC loads.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = write(directory, "site.py", """\
            from collections import namedtuple
            from failnozzle.server import UniqueMessage, _default_fake_record

            MSG = namedtuple('MSG', UniqueMessage._fields + ('host',))
            UNIQUE_MSG_TUPLE = MSG

            def INTERNAL_ERROR_FUNC(count, exception):
                record = _default_fake_record(count, exception)
                record['kind'] = 'nozzle-internal'
                return record
            """)
        loaded, _ = load_settings(path)
        self.assertEqual(loaded.unique_fields,
                         UniqueMessage._fields + ("host",))
        self.assertEqual(loaded.INTERNAL_ERROR_FUNC(1, ValueError())["kind"],
                         "nozzle-internal")

    def test_twistd_arguments(self):
        """
        The command runs twistd in the foreground, without a pid file,
        logging to standard error, with the config if one is given.
        """
        self.assertEqual(server.twistd_arguments("/etc/failnozzle.py"), [
            "--nodaemon", "--pidfile=",
            "--logger=failnozzle.server.log_to_stderr", "failnozzle",
            "--config=/etc/failnozzle.py"])
        self.assertEqual(server.twistd_arguments(None)[-1], "failnozzle")

    def test_import_does_nothing(self):
        """
        Importing failnozzle.server (as a config does) starts nothing:
        no reactor, no twistd, no output, no file.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        done = subprocess.run(
            [sys.executable, "-c",
             "import sys, failnozzle.server; "
             "print(sorted(m for m in sys.modules if m in "
             "('twisted.internet.reactor', 'twisted.scripts.twistd')))"],
            capture_output=True, env=child_environment(), cwd=directory,
            timeout=WAIT_SECONDS)
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, b"[]\n", b""))
        self.assertEqual(os.listdir(directory), [])


class SettingsModuleTests(SynchronousTestCase):
    """
    L{failnozzle.settings}: the defaults as module names.
    """

    def config(self, text: str) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return write(directory, "site.py", text)

    def test_every_default(self):
        """
        Every setting is there with its default value; lists of values
        are lists, as the original's MONITORING_ERROR_MARKERS was.
        """
        self.assertEqual(sorted(settings_module.__all__),
                         sorted(SETTING_NAMES))
        for name in SETTING_NAMES:
            value = getattr(settings_module, name)
            default = default_value(name)
            if isinstance(default, tuple) and not name.endswith("_BIND"):
                self.assertEqual(value, list(default), name)
            else:
                self.assertEqual(value, default, name)
        self.assertIsInstance(settings_module.MONITORING_ERROR_MARKERS, list)
        self.assertIn("FLUSH_SECONDS", dir(settings_module))
        self.assertRaises(AttributeError, getattr, settings_module,
                          "NO_SUCH_SETTING")

    def test_star_import_is_the_defaults(self):
        """
        A config of only C{from failnozzle.settings import *} has the
        settings of no config at all.
        """
        path = self.config("from failnozzle.settings import *\n")
        self.assertEqual(changed_settings(load_settings(None)[0],
                                          load_settings(path)[0]), set())

    def test_extending_defaults(self):
        """
        The defaults can be extended as the original's could.
        """
        path = self.config("""\
            from failnozzle import settings
            from failnozzle.settings import *
            MONITORING_ERROR_MARKERS = MONITORING_ERROR_MARKERS + ['mine']
            REPORT_TO = settings.REPORT_TO + ['ops@example.com']
            FLUSH_SECONDS = settings.FLUSH_SECONDS * 2
            """)
        loaded, _ = load_settings(path)
        self.assertEqual(loaded.MONITORING_ERROR_MARKERS,
                         default_value("MONITORING_ERROR_MARKERS")
                         + ("mine",))
        self.assertEqual(loaded.REPORT_TO, ("ops@example.com",))
        self.assertEqual(loaded.FLUSH_SECONDS, 120)

    def test_change_in_place_stays_in_the_config(self):
        """
        A config that appends to a default list changes its own copy: read
        again (as on a reload) it appends once, and the defaults stay.
        """
        path = self.config("""\
            from failnozzle.settings import *
            MONITORING_ERROR_MARKERS.append('mine')
            """)
        for _ in range(2):
            self.assertEqual(
                load_settings(path)[0].MONITORING_ERROR_MARKERS,
                default_value("MONITORING_ERROR_MARKERS") + ("mine",))
        self.assertNotIn("mine", settings_module.MONITORING_ERROR_MARKERS)


class SplitOutput(TwistdProcess):
    """A L{TwistdProcess} that also keeps standard output on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout = b""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        super().outReceived(data)

    def errReceived(self, data: bytes) -> None:
        super().outReceived(data)


#: A config written for the original failnozzle, as a supervisor setup
#: would have it, but for the addresses and paths a test needs.
ORIGINAL_CONFIG = """\
    import os
    from collections import namedtuple
    from failnozzle.server import UniqueMessage, _default_fake_record

    BASE_DIR = os.path.dirname(os.path.abspath(__file__))
    MSG = namedtuple('MSG', UniqueMessage._fields)
    UNIQUE_MSG_TUPLE = MSG

    UDP_BIND = ('127.0.0.1', '0')
    INCOMING_MESSAGE_MAX_SIZE = 65536
    FLUSH_SECONDS = '3600'
    SOURCE_FIELD_NAME = 'host'
    SERVER_NAME = 'nozzle test'
    REPORT_TOO = 'typo@example.com'
    MAILDIR = os.path.join(BASE_DIR, 'mail')
    SPOOL_DIR = os.path.join(BASE_DIR, 'spool')
    STATE_FILE = os.path.join(BASE_DIR, 'state.json')

    def INTERNAL_ERROR_FUNC(count, exception):
        record = _default_fake_record(count, exception)
        record['kind'] = 'nozzle-internal'
        return record
    """


class ServerCommandTests(_TwistdTestCase):
    """
    The real C{python -m failnozzle.server [CONFIG]}, as supervisor runs
    it.
    """

    def run_server(self, *args: str, cwd=None) -> SplitOutput:
        return spawn_twistd(self, list(args), cwd or self.make_directory(),
                            command=SERVER, process=SplitOutput())

    @defer.inlineCallbacks
    def assert_one_line(self, process: SplitOutput, status: int):
        """
        The process ends with C{status} after one line of output, which
        the returned Deferred fires with.
        """
        reason = yield process.wait_for_end()
        output = process.text
        self.assertEqual(getattr(reason, "exitCode", 0), status, output)
        self.assertIsNone(getattr(reason, "signal", None), output)
        self.assertNotIn("Traceback", output)
        lines = lines_of(output)
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    @defer.inlineCallbacks
    def test_original_config_in_foreground(self):
        """
        A config written for the original runs in the foreground: errors
        received (custom source field, a bad datagram reported through the
        config's INTERNAL_ERROR_FUNC) are in the digest written on SIGTERM;
        the notices are logged; everything goes to standard error, as the
        original logged; no pid file is written.
        """
        cwd = self.make_directory()
        # Not in cwd: python -m puts it first on sys.path, where a
        # failnozzle.py would hide the package (for the original too).
        etc = self.make_directory()
        config = write(etc, "failnozzle.py", ORIGINAL_CONFIG)
        process = self.run_server(config, cwd=cwd)
        listening = yield process.wait_for(
            r"listening for errors on UDP 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(listening.group(1)))
        send_datagrams(address, [record("boom", host="web1"),
                                 record("boom", host="web2"), b"not json"])
        yield process.wait_for(r"Bad input from 127\.0\.0\.1")
        process.transport.signalProcess("TERM")
        reason = yield process.wait_for_end()
        self.assertIsInstance(reason, error.ProcessTerminated, process.text)
        self.assertEqual(reason.signal, signal.SIGTERM, process.text)

        [digest] = maildir_files(os.path.join(etc, "mail"))
        message = read_message(digest)
        self.assertEqual("[nozzle test] 2 new: Error: boom in views "
                         "(3 total)", message["Subject"])
        body = message.get_content()
        self.assertIn("(app, nozzle-internal)", body)
        self.assertIn("- on web1, 1X\n- on web2, 1X\n", body)
        log = process.text
        for notice in (
                "REPORT_TOO is not a setting and is ignored (did you mean "
                "REPORT_TO?)",
                "BASE_DIR is not a setting and is ignored",
                "INCOMING_MESSAGE_MAX_SIZE = 65536 is read as 65507"):
            self.assertIn(notice, log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
        self.assertEqual(process.stdout, b"")
        # No twistd.pid, nor anything else: the config's paths are in etc.
        self.assertEqual(os.listdir(cwd), [])

    @defer.inlineCallbacks
    def test_missing_config(self):
        """
        A config that does not exist: one line naming it, status 1, as the
        original's "Config file ... not found".
        """
        line = yield self.assert_one_line(
            self.run_server("/no/such/failnozzle.py"), 1)
        self.assertIn("'/no/such/failnozzle.py'", line)

    @defer.inlineCallbacks
    def test_defaults_without_config(self):
        """
        Without CONFIG it runs with the defaults: it listens on UDP_BIND's
        127.0.0.1:1549, which this test holds, so it stops saying so.
        """
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        try:
            holder.bind(("127.0.0.1", 1549))
        except OSError:
            pass  # Held by another process: the same for the daemon.
        line = yield self.assert_one_line(self.run_server(), 1)
        self.assertEqual(line, "failnozzle: UDP_BIND: cannot listen on "
                               "127.0.0.1:1549: Address already in use")

    @defer.inlineCallbacks
    def test_usage(self):
        """
        --help prints the usage (status 0); more than one argument is a
        usage error (status 2).
        """
        process = self.run_server("--help")
        reason = yield process.wait_for_end()
        self.assertIsInstance(reason, error.ProcessDone, process.text)
        self.assertIn("usage: python -m failnozzle.server [CONFIG]",
                      process.text)
        process = self.run_server("a.py", "b.py")
        reason = yield process.wait_for_end()
        self.assertEqual(reason.exitCode, 2, process.text)
        self.assertIn("usage: python -m failnozzle.server", process.text)


class TwistdCommandTests(_TwistdTestCase):
    """
    C{twistd failnozzle --check} and C{--version}, run for real.
    """

    @defer.inlineCallbacks
    def run_twistd(self, *args: str, cwd=None):
        """Run C{twistd failnozzle *args}; the reason it ended and output."""
        process = spawn_twistd(self, ["failnozzle", *args],
                               cwd or self.make_directory())
        reason = yield process.wait_for_end()
        return reason, lines_of(process.text)

    @defer.inlineCallbacks
    def test_check_problems(self):
        """
        --check prints every problem, one line each, and exits with 1;
        nothing is created.
        """
        cwd = self.make_directory()
        config = write(cwd, "site.py", """\
            SMTP_HOST = 'smtp.example.com'
            SMTP_PORT = 'smtps'
            REPORT_TO = 'j\u00f6rg@example.com'
            SERVER_NAME = 'web1\\r\\n'
            EMAIL_BODY_TEMPLATE = 'missing.txt'
            """)
        reason, lines = yield self.run_twistd(f"--config={config}", "--check",
                                              cwd=cwd)
        self.assertEqual(reason.exitCode, 1, lines)
        problems = [line for line in lines if "notice:" not in line]
        self.assertEqual(len(problems), 5, lines)
        for line, setting in zip(problems, [
                "SMTP_PORT", "REPORT_TO", "SERVER_NAME", "REPORT_FROM",
                "EMAIL_BODY_TEMPLATE"]):
            self.assertTrue(line.startswith(f"failnozzle: {setting}"), line)
        self.assertEqual(os.listdir(cwd), ["site.py"])

    @defer.inlineCallbacks
    def test_check_valid(self):
        """
        --check of valid settings prints that they are, and exits with 0.
        """
        cwd = self.make_directory()
        config = write(cwd, "site.py", "UDP_BIND = ('0.0.0.0', '1549')\n")
        reason, lines = yield self.run_twistd(f"--config={config}", "--check",
                                              cwd=cwd)
        self.assertIsInstance(reason, error.ProcessDone, lines)
        self.assertEqual(lines, [f"failnozzle: the settings are valid "
                                 f"(config file {config!r})"])

    @defer.inlineCallbacks
    def test_version(self):
        """
        --version prints failnozzle's version and exits with 0.
        """
        reason, lines = yield self.run_twistd("--version")
        self.assertIsInstance(reason, error.ProcessDone, lines)
        self.assertEqual(lines, [f"failnozzle {failnozzle.__version__}"])
