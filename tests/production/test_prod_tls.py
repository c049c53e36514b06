"""The HTTP transport's TLS settings against a local TLS server that requires client certificates
(mutual TLS, as the GPU hosts' nginx does): GPU_BRIDGE_GPU_CA_FILE, GPU_BRIDGE_CLIENT_CERT_FILE,
GPU_BRIDGE_CLIENT_KEY_FILE, and how TLS failures are reported."""

from __future__ import annotations

import datetime
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flask import Flask, jsonify, request
from prod_helpers import StandIn
from werkzeug.serving import make_server

from gpu_bridge.client.http import HttpTransport
from gpu_bridge.config import ClientSettings, GpuHost
from gpu_bridge.errors import ConfigError, GpuHostError, GpuHostUnauthorized, GpuHostUnreachable

TOKEN = "tls-test-token"


# --- a throwaway PKI --------------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, *objs) -> str:
    data = b""
    for obj in objs:
        if isinstance(obj, x509.Certificate):
            data += obj.public_bytes(serialization.Encoding.PEM)
        else:
            data += obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    path.write_bytes(data)
    return str(path)


def _ca(name: str):
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca, name: str, usage, sans=()):
    ca_key, ca_cert = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = _ca("server CA"), _ca("client CA"), _ca("rogue CA")
    skey, scert = _leaf(server_ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("localhost")])
    ckey, ccert = _leaf(client_ca, "prod-01", ExtendedKeyUsageOID.CLIENT_AUTH)
    rkey, rcert = _leaf(rogue_ca, "intruder", ExtendedKeyUsageOID.CLIENT_AUTH)
    return {
        "server_ca": _write(d / "server-ca.pem", server_ca[1]),
        "client_ca": _write(d / "client-ca.pem", client_ca[1]),
        "server_cert": _write(d / "server.pem", scert),
        "server_key": _write(d / "server.key", skey),
        "client_cert": _write(d / "client.pem", ccert),
        "client_key": _write(d / "client.key", ckey),
        "client_both": _write(d / "client-both.pem", ccert, ckey),
        "rogue_cert": _write(d / "rogue.pem", rcert),
        "rogue_key": _write(d / "rogue.key", rkey),
        "dir": d,
    }


class _TlsServer:
    """A Flask GPU-server stand-in behind TLS that requires a client certificate from client CA."""

    def __init__(self, pki):
        app = Flask("tls-standin")
        self.peers: list[str | None] = []

        @app.before_request
        def record():
            cert = request.environ.get("peercert")
            self.peers.append(cert)

        @app.get("/api/health")
        def health():
            return jsonify(status="ok", ollama={"reachable": True})

        @app.get("/api/models")
        def models():
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return jsonify(error="missing or invalid token", code="unauthorized"), 401
            return jsonify(models=[{"name": "llama3.2:latest", "size": 1, "digest": "aa",
                                    "modified_at": "2025-05-05T00:37:44Z", "details": {}}])

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["client_ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
        self.server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ctx)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tls_server(pki):
    server = _TlsServer(pki)
    yield server
    server.stop()


def _transport(server, env: dict, name: str = "localhost", scheme: str = "https") -> HttpTransport:
    env = {"GPU_INSTANCE_HOSTS": f"{name}:{server.port}", "GPU_BRIDGE_GPU_SCHEME": scheme,
           "GPU_BRIDGE_API_TOKEN": TOKEN, "GPU_BRIDGE_RETRIES": "0", "GPU_BRIDGE_CONNECT_TIMEOUT": "2",
           "GPU_BRIDGE_READ_TIMEOUT": "5", **env}
    settings = ClientSettings.from_env(env)
    return HttpTransport(settings.hosts[0], settings)


# --- settings -----------------------------------------------------------------------------------
def test_settings_default_to_no_tls_files():
    s = ClientSettings.from_env({})
    assert (s.ca_file, s.client_cert_file, s.client_key_file) == (None, None, None)


def test_settings_read_the_three_files(pki):
    s = ClientSettings.from_env({"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"],
                                 "GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                 "GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]})
    assert (s.ca_file, s.client_cert_file, s.client_key_file) == (pki["server_ca"], pki["client_cert"],
                                                                   pki["client_key"])


