"""Which certificates may call which services, on a server running mutual TLS.

The TLS handshake has already refused clients without a certificate from the cluster CA; this
interceptor checks the role of the one presented (afsd/trust/identity.py) against the service called.
On a port that takes bearer tokens instead (afsd/trust/tokens.py), a valid token stands for a user.
Cluster-internal services (discovery, layerstore: they spend registry credentials, cache space and
bandwidth, and serve every image's bytes) take node certificates only; the user-facing services of
afslet and proxy take node certificates (the proxy relaying) and user certificates. A service not
listed here is refused. Finer rules that depend on the request (a heartbeat may speak only for the
node its certificate names) live in the service itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc

from afsd.rpc import refuse
from afsd.trust.identity import NODE_ROLE, USER_ROLE, PeerIdentity, identity_of
from afsd.trust.tokens import BearerTokens

NODES = frozenset({NODE_ROLE})
NODES_AND_USERS = frozenset({NODE_ROLE, USER_ROLE})

ACCESS: Mapping[str, frozenset[str]] = {
    "discovery.v1.ServiceDiscovery": NODES,
    "layerstore.v1.LayerStore": NODES,
    "afsletpb.Afslet": NODES_AND_USERS,
    "afsd.executions.v1.Executions": NODES_AND_USERS,
    "afsproxy.v1.AfsProxy": NODES_AND_USERS,
}


async def require_identity(context: grpc.aio.ServicerContext, allowed: frozenset[str], method: str,
                           tokens: BearerTokens | None = None) -> PeerIdentity:
    """The caller's identity (its certificate's, or with `tokens` its bearer token's, a user) if it has
    one of the `allowed` roles; else the call is aborted."""
    if tokens is not None:
        name = tokens.holder(context.invocation_metadata() or ())
        if name is None:
            await refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"{method} needs `authorization: Bearer TOKEN` with a token this server knows")
        identity = PeerIdentity(name, frozenset({USER_ROLE}), frozenset())
    else:
        identity = identity_of(context)
    if identity is None:
        await refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                     f"{method} needs a client certificate from the cluster CA")
    if not identity.roles & allowed:
        await refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                     f"{method} needs a certificate with role {' or '.join(sorted(allowed))}; "
                     f"{identity} has none")
    return identity


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, rules: Mapping[str, frozenset[str]] = ACCESS, tokens: BearerTokens | None = None) -> None:
        self.rules = rules
        self.tokens = tokens

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        allowed = self.rules.get(method.split("/")[1] if method.count("/") == 2 else "", frozenset())
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await require_identity(context, allowed, method, self.tokens)
                return await inner_unary(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, **kwargs)

        def checked_stream(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await require_identity(context, allowed, method, self.tokens)
                async for response in inner(request, context):
                    yield response
            return streaming
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(checked_stream(handler.unary_stream), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(checked_stream(handler.stream_stream), **kwargs)
        return None  # stream-unary: no afsd service has one; refuse rather than serve it unchecked
