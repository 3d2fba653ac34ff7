"""
Tests for L{failnozzle.textcap}: cutting fields and tracebacks, and
C{msg % args} formatted under a cap, checked against Python's own C{%} on
many generated formats.
"""
import random
import re
import tracemalloc

from twisted.trial.unittest import SynchronousTestCase

from failnozzle.textcap import (FIELD_MARK, cut_end, cut_middle, format_capped,
                                one_line, recut_middle)

KEYS = ("a", "b", "a(b)c", "", "x y")


def random_value(rng, conversion=""):
    """A value such as JSON gives, mostly one C{conversion} takes."""
    if conversion in "diouxXc" and rng.random() < 0.8:
        return rng.choice([rng.randint(-10 ** 6, 10 ** 6),
                           rng.randint(-2 ** 200, 2 ** 200),
                           rng.randrange(0x110000), True])
    if conversion in "eEfFgG" and rng.random() < 0.8:
        return rng.choice([0.0, -0.0, 1e300, -1e-300, 5e-324, float("inf"),
                           float("nan"), 0.1, 123.456, 2.5, 7,
                           rng.uniform(-1e6, 1e6)])
    return rng.choice([
        None, False, rng.randint(-999, 999), rng.uniform(-1e6, 1e6),
        "".join(rng.choice("ab\n é'\"\x00\u2028x")
                for _ in range(rng.randrange(40))),
        ["x", 1.5, None], {"k": [1]}, "é", "y" * rng.randrange(500)])


def random_number(rng):
    return str(rng.choice([0, 1, 2, 5, 10, rng.randrange(300),
                           rng.randrange(3000)]))


def random_specifier(rng, mapping):
    """A specifier, mostly valid, as text, and its conversion."""
    spec = "%"
    if mapping and rng.random() < 0.7:
        spec += "(" + rng.choice(KEYS) + ")"
    spec += "".join(rng.choice("-+ #0") for _ in range(rng.choice(
        [0, 0, 1, 2, 3])))
    choice = rng.random()
    if choice < 0.3:
        spec += random_number(rng)
    elif choice < 0.4:
        spec += "*"
    choice = rng.random()
    if choice < 0.2:
        spec += "."
    elif choice < 0.45:
        spec += "." + random_number(rng)
    elif choice < 0.5:
        spec += ".*"
    if rng.random() < 0.05:
        spec += rng.choice("hlL")
    conversion = (rng.choice("sradiouxXeEfFgGc") if rng.random() < 0.95
                  else rng.choice("%zq\nl"))
    return spec + conversion, conversion


def random_format(rng):
    """A format and arguments for it: mostly fitting, sometimes not."""
    mapping = rng.random() < 0.3
    parts, args = [], []
    for _ in range(rng.randrange(1, 7)):
        if rng.random() < 0.3:
            parts.append(rng.choice(["lit ", "a\nb", "%%", "é", "\n",
                                     "xyz" * 20]))
            continue
        spec, conversion = random_specifier(rng, mapping)
        parts.append(spec)
        args += [rng.randrange(-400, 400) for _ in range(spec.count("*"))]
        args.append(random_value(rng, conversion))
    if mapping:
        return "".join(parts), {key: random_value(rng, rng.choice("sdf"))
                                for key in KEYS if rng.random() < 0.8}
    if rng.random() < 0.1:
        return "".join(parts), random_value(rng)
    if args and rng.random() < 0.1:
        del args[rng.randrange(len(args))]
    elif rng.random() < 0.05:
        args.append(1)
    return "".join(parts), tuple(args)


def outcome(function, *args):
    """C{("ok", result)}, or C{("error",)} if C{function} raised."""
    try:
        return ("ok", function(*args))
    except Exception:
        return ("error",)


class OneLineTests(SynchronousTestCase):
    """
    L{one_line}: a text made one line for a digest or a log.
    """

    def test_white_space_and_controls(self):
        """
        Line breaks, runs of white space and control characters (C0, DEL,
        C1) are one space each; the ends are stripped.
        """
        self.assertEqual(one_line(" a\r\n\tb\x00c\x1b[0m\x7fd\x85e\x9f  "),
                         "a b c [0m d e")

    def test_other_text_kept(self):
        """
        Other characters, non-ASCII ones included, are kept.
        """
        self.assertEqual(one_line("Ärger ☃ 😀"), "Ärger ☃ 😀")


class CutEndTests(SynchronousTestCase):
    """
    L{cut_end}: a field cut at its cap.
    """

    def test_short_kept(self):
        """
        A text of at most the cap is the same object.
        """
        text = "x" * 10
        self.assertIs(cut_end(text, 10), text)

    def test_cut(self):
        """
        A longer text keeps its start and ends in the mark, the cap's
        length in all.
        """
        self.assertEqual(cut_end("abcdefghij", 5), "abcd" + FIELD_MARK)
        self.assertEqual(cut_end("abcdefghij", 1), FIELD_MARK)


