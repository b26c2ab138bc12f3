"""``python -m couchtoken sign``: mint an expiring signed link.  ``... token``: print a new token."""

from __future__ import annotations

import argparse
import os
import sys
import time

from couchtoken.access.links import DEFAULT_MAX_LIFETIME
from couchtoken.client import new_token, signed_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m couchtoken")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("token", help="print a new random download token (128 bits, base64url)")
    sign = commands.add_parser("sign", help="print an expiring signed link to an attachment")
    sign.add_argument("base_url", help="where couchtoken is served, e.g. https://files.example.com")
    sign.add_argument("db")
    sign.add_argument("docid")
    sign.add_argument("attachment")
    sign.add_argument(
        "--token-env",
        default="COUCHTOKEN_SIGN_TOKEN",
        help="environment variable holding the document's token (kept off the command line)",
    )
    sign.add_argument("--expires-in", type=int, default=3600, help="seconds the link stays valid")
    args = parser.parse_args(argv)
    if args.command == "token":
        print(new_token())
        return 0
    token = os.environ.get(args.token_env)
    if not token:
        parser.error(f"set ${args.token_env} to the document's download token")
    if not 0 < args.expires_in <= DEFAULT_MAX_LIFETIME:
        parser.error(f"--expires-in must be between 1 and {DEFAULT_MAX_LIFETIME} seconds")
    expires = int(time.time()) + args.expires_in
    try:
        link = signed_url(args.base_url, args.db, args.docid, args.attachment, token, expires)
    except ValueError as refused:  # names the service would refuse, a short token (never quoted)
        parser.error(str(refused))
    print(link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
