"""The one module that talks to AWS: three Describe calls (and ListTagsForResource when
filtering by tag) through boto3, which is imported here only, at call time, so the core
installs and runs without it (``pip install cacheport[aws]`` brings it).

Credentials come from boto3's usual chain (environment, shared files, instance or task
role). An AccessDenied names the IAM action that is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ACCESS_DENIED = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation",
                 "UnauthorizedException")
INSTALL_HINT = "boto3 is not installed; install the extra: pip install 'cacheport[aws]'"


class AwsError(Exception):
    """The API could not be read; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Account:
    """The descriptions of one region, in the API's own shapes."""

    groups: list[dict[str, Any]]
    cache_clusters: list[dict[str, Any]]
    serverless: list[dict[str, Any]]


def client(region: str | None, profile: str | None = None) -> Any:
    """An ElastiCache client; raises ``AwsError`` without boto3 or a region."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError
    except ImportError:
        raise AwsError(INSTALL_HINT) from None
    try:
        session = boto3.Session(profile_name=profile, region_name=region)
        if session.region_name is None:
            raise AwsError("no region: pass --region or set AWS_REGION")
        return session.client("elasticache")
    except BotoCoreError as exc:
        raise AwsError(str(exc)) from None


def _explain(exc: Exception) -> AwsError:
    """botocore's errors in words that say what to do."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return AwsError("no AWS credentials found (environment, ~/.aws, or an instance or "
                        "task role)")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ACCESS_DENIED:
            return AwsError(f"{code}: the caller may not call {exc.operation_name}; allow "
                            f"elasticache:{exc.operation_name} in its IAM policy")
    return AwsError(str(exc))


def _pages(call: Callable[..., Mapping[str, Any]], key: str, token: str,
           **params: Any) -> Iterator[dict[str, Any]]:
    """Every item of a paginated Describe call (``Marker`` or ``NextToken``)."""
    while True:
        page = call(**params)
        yield from page.get(key) or []
        following = page.get(token)
        if not following:
            return
        params[token] = following


def read_account(api: Any, *, serverless: bool = True) -> Account:
    """DescribeReplicationGroups, DescribeCacheClusters (ShowCacheNodeInfo) and
    DescribeServerlessCaches, every page."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        groups = list(_pages(api.describe_replication_groups, "ReplicationGroups", "Marker"))
        clusters = list(_pages(api.describe_cache_clusters, "CacheClusters", "Marker",
                               ShowCacheNodeInfo=True))
        caches = list(_pages(api.describe_serverless_caches, "ServerlessCaches",
                             "NextToken")) if serverless else []
    except (ClientError, BotoCoreError) as exc:
        raise _explain(exc) from None
    return Account(groups, clusters, caches)


def tag_reader(api: Any) -> Callable[[str], dict[str, str]]:
    """``arn -> {key: value}`` through ListTagsForResource, each ARN asked once."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: dict[str, dict[str, str]] = {}

    def tags_of(arn: str) -> dict[str, str]:
        if arn not in seen:
            try:
                reply = api.list_tags_for_resource(ResourceName=arn)
            except (ClientError, BotoCoreError) as exc:
                raise _explain(exc) from None
            seen[arn] = {str(t["Key"]): str(t.get("Value", ""))
                         for t in reply.get("TagList") or []}
        return seen[arn]

    return tags_of