def test_client_key_from_the_credentials_directory(pki, tmp_path):
    (tmp_path / "client-key").write_bytes(Path(pki["client_key"]).read_bytes())
    s = ClientSettings.from_env({"GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                 "CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert s.client_key_file == str(tmp_path / "client-key")


@pytest.mark.parametrize("var", ["GPU_BRIDGE_GPU_CA_FILE", "GPU_BRIDGE_CLIENT_CERT_FILE", "GPU_BRIDGE_CLIENT_KEY_FILE"])
def test_unreadable_file_names_the_variable(var, pki, tmp_path):
    env = {"GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"], var: str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match=var):
        ClientSettings.from_env(env)


def test_key_without_certificate_is_refused(pki):
    with pytest.raises(ConfigError, match="GPU_BRIDGE_CLIENT_CERT_FILE"):
        ClientSettings.from_env({"GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]})


# --- against the TLS server -----------------------------------------------------------------------
def test_mutual_tls_works(tls_server, pki):
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"],
                                "GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                "GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]})
    assert t.session.verify == pki["server_ca"]
    assert [m["name"] for m in t.list_models()] == ["llama3.2:latest"]
    assert t.health()["status"] == "ok"
    t.close()


def test_certificate_and_key_in_one_file(tls_server, pki):
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"],
                                "GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_both"]})
    assert t.list_models()
    t.close()


def test_no_client_certificate_is_refused(tls_server, pki):
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"]})
    with pytest.raises(GpuHostUnauthorized, match="refused this client's TLS certificate.*GPU_BRIDGE_CLIENT_CERT_FILE"):
        t.list_models()
    t.close()


def test_client_certificate_from_another_ca_is_refused(tls_server, pki):
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"],
                                "GPU_BRIDGE_CLIENT_CERT_FILE": pki["rogue_cert"],
                                "GPU_BRIDGE_CLIENT_KEY_FILE": pki["rogue_key"]})
    with pytest.raises(GpuHostError) as info:
        t.list_models()
    assert "TLS" in info.value.message or "certificate" in info.value.message, info.value.message
    t.close()


def test_server_certificate_not_signed_by_our_ca(tls_server, pki):
    """Without GPU_BRIDGE_GPU_CA_FILE the system's bundle cannot verify a private CA's certificate."""
    t = _transport(tls_server, {"GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                "GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]})
    with pytest.raises(GpuHostUnreachable, match="cannot verify localhost:.*GPU_BRIDGE_GPU_CA_FILE"):
        t.list_models()
    t.close()


def test_wrong_ca_bundle(tls_server, pki):
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["client_ca"],
                                "GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                "GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]})
    with pytest.raises(GpuHostUnreachable, match="cannot verify .* against the CA bundle"):
        t.list_models()
    t.close()


def test_host_name_not_in_the_certificate(tls_server, pki):
    """The certificate names localhost only; 127.0.0.1 reaches the same server by another name."""
    t = _transport(tls_server, {"GPU_BRIDGE_GPU_CA_FILE": pki["server_ca"],
                                "GPU_BRIDGE_CLIENT_CERT_FILE": pki["client_cert"],
                                "GPU_BRIDGE_CLIENT_KEY_FILE": pki["client_key"]}, name="127.0.0.1")
    try:
        with pytest.raises(GpuHostUnreachable, match="cannot verify"):
            t.list_models()
    finally:
        t.close()


# --- the TLS proxy's JSON refusals (nginx on the GPU hosts) ---------------------------------------
@pytest.fixture(scope="module")
def proxy_standin():
    app = Flask("nginx-standin")

    @app.get("/api/<path:rest>")
    def refuse(rest):
        code = request.args.get("code", "client_certificate_required")
        status = 400 if code == "tls_required" else 403
        return jsonify(error="refused by the TLS proxy", code=code), status

    server = StandIn(app)
    yield server
    server.stop()


@pytest.mark.parametrize("code", ["client_certificate_required", "client_certificate_invalid"])
def test_proxy_refusal_is_unauthorized_not_a_sick_host(proxy_standin, code):
    t = HttpTransport(GpuHost("127.0.0.1", proxy_standin.port), ClientSettings(retries=0))
    with pytest.raises(GpuHostUnauthorized, match="requires mutual TLS.*GPU_BRIDGE_CLIENT_CERT_FILE"):
        t._request("GET", f"/api/models?code={code}")
    t.close()


def test_plain_http_to_the_tls_port_names_the_scheme_setting(proxy_standin):
    t = HttpTransport(GpuHost("127.0.0.1", proxy_standin.port), ClientSettings(retries=0))
    with pytest.raises(GpuHostError, match="GPU_BRIDGE_GPU_SCHEME=https"):
        t._request("GET", "/api/models?code=tls_required")
    t.close()
