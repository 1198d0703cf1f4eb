"""The Open Inference Protocol v2 (KServe / Triton): ``codec`` turns wire data into a
neutral request and back (pure functions), ``v2`` serves it over HTTP, ``grpc`` over gRPC,
``common`` holds what the two share (which model a name means, metadata, size limits)."""
