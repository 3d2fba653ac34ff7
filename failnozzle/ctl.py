"""
failnozzle-ctl: a running failnozzle's control API from a shell, with the
standard library only (it runs where the daemon's dependencies are not).

  failnozzle-ctl status
  failnozzle-ctl flush
  failnozzle-ctl reload
  failnozzle-ctl failed list
  failnozzle-ctl failed resend [ID ...]
  failnozzle-ctl silence add --until 2027-01-31T00:00:00Z \
      --comment 'known, OPS-12' kind=legacy-cron
  failnozzle-ctl silence add --for 2h --comment 'deploy' kind=shop
  failnozzle-ctl silence list
  failnozzle-ctl silence remove ID

The address is --http HOST:PORT, else FAILNOZZLE_HTTP, else
127.0.0.1:1550; the token --token, else FAILNOZZLE_TOKEN.  Exit status: 0
done, 1 refused or failed (the daemon's reason is printed), 2 usage.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

# Standard library only, as this module is.
from failnozzle.textcap import CONTROL_CODES

DEFAULT_ADDRESS = "127.0.0.1:1550"
#: Seconds to wait for an answer (a resend waits for the disk only).
TIMEOUT_SECONDS = 30


class CtlError(Exception):
    """What the daemon refused, or why it could not be asked."""


class UsageError(CtlError):
    """What was asked cannot be sent as it is (exit status 2)."""


def request(address: str, path: str, token: Optional[str],
            body: Optional[dict] = None) -> dict:
    """
    GET C{path} (or POST C{body} as JSON) at C{address}; the JSON reply.

    @raise CtlError: no answer, or an error answer (its reason).
    """
    url = f"http://{address}{path}"  # [::1]:1550 as it is
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    asked = urllib.request.Request(url, data=data, headers=headers,
                                   method="GET" if data is None else "POST")
    # No proxy, whatever the environment says: the token is for the daemon.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(asked, timeout=TIMEOUT_SECONDS) as reply:
            answer = reply.read()
    except urllib.error.HTTPError as error:
        try:
            reason = json.loads(error.read()).get("error")
        except (ValueError, AttributeError):
            reason = None
        raise CtlError(f"{error.code} {reason or error.reason}") from None
    except (urllib.error.URLError, OSError) as error:
        why = getattr(error, "reason", error)
        raise CtlError(f"cannot reach failnozzle at {address}: {why}") \
            from None
    except http.client.HTTPException as error:
        raise CtlError(f"{address} did not answer HTTP ({error!r}): is it "
                       f"failnozzle's HTTP_BIND?") from None
    try:
        return json.loads(answer)
    except ValueError:
        raise CtlError(f"{url} did not answer JSON: is it failnozzle?") \
            from None


def address_argument(text: str) -> str:
    """C{--http}'s HOST:PORT (C{[::1]:1550} for IPv6), checked."""
    host, colon, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (not colon or not host.strip("[]") or not port.isascii()
            or not port.isdigit()
            or not 0 < int(port) < 65536
            or (":" in host and not bracketed)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with a port from 1 to 65535 "
            f"([::1]:1550 for IPv6)")
    return text


def token_argument(text: str) -> str:
    """C{--token}, checked: an HTTP header carries no control character."""
    if not text.isprintable() or not text.isascii():
        raise argparse.ArgumentTypeError(
            "the token holds a line break, a control character or a "
            "character that is not ASCII: no HTTP header can carry it")
    return text


#: A duration as amtool's --duration takes it: 90m, 2h, 1h30m, 1d, 1w.
_DURATION = re.compile(r"(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?"
                       r"(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_UNITS = (7 * 86400, 86400, 3600, 60, 1)
#: The longest --for, said before anything is sent: the daemon's
#: failnozzle.silences.MAX_FOR_SECONDS (not imported: standard library
#: only).  A longer one is a date, for --until.
_LONGEST_SECONDS = 100 * 366 * 86400


def duration_argument(text: str) -> float:
    """C{--for}'s duration (2h, 1h30m, 1d, 1w, or seconds), in seconds."""
    if text.isascii() and text.isdigit():
        seconds = int(text)
    else:
        found = _DURATION.fullmatch(text) if text.isascii() else None
        if found is None or not any(found.groups()):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration such as 90m, 2h, 1h30m, 1d or "
                f"1w, or a number of seconds")
        seconds = sum(int(count) * unit for count, unit
                      in zip(found.groups(), _DURATION_UNITS) if count)
    if not seconds:
        raise argparse.ArgumentTypeError("a silence of no time is none")
    if seconds > _LONGEST_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is longer than 100 years: --until for a date")
    return float(seconds)