class CutMiddleTests(SynchronousTestCase):
    """
    L{cut_middle}: a traceback keeps its head and its tail.
    """

    def test_short_kept(self):
        """
        A text of at most the cap is the same object.
        """
        text = "line\n" * 20
        self.assertIs(cut_middle(text, 100), text)

    def test_head_tail_and_count(self):
        """
        A longer text keeps whole lines of its start and its end around a
        line saying exactly how many characters are not there, the cap's
        length at most.
        """
        lines = [f"  File \"app.py\", line {number}, in f{number}\n"
                 for number in range(2000)]
        text = "Traceback (most recent call last):\n" + "".join(lines) + (
            "ValueError: the end\n")
        cut = cut_middle(text, 4000)
        self.assertLessEqual(len(cut), 4000)
        head, mark, tail = cut.partition("[… ")
        self.assertTrue(text.startswith(head))
        self.assertTrue(head.endswith("\n"))
        count, _, tail = tail.partition(" characters cut …]\n")
        self.assertTrue(text.endswith(tail))
        self.assertTrue(tail.startswith("  File "))
        self.assertTrue(tail.endswith("ValueError: the end\n"))
        self.assertEqual(int(count.replace(",", "")),
                         len(text) - len(head) - len(tail))
        self.assertGreater(len(head) + len(tail), 3800)

    def test_one_long_line(self):
        """
        A text without line ends is cut where the room ends.
        """
        text = "a" * 5000 + "b" * 5000
        cut = cut_middle(text, 1000)
        self.assertLessEqual(len(cut), 1000)
        self.assertGreater(len(cut), 990)
        self.assertRegex(cut, r"^a+\[… 9,\d{3} characters cut …\]b+$")

    def test_tiny_cap(self):
        """
        A cap with no room for the mark keeps the start.
        """
        self.assertEqual(cut_middle("abcdefghij", 4), "abcd")


def random_traceback(rng):
    """A text of lines of random lengths, some of them long."""
    return "".join(
        "x" * rng.choice([0, 1, 5, 40, 80, 300, 2000]) + "\n"
        for _ in range(rng.randrange(1, 400)))


