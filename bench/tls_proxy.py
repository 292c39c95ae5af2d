"""A loopback HTTPS proxy for a peer whose GitLab address is fixed: ``python bench/tls_proxy.py
TARGET_PORT CERT KEY``.

tap-gitlab 1.0.1 reads ``https://gitlab.com/api/v4`` whatever its config says. Through
requests' own ``HTTPS_PROXY`` it sends ``CONNECT gitlab.com:443`` here; the proxy answers the
TLS handshake itself with a self-signed certificate for gitlab.com (which the peer trusts
through ``REQUESTS_CA_BUNDLE``) and passes the decrypted bytes on to the simulator's plain HTTP
port on 127.0.0.1. No name is resolved and nothing leaves the machine; the peer's code is
unchanged. Prints ``ready <port>`` once listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  target_port: int, context: ssl.SSLContext) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    if not request.startswith(b"CONNECT "):
        writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
        writer.close()
        return
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    await writer.start_tls(context)
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
    await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def main(target_port: int, cert: str, key: str) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = await asyncio.start_server(
        lambda r, w: _client(r, w, target_port, context), "127.0.0.1", 0)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
