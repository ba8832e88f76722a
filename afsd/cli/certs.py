"""`afsd certs init` / `afsd certs issue NAME`: a cluster CA and certificates for people without a PKI."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "certs", help="make a cluster CA and node/user certificates (mutual TLS)",
        description="A small cluster CA for mutual TLS between afsd daemons. `init` makes the CA (DIR/ca.crt, "
                    "DIR/ca.key); `issue NAME` a certificate in DIR/NAME (ca.crt, tls.crt, tls.key: cert-manager's "
                    "secret layout, which every daemon's --tls-dir reads). Keep ca.key off the nodes.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    init = verbs.add_parser("init", help="make the cluster CA")
    init.add_argument("--dir", type=Path, default=Path("/etc/afsd/pki"), help="where (default %(default)s)")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default %(default)s)")
    init.set_defaults(handler=run_init)
    issue = verbs.add_parser("issue", help="issue a node or user certificate",
                             description="Issue NAME's certificate, signed by the CA in --dir, into --out "
                                         "(default DIR/NAME). A node certificate's NAME is its --node-id; give "
                                         "every host name and IP the node is dialled at with --host.")
    issue.add_argument("name", metavar="NAME", help="node id (the daemons' --node-id) or user name")
    issue.add_argument("--dir", type=Path, default=Path("/etc/afsd/pki"), help="the CA's directory (default %(default)s)")
    issue.add_argument("--user", action="store_true",
                       help="a user certificate (afsd run/ps, afs-sdk): client only, for afslet and proxy")
    issue.add_argument("--host", action="append", default=[], metavar="HOST|IP",
                       help="a DNS name or IP address this node is reached at (repeatable)")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default %(default)s)")
    issue.add_argument("--out", type=Path, help="output directory (default DIR/NAME)")
    issue.set_defaults(handler=run_issue)


def run_init(args: argparse.Namespace) -> int:
    from afsd.trust.certs import init_ca

    path = init_ca(args.dir, days=args.days)
    print(f"cluster CA {path} (key {args.dir / 'ca.key'}: keep it off the nodes)")
    return 0


def run_issue(args: argparse.Namespace) -> int:
    from afsd.errors import UsageError
    from afsd.trust.certs import issue
    from afsd.trust.identity import NODE_ROLE, USER_ROLE

    if args.user and args.host:
        raise UsageError("--host is for node certificates; a user certificate is client-only")
    if not args.user and not args.host:
        raise UsageError(f"a node certificate needs the hosts {args.name} is reached at: --host HOST|IP (repeatable)")
    files = issue(args.dir, args.name, role=USER_ROLE if args.user else NODE_ROLE, hosts=args.host,
                  days=args.days, out=args.out)
    print(f"{'user' if args.user else 'node'} certificate for {args.name}: {files.cert.parent}/ "
          f"(ca.crt, tls.crt, tls.key)")
    return 0