class RecutMiddleTests(SynchronousTestCase):
    """
    L{recut_middle}: a text kept cut by L{cut_middle}, cut again to a
    smaller cap.
    """

    def test_short_kept(self):
        """
        A text within the cap is the same object, mark or not.
        """
        text = cut_middle("line\n" * 1000, 500)
        self.assertIs(recut_middle(text, 500), text)

    def test_cap_lowered_by_one(self):
        """
        A cut text already within a cap one lower is cut again when that
        cap keeps less of its head or tail: as the first text is cut to
        it (its mark counting one more character).
        """
        text = "yyyyy\n" * 83
        kept = cut_middle(text, 422)
        self.assertLessEqual(len(kept), 421)
        self.assertEqual(recut_middle(kept, 421), cut_middle(text, 421))
        self.assertNotEqual(recut_middle(kept, 421), kept)

    def test_uncut_text(self):
        """
        A text that was not cut is cut as L{cut_middle} cuts it.
        """
        text = "Traceback\n" + "  frame\n" * 1000 + "ValueError\n"
        self.assertEqual(recut_middle(text, 1000), cut_middle(text, 1000))

    def test_as_if_cut_anew(self):
        """
        A text cut, then cut again to a third of its cap or less, is what
        the first text cut to that cap is: a traceback kept from before a
        cap was lowered is the same as one arriving after.
        """
        rng = random.Random(9)
        for _ in range(300):
            text = random_traceback(rng)
            first = rng.randrange(300, 20000)
            second = rng.randrange(40, first // 3)
            self.assertEqual(recut_middle(cut_middle(text, first), second),
                             cut_middle(text, second),
                             (len(text), first, second))

    def test_any_cap(self):
        """
        Cut again to any smaller cap, a text has at most that many
        characters, all of them from the first text's head and tail, and
        its mark counts every character of the first text not there.
        """
        rng = random.Random(10)
        for _ in range(300):
            text = random_traceback(rng)
            first = rng.randrange(300, 20000)
            second = rng.randrange(40, first)
            recut = recut_middle(cut_middle(text, first), second)
            self.assertLessEqual(len(recut), second)
            if len(text) <= second:
                self.assertEqual(recut, text)
                continue
            head, count, tail = re.fullmatch(
                r"(.*?)\[… ([0-9,]+) characters cut …\](.*)", recut,
                re.S).groups()
            if head.endswith("\n"):
                # The mark is a line of its own.
                self.assertEqual(tail[:1], "\n")
                tail = tail[1:]
            self.assertTrue(text.startswith(head))
            self.assertTrue(text.endswith(tail))
            self.assertEqual(int(count.replace(",", "")),
                             len(text) - len(head) - len(tail))

    def test_mark_of_its_own(self):
        """
        A text holding a mark it was not cut at is still cut within the
        cap (its count is the text's word).
        """
        text = "a" * 3000 + "[… 5 characters cut …]" + "b" * 3000
        recut = recut_middle(text, 1000)
        self.assertLessEqual(len(recut), 1000)
        self.assertRegex(recut, r"^a+\[… 5,\d{3} characters cut …\]b+$")

    def test_huge_count(self):
        """
        A mark whose number no text could have is not read as one.
        """
        text = "a" * 3000 + "[… " + "9" * 5000 + " characters cut …]"
        recut = recut_middle(text, 1000)
        self.assertEqual(recut, cut_middle(text, 1000))


class FormatCappedTests(SynchronousTestCase):
    """
    L{format_capped} gives what Python's C{%} gives, cut like
    L{cut_middle}, and raises when it raises.
    """

    def test_generated_formats(self):
        """
        On 30,000 generated formats and arguments (flags, widths and
        precisions up to 3,000 and C{*}, mapping keys, every conversion,
        some unsupported, too few or too many arguments) and caps from 1
        to 100,000, the outcome is Python's.
        """
        rng = random.Random(1549)
        formatted = 0
        for _ in range(30000):
            msg, args = random_format(rng)
            cap = rng.choice([1, 2, 10, 40, 60, 100, 300, 1000, 100000])
            expected = outcome(lambda: cut_middle(msg % args, cap))
            self.assertEqual(outcome(format_capped, msg, args, cap),
                             expected, (msg, args, cap))
            formatted += expected[0] == "ok"
        self.assertGreater(formatted, 10000)

    def test_examples(self):
        """
        The cases Python's C{%} has rules for.
        """
        for msg, args in [
                ("%s and %d", ("a", 5)), ("%(a)s %(a)r", {"a": "x"}),
                ("%s %(a)s", {"a": 1}), ("%*d|%-*d", (5, 1, 5, 2)),
                ("%.*s", (-5, "abc")), ("%*d", (-4, 7)), ("%#010x", (-255,)),
                ("%hd %ld", (1, 2)), ("%(a(b)c)s", {"a(b)c": 1}),
                ("100%%", ()), ("%c%c", (233, "x")), ("%.3c", ("x",)),
                ("%5.1f%%", (99.44,)), ("%.0d", (0,)), ("hello", {}),
                ("%s", [1]), ("%.1100g", (0.1,)), ("%#.1200g", (0.1,))]:
            self.assertEqual(format_capped(msg, args, 10 ** 6), msg % args,
                             (msg, args))

    def test_errors(self):
        """
        Formats and arguments that do not fit raise, as with Python's C{%}.
        """
        for msg, args in [
                ("%d", ("x",)), ("%c", (2 ** 40,)), ("%s %s", (1,)),
                ("%s", (1, 2)), ("hello", 5), ("%(a)s", (1,)),
                ("%(a)s", {"b": 1}), ("%(a", {"a": 1}), ("%", ()),
                ("%z", (1,)), ("%5%", (1,)), ("%lld", (1,)),
                ("%*d", (1.0, 1)), ("%*d", (10 ** 30, 1)),
                ("%99999999999999999999d", (1,)), ("%(a)s %s", {"a": 1}),
                ("%d", (float("inf"),)), ("%x", (1.5,))]:
            self.assertRaises(Exception, format_capped, msg, args, 1000)
            self.assertRaises(Exception, lambda: msg % args)

    def assertCostsLittle(self, msg, args, cap=16384):
        """
        Formatting takes less than 4 MiB at its peak, and gives at most the
        cap.

        @return: the result.
        """
        tracemalloc.start()
        try:
            result = format_capped(msg, args, cap)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 4 * 1024 * 1024)
        self.assertLessEqual(len(result), cap)
        return result

    def test_huge_width(self):
        """
        A width of 100,000,000 costs no more than the cap, and says how
        much it cut.
        """
        result = self.assertCostsLittle("%100000000d", (1,))
        self.assertTrue(result.startswith(" " * 8000))
        self.assertTrue(result.endswith(" 1"))
        self.assertIn("[… 99,983,6", result)
        left = self.assertCostsLittle("%-100000000d|", (1,))
        self.assertTrue(left.startswith("1 "))
        self.assertTrue(left.endswith(" |"))

    def test_huge_precision(self):
        """
        So does a precision of 100,000,000, on an integer or a float.
        """
        self.assertTrue(self.assertCostsLittle(
            "%.100000000d", (7,)).endswith("007"))
        self.assertTrue(self.assertCostsLittle(
            "%.100000000f", (1.5,)).startswith("1.5000"))
        self.assertTrue(self.assertCostsLittle(
            "%.100000000e", (1.5,)).endswith("000e+00"))

    def test_repeated_key(self):
        """
        A mapping key repeated 13,000 times with a 60,000-character value
        (780 MB with Python's C{%}) costs no more than the cap.
        """
        result = self.assertCostsLittle("%(a)s" * 13000, {"a": "x" * 60000})
        self.assertIn("[… 779,98", result)
        self.assertCostsLittle("%(a)r" * 13000, {"a": "x\n" * 30000})
