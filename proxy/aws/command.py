"""``cacheport import-aws``: read the region's caches, write the port map, list the rest."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from ..iptables.command import write_translated
from ..iptables.render import _count
from .fetch import AwsError, client, read_account, tag_reader
from .render import render_yaml
from .translate import TranslateError, parse_tag, select, translate

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_AWS = 3


def run_import(args: argparse.Namespace, api: Any = None) -> int:
    """The command; ``api`` is an ElastiCache client (tests pass a stubbed one)."""
    try:
        tags = dict(parse_tag(t) for t in args.tag)
        allow = [str(ipaddress.ip_network(c, strict=False)) for c in args.allow]
    except ValueError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if api is None:
            api = client(args.region, args.profile)
        account = read_account(api, serverless=not args.no_serverless)
        tags_of = tag_reader(api)
        groups = select(account.groups, args.id, tags, tags_of)
        clusters = select(account.cache_clusters, args.id, tags, tags_of)
        caches = select(account.serverless, args.id, tags, tags_of)
    except AwsError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_AWS
    try:
        result = translate(groups, clusters, caches, first_port=args.first_port)
    except TranslateError as exc:
        print(f"cacheport: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    region = args.region or getattr(getattr(api, "meta", None), "region_name", "") or "?"
    for item in result.untranslated:
        kind = "warning" if item.needed else "note"
        print(f"cacheport: {kind}: {item.source}: {item.reason}", file=sys.stderr)
    if not result.entries:
        print("cacheport: no cache could be translated "
              f"({len(groups) + len(clusters) + len(caches)} described); nothing written",
              file=sys.stderr)
        return EXIT_CONFIG
    document = render_yaml(result, region=region, announce=args.announce, allow=allow,
                           listen=args.listen)
    if not write_translated(document, args.output):
        return EXIT_CONFIG
    review = sum(1 for u in result.untranslated if u.needed)
    print(f"cacheport: {_count(len(result.clusters), 'cluster')} and "
          f"{_count(len(result.listeners), 'listener')}"
          f"{f' written to {args.output}' if args.output else ''}; {review} item(s) to review",
          file=sys.stderr)
    return EXIT_OK


def cmd_import_aws(args: argparse.Namespace) -> int:
    return run_import(args)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import-aws`` to the ``cacheport`` command."""
    p = sub.add_parser(
        "import-aws",
        help="write a port map from the ElastiCache API (needs cacheport[aws])",
        description="Describe the region's replication groups, cache clusters and "
        "serverless caches (boto3's usual credentials) and write a port map: a cluster "
        "entry for each, with non-overlapping port ranges. What cannot be translated is "
        "listed in the map and as warnings. Exit status 0 when something was translated, "
        "2 when nothing was, 3 when the API could not be read. IAM: "
        "elasticache:DescribeReplicationGroups, DescribeCacheClusters, "
        "DescribeServerlessCaches, and ListTagsForResource with --tag.",
    )
    p.add_argument("--region", help="AWS region (default: boto3's, e.g. AWS_REGION)")
    p.add_argument("--profile", help="a named profile from the shared AWS config")
    p.add_argument("--id", action="append", default=[], metavar="ID",
                   help="only this replication group / cache cluster / serverless cache "
                        "(repeatable)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="only caches carrying this tag (repeatable: all must match)")
    p.add_argument("--announce", required=True, metavar="HOST",
                   help="the NAT host's address as clients reach it (told to cluster clients)")
    p.add_argument("--allow", action="append", required=True, metavar="CIDR",
                   help="client networks that may connect (repeatable); goes to defaults")
    p.add_argument("--listen", default="0.0.0.0", metavar="HOST",
                   help="address the listeners bind (default 0.0.0.0)")
    p.add_argument("--first-port", type=int, default=30000, metavar="PORT",
                   help="ports are handed out upwards from here (default 30000)")
    p.add_argument("--no-serverless", action="store_true",
                   help="skip DescribeServerlessCaches (regions or SDKs without it)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the port map to FILE instead of standard output")
    p.set_defaults(func=cmd_import_aws)
