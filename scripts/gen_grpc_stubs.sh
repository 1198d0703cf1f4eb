#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of the Open Inference Protocol from
# service/frontends/oip/codec/proto/grpc_predict_v2.proto. The generated files are committed:
# nothing is generated at run time. Needs grpcio-tools (a dev dependency); the
# stubs then need protobuf and grpcio at run time, at least the versions that
# generated them (the modules check this on import).
#
#   scripts/gen_grpc_stubs.sh            # uses .venv/bin/python, else python3
#   PYTHON=/path/to/python scripts/gen_grpc_stubs.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
OUT=service/frontends/oip/codec
PROTO_DIR=$OUT/proto

"$PYTHON" -m grpc_tools.protoc -I "$PROTO_DIR" \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    "$PROTO_DIR/grpc_predict_v2.proto"

# protoc writes a top-level import; make it relative so the stubs import from the package.
sed -i 's/^import grpc_predict_v2_pb2 as /from . import grpc_predict_v2_pb2 as /' \
    "$OUT/grpc_predict_v2_pb2_grpc.py"

# Register the messages in a private descriptor pool, not protobuf's default one.
# tritonclient.grpc (and Triton's own stubs) define the same `inference.*` messages
# from another file; two such files in the default pool make the second import fail
# with "duplicate symbol". The wire format and the gRPC method paths
# (/inference.GRPCInferenceService/...) do not depend on the pool.
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
    "$OUT/grpc_predict_v2_pb2.py"

# Generated code keeps its own style: exempt it from ruff.
for f in "$OUT/grpc_predict_v2_pb2.py" "$OUT/grpc_predict_v2_pb2.pyi" \
         "$OUT/grpc_predict_v2_pb2_grpc.py"; do
    grep -q '^# ruff: noqa' "$f" || sed -i '1i # ruff: noqa' "$f"
done

# Fail loudly if an edit above stopped matching a newer protoc's output.
grep -q '^from \. import grpc_predict_v2_pb2 as ' "$OUT/grpc_predict_v2_pb2_grpc.py"
grep -q '_descriptor_pool\.DescriptorPool()\.AddSerializedFile' "$OUT/grpc_predict_v2_pb2.py"
echo "regenerated $OUT/grpc_predict_v2_pb2{.py,.pyi,_grpc.py}"
