"""A gateway in Python: gets its X509-SVID from the SPIFFE Workload API (py-spiffe),
exchanges a user's token for a Txn-Token at Writ's token service (RFC 8693, over mTLS),
and calls a service with it.

Every TLS connection is verified as any HTTPS client verifies a server: the trust
bundle is the CA, the host name is checked against the certificate's SANs, and then the
certificate's URI SAN must be the SPIFFE ID the gateway expects at that address.

Standard library plus py-spiffe (PyPI `spiffe`, which brings `cryptography`).

    SPIFFE_ENDPOINT_SOCKET=unix:///tmp/writ-dev/agent.sock python3 gateway.py \
        --tts-url https://localhost:8443 --tts-id spiffe://example.org/writ/tts \
        --service-url https://localhost:9443 --service-id spiffe://example.org/orders \
        --subject-token-file user.jwt --scope orders.read

Prints the service's JSON answer on stdout; exits 1 with the reason on stderr otherwise.
"""

import argparse
import http.client
import json
import os
import ssl
import sys
import tempfile
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from spiffe import WorkloadApiClient

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TXN_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"


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


def client_context(cert, key, ca):
    """TLS client: the bundle as the only CA, host names checked, our SVID presented."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert, key)
    return ctx


def spiffe_ids(der):
    """The URI SANs of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def request(ctx, url, expected_id, method, path, body=None, headers=None):
    """One HTTPS request to `url` + `path` after checking the server is `expected_id`."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https":
        raise SystemExit(f"{url}: only https")
    conn = http.client.HTTPSConnection(parsed.hostname, parsed.port or 443, context=ctx, timeout=30)
    try:
        conn.connect()  # the handshake: chain and host name verified here
        ids = spiffe_ids(conn.sock.getpeercert(binary_form=True))
        if ids != [expected_id]:
            raise SystemExit(f"{url} is {ids}, not {expected_id}")
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tts-url", required=True)
    p.add_argument("--tts-id", required=True, help="the token service's SPIFFE ID")
    p.add_argument("--service-url", required=True)
    p.add_argument("--service-id", required=True, help="the service's SPIFFE ID")
    p.add_argument("--service-path", default="/orders")
    p.add_argument("--subject-token-file", required=True, help="the user's access token")
    p.add_argument("--scope", default="orders.read")
    p.add_argument("--spiffe-id", help="which of this process's SVIDs to use")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        me, cert, key, ca = fetch_identity(args.spiffe_id, workdir)
        ctx = client_context(cert, key, ca)
        with open(args.subject_token_file) as f:
            subject_token = f.read().strip()
        trust_domain = me.split("/")[2]
        form = urllib.parse.urlencode(
            {
                "grant_type": TOKEN_EXCHANGE,
                "requested_token_type": TXN_TOKEN_TYPE,
                "audience": trust_domain,
                "scope": args.scope,
                "subject_token": subject_token,
                "subject_token_type": ACCESS_TOKEN_TYPE,
            }
        )
        status, body = request(
            ctx, args.tts_url, args.tts_id, "POST", "/token", form,
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        if status != 200:
            raise SystemExit(f"token exchange refused ({status}): {body.decode(errors='replace')}")
        txn_token = json.loads(body)["access_token"]
        status, body = request(
            ctx, args.service_url, args.service_id, "GET", args.service_path,
            headers={"Txn-Token": txn_token},
        )
        if status != 200:
            raise SystemExit(f"the service refused ({status}): {body.decode(errors='replace')}")
        print(body.decode(), flush=True)


if __name__ == "__main__":
    try:
        main()
    except ssl.SSLError as e:
        raise SystemExit(f"TLS: {e}")
    except ssl.CertificateError as e:
        raise SystemExit(f"TLS: {e}")