def _when(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def status_lines(status: dict) -> list:
    """The status as a few lines for a terminal."""
    buffered, delivery = status["buffered"], status["delivery"]
    spool, flush = status["spool"], status["flush"]
    received = ", ".join(f"{count:,} {name}" for name, count
                         in status["received"].items() if count) or "nothing"
    lines = [
        f"failnozzle {status['version']} on {status['server_name']}, up "
        f"{status['uptime_seconds']:.0f} s",
        "listening: " + ", ".join(f"{name} {address}" for name, address
                                  in status["listening"].items()),
        f"received: {received}",
    ]
    for reason, count in status["bad_input"].items():
        lines.append(f"bad input: {count:,} {reason}")
    for name, count in status.get("below_level", {}).items():
        lines.append(f"below the level: {count:,} {name}")
    for item in status.get("silences", []):
        lines.append("silence " + _silence_line(item))
    lines.append(f"buffered: {buffered['total']:,} errors, "
                 f"{buffered['unique']:,} unique")
    for error in buffered["top"]:
        lines.append(f"  {error['count']:,}x {error['message'][:100]}")
    for kind, held in status["held"].items():
        lines.append(f"held for the next {kind}: {held['total']:,}")
    lines.append(f"flush: every {flush['every_seconds']:g} s, last "
                 f"{_when(flush['last'])}, next {_when(flush['next'])}")
    sent = ", ".join(f"{count} {kind}" for kind, count
                     in delivery["sent"].items()) or "none"
    lines.append(f"delivered via {delivery['to']}: {sent}; last "
                 f"{_when(delivery['last_success'])}")
    if delivery["last_error"]:
        lines.append(f"last delivery error: "
                     f"{_when(delivery['last_error']['at'])}: "
                     f"{delivery['last_error']['reason']}")
    lines.append(f"spool: {spool['messages']} waiting, {spool['failed']} "
                 f"failed")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="failnozzle-ctl", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--http", metavar="HOST:PORT",
                        type=address_argument,
                        default=os.environ.get("FAILNOZZLE_HTTP")
                        or DEFAULT_ADDRESS,
                        help="the daemon's HTTP_BIND (default: "
                             "$FAILNOZZLE_HTTP, else 127.0.0.1:1550)")
    parser.add_argument("--token", type=token_argument,
                        default=os.environ.get("FAILNOZZLE_TOKEN"),
                        help="its HTTP_TOKEN (default: $FAILNOZZLE_TOKEN)")
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's JSON answer as it is")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="what it holds and has done")
    commands.add_parser("flush", help="send the digests now")
    commands.add_parser("reload", help="read the config again (as SIGHUP)")
    failed = commands.add_parser("failed", help="messages given up on")
    what = failed.add_subparsers(dest="action", required=True)
    what.add_parser("list", help="list them")
    resend = what.add_parser("resend", help="put them back in the spool "
                                            "and send them now")
    resend.add_argument("ids", nargs="*", metavar="ID",
                        help="which (default: all of failed/; one probably "
                             "delivered, of unconfirmed/, by its ID)")
    silence = commands.add_parser(
        "silence", help="keep known errors out of the mail for a time")
    doing = silence.add_subparsers(dest="action", required=True)
    doing.add_parser("list", help="the silences, and what each kept out")
    add = doing.add_parser("add", help="add one: FIELD=REGEX... (all must "
                                       "match), until a time or for a while")
    add.add_argument("match", nargs="+", metavar="FIELD=REGEX")
    ends = add.add_mutually_exclusive_group(required=True)
    ends.add_argument("--until",
                      help="when it ends: an ISO 8601 time with its zone, "
                           "such as 2027-01-31T00:00:00Z, or seconds since "
                           "the epoch")
    ends.add_argument("--for", dest="duration", type=duration_argument,
                      metavar="DURATION",
                      help="or how long from now: 90m, 2h, 1h30m, 1d, 1w")
    add.add_argument("--comment", default="", help="why")
    remove = doing.add_parser("remove", help="end one added at run time")
    remove.add_argument("id", metavar="ID")
    options = parser.parse_args(argv)
    try:
        answer, lines = _run(options)
    except UsageError as error:
        parser.error(str(error))  # exits 2
    except CtlError as error:
        print(f"failnozzle-ctl: {error}", file=sys.stderr)
        return 1
    if options.json:
        print(json.dumps(answer, indent=2))
    else:
        for line in lines:
            print(_printable(line))
    return 0


