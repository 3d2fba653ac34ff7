"""
Tests for L{failnozzle.config}: defaults, config files written for the
original failnozzle, and one clear line for every kind of mistake.
"""
import dataclasses
import logging
import os
import sys
import textwrap
from collections import namedtuple

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.config import (DEFAULT_MONITORING_ERROR_MARKERS,
                               SECRET_SETTINGS, ConfigError, Settings,
                               UniqueMessage, changed_settings, check_settings,
                               default_value, load_settings, parse_host_port,
                               read_config_file)
from failnozzle.service import make_transport


def without_udp_bind(notices):
    """The notices but the one every config without UDP_BIND gets."""
    return [notice for notice in notices
            if not notice.startswith("UDP_BIND is not set")]


class ConfigTestCase(SynchronousTestCase):
    """
    Helpers to write a config file and load it.
    """

    def write(self, text, name="failnozzle_site.py"):
        """Write C{text} (dedented) to a new file; return its path."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as config_file:
            config_file.write(textwrap.dedent(text))
        return path

    def shared_module(self, module, text):
        """
        Write C{text} as the module C{module} a config file may import
        (C{from module import *}), importable until the test ends.

        @return: its path.
        """
        path = self.write(text, name=f"{module}.py")
        directory = os.path.dirname(path)
        self.addCleanup(sys.modules.pop, module, None)
        self.addCleanup(sys.path.remove, directory)
        sys.path.insert(0, directory)
        return path

    def load(self, text):
        """The settings and notices a config file of C{text} gives."""
        return load_settings(self.write(text))

    def assertConfigError(self, text, setting, *fragments):
        """
        Loading C{text} fails with a one-line L{ConfigError} naming
        C{setting} and containing each of C{fragments}.

        @return: the error's text.
        """
        error = self.assertRaises(ConfigError, self.load, text)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn(setting, message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class DefaultsTests(ConfigTestCase):
    """
    The settings when a config file says nothing.
    """

    def assertDefaults(self, settings):
        self.assertEqual(settings.UDP_BIND, ("127.0.0.1", 1549))
        self.assertEqual(settings.FLUSH_SECONDS, 60)
        self.assertEqual(settings.PAGER_WINDOW_SIZE, 5)
        self.assertEqual(settings.PAGER_LIMIT, 100)
        self.assertEqual(settings.SOURCE_FIELD_NAME, "source")
        self.assertEqual(settings.INCOMING_MESSAGE_MAX_SIZE, 65507)
        self.assertEqual(settings.MAX_UNIQUE_MESSAGES, 2000)
        self.assertEqual(settings.MONITORING_ERROR_MARKERS,
                         ("1669fe88-b0c3-439d-bc10-8a3d21493ede",
                          "c84a3673-0a95-447b-810f-8107e1e38013"))
        self.assertIs(settings.UNIQUE_MSG_TUPLE, UniqueMessage)
        self.assertEqual(settings.unique_fields,
                         ("module", "funcName", "filename", "message",
                          "pathname", "lineno", "exc_text", "kind"))
        self.assertEqual(settings.EMAIL_BODY_TEMPLATE, "body-template.txt")
        self.assertEqual(settings.EMAIL_SUBJECT_TEMPLATE,
                         "subject-template.txt")
        self.assertIsNone(settings.INTERNAL_ERROR_FUNC)
        self.assertIsNone(settings.SMTP_HOST)
        self.assertIsNone(settings.SMTP_TLS)
        self.assertFalse(settings.smtp_enabled)

    def test_no_file(self):
        """
        Without a config file every setting has its documented default;
        the one notice says that only this machine can send (UDP_BIND).
        """
        settings, notices = load_settings(None)
        self.assertDefaults(settings)
        self.assertEqual(notices, [
            "UDP_BIND is not set: listening on 127.0.0.1:1549, so only this "
            "machine can send errors (the original failnozzle listened on "
            "every interface: set UDP_BIND = ('0.0.0.0', 1549) for that)"])

    def test_empty_file(self):
        """
        A config file of comments only gives the defaults too, and the
        UDP_BIND notice names the file.
        """
        path = self.write("# nothing to change\n")
        settings, notices = load_settings(path)
        self.assertDefaults(settings)
        [notice] = notices
        self.assertTrue(notice.startswith(
            f"UDP_BIND is not set in config file {path!r}: listening on "
            f"127.0.0.1:1549, so only this machine can send errors"), notice)

    def test_monitoring_markers_are_the_originals(self):
        """
        The default markers are the original failnozzle's two UUIDs.
        """
        self.assertEqual(load_settings(None)[0].MONITORING_ERROR_MARKERS,
                         DEFAULT_MONITORING_ERROR_MARKERS)

    def test_maildir_mode_addresses(self):
        """
        Without SMTP_HOST the digests go to the maildir with placeholder
        addresses, so their headers are well-formed.
        """
        settings, _ = load_settings(None)
        self.assertEqual(settings.REPORT_FROM, "failnozzle@localhost")
        self.assertEqual(settings.REPORT_TO, ("failnozzle@localhost",))

    def test_overrides_win(self):
        """
        Overrides (from the command line) replace what the file says.
        """
        path = self.write("FLUSH_SECONDS = 30\n")
        settings, _ = load_settings(path, {"FLUSH_SECONDS": 5.5})
        self.assertEqual(settings.FLUSH_SECONDS, 5.5)


class SMTPTLSTests(ConfigTestCase):
    """
    SMTP_TLS: unset, it is found out when sending, whatever the port.
    """

    def test_unset_stays_unset(self):
        """
        Unset, SMTP_TLS stays None on every port (the transport tries
        implicit TLS first on 465, STARTTLS first elsewhere).
        """
        for port in (25, 465, 587, 2525):
            settings, _ = self.load(f"SMTP_PORT = {port}\n")
            self.assertIsNone(settings.SMTP_TLS, port)

    def test_password_not_in_clear_when_unset(self):
        """
        AUTH with SMTP_TLS unset is no notice: the mode found out is always
        TLS, never clear text.
        """
        _, notices = self.load("""\
            UDP_BIND = ('127.0.0.1', 1549)
            SMTP_HOST = 'smtp.example.com'
            SMTP_USER = 'u'
            SMTP_PASSWORD = 'p'
            REPORT_FROM = 'nozzle@example.com'
            REPORT_TO = 'ops@example.com'
            """)
        self.assertEqual(notices, [])

    def test_explicit_kept(self):
        """
        A mode set in the file is kept whatever the port.
        """
        settings, _ = self.load("SMTP_PORT = 465\nSMTP_TLS = 'off'\n")
        self.assertEqual(settings.SMTP_TLS, "off")
        settings, _ = self.load("SMTP_PORT = 25\nSMTP_TLS = 'implicit'\n")
        self.assertEqual(settings.SMTP_TLS, "implicit")

    def test_password_in_clear_noticed(self):
        """
        AUTH without TLS is allowed but said at start-up.
        """
        _, notices = self.load("""\
            SMTP_HOST = 'smtp.example.com'
            SMTP_TLS = 'off'
            SMTP_USER = 'u'
            SMTP_PASSWORD = 'p'
            REPORT_FROM = 'nozzle@example.com'
            REPORT_TO = 'ops@example.com'
            """)
        [notice] = without_udp_bind(notices)
        self.assertIn("SMTP_USER", notice)
        self.assertIn("clear", notice)


class OriginalConfigTests(ConfigTestCase):
    """
    A config file exactly in the style of the original failnozzle's works
    unchanged.
    """

    ORIGINAL = """\
        # failnozzle config, as written for the original
        import os
        import logging
        from collections import namedtuple
        from logging import DEBUG

        base_dir = os.path.dirname(__file__)
        template_dir = os.path.join(base_dir, 'templates')

        SERVER_NAME = os.uname()[1]
        LOG_LEVEL = logging.INFO
        LOG_FORMAT = '%(asctime)-15s %(levelname)-8s %(message)s'
        UDP_BIND = ('0.0.0.0', 1549)
        INCOMING_MESSAGE_MAX_SIZE = 65536

        SMTP_HOST = 'smtp.example.com'
        SMTP_PORT = 465
        SMTP_USER = 'error.reporter@example.com'
        SMTP_PASSWORD = 'drink canada pony solvent'

        REPORT_FROM = 'error.reporter@example.com'
        REPORT_TO = 'your.team@example.com'
        JUST_MONITORING_REPORT_TO = 'error.canary@example.com'
        PAGER_TO = 'your.pager.address@example.com'
        PAGER_FROM = 'error.reporter@example.com'

        FLUSH_SECONDS = 30
        PAGER_WINDOW_SIZE = 4
        PAGER_LIMIT = 50
        MONITORING_ERROR_MARKERS = ["1669fe88-b0c3-439d-bc10-8a3d21493ede"]

        UNIQUE_MSG_TUPLE = namedtuple('MyMessage',
                                      ['module', 'message', 'kind'])
        SOURCE_FIELD_NAME = 'host'
        EMAIL_TEMPLATE_DIR = template_dir
        EMAIL_BODY_TEMPLATE = 'body.txt'
        EMAIL_SUBJECT_TEMPLATE = 'subject.txt'


        def INTERNAL_ERROR_FUNC(count, exception):
            return dict(module='failnozzle', kind='internal',
                        message='Internal error: %d %r' % (count, exception))
        """

    def setUp(self):
        self.path = self.write(self.ORIGINAL)
        os.mkdir(os.path.join(os.path.dirname(self.path), "templates"))
        self.settings, self.notices = load_settings(self.path)

    def test_values(self):
        """
        Every setting the file assigns is read with its value; what is
        derived is filled in, and nothing calls for a notice.
        """
        settings = self.settings
        self.assertEqual(settings.SERVER_NAME, os.uname()[1])
        self.assertEqual(settings.LOG_LEVEL, logging.INFO)
        self.assertEqual(settings.UDP_BIND, ("0.0.0.0", 1549))
        self.assertEqual(settings.SMTP_HOST, "smtp.example.com")
        self.assertEqual(settings.SMTP_PORT, 465)
        # Found out when sending, implicit TLS first on 465.
        self.assertIsNone(settings.SMTP_TLS)
        self.assertEqual(settings.SMTP_USER, "error.reporter@example.com")
        self.assertEqual(settings.SMTP_PASSWORD, "drink canada pony solvent")
        self.assertEqual(settings.REPORT_FROM, "error.reporter@example.com")
        self.assertEqual(settings.REPORT_TO, ("your.team@example.com",))
        self.assertEqual(settings.JUST_MONITORING_REPORT_TO,
                         ("error.canary@example.com",))
        self.assertEqual(settings.PAGER_TO,
                         ("your.pager.address@example.com",))
        self.assertEqual(settings.PAGER_FROM, "error.reporter@example.com")
        self.assertEqual(settings.FLUSH_SECONDS, 30)
        self.assertEqual(settings.PAGER_WINDOW_SIZE, 4)
        self.assertEqual(settings.PAGER_LIMIT, 50)
        self.assertEqual(settings.MONITORING_ERROR_MARKERS,
                         ("1669fe88-b0c3-439d-bc10-8a3d21493ede",))
        self.assertEqual(settings.SOURCE_FIELD_NAME, "host")
        self.assertEqual(settings.EMAIL_TEMPLATE_DIR,
                         os.path.join(os.path.dirname(self.path), "templates"))
        self.assertEqual(settings.EMAIL_BODY_TEMPLATE, "body.txt")
        self.assertEqual(settings.EMAIL_SUBJECT_TEMPLATE, "subject.txt")

    def test_datagram_size(self):
        """
        The original's INCOMING_MESSAGE_MAX_SIZE of 65536 is read as 65507,
        UDP's largest payload, with the one notice this file calls for.
        """
        self.assertEqual(self.settings.INCOMING_MESSAGE_MAX_SIZE, 65507)
        self.assertEqual(self.notices, [
            "INCOMING_MESSAGE_MAX_SIZE = 65536 is read as 65507, the largest "
            "payload UDP carries"])

    def test_namedtuple(self):
        """
        UNIQUE_MSG_TUPLE is the namedtuple class the file made.
        """
        self.assertEqual(self.settings.UNIQUE_MSG_TUPLE.__name__, "MyMessage")
        self.assertEqual(self.settings.unique_fields,
                         ("module", "message", "kind"))

    def test_internal_error_func(self):
        """
        INTERNAL_ERROR_FUNC is the function the file defines.
        """
        record = self.settings.INTERNAL_ERROR_FUNC(3, ValueError("x"))
        self.assertEqual(record["message"],
                         "Internal error: 3 ValueError('x')")

    def test_imports_and_helpers_ignored(self):
        """
        What the file imports (C{DEBUG}, modules) and its lowercase helper
        variables are not settings.
        """
        values, notices = read_config_file(self.path)
        self.assertEqual(notices, [])
        self.assertNotIn("DEBUG", values)
        self.assertNotIn("os", values)
        self.assertNotIn("base_dir", values)
        self.assertIn("INTERNAL_ERROR_FUNC", values)
        self.assertTrue(all(name.isupper() for name in values))

    def test_any_file_name(self):
        """
        The file need not end in .py, as with the original's load_source.
        """
        path = self.write("FLUSH_SECONDS = 7\n", name="failnozzle.conf")
        self.assertEqual(load_settings(path)[0].FLUSH_SECONDS, 7)


class NamesTests(ConfigTestCase):
    """
    Which names of a config file are settings.
    """

    def test_imported_constant_used(self):
        """
        C{from logging import DEBUG} is no unknown setting, and its value
        can be used.
        """
        settings, _ = self.load("from logging import DEBUG\n"
                                "LOG_LEVEL = DEBUG\n")
        self.assertEqual(settings.LOG_LEVEL, logging.DEBUG)

    def test_star_import_of_settings(self):
        """
        Settings imported from a shared module count, as they did for the
        original; other UPPER_CASE names that come with them do not.
        """
        self.shared_module("failnozzle_shared_defaults", """\
            REPORT_TO = ['shared@example.com']
            FLUSH_SECONDS = 15
            SOME_CONSTANT = 3
            """)
        settings, _ = self.load("""\
            from failnozzle_shared_defaults import *
            FLUSH_SECONDS = 20
            """)
        self.assertEqual(settings.REPORT_TO, ("shared@example.com",))
        self.assertEqual(settings.FLUSH_SECONDS, 20)

    def test_shared_module_read_again(self):
        """
        A module of the site's own that a config imports is read again
        with it (a reload), so a change to it takes effect.
        """
        shared = self.shared_module("failnozzle_shared_reread",
                                    "FLUSH_SECONDS = 15\n")
        config = "from failnozzle_shared_reread import *\n"
        self.assertEqual(self.load(config)[0].FLUSH_SECONDS, 15)
        with open(shared, "w") as out:
            out.write("FLUSH_SECONDS = 250\n")
        self.assertEqual(self.load(config)[0].FLUSH_SECONDS, 250)
        self.assertNotIn("failnozzle_shared_reread", sys.modules)

    def test_definition_in_block(self):
        """
        A setting defined inside an C{if} or C{try} block is read.
        """
        settings, _ = self.load("""\
            try:
                import no_such_module_for_failnozzle
            except ImportError:
                def INTERNAL_ERROR_FUNC(count, exception):
                    return {'message': 'fallback'}
            if True:
                PAGER_LIMIT = 7
            """)
        self.assertEqual(settings.INTERNAL_ERROR_FUNC(1, None),
                         {"message": "fallback"})
        self.assertEqual(settings.PAGER_LIMIT, 7)

    def test_function_locals_ignored(self):
        """
        UPPER_CASE names local to a function, a comprehension or a class
        body are not the file's settings.
        """
        settings, _ = self.load("""\
            def helper():
                NOT_A_SETTING = 1
                return NOT_A_SETTING
            class Helper:
                ALSO_NOT = 2
            REPORT_TO = [ADDR for ADDR in ['a@example.com']]
            PAGER_LIMIT = helper() + Helper.ALSO_NOT
            """)
        self.assertEqual(settings.PAGER_LIMIT, 3)
        self.assertEqual(settings.REPORT_TO, ("a@example.com",))

    def test_private_names_ignored(self):
        """
        Names starting with an underscore are helpers, not settings.
        """
        values, notices = read_config_file(self.write("_HELPER = 1\n_x = 2\n"))
        self.assertEqual((values, notices), ({}, []))


class AddressTests(ConfigTestCase):
    """
    REPORT_TO and the other recipient settings.
    """

    def test_one_address(self):
        """
        One address, as the original took it, becomes a list of one.
        """
        settings, _ = self.load("REPORT_TO = 'ops@example.com'\n")
        self.assertEqual(settings.REPORT_TO, ("ops@example.com",))

    def test_list(self):
        """
        A list or a tuple of addresses is kept in order.
        """
        settings, _ = self.load(
            "REPORT_TO = ['ops@example.com', 'dev@example.com']\n"
            "PAGER_TO = ('p@example.com',)\n")
        self.assertEqual(settings.REPORT_TO,
                         ("ops@example.com", "dev@example.com"))
        self.assertEqual(settings.PAGER_TO, ("p@example.com",))

    def test_comma_separated(self):
        """
        A string of several addresses, as in a To: header, is several
        recipients, not one the SMTP server would refuse.
        """
        settings, _ = self.load(
            "REPORT_TO = 'ops@example.com, \"Doe, Jo\" <jo@example.com>'\n")
        self.assertEqual(settings.REPORT_TO,
                         ("ops@example.com", '"Doe, Jo" <jo@example.com>'))

    def test_display_name(self):
        """
        An address with a display name is an address.
        """
        settings, _ = self.load(
            "REPORT_FROM = 'Error Reporter <err@example.com>'\n")
        self.assertEqual(settings.REPORT_FROM,
                         "Error Reporter <err@example.com>")

    def test_empty(self):
        """
        None, '' and [] mean "not set".
        """
        for value in ("None", "''", "[]"):
            settings, _ = self.load(f"JUST_MONITORING_REPORT_TO = {value}\n")
            self.assertEqual(settings.JUST_MONITORING_REPORT_TO, (), value)


class UniqueMsgTupleTests(ConfigTestCase):
    """
    UNIQUE_MSG_TUPLE as a namedtuple class or a list of field names.
    """

    def test_namedtuple_class(self):
        """
        A namedtuple class is kept as it is.
        """
        custom = namedtuple("CustomUniqueError", ["x", "y", "z"])
        settings, _ = load_settings(None, {"UNIQUE_MSG_TUPLE": custom})
        self.assertIs(settings.UNIQUE_MSG_TUPLE, custom)
        self.assertEqual(settings.unique_fields, ("x", "y", "z"))

    def test_list_of_names(self):
        """
        A list (or tuple) of field names becomes a namedtuple of them.
        """
        for text in ("['x', 'y', 'z']", "('x', 'y', 'z')"):
            settings, _ = self.load(f"UNIQUE_MSG_TUPLE = {text}\n")
            self.assertEqual(settings.unique_fields, ("x", "y", "z"))
            self.assertEqual(settings.UNIQUE_MSG_TUPLE(1, 2, 3).y, 2)

    def test_invalid(self):
        """
        None (as the original's test_validate_settings), no fields,
        duplicate or non-identifier names, or anything else is refused.
        """
        for text in ("None", "[]", "['a', 'a']", "['not-a-name']", "[1, 2]",
                     "'message'", "dict", "namedtuple('E', [])"):
            self.assertConfigError(
                "from collections import namedtuple\n"
                f"UNIQUE_MSG_TUPLE = {text}\n",
                "UNIQUE_MSG_TUPLE")


class LegacyNameTests(ConfigTestCase):
    """
    The names the original's README used.
    """

    def test_read_as_current(self):
        """
        ERROR_RECIP, JUST_MONITORING_ERROR_RECIP and PAGER_WINDOW_LIMIT are
        read as REPORT_TO, JUST_MONITORING_REPORT_TO and PAGER_LIMIT, each
        with a notice.
        """
        settings, notices = self.load("""\
            ERROR_RECIP = 'ops@example.com'
            JUST_MONITORING_ERROR_RECIP = 'canary@example.com'
            PAGER_WINDOW_LIMIT = 42
            """)
        self.assertEqual(settings.REPORT_TO, ("ops@example.com",))
        self.assertEqual(settings.JUST_MONITORING_REPORT_TO,
                         ("canary@example.com",))
        self.assertEqual(settings.PAGER_LIMIT, 42)
        self.assertEqual(without_udp_bind(notices), [
            "ERROR_RECIP is read as REPORT_TO; please rename it",
            "JUST_MONITORING_ERROR_RECIP is read as JUST_MONITORING_REPORT_TO;"
            " please rename it",
            "PAGER_WINDOW_LIMIT is read as PAGER_LIMIT; please rename it",
        ])

    def test_current_wins(self):
        """
        When both names are set the current one wins and the legacy one
        is said to be ignored.
        """
        settings, notices = self.load("""\
            ERROR_RECIP = 'old@example.com'
            REPORT_TO = 'new@example.com'
            """)
        self.assertEqual(settings.REPORT_TO, ("new@example.com",))
        self.assertEqual(without_udp_bind(notices),
                         ["ERROR_RECIP is ignored: REPORT_TO is set too"])

    def test_after_the_defaults_imported(self):
        """
        After C{from failnozzle.settings import *}, which the original's
        configs began with, the legacy names are read all the same: the
        current names' defaults it brings are not set by the file.
        """
        settings, notices = self.load("""\
            from failnozzle.settings import *
            ERROR_RECIP = 'ops@example.com'
            PAGER_WINDOW_LIMIT = 5
            """)
        self.assertEqual(settings.REPORT_TO, ("ops@example.com",))
        self.assertEqual(settings.PAGER_LIMIT, 5)
        self.assertEqual(without_udp_bind(notices), [
            "ERROR_RECIP is read as REPORT_TO; please rename it",
            "PAGER_WINDOW_LIMIT is read as PAGER_LIMIT; please rename it",
        ])

    def test_error_names_legacy(self):
        """
        A wrong value under a legacy name is reported under that name, the
        one the user wrote.
        """
        self.assertConfigError("PAGER_WINDOW_LIMIT = 'many'\n",
                               "PAGER_WINDOW_LIMIT")
        self.assertConfigError("ERROR_RECIP = 5\n", "ERROR_RECIP")


class UnknownNameTests(ConfigTestCase):
    """
    An UPPER_CASE name a config file assigns that is no setting is ignored
    with a notice, as the original ignored it; given as an override it is
    a mistake.
    """

    def assertIgnored(self, text, name, ending):
        """
        Loading C{text} works; its notice about C{name} names the file and
        ends with C{ending}.

        @return: the path of the file and its settings.
        """
        path = self.write(text)
        settings, notices = load_settings(path)
        [notice] = [notice for notice in notices if name in notice]
        self.assertEqual(
            notice, f"config file {path!r}: {name} is not a setting and is "
                    f"ignored{ending}")
        return path, settings

    def test_typo_suggestion(self):
        """
        A near miss is named with the setting it probably means.
        """
        self.assertIgnored("REPORT_TOO = 'a@example.com'\n", "REPORT_TOO",
                           " (did you mean REPORT_TO?)")

    def test_no_suggestion(self):
        """
        A name like no setting is only named.
        """
        self.assertIgnored("ZZZ = 1\n", "ZZZ", "")

    def test_defined_function(self):
        """
        An UPPER_CASE function or class is noticed too.
        """
        self.assertIgnored("def INTERNAL_ERROR_FUNCTION(c, e):\n"
                           "    return {}\n", "INTERNAL_ERROR_FUNCTION",
                           " (did you mean INTERNAL_ERROR_FUNC?)")

    def test_helpers_of_the_original(self):
        """
        The helpers configs of the original define load, and their values
        can make settings: C{BASE_DIR} from C{__file__}, a namedtuple
        C{MSG} that becomes UNIQUE_MSG_TUPLE.
        """
        path, settings = self.assertIgnored("""\
            import os
            from collections import namedtuple
            BASE_DIR = os.path.dirname(__file__)
            MSG = namedtuple('MSG', ['message', 'kind'])
            UNIQUE_MSG_TUPLE = MSG
            EMAIL_TEMPLATE_DIR = BASE_DIR
            """, "BASE_DIR", "")
        self.assertEqual(settings.unique_fields, ("message", "kind"))
        self.assertEqual(settings.EMAIL_TEMPLATE_DIR, os.path.dirname(path))
        self.assertIn(f"config file {path!r}: MSG is not a setting and is "
                      f"ignored", load_settings(path)[1])

    def test_required_still_enforced(self):
        """
        A typo of a required setting leaves it missing: that is refused.
        """
        self.assertConfigError("SMTP_HOST = 'smtp.example.com'\n"
                               "REPORT_FROM = 'nozzle@example.com'\n"
                               "REPORT_TOO = 'ops@example.com'\n",
                               "REPORT_TO is required when SMTP_HOST is set")

    def test_unknown_override(self):
        """
        An override of no setting is a ConfigError, not a KeyError.
        """
        error = self.assertRaises(ConfigError, load_settings, None,
                                  {"FLUSH_SECOND": 5})
        self.assertIn("unknown setting FLUSH_SECOND", str(error))
        self.assertIn("did you mean FLUSH_SECONDS?", str(error))


class TypeErrorTests(ConfigTestCase):
    """
    A value of the wrong type or range, for each kind of setting.
    """

    def assertAllRefused(self, setting, values, *fragments):
        for value in values:
            self.assertConfigError(f"{setting} = {value}\n", setting,
                                   *fragments)

    def test_strings(self):
        """
        Settings that are text refuse other types and "".
        """
        self.assertAllRefused("SOURCE_FIELD_NAME", ["5", "''", "None",
                                                    "['source']"],
                              "non-empty string")
        self.assertAllRefused("MAILDIR", ["None", "b'mail'"])
        self.assertAllRefused("EMAIL_BODY_TEMPLATE", ["0"])
        self.assertAllRefused("SERVER_NAME", ["('a',)"])
        self.assertAllRefused("SMTP_HOST", ["25", "True"])
        self.assertAllRefused("SMTP_USER", ["1"])

    def test_addresses(self):
        """
        Recipient settings take addresses only, without line breaks.
        """
        self.assertAllRefused("REPORT_TO", ["5", "{'a@example.com'}"],
                              "email address or a list")
        self.assertAllRefused("REPORT_TO", ["['ops']", "[None]",
                                            "'a@example.com\\nBcc: x@y.z'",
                                            "'a@example.com\\r'"],
                              "is not an email address")
        self.assertAllRefused("PAGER_TO", ["'pager'"])
        self.assertAllRefused("REPLY_TO", ["[1]"])

    def test_one_address(self):
        """
        REPORT_FROM and PAGER_FROM are one address, not a list.
        """
        self.assertAllRefused(
            "REPORT_FROM", ["['a@example.com', 'b@example.com']",
                            "'a@example.com, b@example.com'"],
            "one email address")
        self.assertAllRefused("PAGER_FROM", ["'nobody'"])

    def test_whole_numbers(self):
        """
        Counts take whole numbers of at least 1: no other text, float or
        bool.
        """
        for setting in ("PAGER_WINDOW_SIZE", "PAGER_LIMIT",
                        "MAX_UNIQUE_MESSAGES", "INCOMING_MESSAGE_MAX_SIZE",
                        "UDP_RCVBUF"):
            self.assertAllRefused(setting, ["'five'", "'5.0'", "5.0",
                                            "None", "'0x5'"],
                                  "whole number")
            self.assertAllRefused(setting, ["0", "-3"], "at least 1")

    def test_bools_are_not_numbers(self):
        """
        True and False are refused where a number is expected, though
        Python counts them as ints.
        """
        for setting in ("PAGER_LIMIT", "PAGER_WINDOW_SIZE", "SMTP_PORT",
                        "INCOMING_MESSAGE_MAX_SIZE", "MAX_UNIQUE_MESSAGES",
                        "FLUSH_SECONDS", "SMTP_TIMEOUT", "UDP_RCVBUF",
                        "LOG_LEVEL"):
            for value in ("True", "False"):
                self.assertConfigError(f"{setting} = {value}\n", setting,
                                       f"not {value}")
        self.assertConfigError("UDP_BIND = ('127.0.0.1', True)\n",
                               "UDP_BIND", "not True")

    def test_seconds(self):
        """
        Durations are finite numbers of at least a tenth of a second (a
        timer due more often keeps the daemon busy doing nothing else), or
        0 where that turns the feature off.
        """
        for setting in ("FLUSH_SECONDS", "SMTP_TIMEOUT"):
            self.assertAllRefused(setting, ["'soon'", "None", "'nan'",
                                            "'1e400'"], "a number")
            self.assertAllRefused(setting, ["0", "0.0", "1e-9", "0.09"],
                                  "at least 0.1 seconds, not")
            self.assertAllRefused(setting, ["-1"], "at least 0")
            self.assertAllRefused(setting, ["float('nan')", "float('inf')"],
                                  "a number")
        self.assertAllRefused("SNAPSHOT_SECONDS", ["1e-9"],
                              "at least 0.1 seconds (or 0, for off)")
        settings, _ = self.load("FLUSH_SECONDS = 0.1\nSNAPSHOT_SECONDS = 0\n")
        self.assertEqual((settings.FLUSH_SECONDS, settings.SNAPSHOT_SECONDS),
                         (0.1, 0))

    def test_receive_buffer_limit(self):
        """
        UDP_RCVBUF must fit the C int the kernel takes.
        """
        self.assertAllRefused("UDP_RCVBUF", ["2 ** 31", "2 ** 40"],
                              "at most 2147483647")
        settings, _ = self.load("UDP_RCVBUF = 2 ** 31 - 1\n")
        self.assertEqual(settings.UDP_RCVBUF, 2 ** 31 - 1)

    def test_ports(self):
        """
        SMTP_PORT is 1 to 65535: a mail server cannot be reached on port 0.
        """
        self.assertAllRefused("SMTP_PORT", ["70000", "65536", "-1", "0",
                                            "'0'"],
                              "port number (1-65535)")
        self.assertAllRefused("SMTP_PORT", ["'smtps'", "25.0"],
                              "whole number")

    def test_boolean(self):
        """
        SMTP_TLS_VERIFY is True or False, not something truthy.
        """
        self.assertAllRefused("SMTP_TLS_VERIFY", ["1", "'yes'", "None"],
                              "True or False")

    def test_tls_mode(self):
        """
        SMTP_TLS is one of the three modes.
        """
        self.assertAllRefused("SMTP_TLS", ["'ssl'", "True", "'STARTTLS'"],
                              "'implicit', 'starttls', 'off'")

    def test_markers(self):
        """
        MONITORING_ERROR_MARKERS is a list of non-empty strings, not one
        string (which would be a list of its characters).
        """
        self.assertAllRefused("MONITORING_ERROR_MARKERS",
                              ["'1669fe88'", "None", "5"], "list of strings")
        self.assertAllRefused("MONITORING_ERROR_MARKERS",
                              ["['']", "[5]"], "non-empty string")

    def test_callable(self):
        """
        INTERNAL_ERROR_FUNC is a function.
        """
        self.assertAllRefused("INTERNAL_ERROR_FUNC", ["'my_func'", "{}"],
                              "function")

    def test_log_level(self):
        """
        LOG_LEVEL is a logging level, by number or name.
        """
        self.assertAllRefused("LOG_LEVEL", ["'LOUD'", "None", "1.5"],
                              "logging level")
        settings, _ = self.load("LOG_LEVEL = 'info'\n")
        self.assertEqual(settings.LOG_LEVEL, "info")

    def test_files(self):
        """
        SMTP_CA_FILE must be an existing file and EMAIL_TEMPLATE_DIR an
        existing directory.
        """
        missing = os.path.abspath(self.mktemp())
        self.assertConfigError(f"SMTP_CA_FILE = {missing!r}\n",
                               "SMTP_CA_FILE", "no such file", missing)
        self.assertConfigError(f"EMAIL_TEMPLATE_DIR = {missing!r}\n",
                               "EMAIL_TEMPLATE_DIR", "no such directory")
        existing = self.write("")
        self.assertConfigError(f"EMAIL_TEMPLATE_DIR = {existing!r}\n",
                               "EMAIL_TEMPLATE_DIR", "no such directory")
        settings, _ = self.load(f"SMTP_CA_FILE = {existing!r}\n")
        self.assertEqual(settings.SMTP_CA_FILE, existing)


class UDPBindTests(ConfigTestCase):
    """
    UDP_BIND: a (host, port) pair.
    """

    def test_malformed(self):
        """
        Anything but a pair of a host string and a port is refused.
        """
        for value in ("'127.0.0.1:1549'", "('127.0.0.1',)",
                      "('127.0.0.1', 1549, 0)", "(1549, '127.0.0.1')",
                      "None", "1549"):
            self.assertConfigError(f"UDP_BIND = {value}\n", "UDP_BIND",
                                   "(host, port) pair")

    def test_bad_port(self):
        """
        The port must be a port number.
        """
        for value in ("70000", "-1", "'syslog'", "None", "'70000'"):
            self.assertConfigError(f"UDP_BIND = ('127.0.0.1', {value})\n",
                                   "UDP_BIND")

    def test_addresses(self):
        """
        IPv4 and IPv6 addresses are kept; an empty host means all IPv4
        interfaces, as for the original's socket.
        """
        for value, expected in [
                ("('0.0.0.0', 1549)", ("0.0.0.0", 1549)),
                ("['::1', 0]", ("::1", 0)),
                ("('', 1549)", ("0.0.0.0", 1549))]:
            settings, _ = self.load(f"UDP_BIND = {value}\n")
            self.assertEqual(settings.UDP_BIND, expected)

    def test_host_name(self):
        """
        A host name, which the original's IPv4 socket accepted, is read as
        its IPv4 address.
        """
        settings, _ = self.load("UDP_BIND = ('localhost', 1549)\n")
        self.assertEqual(settings.UDP_BIND, ("127.0.0.1", 1549))

    def test_bad_host(self):
        """
        A host that is no address and no valid name is named.
        """
        self.assertConfigError("UDP_BIND = ('bad..name', 1549)\n",
                               "UDP_BIND", "'bad..name'")
        self.assertConfigError(f"UDP_BIND = ({'x' * 70!r}, 1549)\n",
                               "UDP_BIND")


class DependencyTests(ConfigTestCase):
    """
    Settings required by other settings.
    """

    SMTP = ("SMTP_HOST = 'smtp.example.com'\n"
            "REPORT_FROM = 'nozzle@example.com'\n"
            "REPORT_TO = 'ops@example.com'\n")

    def test_smtp_complete(self):
        """
        SMTP_HOST with a sender and recipients is enough.
        """
        settings, _ = self.load(self.SMTP)
        self.assertTrue(settings.smtp_enabled)
        self.assertEqual(settings.REPORT_FROM, "nozzle@example.com")

    def test_smtp_without_report_from(self):
        """
        SMTP needs REPORT_FROM.
        """
        self.assertConfigError(self.SMTP + "REPORT_FROM = None\n",
                               "REPORT_FROM", "required when SMTP_HOST")

    def test_smtp_without_report_to(self):
        """
        SMTP needs REPORT_TO.
        """
        self.assertConfigError(self.SMTP + "REPORT_TO = []\n",
                               "REPORT_TO", "required when SMTP_HOST")

    def test_user_without_password(self):
        """
        SMTP_USER needs SMTP_PASSWORD.
        """
        self.assertConfigError(self.SMTP + "SMTP_USER = 'u'\n",
                               "SMTP_PASSWORD", "required when SMTP_USER")

    def test_password_without_user(self):
        """
        SMTP_PASSWORD needs SMTP_USER.
        """
        self.assertConfigError(self.SMTP + "SMTP_PASSWORD = 'p'\n",
                               "SMTP_USER", "required when SMTP_PASSWORD")

    def test_user_and_password(self):
        """
        Both together are fine.
        """
        settings, _ = self.load(self.SMTP + "SMTP_USER = 'u'\n"
                                "SMTP_PASSWORD = 'p'\n")
        self.assertEqual((settings.SMTP_USER, settings.SMTP_PASSWORD),
                         ("u", "p"))

    def test_pager_without_from(self):
        """
        PAGER_TO with SMTP but neither PAGER_FROM nor REPORT_FROM is
        refused: the alert would have no sender.
        """
        self.assertConfigError(
            "SMTP_HOST = 'smtp.example.com'\nREPORT_TO = 'ops@example.com'\n"
            "PAGER_TO = 'pager@example.com'\n",
            "REPORT_FROM", "required when SMTP_HOST is set")

    def test_pager_from_defaults(self):
        """
        PAGER_TO with SMTP is fine with PAGER_FROM, or with REPORT_FROM
        alone.
        """
        settings, _ = self.load(self.SMTP + "PAGER_TO = 'p@example.com'\n")
        self.assertIsNone(settings.PAGER_FROM)
        settings, _ = self.load(self.SMTP + "PAGER_TO = 'p@example.com'\n"
                                "PAGER_FROM = 'alert@example.com'\n")
        self.assertEqual(settings.PAGER_FROM, "alert@example.com")


class FileErrorTests(ConfigTestCase):
    """
    A config file that cannot be read or run.
    """

    def test_missing(self):
        """
        A missing file is named, with the reason.
        """
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(str(error), f"cannot read config file {path!r}: "
                                     "No such file or directory")

    def test_directory(self):
        """
        A directory instead of a file is named too.
        """
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertIn(repr(path), str(error))
        self.assertNotIn("\n", str(error))

    def test_syntax_error(self):
        """
        A syntax error names the file and the line.
        """
        path = self.write("FLUSH_SECONDS = 60\nREPORT_TO = 'ops@example.com\n"
                          "PAGER_LIMIT = 5\n")
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertTrue(str(error).startswith(
            f"config file {path!r} line 2: "), str(error))
        self.assertIn("string literal", str(error))
        self.assertNotIn("\n", str(error))

    def test_null_byte(self):
        """
        A file Python will not parse at all is still one clear line,
        without a line number it does not know.
        """
        path = self.write("FLUSH_SECONDS = 60\0\n")
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertIn(repr(path), str(error))
        self.assertNotIn("None", str(error))
        self.assertNotIn("\n", str(error))

    def test_exception_names_line(self):
        """
        An exception while the file runs names the file, the line and the
        exception.
        """
        path = self.write("""\
            import os
            FLUSH_SECONDS = 60
            SERVER_NAME = os.environ['FAILNOZZLE_NO_SUCH_VARIABLE']
            """)
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(
            str(error),
            f"config file {path!r} line 3: KeyError: "
            "'FAILNOZZLE_NO_SUCH_VARIABLE'")

    def test_exception_in_function(self):
        """
        An exception inside a function of the file names the line where
        it was raised.
        """
        path = self.write("""\
            def broken():
                return 1 / 0

            PAGER_LIMIT = broken()
            """)
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertIn(" line 2: ZeroDivisionError: division by zero",
                      str(error))

    def test_exception_message_one_line(self):
        """
        An exception whose message spans lines is still told in one line.
        """
        path = self.write("raise ValueError('first\\nsecond')\n")
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertTrue(str(error).endswith("ValueError: first second"),
                        str(error))

    def test_exit_in_config(self):
        """
        A config that calls sys.exit() (or raises KeyboardInterrupt) is a
        config error as any other: start-up does not end with status 0 and
        nothing said, nor a reload with a traceback.
        """
        for body, said in (("import sys\nsys.exit(0)\n", "SystemExit: 0"),
                           ("raise KeyboardInterrupt\n",
                            "KeyboardInterrupt")):
            error = self.assertRaises(ConfigError, load_settings,
                                      self.write(body))
            self.assertIn(said, str(error))


class ParseHostPortTests(SynchronousTestCase):
    """
    L{parse_host_port}, for --udp and --smtp.
    """

    def test_ipv4(self):
        """
        HOST:PORT.
        """
        self.assertEqual(parse_host_port("127.0.0.1:1549"),
                         ("127.0.0.1", 1549))
        self.assertEqual(parse_host_port("smtp.example.com:25"),
                         ("smtp.example.com", 25))

    def test_ipv6(self):
        """
        [IPV6]:PORT, without the brackets.
        """
        self.assertEqual(parse_host_port("[::1]:1549"), ("::1", 1549))
        self.assertEqual(parse_host_port("[::]:0"), ("::", 0))

    def test_port_only(self):
        """
        :PORT means every interface.
        """
        self.assertEqual(parse_host_port(":1549"), ("0.0.0.0", 1549))

    def test_garbage(self):
        """
        Anything else is a ValueError quoting the text.
        """
        for text in ("", "1549", "host", "host:", "host:port", "host:-1",
                     "host:1.5", ":"):
            error = self.assertRaises(ValueError, parse_host_port, text)
            self.assertIn(repr(text), str(error))


class SMTPIngestTests(ConfigTestCase):
    """
    The SMTP_INGEST_* settings of the mail server.
    """

    def test_defaults(self):
        """
        Off, with room for Django's HTML reports and a busy fleet.
        """
        settings, _ = load_settings(None)
        self.assertIsNone(settings.SMTP_INGEST_BIND)
        self.assertEqual(settings.SMTP_INGEST_MAX_BYTES, 10 * 1024 * 1024)
        self.assertEqual(settings.SMTP_INGEST_MAX_CONNECTIONS, 100)
        self.assertEqual(settings.SMTP_INGEST_MAX_RECIPIENTS, 100)
        self.assertIsNone(settings.SMTP_INGEST_USERS)
        self.assertIsNone(settings.SMTP_INGEST_TLS_CERT)
        self.assertIsNone(settings.SMTP_INGEST_TLS_KEY)

    def test_values(self):
        """
        The address is read as UDP_BIND is; users are a dict.
        """
        settings, notices = self.load(
            "SMTP_INGEST_BIND = ('localhost', 2525)\n"
            "SMTP_INGEST_MAX_BYTES = 1000\n"
            "SMTP_INGEST_USERS = {'django': 's3cret'}\n")
        self.assertEqual(settings.SMTP_INGEST_BIND, ("127.0.0.1", 2525))
        self.assertEqual(settings.SMTP_INGEST_MAX_BYTES, 1000)
        self.assertEqual(settings.SMTP_INGEST_USERS, {"django": "s3cret"})
        self.assertEqual(without_udp_bind(notices), [
            "SMTP_INGEST_USERS is set without SMTP_INGEST_TLS_CERT: "
            "passwords cross the network in clear"])

    def test_wrong_values(self):
        """
        Each setting's mistakes are named in one line, and a password is
        never shown.
        """
        for text, fragment in (
                ("SMTP_INGEST_BIND = 2525", "(host, port) pair"),
                ("SMTP_INGEST_BIND = ('::1', 70000)", "port number"),
                ("SMTP_INGEST_MAX_BYTES = 0", "at least 1"),
                ("SMTP_INGEST_MAX_CONNECTIONS = 1.5", "whole number"),
                ("SMTP_INGEST_MAX_RECIPIENTS = '10.5'", "whole number"),
                ("SMTP_INGEST_USERS = 'django:s3cret'", "it is a str "),
                ("SMTP_INGEST_USERS = {}", "it is a dict "),
                ("SMTP_INGEST_USERS = {'': 's3cret'}",
                 "it is a dict of empty str to str "),
                ("SMTP_INGEST_USERS = {'django': ''}",
                 "it is a dict of str to empty str "),
                ("SMTP_INGEST_USERS = {'django': 's3cret', 'web': 5}",
                 "it is a dict of str to int/str "),
                ("SMTP_INGEST_TLS_CERT = '/no/such.pem'", "no such file")):
            setting = text.split()[0]
            message = self.assertConfigError(text + "\n", setting, fragment)
            self.assertNotIn("s3cret", message)

    def test_cert_and_key(self):
        """
        SMTP_INGEST_TLS_CERT and _KEY go together.
        """
        path = self.write("")
        self.assertConfigError(f"SMTP_INGEST_TLS_CERT = {path!r}\n",
                               "SMTP_INGEST_TLS_KEY is required when "
                               "SMTP_INGEST_TLS_CERT is set")
        self.assertConfigError(f"SMTP_INGEST_TLS_KEY = {path!r}\n",
                               "SMTP_INGEST_TLS_CERT is required when "
                               "SMTP_INGEST_TLS_KEY is set")
        settings, notices = self.load(
            f"SMTP_INGEST_BIND = ('127.0.0.1', 2525)\n"
            f"SMTP_INGEST_USERS = {{'django': 's3cret'}}\n"
            f"SMTP_INGEST_TLS_CERT = SMTP_INGEST_TLS_KEY = {path!r}\n")
        self.assertEqual(settings.SMTP_INGEST_TLS_KEY, path)
        self.assertEqual(without_udp_bind(notices), [])


class NumericStringTests(ConfigTestCase):
    """
    Numbers written as strings, as configs of the original read them from
    the environment or copied them quoted.
    """

    def test_whole_numbers(self):
        """
        C{'465'} is 465, so delivery begins with implicit TLS as on 465.
        """
        settings, _ = self.load("SMTP_HOST = 'smtp.example.com'\n"
                                "REPORT_FROM = 'nozzle@example.com'\n"
                                "REPORT_TO = 'ops@example.com'\n"
                                "SMTP_PORT = '465'\n"
                                "SMTP_INGEST_MAX_BYTES = ' 1000 '\n")
        self.assertEqual(settings.SMTP_PORT, 465)
        self.assertEqual(make_transport(settings, None).mode, "implicit")
        self.assertEqual(settings.SMTP_INGEST_MAX_BYTES, 1000)

    def test_seconds(self):
        """
        Durations take whole and decimal numbers as text.
        """
        settings, _ = self.load("FLUSH_SECONDS = '60'\n"
                                "SMTP_TIMEOUT = '1.5'\n"
                                "SNAPSHOT_SECONDS = '0'\n")
        self.assertEqual(settings.FLUSH_SECONDS, 60)
        self.assertEqual(settings.SMTP_TIMEOUT, 1.5)
        self.assertEqual(settings.SNAPSHOT_SECONDS, 0)

    def test_bind_ports(self):
        """
        The port of a (host, port) pair may be text too.
        """
        settings, _ = self.load("UDP_BIND = ('0.0.0.0', '1549')\n"
                                "GELF_BIND = ['127.0.0.1', '12201']\n")
        self.assertEqual(settings.UDP_BIND, ("0.0.0.0", 1549))
        self.assertEqual(settings.GELF_BIND, ("127.0.0.1", 12201))

    def test_other_text_refused(self):
        """
        Text that is no number of the kind wanted is still one line that
        shows it; digits of other scripts are not read as numbers.
        """
        self.assertConfigError("FLUSH_SECONDS = 'sixty'\n", "FLUSH_SECONDS",
                               "must be a number, not 'sixty'")
        self.assertConfigError("SMTP_PORT = '4\u0666\u0665'\n", "SMTP_PORT",
                               "whole number")
        self.assertConfigError("SMTP_PORT = ''\n", "SMTP_PORT",
                               "whole number")
        self.assertConfigError("SMTP_PORT = '70000'\n", "SMTP_PORT",
                               "port number (1-65535), not 70000")


class BoundsTests(ConfigTestCase):
    """
    Values that would start fine and fail later are refused at start-up,
    in one line naming the setting.
    """

    def test_huge_numbers_every_numeric_setting(self):
        """
        Every setting whose default is a number refuses an absurd one,
        whole or not, without a traceback, and shows it shortened.
        """
        numeric = [f.name for f in dataclasses.fields(Settings)
                   if type(default_value(f.name)) in (int, float)]
        self.assertIn("FLUSH_SECONDS", numeric)
        for name in numeric:
            for value in ("10 ** 400", "1e300", "10 ** 5000"):
                message = self.assertConfigError(f"{name} = {value}\n", name)
                self.assertLess(len(message), 200, message)

    def test_maxima(self):
        """
        Each limit's largest sensible value is taken, the next refused.
        """
        for name, largest in [
                ("FLUSH_SECONDS", 7 * 24 * 3600),
                ("SMTP_TIMEOUT", 3600),
                ("RETRY_MAX_SECONDS", 7 * 24 * 3600),
                ("SPOOL_LIFETIME_SECONDS", 365 * 24 * 3600),
                ("SHUTDOWN_TIMEOUT_SECONDS", 3600),
                ("SNAPSHOT_SECONDS", 24 * 3600),
                ("SMTP_INGEST_MAX_BYTES", 100 * 1024 * 1024),
                ("SMTP_INGEST_MAX_CONNECTIONS", 10_000),
                ("MAX_UNIQUE_MESSAGES", 1_000_000),
                ("MAX_SOURCES_PER_ERROR", 10_000),
                ("DIGEST_MAX_BYTES", 100_000_000)]:
            settings, _ = self.load(f"{name} = {largest}\n"
                                    "RETRY_MIN_SECONDS = 1\n")
            self.assertEqual(getattr(settings, name), largest)
            self.assertConfigError(f"{name} = {largest + 1}\n", name,
                                   f"at most {largest}")

    def test_digest_max_bytes_floor(self):
        """
        DIGEST_MAX_BYTES below 10,000 is refused: the headers and the
        summary line of a digest may not fit in less.
        """
        self.assertEqual(self.load("DIGEST_MAX_BYTES = 10000\n")[0]
                         .DIGEST_MAX_BYTES, 10000)
        self.assertConfigError("DIGEST_MAX_BYTES = 9999\n",
                               "DIGEST_MAX_BYTES", "at least 10000")

    def test_absurd_byte_limit(self):
        """
        SMTP_INGEST_MAX_BYTES = 2**40, which the mail server would
        advertise and buffer, is refused.
        """
        self.assertConfigError("SMTP_INGEST_MAX_BYTES = 2 ** 40\n",
                               "SMTP_INGEST_MAX_BYTES", "at most 104857600")

    def test_pager_off_as_the_original(self):
        """
        PAGER_LIMIT = sys.maxsize, which some configs of the original used
        to never page, is taken.
        """
        settings, _ = self.load("import sys\nPAGER_LIMIT = sys.maxsize\n")
        self.assertEqual(settings.PAGER_LIMIT, sys.maxsize)

    def test_datagram_size(self):
        """
        INCOMING_MESSAGE_MAX_SIZE above 65536 is refused; 65508 to 65536
        (the original's default) is read as 65507 with a notice; 65507 and
        less are kept as they are.
        """
        self.assertConfigError("INCOMING_MESSAGE_MAX_SIZE = 65537\n",
                               "INCOMING_MESSAGE_MAX_SIZE", "at most 65507",
                               "UDP")
        self.assertConfigError("INCOMING_MESSAGE_MAX_SIZE = 2 ** 40\n",
                               "INCOMING_MESSAGE_MAX_SIZE", "at most 65507")
        for value in (65508, 65536):
            settings, notices = self.load(
                f"INCOMING_MESSAGE_MAX_SIZE = {value}\n")
            self.assertEqual(settings.INCOMING_MESSAGE_MAX_SIZE, 65507)
            self.assertEqual(without_udp_bind(notices), [
                f"INCOMING_MESSAGE_MAX_SIZE = {value} is read as 65507, the "
                "largest payload UDP carries"])
        settings, notices = self.load("INCOMING_MESSAGE_MAX_SIZE = 8192\n")
        self.assertEqual(settings.INCOMING_MESSAGE_MAX_SIZE, 8192)
        self.assertEqual(without_udp_bind(notices), [])

    def test_server_name(self):
        """
        SERVER_NAME is one line of printable ASCII: spaces are fine; line
        breaks (header injection), control characters, non-ASCII and
        blank or overlong names are refused.
        """
        settings, _ = self.load("SERVER_NAME = 'web server #1 (eu-west)'\n")
        self.assertEqual(settings.SERVER_NAME, "web server #1 (eu-west)")
        for value in ("'web1\\r\\nBcc: x@example.com'", "'web1\\n'",
                      "'web\\x001'", "'web\\t1'", "'w\\u00e9b1'", "'   '",
                      "'x' * 256"):
            self.assertConfigError(f"SERVER_NAME = {value}\n", "SERVER_NAME",
                                   "printable ASCII")

    def test_address_must_be_ascii(self):
        """
        An address whose mailbox or domain is not ASCII is refused (no
        SMTPUTF8); a display name in any script is fine.
        """
        for name in ("REPORT_TO", "REPORT_FROM", "PAGER_TO", "REPLY_TO"):
            self.assertConfigError(f"{name} = 'j\\u00f6rg@example.com'\n",
                                   name, "must be ASCII", "SMTPUTF8")
            self.assertConfigError(f"{name} = 'ops@b\\u00fccher.example'\n",
                                   name, "must be ASCII", "xn--")
        settings, _ = self.load(
            "REPORT_TO = 'J\\u00f6rg M\\u00fcller <jm@example.com>'\n")
        self.assertEqual(settings.REPORT_TO,
                         ("J\u00f6rg M\u00fcller <jm@example.com>",))

    def test_address_control_characters_and_length(self):
        """
        Control characters anywhere, and an address longer than SMTP
        allows, are refused.
        """
        self.assertConfigError("REPORT_TO = 'Ops\\x00 <ops@example.com>'\n",
                               "REPORT_TO", "is not an email address")
        self.assertConfigError("REPORT_TO = 'ops@\\texample.com'\n",
                               "REPORT_TO", "is not an email address")
        self.assertConfigError(
            f"REPORT_TO = 'ops@{'a' * 250}.example'\n", "REPORT_TO",
            "longer than the 254 characters")

    def test_recipients_and_markers_counted(self):
        """
        At most 100 recipients per setting (the most an SMTP server must
        take per message; a digest to more may be refused whole) and 1000
        markers, each looked for in every error.
        """
        settings, _ = self.load(
            "REPORT_TO = [f'ops{i}@example.com' for i in range(100)]\n")
        self.assertEqual(len(settings.REPORT_TO), 100)
        self.assertConfigError(
            "PAGER_TO = ', '.join(f'p{i}@example.com' for i in range(101))\n",
            "PAGER_TO", "names 101 addresses; at most 100")
        self.assertConfigError(
            "MONITORING_ERROR_MARKERS = [str(i) for i in range(1001)]\n",
            "MONITORING_ERROR_MARKERS", "holds 1001 markers; at most 1000")

    def test_paths_without_nul(self):
        """
        A path with a NUL byte, which every system call refuses, is
        refused at start-up, whatever the path is for.
        """
        for name in ("SPOOL_DIR", "MAILDIR", "STATE_FILE",
                     "EMAIL_BODY_TEMPLATE", "EMAIL_SUBJECT_TEMPLATE",
                     "EMAIL_TEMPLATE_DIR", "SMTP_CA_FILE",
                     "SMTP_INGEST_TLS_CERT", "SMTP_INGEST_TLS_KEY"):
            self.assertConfigError(f"{name} = 'spool\\x00x'\n", name,
                                   "NUL byte")

    def test_smtp_host(self):
        """
        SMTP_HOST must be a host name or address: no spaces, control
        characters or empty labels; IP addresses and international names
        are fine.
        """
        for value in ("'smtp example.com'", "'bad..name'", "'smtp\\x00'",
                      "'smtp.example.com\\n'", f"{'a' * 64 + '.example'!r}"):
            self.assertConfigError(f"SMTP_HOST = {value}\n", "SMTP_HOST",
                                   "not a host name")
        for value in ("127.0.0.1", "::1", "mail.b\u00fccher.example",
                      "smtp.example.com."):
            settings, _ = self.load(f"SMTP_HOST = {value!r}\n"
                                    "REPORT_FROM = 'n@example.com'\n"
                                    "REPORT_TO = 'o@example.com'\n")
            self.assertEqual(settings.SMTP_HOST, value)

    def test_smtp_user(self):
        """
        SMTP_USER cannot hold what separates the parts of SMTP AUTH.
        """
        for value in ("'u\\x00admin'", "'u\\r\\nRSET'"):
            self.assertConfigError(f"SMTP_USER = {value}\n", "SMTP_USER",
                                   "cannot hold NUL, CR or LF")


class SecretTests(ConfigTestCase):
    """
    An error about a secret setting names the setting and the type of
    the value, never the value.
    """

    def test_secret_settings(self):
        """
        SMTP_PASSWORD, SMTP_INGEST_USERS, the HTTP tokens and CLUSTER_URL
        (which may hold Redis' password) are secret; their checkers say
        so, so a later secret says it the same way.
        """
        self.assertEqual(SECRET_SETTINGS,
                         {"SMTP_PASSWORD", "SMTP_INGEST_USERS", "HTTP_TOKEN",
                          "HTTP_ERRORS_TOKEN", "CLUSTER_URL"})

    def test_never_shown(self):
        """
        Whatever is wrong with a secret setting, its value is not in the
        error, but the setting and the type are.
        """
        for value, kind in [
                ("['s3cret']", "a list"), ("b's3cret'", "a bytes"),
                ("'s3cret\\n'", "a str"), ("('s3cret',)", "a tuple"),
                ("{'s3cret': 1}", "a dict")]:
            for name in sorted(SECRET_SETTINGS):
                message = self.assertConfigError(f"{name} = {value}\n", name)
                self.assertNotIn("s3cret", message)
                self.assertIn(f"it is {kind}", message)
                self.assertIn("secret", message)

    def test_password_type(self):
        """
        SMTP_PASSWORD = 12345 says what it must be and that it is an int.
        """
        self.assertConfigError(
            "SMTP_PASSWORD = 12345\n", "SMTP_PASSWORD",
            "SMTP_PASSWORD must be a string without NUL, CR or LF; it is an "
            "int (its value is secret, so not shown)")


class CheckSettingsTests(ConfigTestCase):
    """
    L{check_settings}: every problem of a configuration at once.
    """

    def test_every_problem(self):
        """
        Each wrong setting is named, in the file's order, then the
        problems between settings; load_settings raises the first.
        """
        path = self.write("""\
            SMTP_PORT = 70000
            FLUSH_SECONDS = 'soon'
            SERVER_NAME = 'web\\r\\n1'
            SMTP_HOST = 'smtp.example.com'
            RETRY_MIN_SECONDS = 60
            RETRY_MAX_SECONDS = 30
            """)
        checked = check_settings(path, {"PAGER_LIMITS": 3})
        self.assertEqual(list(checked.problems), [
            "SMTP_PORT must be a port number (1-65535), not 70000",
            "FLUSH_SECONDS must be a number, not 'soon'",
            "SERVER_NAME must be up to 255 characters of printable ASCII "
            "(letters, digits, punctuation, spaces), not 'web\\r\\n1'",
            "unknown setting PAGER_LIMITS (did you mean PAGER_LIMIT?)",
            "REPORT_FROM is required when SMTP_HOST is set",
            "REPORT_TO is required when SMTP_HOST is set",
            "RETRY_MAX_SECONDS must not be less than RETRY_MIN_SECONDS",
        ])
        self.assertEqual(checked.refused,
                         {"SMTP_PORT", "FLUSH_SECONDS", "SERVER_NAME"})
        error = self.assertRaises(ConfigError, load_settings, path)
        self.assertEqual(str(error), checked.problems[0])

    def test_refused_setting_keeps_default(self):
        """
        A refused setting has its default in the settings checked, and a
        problem between settings that involves it is not told twice.
        """
        checked = check_settings(self.write("""\
            SMTP_HOST = 'smtp.example.com'
            REPORT_FROM = 'nozzle@example.com'
            REPORT_TO = ['ops']
            SMTP_USER = 'u'
            SMTP_PASSWORD = 5
            RETRY_MIN_SECONDS = -1
            RETRY_MAX_SECONDS = 10
            """))
        self.assertEqual(len(checked.problems), 3, checked.problems)
        self.assertEqual(checked.refused, {"REPORT_TO", "SMTP_PASSWORD",
                                           "RETRY_MIN_SECONDS"})
        self.assertEqual(checked.settings.REPORT_TO, ())
        self.assertEqual(checked.settings.RETRY_MIN_SECONDS, 30)

    def test_valid(self):
        """
        A valid configuration has no problems and the settings to run.
        """
        checked = check_settings(self.write("FLUSH_SECONDS = 5\n"),
                                 {"UDP_BIND": ("127.0.0.1", 0)})
        self.assertEqual((checked.problems, checked.refused), ((), set()))
        self.assertEqual(checked.settings.FLUSH_SECONDS, 5)
        self.assertEqual(checked.notices, ())

    def test_file_that_does_not_run(self):
        """
        A config file that cannot be read or run is one problem, and there
        are no settings to check further.
        """
        checked = check_settings(self.write("FLUSH_SECONDS = 1 / 0\n"))
        self.assertIsNone(checked.settings)
        [problem] = checked.problems
        self.assertIn("ZeroDivisionError", problem)

    def test_legacy_name_problem(self):
        """
        A wrong value under a legacy name is one problem, under that name.
        """
        checked = check_settings(self.write("PAGER_WINDOW_LIMIT = 'x'\n"
                                            "FLUSH_SECONDS = 0\n"))
        self.assertEqual(len(checked.problems), 2, checked.problems)
        self.assertTrue(checked.problems[0].startswith("PAGER_WINDOW_LIMIT "))
        self.assertEqual(checked.refused, {"PAGER_LIMIT", "FLUSH_SECONDS"})


class UDPBindNoticeTests(ConfigTestCase):
    """
    The notice that only this machine can send, when UDP_BIND is left at
    its loopback default (the original listened on every interface).
    """

    def udp_notices(self, path, overrides=None):
        return [notice for notice in load_settings(path, overrides)[1]
                if notice.startswith("UDP_BIND")]

    def test_set_by_the_file(self):
        """
        A file that sets UDP_BIND, even to the default, gets no notice.
        """
        path = self.write("UDP_BIND = ('127.0.0.1', 1549)\n")
        self.assertEqual(self.udp_notices(path), [])

    def test_set_by_an_override(self):
        """
        --udp sets it too.
        """
        path = self.write("FLUSH_SECONDS = 5\n")
        self.assertEqual(
            self.udp_notices(path, {"UDP_BIND": ("127.0.0.1", 0)}), [])

    def test_defaults_imported(self):
        """
        C{from failnozzle.settings import *} is not setting it: the notice
        names UDP_BIND, the file and that only this machine can send.
        """
        path = self.write("from failnozzle.settings import *\n"
                          "FLUSH_SECONDS = 5\n")
        [notice] = self.udp_notices(path)
        self.assertIn(f"UDP_BIND is not set in config file {path!r}", notice)
        self.assertIn("only this machine can send", notice)

    def test_imported_from_a_shared_module(self):
        """
        UDP_BIND set in a shared module the file imports is set.
        """
        self.shared_module("failnozzle_shared_bind",
                           "UDP_BIND = ('0.0.0.0', 1549)\n")
        path = self.write("from failnozzle_shared_bind import *\n")
        self.assertEqual(self.udp_notices(path), [])
        self.assertEqual(load_settings(path)[0].UDP_BIND, ("0.0.0.0", 1549))


class ChangedSettingsTests(ConfigTestCase):
    """
    L{changed_settings}, for a reload: which settings a new config changes.
    """

    CONFIG = """\
        from collections import namedtuple
        FLUSH_SECONDS = {flush}
        REPORT_TO = ['ops@example.com']
        UNIQUE_MSG_TUPLE = namedtuple('Msg', {fields!r})

        def INTERNAL_ERROR_FUNC(count, exception):
            return {{'message': {message!r}, 'kind': 'internal'}}
        """

    def settings(self, flush=60, fields=("message", "kind"),
                 message="bad input"):
        text = self.CONFIG.format(flush=flush, fields=list(fields),
                                  message=message)
        return load_settings(self.write(text))[0]

    def test_same_file_read_again(self):
        """
        The same file read twice changes nothing, though its namedtuple
        class and function are new objects.
        """
        old, new = self.settings(), self.settings()
        self.assertIsNot(old.UNIQUE_MSG_TUPLE, new.UNIQUE_MSG_TUPLE)
        self.assertIsNot(old.INTERNAL_ERROR_FUNC, new.INTERNAL_ERROR_FUNC)
        self.assertEqual(changed_settings(old, new), set())

    def test_values(self):
        """
        A changed value is named.
        """
        self.assertEqual(changed_settings(self.settings(),
                                          self.settings(flush=30)),
                         {"FLUSH_SECONDS"})

    def test_namedtuple_fields(self):
        """
        A namedtuple of other fields changes UNIQUE_MSG_TUPLE.
        """
        self.assertEqual(
            changed_settings(self.settings(),
                             self.settings(fields=("message", "lineno"))),
            {"UNIQUE_MSG_TUPLE"})

    def test_function_code(self):
        """
        A function that does something else changes INTERNAL_ERROR_FUNC.
        """
        self.assertEqual(
            changed_settings(self.settings(),
                             self.settings(message="other")),
            {"INTERNAL_ERROR_FUNC"})

    def test_defaults(self):
        """
        Two loads of the defaults are the same; a file of settings differs
        from them in exactly those it sets.
        """
        defaults = load_settings(None)[0]
        self.assertEqual(changed_settings(defaults, load_settings(None)[0]),
                         set())
        self.assertEqual(
            changed_settings(defaults, self.load(
                "PAGER_LIMIT = 7\nSMTP_INGEST_USERS = {'a': 'b'}\n")[0]),
            {"PAGER_LIMIT", "SMTP_INGEST_USERS"})
