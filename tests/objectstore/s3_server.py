"""A real S3 API server on 127.0.0.1 for the tests: moto's server app behind werkzeug.

``python -m tests.objectstore.s3_server [PORT]`` prints the port it listens on, then serves
until killed. State lives in the process: a new server starts with no bucket.

moto's own threaded server checks a conditional write's precondition and stores the
object in two steps without a lock, so two concurrent ``If-Match`` PUTs could both pass;
S3 itself applies them atomically. Requests are therefore handled one at a time (threads
still accept connections, so keep-alive clients never block each other).
"""

from __future__ import annotations

import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    moto_app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def app(environ, start_response):
        with one_at_a_time:
            return moto_app(environ, start_response)

    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
