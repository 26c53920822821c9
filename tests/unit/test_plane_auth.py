"""The cluster token and the internal plane's choice (`tandem.common.plane_auth`), and Redis
URL redaction (`tandem.common.redis_url`): exact values and messages."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tandem.common.plane_auth import (
    METADATA_KEY,
    MISSING_MESSAGE,
    TOKEN_ENV,
    WRONG_MESSAGE,
    ClusterToken,
    PlaneAuth,
    aio_channel,
    server_interceptors,
)
from tandem.common.redis_url import redact, with_password

TOKEN = ClusterToken("0123456789abcdef-token")


def test_the_token_is_validated_and_hidden() -> None:
    assert "0123456789abcdef" not in repr(TOKEN) and repr(TOKEN) == "ClusterToken()"
    assert TOKEN.metadata() == ((METADATA_KEY, "0123456789abcdef-token"),)
    assert TOKEN.matches("0123456789abcdef-token") and TOKEN.matches(b"0123456789abcdef-token")
    assert not TOKEN.matches("0123456789abcdef-tokeN") and not TOKEN.matches("")
    generated = ClusterToken.generate()
    assert len(generated.secret) == 43 and generated != ClusterToken.generate()
    for bad, message in (
        ("", "the cluster token is empty"),
        ("short", "the cluster token must be at least 16 characters long"),
        ("has a space in it 0123", "the cluster token must be printable ASCII without spaces"),
        ("naïve-token-0123456789", "the cluster token must be printable ASCII without spaces"),
    ):
        with pytest.raises(ValueError) as info:
            ClusterToken(bad)
        assert str(info.value) == message


def test_the_proof_is_an_hmac_of_the_parts() -> None:
    proof = TOKEN.proof("ctx", "pair", "nonce")
    assert proof == TOKEN.proof("ctx", "pair", "nonce") and len(proof) == 64
    assert proof != TOKEN.proof("ctx", "pair", "other") != ClusterToken("another-token-0123456").proof("ctx")
    assert TOKEN.proof("a", "bc") != TOKEN.proof("ab", "c")  # parts are separated


def test_resolve_reads_the_file_then_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  file-token-0123456789\n")
    env = {TOKEN_ENV: " env-token-0123456789 "}
    assert PlaneAuth(path).resolve(env).token == ClusterToken("file-token-0123456789")
    assert PlaneAuth().resolve(env).token == ClusterToken("env-token-0123456789")
    assert PlaneAuth().resolve({TOKEN_ENV: "  "}) == PlaneAuth()
    assert PlaneAuth(insecure_no_auth=True).resolve(env) == PlaneAuth(insecure_no_auth=True)
    with pytest.raises(ValueError) as info:
        PlaneAuth().resolve({TOKEN_ENV: "short"})
    assert str(info.value) == f"{TOKEN_ENV}: the cluster token must be at least 16 characters long"
    path.write_text("\n")
    with pytest.raises(ValueError) as info:
        PlaneAuth(path).resolve({})
    assert str(info.value) == f"{path}: the cluster token is empty"
    with pytest.raises(ValueError, match="cannot read the cluster token file"):
        PlaneAuth(tmp_path / "missing").resolve({})


def test_the_plane_is_locked_unless_said_otherwise() -> None:
    with pytest.raises(ValueError) as info:
        PlaneAuth().require("a worker")
    assert str(info.value) == (
        "a worker needs the internal plane's cluster token: set TANDEM_CLUSTER_TOKEN or --cluster-token-file "
        "(`tandem up` generates one), or pass --insecure-no-auth to run without authentication on a trusted network"
    )
    PlaneAuth(token=TOKEN).require("a worker")
    PlaneAuth(insecure_no_auth=True).require("a worker")
    with pytest.raises(ValueError) as info:
        PlaneAuth(insecure_no_auth=True, token=TOKEN)
    assert str(info.value) == (
        "--insecure-no-auth contradicts the cluster token given (--cluster-token-file or TANDEM_CLUSTER_TOKEN)"
    )
    assert server_interceptors(PlaneAuth(insecure_no_auth=True)) == []
    assert "0123456789abcdef" not in repr(PlaneAuth(token=TOKEN))


def test_the_server_check_on_a_real_grpc_aio_server() -> None:
    """A generic unary and a unary-stream method behind the check: the token passes, none or
    another is UNAUTHENTICATED before the handler runs, an unknown method too."""
    calls: list[str] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls.append("echo")
        return request

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        calls.append("stream")
        yield request

    async def main() -> None:
        server = grpc.aio.server(interceptors=server_interceptors(PlaneAuth(token=TOKEN)))
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.S", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            async with aio_channel(address, TOKEN) as channel:
                assert await channel.unary_unary("/t.S/Echo")(b"hi", metadata=(("k", "v"),)) == b"hi"
                assert [m async for m in channel.unary_stream("/t.S/Stream")(b"x")] == [b"x"]
            for token, message in ((None, MISSING_MESSAGE), (ClusterToken("another-token-0123456"), WRONG_MESSAGE)):
                async with aio_channel(address, token) as channel:
                    for call in (channel.unary_unary("/t.S/Echo")(b"hi"), channel.unary_unary("/t.S/Nope")(b"")):
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await call
                        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, message)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        [m async for m in channel.unary_stream("/t.S/Stream")(b"x")]
                    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert calls == ["echo", "stream"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:p%40ss@h:1/0?ssl_cert_reqs=none", "rediss://user:***@h:1/0?ssl_cert_reqs=none"),
        ("redis://h:1/0?password=abc&db=2", "redis://h:1/0?password=***&db=2"),
        ("unix:///tmp/r.sock?password=x", "unix:///tmp/r.sock?password=***"),
        ("redis://[::1:6379", "***"),
    ],
)
def test_redis_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_with_password() -> None:
    assert with_password("redis://127.0.0.1:5/0", "pw") == "redis://:pw@127.0.0.1:5/0"
    with pytest.raises(ValueError, match="already has userinfo"):
        with_password("redis://:a@h:1/0", "pw")
