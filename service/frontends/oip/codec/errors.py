"""The one error the protocol layer raises for a bad request.

Every way a client can get a request wrong (malformed JSON, a tensor whose bytes do
not match its shape, an input the model does not have, too many images...) ends in
``ProtocolError`` with a sentence for a person, so the front ends need exactly one
mapping: HTTP 400 ``{"error": message}`` (what tritonclient reads) and gRPC
``INVALID_ARGUMENT`` with the message as details.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A request that breaks the inference protocol or the model's signature."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
