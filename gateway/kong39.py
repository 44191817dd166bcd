"""Kong 3.9's declarative schema, as far as eskit uses it or a user would plausibly add to it.

Written for this project from Kong's Lua source (Kong/kong, open-source edition; Kong's code is
not copied here). Which file was read where:

- At Kong/kong 39654d6c246d8d40de2f53bd2d5ebca820e6b1d5, whose `kong/meta.lua` is
  major=3 minor=9 patch=0 (no suffix) and whose cors schema has no `allow_origin_absent` (3.10):
  `kong/db/schema/entities/services.lua` and `kong/plugins/cors/schema.lua`.
- At Kong/kong 1f6d269517cfb8e0221dad0ffc68d95c3344bbbb, whose `kong-3.9.0-0.rockspec` is
  version 3.9.0-0 (the 3.9 line): `kong/db/schema/entities/routes.lua` (default
  `router_flavor` traditional_compatible: no `expression`/`priority` fields).
- Not pinned to a commit: the index of Kong's history that was searched stores each distinct
  file content once and would not return these at any 3.9 commit, so the newest open-source
  content found was read and taken as the 3.9 content: each is 3.x by what it contains (markers
  below), none has a feature of a later release known to this table, and the 3.9.0 and 3.9.1
  changelogs (changelog/3.9.0/3.9.0.md at e01bf85ce3ce, changelog/3.9.1/3.9.1.md at
  2b3583ff3694) list no change to them. That they are the exact 3.9 revision is not proven:
  `kong/plugins/acl/schema.lua` (has `always_use_authenticated_groups`, 3.6; OSS has no
  `include_consumer_groups`, which is Enterprise), `kong/plugins/ip-restriction/schema.lua`
  (`status`, `message`, field descriptions: 3.5+), `kong/plugins/bot-detection/schema.lua`
  (`allow`/`deny` with descriptions: 3.5+), `kong/plugins/request-transformer/schema.lua` and
  `kong/plugins/response-transformer/schema.lua` (import `kong.tools.http`; response-transformer
  renames `json`, 3.8), `kong/db/schema/entities/routes_subschemas.lua` (tls_passthrough and
  the `expressions` flavour adjustments), `kong/db/schema/typedefs.lua` (utf8_name, router_path,
  tags, ip_or_cidr, path; 3.5+), `kong/constants.lua` (OSS protocols: no ws/wss, those are
  Enterprise).
- `kong/db/schema/entities/upstreams.lua`: no 3.x copy could be read; its long-standing checks
  (name no IP/no port, hash_fallback rules, distinct headers, cookie name) were read at
  0045b67290032646c1ad56bbd871ad340bf9f476 (pre-1.0) and the 3.x fields (latency,
  query_arg, uri_capture, host_header, use_srv_name, the grpc health checks) stay as Kong's 3.9
  documentation lists them.
- Read earlier for this table, at the tag: jwt, rate-limiting (with `kong/tools/redis/
  schema.lua` and its DB-less `policy`), correlation-id, request-size-limiting, prometheus
  (matched against a copy marked "Based on Kong/kong blob 3.9.1"), key-auth, proxy-cache;
  `kong/db/schema/entities/{targets,consumers}.lua`, `kong/plugins/jwt/daos.lua` (jwt_secrets),
  `kong/db/declarative/` (top-level keys, nesting).

Not in 3.9, on purpose: cors `allow_origin_absent` (3.10) and prometheus `wasm_metrics` (not
re-read here: the 3.9.0 changelog does list "Proxy-Wasm metrics" for prometheus, so check it when
prometheus is next read). A field Kong adds later is refused until added here. Where Kong
validates with PCRE or its own parsers (regexes, hosts, templates) this table checks what Python
can check the same way and no more.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.schema_rules import (
    Field,
    RecordCheck,
    at_least_one_of,
    distinct,
    each,
    nonempty,
    null_unless,
    only_one_of,
    quoted,
    record,
    required_if,
    strings,
)

# --- validators Kong's typedefs name (kong/db/schema/typedefs.lua, kong/tools/*) -------------


def ip_or_cidr_problem(text: str) -> str | None:
    """typedefs.ip_or_cidr."""
    try:
        if "/" in text:
            ipaddress.ip_network(text, strict=False)
        else:
            ipaddress.ip_address(text)
    except ValueError:
        return f"invalid ip or cidr range: '{text}'"
    return None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _split_port(host: str) -> tuple[str, str | None]:
    """`host[:port]`, `[v6][:port]` or a bare IPv6 address (which has no port)."""
    if host.startswith("["):
        inside, _, rest = host[1:].partition("]")
        return inside, rest[1:] if rest.startswith(":") else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, None


def host_without_port_problem(host: str) -> str | None:
    """typedefs.host: a name or an IP address, without a port."""
    if _split_port(host)[1] is not None:
        return "must not have a port"
    return None


def wildcard_host_problem(host: str) -> str | None:
    """typedefs.wildcard_host (route `snis`)."""
    if "*" in host:
        if host.count("*") > 1:
            return "only one wildcard must be specified"
        if not (host.startswith("*") or host.endswith("*")):
            return "wildcard must be leftmost or rightmost character"
    name, port = _split_port(host.replace("*", "wildcard"))
    if _is_ip(name):
        return "must not be an IP"
    if port is not None:
        return "must not have a port"
    return None


def route_host_problem(host: str) -> str | None:
    """typedefs.hosts elements: at most one wildcard, at the leftmost or rightmost label."""
    if host.count("*") > 1:
        return "invalid wildcard: must have at most one wildcard"
    if "*" in host and not (host.startswith("*.") or host.endswith(".*")):
        return "invalid wildcard: must be placed at leftmost or rightmost label"
    return None


_REGEX_ERRORS = (
    "missing )",
    "unbalanced parenthesis",
    "unterminated character set",
    "nothing to repeat",
    "multiple repeat",
)


def regex_problem(pattern: str) -> str | None:
    """`is_regex` / a `~/` route path: Kong compiles it with PCRE; this refuses only what PCRE
    refuses as well (unbalanced groups and classes, a quantifier on nothing)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        if any(e in exc.msg for e in _REGEX_ERRORS):
            return f"invalid regex: '{pattern}' ({exc.msg})"
    return None


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4."""
    out: list[str] = []
    while path:
        if path.startswith(("../", "./")):
            path = path[path.index("/") + 1 :]
        elif path.startswith("/./") or path == "/.":
            path = "/" + path[3:]
        elif path.startswith("/../") or path == "/..":
            path = "/" + path[4:]
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            cut = path.find("/", 1)
            cut = len(path) if cut == -1 else cut
            out.append(path[:cut])
            path = path[cut:]
    return "".join(out)


def _normalized(path: str) -> str:
    """kong.tools.uri.normalize(path, true): unreserved characters decoded, other escapes in
    upper case, dot segments removed, slashes merged."""

    def escape(m: re.Match[str]) -> str:
        char = chr(int(m[1], 16))
        return char if char in _UNRESERVED else "%" + m[1].upper()

    decoded = re.sub(r"%([0-9A-Fa-f]{2})", escape, path)
    return re.sub(r"/{2,}", "/", _remove_dot_segments(decoded))


def router_path_problem(path: str) -> str | None:
    """typedefs.router_path beyond its prefix: no empty segment, valid %-escapes, a fixed path
    in normal form, a regex path that compiles."""
    if "//" in path:
        return "must not have empty segments"
    bad = re.search(r"%(?![0-9A-Fa-f]{2}).{0,2}", path)
    if bad and re.fullmatch(r"[A-Za-z0-9._~/%:@!$&'()*+,;=\-]*", path.lstrip("~")):
        return f"invalid url-encoded value: '{bad[0]}'"
    if path.startswith("~"):
        return regex_problem(path[1:])
    normal = _normalized(path)
    if normal != path:
        return f"non-normalized path, consider use '{normal}' instead"
    return None


# --- typedefs (kong/db/schema/typedefs.lua, kong/constants.lua) -----------------------------

# constants.PROTOCOLS of the open-source edition (ws and wss are Enterprise only).
PROTOCOLS = ("grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp")
HTTP_PROTOCOLS = ("http", "https")
HTTP_METHODS = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT")
JWT_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
    "PS256", "PS384", "PS512", "EdDSA",
)  # fmt: skip

# typedefs.name: plain ASCII (plugin instance names, upstream-style names).
NAME = Field(
    "string", match=r"[A-Za-z0-9.\-_~]+", match_hint="is not a valid name (A-Z a-z 0-9 . - _ ~)"
)
# typedefs.utf8_name: service and route names may also carry non-ASCII characters.
UTF8_NAME = Field(
    "string",
    match=r"[A-Za-z0-9.\-_~\u0080-\U0010ffff]+",
    match_hint=(
        "is not a valid name: the only accepted ascii characters are alphanumerics or "
        "., -, _, and ~"
    ),
)
# typedefs.tag: printable ASCII except ',' and '/' (a space is allowed), or non-ASCII.
TAGS = strings(
    set_=True,
    match=r"[ !-+\-.0-~\u0080-\U0010ffff]+",
    match_hint="is not a valid tag: expected printable ascii (except `,` and `/`) or utf-8",
)
UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
ID = Field("string", match=UUID, match_hint="is not a UUID")
PORT = Field("integer", between=(0, 65535))
TIMEOUT = Field("integer", between=(1, 2**31 - 2))
HOST = Field("string", match=r"[A-Za-z0-9.\-_*:\[\]]+", match_hint="is not a valid hostname")
# typedefs.path: starts with '/', no empty segment, RFC 3986 characters, valid %-escapes.
PATH = Field(
    "string",
    match=r"(?!.*//)/(?:[A-Za-z0-9._~/:@!$&'()*+,;=\-]|%[0-9A-Fa-f]{2})*",
    match_hint=(
        "is not a valid path: it should start with: /, have no empty segments (//) and use "
        "RFC 3986 characters and valid %-escapes only"
    ),
)
ROUTE_PATH = Field(
    "string", match=r"(?:/|~/).*", match_hint="should start with: / (fixed path) or ~/ (regex path)"
)
HEADER_NAME = Field(
    "string",
    match=r"[A-Za-z0-9_\-]+",
    match_hint="is not a valid header name (A-Z a-z 0-9 _ -)",
)
# utils.validate_cookie_name: an RFC 2616 token.
COOKIE_NAME = Field(
    "string", match=r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", match_hint="is not a valid cookie name"
)
FOREIGN = Field("any")  # `{id: ...}` or a name: resolved by Kong, not checked here
TIMESTAMP = Field("integer")
IP_PORT = record(
    (at_least_one_of("ip", "port"),),
    ip=Field("string"),  # typedefs.ip_or_cidr, checked by the route
    port=PORT,
)

# --- entities (kong/db/schema/entities/*.lua) ----------------------------------------------

SERVICE_TLS_FIELDS = ("client_certificate", "tls_verify", "tls_verify_depth", "ca_certificates")


def _service_path_only_for_http(value: Mapping[str, Any]) -> str | None:
    stream = ("tcp", "tls", "udp", "grpc", "grpcs")  # tls_passthrough may keep a path
    if value.get("protocol") in stream and value.get("path") is not None:
        return f"path must not be set when protocol is {value['protocol']!r}"
    return None


def _service_host(value: Mapping[str, Any]) -> str | None:
    host = value.get("host")
    if host is None:
        return None if value.get("url") else "host: required field missing (or set url)"
    problem = host_without_port_problem(host)
    return f"host: {problem}" if problem else None


SERVICE = record(
    (
        _service_host,
        _service_path_only_for_http,
        *(
            null_unless(f, on="protocol", one_of=("https", "tls"), default="http")
            for f in SERVICE_TLS_FIELDS
        ),
    ),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    name=UTF8_NAME,
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
    ca_certificates=strings(match=UUID, match_hint="is not a UUID"),
    enabled=Field("boolean", default=True),
)

# routes.lua: `protocols` is a set with mutually exclusive subsets; routes_subschemas.lua picks
# the rules by protocol family.
PROTOCOL_FAMILIES = (
    ("http", "https"),
    ("tcp", "tls", "udp"),
    ("tls_passthrough",),
    ("grpc", "grpcs"),
)
SNI_PROTOCOLS = ("grpcs", "https", "tls", "tls_passthrough")


def _route_protocols(value: Mapping[str, Any]) -> list[str]:
    return list(value.get("protocols") or HTTP_PROTOCOLS)


def _route_protocol_families(value: Mapping[str, Any]) -> str | None:
    protocols = set(_route_protocols(value))
    used = [f for f in PROTOCOL_FAMILIES if protocols & set(f)]
    if len(used) > 1:
        shown = ", ".join("(" + ", ".join(f"'{p}'" for p in f) + ")" for f in PROTOCOL_FAMILIES)
        return f"protocols: these sets are mutually exclusive: {shown}"
    return None


def _must_set_one_of(value: Mapping[str, Any], names: Sequence[str], when: str) -> str | None:
    if any(nonempty(value.get(n)) for n in names):
        return None
    return f"must set one of {quoted(names)} when 'protocols' is {when}"


def _cannot_set(value: Mapping[str, Any], names: Sequence[str], when: str) -> str | None:
    for name in names:
        if nonempty(value.get(name)):
            return f"cannot set '{name}' when 'protocols' is {when}"
    return None


def _route_by_protocol(value: Mapping[str, Any]) -> str | None:
    """routes_subschemas.lua (traditional_compatible and traditional router flavours)."""
    protocols = _route_protocols(value)
    if set(protocols) & set(HTTP_PROTOCOLS):
        return _cannot_set(value, ("sources", "destinations"), "'http' or 'https'") or (
            _must_set_one_of(value, ("methods", "hosts", "headers", "paths", "snis"), "'https'")
            if "https" in protocols
            else _must_set_one_of(value, ("methods", "hosts", "headers", "paths"), "'http'")
        )
    if set(protocols) & {"grpc", "grpcs"}:
        if value.get("strip_path") is True:
            return "cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'"
        return _cannot_set(value, ("methods", "sources", "destinations"), "'grpc' or 'grpcs'") or (
            _must_set_one_of(value, ("hosts", "headers", "paths", "snis"), "'grpcs'")
            if "grpcs" in protocols
            else _must_set_one_of(value, ("hosts", "headers", "paths"), "'grpc'")
        )
    stream = "'tcp', 'tls', 'tls_passthrough' or 'udp'"
    problem = _cannot_set(value, ("methods", "hosts", "paths", "headers"), stream)
    if problem:
        return problem
    if "tls_passthrough" in protocols:
        if not nonempty(value.get("snis")):
            return "must set snis when 'protocols' is 'tls_passthrough'"
        return None
    return _must_set_one_of(value, ("sources", "destinations", "snis"), "'tcp', 'tls' or 'udp'")


def _route_snis_need_tls(value: Mapping[str, Any]) -> str | None:
    if nonempty(value.get("snis")) and not set(_route_protocols(value)) & set(SNI_PROTOCOLS):
        return (
            "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or "
            "'tls_passthrough'"
        )
    return None


def _route_headers_without_host(value: Mapping[str, Any]) -> str | None:
    for name in value.get("headers") or {}:
        if name.lower() == "host":
            return (
                "headers: cannot contain 'host' header, which must be specified in the "
                "'hosts' attribute"
            )
    return None


def _route_elements(value: Mapping[str, Any]) -> str | None:
    checks = (
        each(("paths",), router_path_problem),
        each(("hosts",), route_host_problem),
        each(("snis",), wildcard_host_problem),
    )
    for check in checks:
        message = check(value)
        if message:
            return message
    for name in ("sources", "destinations"):
        for i, peer in enumerate(value.get(name) or []):
            problem = ip_or_cidr_problem(peer["ip"]) if peer.get("ip") is not None else None
            if problem:
                return f"{name}[{i}].ip: {problem}"
    return None


ROUTE = record(
    (
        _route_protocol_families,
        _route_by_protocol,
        _route_snis_need_tls,
        _route_headers_without_host,
        _route_elements,
    ),
    id=ID,
    created_at=TIMESTAMP,
    updated_at=TIMESTAMP,
    name=UTF8_NAME,
    protocols=Field(
        "set",
        len_min=1,
        elements=Field("string", one_of=PROTOCOLS),
        default=list(HTTP_PROTOCOLS),
    ),
    methods=Field(
        "set",
        elements=Field("string", match=r"[A-Z]+", match_hint="is not an uppercase HTTP method"),
    ),
    hosts=Field("array", elements=HOST),
    paths=Field("array", elements=ROUTE_PATH),
    headers=Field("map", keys=HEADER_NAME, values=strings()),
    https_redirect_status_code=Field("integer", one_of=(426, 301, 302, 307, 308), default=426),
    regex_priority=Field("integer", default=0),
    strip_path=Field("boolean", default=True),  # grpc(s) routes: default false, may not be true
    path_handling=Field("string", one_of=("v0", "v1"), default="v0"),
    preserve_host=Field("boolean", default=False),
    request_buffering=Field("boolean", default=True),
    response_buffering=Field("boolean", default=True),
    snis=strings(set_=True),
    sources=Field("set", elements=IP_PORT),
    destinations=Field("set", elements=IP_PORT),
    tags=TAGS,
    service=FOREIGN,
    # `expression` and `priority` exist only with router_flavor = expressions; eskit's Kong runs
    # the 3.9 default (traditional_compatible), where they are unknown fields.
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


def _upstream_name(value: Mapping[str, Any]) -> str | None:
    name = value.get("name")
    if isinstance(name, str) and _is_ip(name):
        return f"name: Invalid name ('{name}'); no ip addresses allowed"
    return None


def _hash_fallback(value: Mapping[str, Any]) -> str | None:
    """The hash_fallback rules of upstreams.lua."""
    hash_on = value.get("hash_on") or "none"
    fallback = value.get("hash_fallback") or "none"
    if hash_on in ("none", "cookie") and fallback != "none":
        return f"hash_fallback: must be 'none' when hash_on is {hash_on!r}, got {fallback!r}"
    if hash_on in ("consumer", "ip") and fallback == hash_on:
        return f"hash_fallback: must not be {hash_on!r} when hash_on is {hash_on!r}"
    return None


UPSTREAM = record(
    (
        _upstream_name,
        required_if("hash_on", "header", "hash_on_header"),
        required_if("hash_fallback", "header", "hash_fallback_header"),
        required_if("hash_on", "cookie", "hash_on_cookie"),
        required_if("hash_fallback", "cookie", "hash_on_cookie"),
        required_if("hash_on", "query_arg", "hash_on_query_arg"),
        required_if("hash_fallback", "query_arg", "hash_fallback_query_arg"),
        required_if("hash_on", "uri_capture", "hash_on_uri_capture"),
        required_if("hash_fallback", "uri_capture", "hash_fallback_uri_capture"),
        _hash_fallback,
        distinct("hash_on_header", "hash_fallback_header"),
        distinct("hash_on_query_arg", "hash_fallback_query_arg"),
        distinct("hash_on_uri_capture", "hash_fallback_uri_capture"),
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
    hash_on_cookie=COOKIE_NAME,
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
# acl/schema.lua: `allow` and `deny` are arrays (not sets); exactly one of them is non-empty.
# `include_consumer_groups` is Enterprise only: Kong OSS refuses it as an unknown field.
ACL = record(
    (
        only_one_of("allow", "deny", prefix="config."),
        at_least_one_of("allow", "deny", prefix="config."),
    ),
    allow=strings(),
    deny=strings(),
    hide_groups_header=Field("boolean", default=False),
    always_use_authenticated_groups=Field("boolean", default=False),
)
# ip-restriction/schema.lua: arrays of typedefs.ip_or_cidr; both lists may be set.
IP_RESTRICTION = record(
    (
        at_least_one_of("allow", "deny", prefix="config."),
        each(("allow", "deny"), ip_or_cidr_problem),
    ),
    allow=strings(),
    deny=strings(),
    status=Field("number"),
    message=Field("string"),
)
# bot-detection/schema.lua: arrays of regexes (`is_regex`), both optional.
BOT_DETECTION = record(
    (each(("allow", "deny"), regex_problem),),
    allow=strings(default=[]),
    deny=strings(default=[]),
)

HEADER_NAME_RE = r"[A-Za-z0-9_\-]+"  # kong.tools.http.validate_header_name


def _template_problem(entry: str) -> str | None:
    """request-transformer's check_for_value: `name:value`, the value not empty and a
    pl.template whose `$(...)` are closed."""
    match = re.fullmatch(r"([^:]+):*(.*)", entry, flags=re.DOTALL)
    if not match or not match[2]:
        return f"key '{match[1] if match else entry}' has no value"
    if re.search(r"\$\((?![^)]*\))", match[2]):
        return f"value '{match[2]}' is not in supported format: an unclosed $("
    return None


def _transformations(*, request: bool) -> Field:
    """request-transformer/schema.lua and response-transformer/schema.lua."""
    body = "body" if request else "json"
    payload = (body, "querystring") if request else (body,)
    header_names = strings(
        match=HEADER_NAME_RE + r"(?::.*)?", match_hint="is not a valid header name"
    )
    header_pairs = strings(
        match=HEADER_NAME_RE + r":.*",
        match_hint="is not 'name:value' with a valid header name (A-Z a-z 0-9 _ -)",
    )
    header_renames = strings(
        match=HEADER_NAME_RE + r":+" + HEADER_NAME_RE,
        match_hint="is not 'name:value' with two valid header names (A-Z a-z 0-9 _ -)",
    )
    colon_pairs = strings(match=r"[^:]+:.*", match_hint="is not 'name:value'")
    # request-transformer checks body and querystring values with check_for_value;
    # response-transformer's json only needs the colon.
    value_checks = (each(payload, _template_problem),) if request else ()
    json_types = Field("array", elements=Field("string", one_of=("boolean", "number", "string")))
    typed: dict[str, Field] = {} if request else {"json_types": json_types}

    def pairs(headers: Field, **extra: Field) -> Field:
        return record(value_checks, headers=headers, **{p: colon_pairs for p in payload}, **extra)

    remove = record(
        headers=header_names if request else strings(), **{p: strings() for p in payload}
    )
    fields: dict[str, Field] = {
        "remove": remove,
        "rename": pairs(header_renames),
        "replace": pairs(header_pairs, **({"uri": Field("string")} if request else typed)),
        "add": pairs(header_pairs, **typed),
        "append": pairs(header_pairs, **typed),
    }
    if request:
        fields["http_method"] = Field(
            "string", match=r"[A-Z]+", match_hint="is not an uppercase method"
        )
    return record(**fields)


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
