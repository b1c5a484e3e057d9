"""Bounds on what a request may send to `xtl serve`: every request body, not only uploads.

`BodyLimit` wraps the app (ASGI). A body announced larger than its bound (Content-Length) is
refused with 413 before a byte of it is read; a body without a length (chunked) is counted as it
arrives and refused with 413 as soon as it passes the bound, so no more than the bound is ever
held in memory. Uploads (multipart bodies) may be as large as the upload limit plus room for
their headers; any other body (the API's JSON) at most `MAX_OTHER_BODY`.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

MAX_OTHER_BODY = 1024 * 1024  # JSON of an API call: file references and a few options, a few KB
MULTIPART_ROOM = 64 * 1024  # a multipart body's boundaries and part headers around the file

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: 413 for a request body over its bound (see the module's docstring)."""

    def __init__(self, app, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes

    def bound(self, scope: Scope) -> int:
        content_type = _header(scope, b"content-type") or b""
        if content_type.lower().startswith(b"multipart/form-data"):
            return self.max_upload_bytes + MULTIPART_ROOM
        return MAX_OTHER_BODY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.bound(scope)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                await _refuse(send, 400, "Content-Length is not a number")
                return
            if announced > limit:
                await _refuse(send, 413, _too_large(limit))
                return

        received = 0
        refused = False  # the 413 is sent: the app sees a disconnected client and its answer is dropped
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _refuse(send, 413, _too_large(limit))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the app failed on the cut-off body (a disconnected client); the 413 is the answer


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _too_large(limit: int) -> str:
    return f"request body too large: the limit is {limit / 2**20:g} MB"


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = ('{"detail": "%s"}' % detail).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# Requests one client may have waiting or running at once. With `ui.MAX_QUEUE` = 16 places, one
# client holds at most 4: the others always find room, and a flood of slow requests (kernel SHAP,
# occlusion) from one browser or script delays another client by at most the requests already ahead.
MAX_PER_CLIENT = 4


def client_key(request) -> str:
    """Who sent a request: the peer's address (every browser tab and API script from one machine is
    one client). Behind a reverse proxy on the same machine uvicorn reads the address the proxy
    forwards (X-Forwarded-For); a proxy on another machine must be named in the environment variable
    FORWARDED_ALLOW_IPS, or every request counts as the proxy's."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def limit_each_client(queue, max_per_client: int = MAX_PER_CLIENT) -> None:
    """Refuse a queue join (503, like Gradio's "queue is full") from a client that already has
    `max_per_client` requests waiting or running in Gradio's `queue`.

    Gradio bounds its queue as a whole (`max_size`), not per client, and has no hook for it, so this
    wraps `Queue.push` (the join of a request) and counts the client's events in the queue's own
    lists: nothing to keep in step, so a request that was cancelled, failed or finished stops
    counting the moment Gradio drops it.
    """
    push = queue.push

    def held(key: str) -> int:
        waiting = [e for q in queue.event_queue_per_concurrency_id.values() for e in q.queue]
        running = [e for events in getattr(queue, "active_jobs", []) or [] if events for e in events]
        return sum(client_key(e.request) == key for e in waiting + running)

    async def limited_push(body, request, username):
        key = client_key(request)
        if held(key) >= max_per_client:
            return (False, f"this client already has {max_per_client} requests waiting or running; "
                           "send the next one when one of them is answered", "queue_full")
        return await push(body=body, request=request, username=username)

    queue.push = limited_push
