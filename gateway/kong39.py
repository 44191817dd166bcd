"""Kong 3.9's declarative schema, as far as eskit uses it or a user would plausibly add to it.

Sources (Kong/kong, the 3.x schema files; read for this table, not written from memory):
- plugins: `kong/plugins/<name>/schema.lua`: jwt, rate-limiting (with `kong/tools/redis/
  schema.lua` and its DB-less `policy`), correlation-id, request-size-limiting, cors,
  prometheus (matched against a copy marked "Based on Kong/kong blob 3.9.1"), key-auth,
  proxy-cache;
- entities: `kong/db/schema/entities/{services,routes,upstreams,targets,consumers}.lua`,
  `kong/db/schema/typedefs.lua` (protocols, ports, timeouts, paths), `kong/plugins/jwt/
  daos.lua` (jwt_secrets), `kong/db/declarative/` (top-level keys, nesting).
Taken from Kong's 3.9 documentation rather than re-read at the tag (smaller plugins, checked
with their documented fields): acl, ip-restriction, bot-detection, request-transformer,
response-transformer, and the 3.x additions to services/routes/upstreams (tls_verify,
request_buffering, hash_on_query_arg...). Not in 3.9, on purpose: cors `allow_origin_absent`
(3.10) and prometheus `wasm_metrics` (3.10). A field Kong adds later is refused until added here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.schema_rules import (
    Field,
    RecordCheck,
    at_least_one_of,
    record,
    required_if,
    strings,
)

# --- typedefs (kong/db/schema/typedefs.lua) ------------------------------------------------

PROTOCOLS = ("http", "https", "tcp", "tls", "tls_passthrough", "udp", "grpc", "grpcs", "ws", "wss")
HTTP_PROTOCOLS = ("http", "https")
HTTP_METHODS = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA",
)  # fmt: skip

NAME = Field(
    "string", match=r"[A-Za-z0-9.\-_~]+", match_hint="is not a valid name (A-Z a-z 0-9 . - _ ~)"
)
TAGS = strings(set_=True)
ID = Field("string", match=r"[0-9a-fA-F-]{36}", match_hint="is not a UUID")
PORT = Field("integer", between=(0, 65535))
TIMEOUT = Field("integer", between=(1, 2**31 - 2))
HOST = Field("string", match=r"[A-Za-z0-9.\-_*:\[\]]+", match_hint="is not a valid hostname")
PATH = Field("string", match=r"/.*", match_hint="should start with: /")
ROUTE_PATH = Field(
    "string", match=r"[/~].*", match_hint="should start with: / (fixed path) or ~/ (regex path)"
)
HEADER_NAME = Field("string", match=r"[A-Za-z0-9_\-]+", match_hint="is not a valid header name")
FOREIGN = Field("any")  # `{id: ...}` or a name: resolved by Kong, not checked here
TIMESTAMP = Field("integer")

# --- entities (kong/db/schema/entities/*.lua) ----------------------------------------------


def _service_path_only_for_http(value: Mapping[str, Any]) -> str | None:
    stream = ("tcp", "tls", "tls_passthrough", "udp", "grpc", "grpcs")
    if value.get("protocol") in stream and value.get("path") is not None:
        return f"path must not be set when protocol is {value['protocol']!r}"
    return None


def _route_needs_a_matcher(value: Mapping[str, Any]) -> str | None:
    protocols = value.get("protocols") or list(HTTP_PROTOCOLS)
    if set(protocols) & set(HTTP_PROTOCOLS) and not any(
        value.get(k) for k in ("methods", "hosts", "headers", "paths", "snis")
    ):
        return "must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"
    return None


SERVICE = record(
    (_service_path_only_for_http,),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    name=NAME,
    retries=Field("integer", between=(0, 32767), default=5),
    protocol=Field("string", one_of=PROTOCOLS, default="http"),
    host=HOST,
    port=Field("integer", between=(0, 65535), default=80),
    path=PATH,
    url=Field("string"),  # shorthand for protocol, host, port and path
    connect_timeout=TIMEOUT,
    write_timeout=TIMEOUT,
    read_timeout=TIMEOUT,
    tags=TAGS,
    client_certificate=FOREIGN,
    tls_verify=Field("boolean"),
    tls_verify_depth=Field("integer", between=(0, 64)),
    ca_certificates=strings(),
    enabled=Field("boolean", default=True),
)

ROUTE = record(
    (_route_needs_a_matcher,),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    name=NAME,
    protocols=Field("set", len_min=1, elements=Field("string", one_of=PROTOCOLS)),
    methods=Field(
        "set",
        elements=Field("string", match=r"[A-Z]+", match_hint="is not an uppercase HTTP method"),
    ),
    hosts=Field("array", elements=HOST),
    paths=Field("array", elements=ROUTE_PATH),
    headers=Field("map", keys=HEADER_NAME, values=strings()),
    https_redirect_status_code=Field("integer", one_of=(426, 301, 302, 307, 308), default=426),
    regex_priority=Field("integer", default=0),
    strip_path=Field("boolean", default=True),
    path_handling=Field("string", one_of=("v0", "v1"), default="v0"),
    preserve_host=Field("boolean", default=False),
    request_buffering=Field("boolean", default=True),
    response_buffering=Field("boolean", default=True),
    snis=strings(set_=True),
    sources=Field("set", elements=record(ip=Field("string"), port=PORT)),
    destinations=Field("set", elements=record(ip=Field("string"), port=PORT)),
    tags=TAGS,
    service=FOREIGN,
    expression=Field("string"),  # router_flavor = expressions only
    priority=Field("integer"),
)

HTTP_STATUSES = Field("array", elements=Field("integer", between=(100, 999)))
SECONDS = Field("number", between=(0, 65535))
COUNT = Field("integer", between=(0, 255))
HEALTHCHECK_TYPE = Field("string", one_of=("tcp", "http", "https", "grpc", "grpcs"), default="http")

UPSTREAM_HASH = Field(
    "string",
    one_of=("none", "consumer", "ip", "header", "cookie", "path", "query_arg", "uri_capture"),
    default="none",
)
TARGET = record(
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    upstream=FOREIGN,
    target=Field("string", required=True, match=r"[^\s]+(:\d+)?", match_hint="is not host[:port]"),
    weight=Field("integer", between=(0, 65535), default=100),
    tags=TAGS,
)
UPSTREAM = record(
    (
        required_if("hash_on", "header", "hash_on_header"),
        required_if("hash_on", "cookie", "hash_on_cookie"),
        required_if("hash_on", "query_arg", "hash_on_query_arg"),
        required_if("hash_on", "uri_capture", "hash_on_uri_capture"),
    ),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    name=Field(
        "string",
        required=True,
        match=r"[A-Za-z0-9.\-_]+",
        match_hint="must be a hostname (no IP, no port)",
    ),
    algorithm=Field(
        "string",
        one_of=("round-robin", "consistent-hashing", "least-connections", "latency"),
        default="round-robin",
    ),
    hash_on=UPSTREAM_HASH,
    hash_fallback=UPSTREAM_HASH,
    hash_on_header=HEADER_NAME,
    hash_fallback_header=HEADER_NAME,
    hash_on_cookie=Field("string"),
    hash_on_cookie_path=PATH,
    hash_on_query_arg=Field("string"),
    hash_fallback_query_arg=Field("string"),
    hash_on_uri_capture=Field("string"),
    hash_fallback_uri_capture=Field("string"),
    slots=Field("integer", between=(10, 2**16), default=10000),
    healthchecks=record(
        active=record(
            type=HEALTHCHECK_TYPE,
            timeout=SECONDS,
            concurrency=Field("integer", between=(1, 2**31)),
            http_path=PATH,
            https_sni=Field("string"),
            https_verify_certificate=Field("boolean"),
            headers=Field("map", keys=HEADER_NAME, values=strings()),
            healthy=record(interval=SECONDS, http_statuses=HTTP_STATUSES, successes=COUNT),
            unhealthy=record(
                interval=SECONDS,
                http_statuses=HTTP_STATUSES,
                tcp_failures=COUNT,
                timeouts=COUNT,
                http_failures=COUNT,
            ),
        ),
        passive=record(
            type=HEALTHCHECK_TYPE,
            healthy=record(http_statuses=HTTP_STATUSES, successes=COUNT),
            unhealthy=record(
                http_statuses=HTTP_STATUSES, tcp_failures=COUNT, timeouts=COUNT, http_failures=COUNT
            ),
        ),
        threshold=Field("number", between=(0, 100)),
    ),
    tags=TAGS,
    host_header=HOST,
    client_certificate=FOREIGN,
    use_srv_name=Field("boolean", default=False),
)


def _asymmetric_key_needs_a_public_key(value: Mapping[str, Any]) -> str | None:
    algorithm = value.get("algorithm") or "HS256"
    if not algorithm.startswith("HS") and not value.get("rsa_public_key"):
        return f"rsa_public_key is required when algorithm is {algorithm!r}"
    return None


JWT_SECRET = record(
    (_asymmetric_key_needs_a_public_key,),
    id=ID,
    created_at=TIMESTAMP,
    consumer=FOREIGN,
    key=Field("string"),
    secret=Field("string"),
    rsa_public_key=Field("string"),
    algorithm=Field("string", one_of=JWT_ALGORITHMS, default="HS256"),
    tags=TAGS,
)
CREDENTIALS: dict[str, Field] = {
    "jwt_secrets": JWT_SECRET,
    "keyauth_credentials": record(
        id=ID,
        created_at=TIMESTAMP,
        consumer=FOREIGN,
        key=Field("string"),
        ttl=Field("integer"),
        tags=TAGS,
    ),
    "basicauth_credentials": record(
        id=ID,
        created_at=TIMESTAMP,
        consumer=FOREIGN,
        username=Field("string", required=True),
        password=Field("string", required=True),
        tags=TAGS,
    ),
    "acls": record(
        id=ID,
        created_at=TIMESTAMP,
        consumer=FOREIGN,
        group=Field("string", required=True),
        tags=TAGS,
    ),
}
CONSUMER = record(
    (at_least_one_of("username", "custom_id"),),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    username=Field("string"),
    custom_id=Field("string"),
    tags=TAGS,
)

# The fields every plugin entity has besides `config` (kong/db/schema/entities/plugins.lua).
PLUGIN_ENTITY: dict[str, Field] = {
    "id": ID,
    "created_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
    "name": Field("string", required=True),
    "instance_name": NAME,
    "enabled": Field("boolean", default=True),
    "protocols": Field("set", elements=Field("string", one_of=PROTOCOLS)),
    "tags": TAGS,
    "service": FOREIGN,
    "route": FOREIGN,
    "consumer": FOREIGN,
    "consumer_group": FOREIGN,
    "ordering": Field("any"),  # Enterprise only
}

# --- plugins (kong/plugins/<name>/schema.lua) ----------------------------------------------

RATE_PERIODS = ("second", "minute", "hour", "day", "month", "year")


def _periods_in_order(config: Mapping[str, Any]) -> str | None:
    for i, lower in enumerate(RATE_PERIODS):
        for upper in RATE_PERIODS[i + 1 :]:
            low, high = config.get(lower), config.get(upper)
            if low is not None and high is not None and high < low:
                return (
                    f"The limit for {upper}({high:.1f}) cannot be lower than "
                    f"the limit for {lower}({low:.1f})"
                )
    return None


def _sync_rate_only_with_redis(config: Mapping[str, Any]) -> str | None:
    sync_rate = config.get("sync_rate", -1)
    if sync_rate is None or sync_rate == -1:
        return None
    if (config.get("policy") or "local") != "redis":
        return "sync_rate can only be used with the redis policy"
    if sync_rate < 0.02:
        return "sync_rate must be greater than 0.02, or -1 to disable"
    return None


def _redis_host_when_redis(config: Mapping[str, Any]) -> str | None:
    if config.get("policy") == "redis" and not (config.get("redis") or {}).get("host"):
        return "redis.host is required when policy is 'redis'"
    return None


REDIS = record(  # kong/tools/redis/schema.lua
    host=HOST,
    port=PORT,
    timeout=Field("integer", between=(0, 2**31 - 2), default=2000),
    username=Field("string"),
    password=Field("string", len_min=0),
    database=Field("integer", default=0),
    ssl=Field("boolean", default=False),
    ssl_verify=Field("boolean", default=False),
    server_name=Field("string"),
)


def rate_limiting(*, dbless: bool) -> Field:
    # DB-less Kong offers no `cluster` policy (the counters would live in the database).
    policies = ("local", "redis") if dbless else ("local", "cluster", "redis")
    checks: tuple[RecordCheck, ...] = (
        at_least_one_of(*RATE_PERIODS),
        _periods_in_order,
        _sync_rate_only_with_redis,
        _redis_host_when_redis,
        required_if("limit_by", "header", "header_name"),
        required_if("limit_by", "path", "path"),
    )
    return record(
        checks,
        **{p: Field("number", gt=0) for p in RATE_PERIODS},
        limit_by=Field(
            "string",
            one_of=("consumer", "credential", "ip", "service", "header", "path"),
            default="consumer",
        ),
        header_name=HEADER_NAME,
        path=PATH,
        policy=Field("string", one_of=policies, default="local", len_min=0),
        fault_tolerant=Field("boolean", default=True),
        redis=REDIS,
        hide_client_headers=Field("boolean", default=False),
        error_code=Field("number", gt=0, default=429),
        error_message=Field("string", default="API rate limit exceeded"),
        sync_rate=Field("number", default=-1),
    )


def _exp_with_maximum_expiration(config: Mapping[str, Any]) -> str | None:
    if (config.get("maximum_expiration") or 0) > 0 and "exp" not in (
        config.get("claims_to_verify") or []
    ):
        return "claims_to_verify must contain 'exp' when maximum_expiration is set"
    return None


JWT = record(
    (_exp_with_maximum_expiration,),
    uri_param_names=strings(set_=True, default=["jwt"]),
    cookie_names=strings(set_=True),
    key_claim_name=Field("string", default="iss"),
    secret_is_base64=Field("boolean", default=False),
    claims_to_verify=Field("set", elements=Field("string", one_of=("exp", "nbf"))),
    anonymous=Field("string"),
    run_on_preflight=Field("boolean", default=True),
    maximum_expiration=Field("number", between=(0, 31536000), default=0),
    header_names=strings(set_=True, default=["authorization"]),
    realm=Field("string"),
)
KEY_AUTH = record(
    key_names=Field("array", elements=HEADER_NAME, default=["apikey"]),
    hide_credentials=Field("boolean", default=False),
    anonymous=Field("string"),
    key_in_header=Field("boolean", default=True),
    key_in_query=Field("boolean", default=True),
    key_in_body=Field("boolean", default=False),
    run_on_preflight=Field("boolean", default=True),
    realm=Field("string"),
)
CORRELATION_ID = record(
    header_name=Field("string", default="Kong-Request-ID"),
    generator=Field("string", one_of=("uuid", "uuid#counter", "tracker"), default="uuid#counter"),
    echo_downstream=Field("boolean", default=False),
)
REQUEST_SIZE_LIMITING = record(
    allowed_payload_size=Field("integer", default=128),
    size_unit=Field("string", one_of=("megabytes", "kilobytes", "bytes"), default="megabytes"),
    require_content_length=Field("boolean", default=False),
)
CORS = record(
    origins=strings(),
    headers=strings(),
    exposed_headers=strings(),
    methods=Field(
        "array", elements=Field("string", one_of=HTTP_METHODS), default=list(HTTP_METHODS)
    ),
    max_age=Field("number"),
    credentials=Field("boolean", default=False),
    private_network=Field("boolean", default=False),
    preflight_continue=Field("boolean", default=False),
)
PROMETHEUS = record(
    per_consumer=Field("boolean", default=False),
    status_code_metrics=Field("boolean", default=False),
    ai_metrics=Field("boolean", default=False),
    latency_metrics=Field("boolean", default=False),
    bandwidth_metrics=Field("boolean", default=False),
    upstream_health_metrics=Field("boolean", default=False),
)
ACL = record(
    (at_least_one_of("allow", "deny"),),
    allow=strings(set_=True),
    deny=strings(set_=True),
    hide_groups_header=Field("boolean", default=False),
    include_consumer_groups=Field("boolean", default=False),
    always_use_authenticated_groups=Field("boolean", default=False),
)
IP_RESTRICTION = record(
    (at_least_one_of("allow", "deny"),),
    allow=strings(set_=True),
    deny=strings(set_=True),
    status=Field("number"),
    message=Field("string"),
)
BOT_DETECTION = record(allow=strings(set_=True), deny=strings(set_=True))


def _transformations(*, request: bool) -> Field:
    parts = ("headers", "querystring", "body") if request else ("headers", "json")
    colon_pairs = strings(match=r"[^:]+:.*", match_hint="is not 'name:value'")
    names = strings()
    typed = {
        "json_types": Field(
            "array", elements=Field("string", one_of=("boolean", "number", "string"))
        )
    }
    extra: dict[str, Field] = {} if request else typed
    return record(
        remove=record(**{p: names for p in parts}),
        rename=record(**{p: colon_pairs for p in parts}),
        replace=record(
            **{p: colon_pairs for p in parts}, **({"uri": Field("string")} if request else extra)
        ),
        add=record(**{p: colon_pairs for p in parts}, **extra),
        append=record(**{p: colon_pairs for p in parts}, **extra),
        **(
            {
                "http_method": Field(
                    "string", match=r"[A-Z]+", match_hint="is not an uppercase method"
                )
            }
            if request
            else {}
        ),
    )


PROXY_CACHE = record(
    response_code=Field(
        "array", len_min=1, elements=Field("integer", between=(100, 900)), default=[200, 301, 404]
    ),
    request_method=Field(
        "array",
        elements=Field("string", one_of=("HEAD", "GET", "POST", "PATCH", "PUT")),
        default=["GET", "HEAD"],
    ),
    content_type=strings(default=["text/plain", "application/json"]),
    cache_ttl=Field("integer", gt=0, default=300),
    strategy=Field("string", one_of=("memory",), required=True),
    cache_control=Field("boolean", default=False),
    ignore_uri_case=Field("boolean", default=False),
    storage_ttl=Field("integer"),
    memory=record(dictionary_name=Field("string", default="kong_db_cache")),
    vary_query_params=strings(),
    vary_headers=strings(),
    response_headers=record(
        age=Field("boolean", default=True),
        **{
            "X-Cache-Status": Field("boolean", default=True),
            "X-Cache-Key": Field("boolean", default=True),
        },
    ),
)


def plugin_configs(*, dbless: bool) -> dict[str, Field]:
    """The `config` record of each plugin in this table, by plugin name."""
    return {
        "jwt": JWT,
        "key-auth": KEY_AUTH,
        "acl": ACL,
        "rate-limiting": rate_limiting(dbless=dbless),
        "request-size-limiting": REQUEST_SIZE_LIMITING,
        "correlation-id": CORRELATION_ID,
        "cors": CORS,
        "prometheus": PROMETHEUS,
        "ip-restriction": IP_RESTRICTION,
        "bot-detection": BOT_DETECTION,
        "request-transformer": _transformations(request=True),
        "response-transformer": _transformations(request=False),
        "proxy-cache": PROXY_CACHE,
    }


# Every plugin Kong 3.9 (open source) bundles (kong/constants.lua): a name outside this list is
# not a Kong plugin; one inside it but outside `plugin_configs` has no table here yet.
BUNDLED_PLUGINS = frozenset(
    {
        "jwt", "acl", "correlation-id", "cors", "oauth2", "tcp-log", "udp-log", "file-log",
        "http-log", "key-auth", "hmac-auth", "basic-auth", "ip-restriction",
        "request-transformer", "response-transformer", "request-size-limiting",
        "rate-limiting", "response-ratelimiting", "syslog", "loggly", "datadog", "ldap-auth",
        "statsd", "bot-detection", "aws-lambda", "request-termination", "prometheus",
        "proxy-cache", "session", "acme", "grpc-gateway", "grpc-web", "pre-function",
        "post-function", "azure-functions", "zipkin", "opentelemetry", "ai-proxy",
        "ai-prompt-decorator", "ai-prompt-template", "ai-prompt-guard", "ai-request-transformer",
        "ai-response-transformer", "standard-webhooks", "redirect",
    }
)  # fmt: skip

# The keys a `_format_version: "3.0"` file may have at its top level.
TOP_LEVEL = frozenset(
    {
        "_format_version", "_transform", "_comment", "services", "routes", "consumers",
        "consumer_groups", "plugins", "upstreams", "targets", "certificates",
        "ca_certificates", "snis", "vaults", "keys", "key_sets", "filter_chains",
    }
)  # fmt: skip