#: Control characters as backslash escapes: an error's text is a
#: sender's, and must not move a terminal's cursor or clear it.
_CONTROLS = {code: f"\\x{code:02x}" for code in CONTROL_CODES}


def _printable(line: str) -> str:
    """C{line} with what no terminal can show (a lone surrogate, which an
    error's text may hold) or should play (a control sequence) as a
    backslash escape."""
    return line.translate(_CONTROLS).encode(
        "utf-8", "backslashreplace").decode("utf-8")


def _run(options: argparse.Namespace) -> tuple:
    """The daemon's answer to the command, and the lines that say it."""
    def ask(path: str, body: Optional[dict] = None) -> dict:
        return request(options.http, path, options.token, body)

    if options.command == "status":
        answer = ask("/api/status")
        return answer, status_lines(answer)
    if options.command == "flush":
        answer = ask("/api/flush", {})
        return answer, [f"flushed {answer['flushed']:,} errors into "
                        f"{answer['digests']} digest(s)"]
    if options.command == "reload":
        answer = ask("/api/reload", {})
        if not answer["reloaded"]:
            raise CtlError(f"not reloaded: {answer['error']}")
        return answer, ["reloaded"]
    if options.command == "silence":
        return _silence(options, ask)
    if options.action == "list":
        answer = ask("/api/failed")
        return answer, [
            f"{item['id']}  {_when(item['failed_at'])}  to {item['to']}: "
            f"{item['subject']}" for item in answer["failed"]] + [
            f"{item['id']}  {_when(item['failed_at'])}  to {item['to']}: "
            f"{item['subject']}  (probably delivered: resent only by id)"
            for item in answer.get("unconfirmed", [])] or [
                "no failed messages"]
    answer = ask("/api/failed/resend",
                 {"ids": options.ids} if options.ids else {})
    return answer, [f"resent {len(answer['resent'])} message(s)"]


def _silence(options: argparse.Namespace, ask) -> tuple:
    if options.action == "list":
        answer = ask("/api/silences")
        return answer, [_silence_line(item) for item in answer["silences"]
                        ] or ["no silences"]
    if options.action == "remove":
        answer = ask("/api/silences/remove", {"id": options.id})
        return answer, [f"removed {answer['removed']}"]
    match = {}
    for condition in options.match:
        field, equals, pattern = condition.partition("=")
        if not equals or not field:
            raise UsageError(f"{condition!r} is not FIELD=REGEX")
        if field in match:
            raise UsageError(f"{field} is given twice: one REGEX each "
                             f"(a|b for either)")
        match[field] = pattern
    until = options.until
    if until is None:
        end = {"for": options.duration}
    else:
        end = {"until": float(until) if until.replace(".", "", 1).isdigit()
               else until}
    answer = ask("/api/silences/add", {
        "match": match, "comment": options.comment, **end})
    return answer, ["added " + _silence_line(answer["silence"])]


def _silence_line(item: dict) -> str:
    match = ", ".join(f"{field}={pattern}" for field, pattern
                      in item["match"].items())
    return (f"{item['id']}  until {item['until']}  {match}"
            f"{'  (' + item['comment'] + ')' if item['comment'] else ''}"
            f"  {item['silenced']:,} silenced  [{item['origin']}]")


if __name__ == "__main__":
    sys.exit(main())
