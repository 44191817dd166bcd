"""The gateway: Kong's declarative `compose/kong.yml`, its credentials, and a local stand-in.

`compose/kong.yml` is the single source of gateway truth. Two things are derived from it:

- the same file with the jwt consumer's credentials filled in, one per auth_svc signing key
  (Kong OSS has no JWKS support: it finds the credential by the token's `kid`), for Kong;
- an HAProxy configuration that behaves like Kong with that file for a client (same routes,
  same status codes and bodies for missing, bad and expired tokens, rate limits, body limits
  and request ids), for `esctl up` on a machine without Kong.

Only the plugins and fields Kong would accept are rendered, and only those this package can
reproduce; anything else is an error, so the two never drift apart silently.

- `settings`: `GatewaySettings`, from `GATEWAY_*` variables;
- `kong`: kong.yml read and written, its jwt credentials from auth_svc's published keys, and
  the same credentials as Kong Ingress Controller objects;
- `model`: kong.yml as routes, services and upstreams, each route with its effective plugins;
- `kong_schema`: kong.yml checked as Kong 3.9 checks it (`validate`), with the tables of
  `kong39` (Kong's own schema files) written in the vocabulary of `schema_rules`;
- `plugins`: each Kong plugin translated into HAProxy rules that answer as Kong would;
- `haproxy`: the HAProxy configuration file (listeners, route matching, backends);
- `runner`: the local gateway as a process (`python -m gateway`, `esctl gateway run`).
"""
