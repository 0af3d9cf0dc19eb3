"""A service in Python: serves HTTPS with its X509-SVID (from py-spiffe), requires a
client certificate signed by the trust bundle, and accepts a request only when

- the caller's SPIFFE ID (the URI SAN of its client certificate) is one it allows, and
- the `Txn-Token` header holds a Txn-Token signed by the token service's keys (PyJWT's
  `PyJWKClient` on the service's JWKS, fetched over HTTPS verified with the bundle),
  typed `txntoken+jwt`, for this trust domain (`aud`), from the expected issuer, not
  expired, whose `req_wl` is that same caller.

Standard library plus py-spiffe (PyPI `spiffe`) and PyJWT (which py-spiffe brings).

    SPIFFE_ENDPOINT_SOCKET=unix:///tmp/writ-dev/agent.sock python3 service.py \
        --listen 127.0.0.1:9443 --spiffe-id spiffe://example.org/orders \
        --issuer https://127.0.0.1:8443 --jwks-url https://localhost:8443/.well-known/jwks.json \
        --allow-caller spiffe://example.org/gateway

Prints `listening on HOST:PORT` once ready. Answers 200 with the accepted claims as JSON,
403 with `{"error": ...}` otherwise.
"""

import argparse
import http.server
import json
import os
import ssl
import tempfile

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from spiffe import WorkloadApiClient

TXN_TOKEN_TYP = "txntoken+jwt"
MAX_TOKEN_BYTES = 16 * 1024


def fetch_identity(spiffe_id, workdir):
    """This process's X509-SVID (the one named `spiffe_id`, else the default) and its
    trust domain's bundle, written as PEM files (the key 0600) for `ssl`."""
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    with WorkloadApiClient(socket_path=endpoint) as client:
        context = client.fetch_x509_context()
    svid = context.default_svid
    if spiffe_id:
        svid = next((s for s in context.x509_svids if str(s.spiffe_id) == spiffe_id), None)
        if svid is None:
            raise SystemExit(f"the Workload API gave this process no SVID for {spiffe_id}")
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    cert = os.path.join(workdir, "svid.pem")
    key = os.path.join(workdir, "svid.key")
    ca = os.path.join(workdir, "bundle.pem")
    with open(cert, "wb") as f:
        f.write(b"".join(c.public_bytes(Encoding.PEM) for c in svid.cert_chain))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(svid.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with open(ca, "wb") as f:
        f.write(b"".join(c.public_bytes(Encoding.PEM) for c in bundle.x509_authorities))
    return str(svid.spiffe_id), cert, key, ca


def spiffe_ids(der):
    """The URI SANs of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def make_handler(jwks, issuer, audience, allowed):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            # The handshake already verified the chain against the bundle (CERT_REQUIRED).
            ids = spiffe_ids(self.connection.getpeercert(binary_form=True))
            if len(ids) != 1 or ids[0] not in allowed:
                return self.answer(403, {"error": f"caller {ids} is not allowed"})
            caller = ids[0]
            token = self.headers.get("Txn-Token", "")
            if not token or len(token) > MAX_TOKEN_BYTES:
                return self.answer(403, {"error": "no Txn-Token"})
            try:
                if jwt.get_unverified_header(token).get("typ") != TXN_TOKEN_TYP:
                    raise jwt.InvalidTokenError(f"typ is not {TXN_TOKEN_TYP}")
                key = jwks.get_signing_key_from_jwt(token)
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=["ES256"],
                    audience=audience,
                    issuer=issuer,
                    options={"require": ["exp", "iat", "iss", "aud", "sub", "txn"]},
                )
            except jwt.PyJWTError as e:
                return self.answer(403, {"error": f"Txn-Token: {e}"})
            if claims.get("req_wl") != caller:
                return self.answer(
                    403, {"error": f"Txn-Token was issued to {claims.get('req_wl')}, not {caller}"}
                )
            self.answer(
                200,
                {
                    "caller": caller,
                    "sub": claims["sub"],
                    "req_wl": claims["req_wl"],
                    "scope": claims.get("scope"),
                    "txn": claims["txn"],
                },
            )

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            pass  # never log request lines that might carry tokens

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:9443")
    p.add_argument("--spiffe-id", help="which of this process's SVIDs to serve with")
    p.add_argument("--issuer", required=True, help="the token service's issuer URL (`iss`)")
    p.add_argument("--jwks-url", required=True, help="the token service's JWKS")
    p.add_argument("--allow-caller", action="append", required=True, help="a SPIFFE ID")
    args = p.parse_args()

    workdir = tempfile.mkdtemp()
    me, cert, key, ca = fetch_identity(args.spiffe_id, workdir)
    audience = me.split("/")[2]  # Writ's Txn-Tokens name the trust domain

    # The JWKS: fetched over HTTPS with the bundle as CA and host names checked.
    jwks_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    jwks = jwt.PyJWKClient(args.jwks_url, ssl_context=jwks_tls, timeout=10)

    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server_tls.load_verify_locations(cafile=ca)
    server_tls.verify_mode = ssl.CERT_REQUIRED  # a client certificate, signed by the bundle

    host, port = args.listen.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), make_handler(jwks, args.issuer, audience, set(args.allow_caller)))
    server.socket = server_tls.wrap_socket(server.socket, server_side=True)
    bound = server.socket.getsockname()
    print(f"listening on {bound[0]}:{bound[1]} as {me}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
