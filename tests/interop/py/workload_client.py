"""Workload API interop client on py-spiffe (PyPI `spiffe` 0.3.2).

Run by tests/tests/suite/py_spiffe.rs with PYTHONPATH pointing at the installed package and
SPIFFE_ENDPOINT_SOCKET=unix:///path/agent.sock. Prints exactly one JSON line on stdout
with what it saw; the Rust test asserts the values. Any failure is a Python exception
(non-zero exit, traceback on stderr).

Usage: workload_client.py AUDIENCE
"""

import json
import os
import sys

from spiffe import JwtSvid, TrustDomain, WorkloadApiClient, X509Source
from spiffe.workloadapi.errors import ValidateJwtSvidError

# Every blocking call gets a deadline, so a hung agent fails the test instead of the CI job.
TIMEOUT = 10.0


def x509_part(client):
    svid = client.fetch_x509_svid()
    svids = client.fetch_x509_svids()
    context = client.fetch_x509_context()
    bundles = client.fetch_x509_bundles()
    td = svid.spiffe_id.trust_domain
    bundle = bundles.get_bundle_for_trust_domain(td)
    if bundle is None:
        raise AssertionError(f"no X.509 bundle for {td}")
    authorities = list(bundle.x509_authorities)
    # The leaf must chain to an authority of the bundle the same socket served.
    leaf = svid.leaf
    issuers = []
    for ca in authorities:
        try:
            leaf.verify_directly_issued_by(ca)
            issuers.append(ca.subject.rfc4514_string())
        except Exception:  # noqa: BLE001 - any failure means "not this CA"
            pass
    return {
        "x509_id": str(svid.spiffe_id),
        "x509_ids": [str(s.spiffe_id) for s in svids],
        "x509_context_default": str(context.default_svid.spiffe_id),
        "x509_chain_len": len(svid.cert_chain),
        "x509_has_key": svid.private_key is not None,
        "x509_bundle_tds": sorted(b.trust_domain.name for b in bundles.bundles),
        "x509_bundle_authorities": len(authorities),
        "leaf_issued_by_bundle": len(issuers) > 0,
    }


def jwt_part(client, audience):
    jwt_svid = client.fetch_jwt_svid(audience={audience})
    token = jwt_svid.token
    validated = client.validate_jwt_svid(token, audience)
    # Refusals: a token for someone else, and a garbled signature.
    wrong_audience_rejected = False
    try:
        client.validate_jwt_svid(token, audience + "-other")
    except ValidateJwtSvidError:
        wrong_audience_rejected = True
    head, body, sig = token.split(".")
    tampered = ".".join([head, body, ("A" if sig[0] != "A" else "B") + sig[1:]])
    tampered_rejected = False
    try:
        client.validate_jwt_svid(tampered, audience)
    except ValidateJwtSvidError:
        tampered_rejected = True

    jwt_bundles = client.fetch_jwt_bundles()
    td = TrustDomain(jwt_svid.spiffe_id.trust_domain.name)
    jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(td)
    if jwt_bundle is None:
        raise AssertionError(f"no JWT bundle for {td}")
    local = JwtSvid.parse_and_validate(token, jwt_bundle, {audience})
    local_wrong_audience_rejected = False
    try:
        JwtSvid.parse_and_validate(token, jwt_bundle, {audience + "-other"})
    except Exception:  # noqa: BLE001 - py-spiffe raises several error types here
        local_wrong_audience_rejected = True
    # JWT-SVIDs are cached by the agent per audience set.
    again = client.fetch_jwt_svid(audience={audience})
    return {
        "jwt_id": str(jwt_svid.spiffe_id),
        "jwt_audience": sorted(jwt_svid.audience),
        "jwt_expiry": jwt_svid.expiry,
        "jwt_same_when_cached": again.token == token,
        "validated_id": str(validated.spiffe_id),
        "wrong_audience_rejected": wrong_audience_rejected,
        "tampered_rejected": tampered_rejected,
        "jwt_bundle_tds": sorted(b.trust_domain.name for b in jwt_bundles.bundles),
        "jwt_bundle_keys": len(jwt_bundle.jwt_authorities),
        "local_validated_id": str(local.spiffe_id),
        "local_audience": sorted(local.audience),
        "local_wrong_audience_rejected": local_wrong_audience_rejected,
    }


def source_part():
    # X509Source reads SPIFFE_ENDPOINT_SOCKET itself.
    source = X509Source(timeout_in_seconds=TIMEOUT)
    try:
        context = source.get_x509_context()
        return {"source_id": str(context.default_svid.spiffe_id)}
    finally:
        source.close()


def main():
    audience = sys.argv[1]
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    out = {"pid": os.getpid()}
    with WorkloadApiClient(socket_path=endpoint, default_timeout=TIMEOUT) as client:
        out.update(x509_part(client))
        out.update(jwt_part(client, audience))
    out.update(source_part())
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
