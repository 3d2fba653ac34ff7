"""
The status page in a real browser: Chromium, headless, as Debian packages
it (.ci/run installs it; without it these tests are skipped, saying so).
"""
from __future__ import annotations

import os
import shutil

from twisted.internet import defer, utils
from twisted.trial.unittest import SkipTest, TestCase

from tests.common import (datagrams_received, record, send_datagrams,
                          start_service, udp_address)

#: The flags that keep Chromium off the network it has no business on.
BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise SkipTest("no chromium on PATH (.ci/run installs Debian's)")
    return found


class StatusPageTests(TestCase):
    """GET / as a browser shows it."""

    @defer.inlineCallbacks
    def test_page_in_browser(self):
        """
        Chromium loads the page: its title, the errors buffered with their
        counts, and a hostile message shown as text, never run; a
        screenshot of it is a real picture.
        """
        browser = chromium()
        service = start_service(self, HTTP_BIND=("127.0.0.1", 0))
        host, port = service.listening()["HTTP_BIND"]
        hostile = "<img src=x onerror=document.title='owned'>"
        arrived = datagrams_received(service, 3)
        send_datagrams(udp_address(service), [
            record("lookup failed for user 17"),
            record("lookup failed for user 42"), record(hostile)])
        yield arrived
        profile = os.path.abspath(self.mktemp())
        url = f"http://{host}:{port}/"
        out, err, status = yield utils.getProcessOutputAndValue(
            browser, BROWSER_FLAGS + [f"--user-data-dir={profile}",
                                      "--dump-dom", url],
            env={"HOME": profile})
        self.assertEqual(status, 0, err)
        dom = out.decode()
        self.assertIn(f"<title>failnozzle on {service.settings.SERVER_NAME}"
                      f"</title>", dom)
        self.assertIn("2×", dom)
        self.assertIn("lookup failed for user 42", dom)
        self.assertIn("&lt;img src=x onerror=", dom)
        self.assertNotIn("owned", dom.split("<title>")[1].split("<")[0])

        picture = os.path.join(profile, "page.png")
        out, err, status = yield utils.getProcessOutputAndValue(
            browser, BROWSER_FLAGS + [f"--user-data-dir={profile}",
                                      "--window-size=1000,1200",
                                      f"--screenshot={picture}", url],
            env={"HOME": profile})
        self.assertEqual(status, 0, err)
        with open(picture, "rb") as png:
            data = png.read()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        # IHDR: the window's size, as asked.
        self.assertEqual((int.from_bytes(data[16:20], "big"),
                          int.from_bytes(data[20:24], "big")), (1000, 1200))
