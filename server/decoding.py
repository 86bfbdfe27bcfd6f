"""Requests that are not protobuf at all: INVALID_ARGUMENT with reason MALFORMED_REQUEST, not INTERNAL.

gRPC parses a request before any servicer code runs and answers a parser's
exception with INTERNAL ("Exception deserializing request!"), its traceback in
the daemon's log: a fuzzing or broken client could fill the log and read a
status that says the aggregator is at fault. ``add_service`` registers a
service's methods like the generated ``add_*Servicer_to_server`` does, but with
a parser that cannot raise: bytes that do not parse become an ``Undecodable``,
refused with the status every other bad input gets (a stream's when the
servicer reaches that message, inside its own error mapping).

A method may bring its own parser or serializer (``add_service``'s
``requests`` and ``replies``): PushDelta's chunks are parsed by
``common.serde.chunk_from_wire``, their data a view of the received bytes
rather than a copy, and FetchDiff's chunks arrive here already serialized by
``chunk_to_wire``. Such a parser raises InvalidArgument with reason
MALFORMED_REQUEST on bytes that are not the message (an ``Undecodable``), and
any other GdfedError on a message that is well-formed but refused (a header
field out of its range): that one is answered as it is (a ``Refused``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from common.errors import GdfedError, InvalidArgument
from server.error_status import error_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What arrived in place of a request message: bytes that are not that message."""

    message_type: str
    error: str

    def refusal(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.message_type}: {self.error}",
            field="request",
            reason="MALFORMED_REQUEST",
        )


@dataclass(frozen=True, slots=True)
class Refused:
    """What arrived in place of a request message: the message, but with a field the parser refused."""

    error: GdfedError

    def refusal(self) -> GdfedError:
        return self.error


Parser = Callable[[bytes], Any]
Serializer = Callable[[Any], bytes]


def serialized(reply: bytes) -> bytes:
    """The serializer of a reply the servicer serialized itself (FetchDiff's ``chunk_to_wire``)."""
    return reply


def _own_parser(name: str, parse: Parser) -> Parser:
    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except GdfedError as exc:
            if exc.reason != "MALFORMED_REQUEST":
                return Refused(exc)
            # The parser's message names the type too; the refusal says it once.
            error = exc.message.removeprefix(f"the request is not a {name}: ")
            logger.info("[decode] refused %d bytes that are not a %s: %s", len(raw), name, error)
            return Undecodable(name, error)

    return parsed


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(raw)
        except (DecodeError, RuntimeError, ValueError) as exc:  # upb raises DecodeError; others vary
            logger.info("[decode] refused %d bytes that are not a %s: %s", len(raw), name, exc)
            return Undecodable(name, str(exc) or type(exc).__name__)

    return parse


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Undecodable | Refused):
            raise request.refusal()  # inside the servicer's error mapping: a status, not INTERNAL
        yield request


def _handler(
    method: MethodDescriptor,
    behaviour: Callable[..., Any],
    own_parser: Parser | None = None,
    own_serializer: Serializer | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    parse = (
        _parser(message_factory.GetMessageClass(method.input_type))
        if own_parser is None
        else _own_parser(method.input_type.full_name, own_parser)
    )
    serialize = own_serializer or message_factory.GetMessageClass(method.output_type).SerializeToString

    if method.client_streaming:

        def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(_checked(requests), context)

        if method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(
                streamed, request_deserializer=parse, response_serializer=serialize
            )
        return grpc.stream_unary_rpc_method_handler(
            streamed, request_deserializer=parse, response_serializer=serialize
        )

    if method.server_streaming:

        def replies(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            if isinstance(request, Undecodable | Refused):
                context.abort_with_status(error_status(request.refusal()))
            yield from behaviour(request, context)

        return grpc.unary_stream_rpc_method_handler(
            replies, request_deserializer=parse, response_serializer=serialize
        )

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable | Refused):
            context.abort_with_status(error_status(request.refusal()))
        return behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=parse, response_serializer=serialize
    )


def add_service(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: object,
    *,
    requests: Mapping[str, Parser] | None = None,
    replies: Mapping[str, Serializer] | None = None,
) -> None:
    """Serve ``servicer``'s methods of ``service`` on ``server``, requests parsed by ``_parser``.

    ``requests`` and ``replies`` (method name -> function) replace a method's protobuf parser
    (it raises InvalidArgument on bytes it refuses) or its reply serializer.
    """
    requests, replies = requests or {}, replies or {}
    handlers = {
        m.name: _handler(m, getattr(servicer, m.name), requests.get(m.name), replies.get(m.name))
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
