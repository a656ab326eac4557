"""`deployd run | check-config | hash-token | demo`.

Fatal start-up problems are one clear message and an exit code, not a traceback:
2 for a bad config or bad arguments, 1 for anything else that stops the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from deployd import __version__
from deployd.config import Config, check_files, load
from deployd.errors import ConfigError, DeploydError

EXIT_CONFIG = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in ("app", "kind", "actor", "revision", "event_id"):
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_control(text: str) -> str:
    """`text` with control characters written as escapes (`\\n`, `\\x1b`), so a value a
    client chose (a pause reason) cannot start a log line of its own or drive a terminal."""
    return _CONTROL.sub(lambda m: _ESCAPES.get(m[0], f"\\x{ord(m[0]):02x}"
                                               if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}"),
                        text)


class TextFormatter(logging.Formatter):
    """One line per record, control characters escaped; a traceback follows on lines
    indented by two spaces, so no text inside it can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape_control(line) for line in text.splitlines())


def setup_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # asyncssh logs every channel open/close at INFO; keep its warnings only.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args.config_file)
    check_files(config)
    hosts = sum(len(app.hosts) for app in config.apps.values())
    print(f"{args.config_file}: ok ({len(config.apps)} app(s), {hosts} host(s), "
          f"{len(config.tokens)} token(s))")
    return 0


def cmd_hash_token(args: argparse.Namespace) -> int:
    secret = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    secret = secret.strip()
    if not secret:
        print("deployd: empty token", file=sys.stderr)
        return EXIT_CONFIG
    print(hashlib.sha256(secret.encode()).hexdigest())
    return 0


async def _run_daemon(config: Config) -> None:
    from deployd.app import serve
    from deployd.notify import Notifier

    stop, reload = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    # Hooks on local hosts must not inherit the socket and speak for the daemon.
    notifier = Notifier.from_env(unset_environment=True)
    try:
        await serve(config, stop, notifier, reload)
    finally:
        notifier.close()


def cmd_run(args: argparse.Namespace) -> int:
    config = load(args.config)
    check_files(config)
    setup_logging(config.daemon.log_format)
    asyncio.run(_run_daemon(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from deployd.demo import run_demo

    return asyncio.run(run_demo(approve=args.approve, keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deployd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"deployd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", required=True, help="the TOML config file")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config_file")
    check.set_defaults(func=cmd_check_config)

    hash_token = commands.add_parser(
        "hash-token", help="print the sha256 to put in token_sha256 (reads the token on stdin)")
    hash_token.set_defaults(func=cmd_hash_token)

    demo = commands.add_parser("demo", help="deploy, break and roll back a throwaway app")
    demo.add_argument("--approve", action="store_true",
                      help="approve the rescue job without waiting for a curl call")
    demo.add_argument("--keep", action="store_true", help="keep the demo's files afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_CONFIG
    except DeploydError as exc:
        print(f"deployd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
