"""TLS end to end: the relay API over HTTPS and the embedded nats-server over TLS, with a test-made CA."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from agent_client import AgentStorage, Migration
from tests.support.htpc import HtpcProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class HttpsHtpc(HtpcProcess):
    """HtpcProcess whose health checks go over HTTPS with the test CA."""

    def __init__(self, *args: object, cert: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.url = f"https://127.0.0.1:{self.port}"
        self.cert = cert

    def wait_healthy(self, timeout: float = 40.0) -> dict[str, object]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                resp = httpx.get(f"{self.url}/health", verify=ssl.create_default_context(cafile=self.cert), timeout=2)
                if resp.status_code == 200 and resp.json().get("status") == "ok":
                    return dict(resp.json())
            except httpx.HTTPError:
                pass
            assert self.running, self.log_tail()
            time.sleep(0.1)
        raise AssertionError(f"HTTPS HTPC not healthy:\n{self.log_tail()}")


async def test_https_api_and_tls_nats(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    htpc = HttpsHtpc(
        tmp_path / "htpc",
        None,
        cert=cert,
        extra_args=[
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--nats-tls-cert",
            str(cert),
            "--nats-tls-key",
            str(key),
            "--nats-tls-ca",
            str(cert),
        ],
    )
    htpc.start()
    try:
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served, and unverified TLS is refused
            httpx.get(f"{htpc.url}/health", timeout=2)
        info = httpx.get(f"{htpc.url}/relay/info", verify=ssl.create_default_context(cafile=cert), timeout=5).json()
        assert info["nats_url"].startswith("tls://")
        ctx = ssl.create_default_context(cafile=str(cert))
        async with AgentStorage(
            "tls-agent", tmp_path / "agent", htpc_url=htpc.url, htpc_verify=str(cert), nats_options={"tls": ctx}
        ) as st:
            await st.migrate([Migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")])
            await st.set_visibility("t", "always")
            await st.write_data("t", {"v": "over tls"})
            await st.flush(timeout=15)
            result = await st.query_network("SELECT v FROM t")
            assert result["rows"] == [["over tls"]]
            assert (await st.health_check())["nats"]["connected"]
    finally:
        htpc.close()
