"""The admin bearer token is compared whole: nothing but the exact token passes.

Over HTTP against the shared server (its token is ``ADMIN_TOKEN``). The probe is a
promote of a version that does not exist: with the right token it reaches the route
and answers 404, so no test here changes what the server serves.
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

PROBE = "/models/tiny/promote"

NOT_THE_TOKEN = {
    "first-character": ADMIN_TOKEN[:1],
    "all-but-the-last-character": ADMIN_TOKEN[:-1],
    "half": ADMIN_TOKEN[: len(ADMIN_TOKEN) // 2],
    "token-with-trailing-junk": ADMIN_TOKEN + "x",
    "token-then-a-word": ADMIN_TOKEN + " extra",
    "token-twice": ADMIN_TOKEN * 2,
    "a-longer-string": "a" * (len(ADMIN_TOKEN) + 8),
    "same-length-other-token": "x" * len(ADMIN_TOKEN),
    "last-character-changed": ADMIN_TOKEN[:-1] + chr(ord(ADMIN_TOKEN[-1]) + 1),
    "suffix": ADMIN_TOKEN[1:],
}


def promote(url: str, authorization: str | None) -> httpx.Response:
    headers = {} if authorization is None else {"authorization": authorization}
    return httpx.post(f"{url}{PROBE}", json={"version": "99"}, headers=headers, timeout=30)


def test_the_exact_token_passes(server):
    r = promote(server.url, f"Bearer {ADMIN_TOKEN}")
    assert r.status_code == 404, r.text  # past the token check, refused by the route
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("sent", NOT_THE_TOKEN.values(), ids=NOT_THE_TOKEN.keys())
def test_anything_but_the_exact_token_is_403(server, sent):
    r = promote(server.url, f"Bearer {sent}")
    assert r.status_code == 403, r.text
    assert r.json()["error"] == {
        "code": "forbidden",
        "message": "the admin token is not valid",
        "status": 403,
    }


def raw_promote(url: str, authorization: str) -> tuple[int, dict]:
    """The probe sent byte for byte: httpx refuses to send a header value that ends in
    spaces, and some clients do send ``Bearer `` when their token variable is empty."""
    host, port = url.removeprefix("http://").split(":")
    body = b'{"version": "99"}'
    head = (
        f"POST {PROBE} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.mark.parametrize(
    "value", ["Bearer", "Bearer ", "Bearer \t  "], ids=["bare", "space", "spaces"]
)
def test_an_empty_bearer_token_is_refused(server, value):
    """HTTP drops a header value's trailing whitespace, so the server sees ``Bearer``
    alone: a scheme without credentials, refused as a missing token is."""
    status, body = raw_promote(server.url, value)
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
