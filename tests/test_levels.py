"""
Tests for L{failnozzle.levels} and the MIN_LEVEL and GELF_MIN_LEVEL
settings.
"""
from twisted.trial.unittest import SynchronousTestCase

from failnozzle.levels import level_named, logging_level, stricter
from tests.test_config import ConfigTestCase


class LevelTests(SynchronousTestCase):

    def test_logging_levels(self):
        """
        Python logging's levelno maps to syslog's severities, a custom
        level to the nearest standard one below it; else its levelname.
        """
        for levelno, severity in [(50, 2), (40, 3), (45, 3), (30, 4),
                                  (25, 6), (20, 6), (10, 7), (0, 7)]:
            self.assertEqual(logging_level({"levelno": levelno}), severity)
        self.assertEqual(logging_level({"levelname": "WARNING"}), 4)
        self.assertEqual(logging_level({"levelname": "nonsense"}), None)
        self.assertEqual(logging_level({"levelno": True,
                                        "levelname": "ERROR"}), 3)
        self.assertEqual(logging_level({"levelno": "40"}), None)
        self.assertEqual(logging_level({}), None)

    def test_names(self):
        """Syslog's names, their short forms, logging's and Sentry's."""
        for name, severity in [("emerg", 0), ("alert", 1), ("crit", 2),
                               ("fatal", 2), ("ERR", 3), ("error", 3),
                               (" Warning ", 4), ("warn", 4), ("notice", 5),
                               ("info", 6), ("informational", 6),
                               ("log", 6), ("debug", 7)]:
            self.assertEqual(level_named(name), severity)
        self.assertIsNone(level_named("loud"))

    def test_stricter(self):
        self.assertEqual(stricter(None, 4), 4)
        self.assertEqual(stricter(3, None), 3)
        self.assertEqual(stricter(3, 4), 3)
        self.assertIsNone(stricter(None, None))


class LevelSettingsTests(ConfigTestCase):

    def test_defaults(self):
        """Every record is an error, but GELF below warning."""
        settings, _ = self.load("")
        self.assertIsNone(settings.MIN_LEVEL)
        self.assertEqual(settings.GELF_MIN_LEVEL, 4)

    def test_names_and_numbers(self):
        settings, _ = self.load("MIN_LEVEL = 'Error'\n"
                                "GELF_MIN_LEVEL = '5'\n")
        self.assertEqual((settings.MIN_LEVEL, settings.GELF_MIN_LEVEL),
                         (3, 5))
        settings, _ = self.load("MIN_LEVEL = 0\nGELF_MIN_LEVEL = None\n")
        self.assertEqual((settings.MIN_LEVEL, settings.GELF_MIN_LEVEL),
                         (0, None))

    def test_refused(self):
        for value in ("'loud'", "8", "-1", "True", "4.5", "'4.5'"):
            self.assertConfigError(f"MIN_LEVEL = {value}\n", "MIN_LEVEL",
                                   "syslog severity")
