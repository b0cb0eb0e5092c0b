"""`mta dkim keygen`: a new signing key in a file (0600), and the DNS TXT record to publish.

The key is written whole or not at all (mta/outfile.py) and never over an existing file:
a key in use must not be replaced behind the published record; rotate with a new
selector instead. The record goes to stdout (paste it into the zone); the rest to stderr.
"""

from __future__ import annotations

import argparse
import sys

from mta.dkim import ALGORITHMS, MIN_RSA_BITS


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("dkim", help="DKIM signing keys (reads no configuration)")
    dsub = p.add_subparsers(metavar="ACTION")
    k = dsub.add_parser("keygen", help="write a new signing key (mode 0600) and print its DNS TXT record")
    k.add_argument("--domain", required=True, metavar="D", help="the signing domain (d=)")
    k.add_argument("--selector", required=True, metavar="S", help="the selector (s=): the key's name under D")
    k.add_argument("--key-file", required=True, metavar="FILE", help="where to write the PEM key (must not exist)")
    k.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="rsa", help="the key type (default: rsa)")
    k.add_argument("--bits", type=int, default=MIN_RSA_BITS, metavar="N",
                   help=f"RSA key size (default and least: {MIN_RSA_BITS})")
    k.set_defaults(run=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    from mta.dkim.keys import DkimKey, DkimKeyError
    from mta.outfile import OutFile
    try:
        pem = DkimKey.generate(args.algorithm, args.bits)
        key = DkimKey.from_pem(args.domain, args.selector, pem)
        with OutFile(args.key_file) as f:
            f.write(pem)
    except FileExistsError:
        print(f"mta dkim keygen: {args.key_file} exists; it is not replaced (a key in use must stay until "
              "its selector is retired): name a new file, and a new selector to rotate", file=sys.stderr)
        return 1
    except (DkimKeyError, OSError) as exc:
        print(f"mta dkim keygen: {exc}", file=sys.stderr)
        return 1
    print(key.txt_record())
    print(f"mta dkim keygen: wrote {args.key_file} (mode 0600; make it readable by the user mta runs as). "
          f"Publish the record above, check it with `dig TXT {key.record_name}`, then add "
          f"[[dkim]] domain = \"{key.domain}\", selector = \"{key.selector}\", key_file = \"{args.key_file}\"",
          file=sys.stderr)
    return 0
