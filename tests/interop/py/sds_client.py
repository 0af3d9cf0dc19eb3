"""An Envoy SDS v3 client built from the official Envoy API protos (PyPI `xds-protos`)
and grpcio, against the agent's socket: what Envoy does, without Envoy.

Run by tests/tests/suite/sds.rs with PYTHONPATH pointing at the installed packages and
SPIFFE_ENDPOINT_SOCKET=unix:///path/agent.sock. Prints one JSON line on stdout.

Usage:
  sds_client.py stream EXPECTED_SPIFFE_ID TIMEOUT_SECONDS
  sds_client.py stranger
"""

import json
import os
import queue
import sys

import grpc
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def channel():
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    path = endpoint[len("unix://"):] if endpoint.startswith("unix://") else endpoint
    return grpc.insecure_channel("unix:" + path)


def request(names, version="", nonce="", error=None):
    req = discovery_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=names,
        type_url=SECRET_TYPE,
        response_nonce=nonce,
    )
    req.node.id = "sds-client-test"
    req.node.cluster = "writ-tests"
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def describe(resp):
    """The secrets of a response: name -> what it holds."""
    out = {}
    for res in resp.resources:
        assert res.type_url == SECRET_TYPE, res.type_url
        secret = secret_pb2.Secret()
        res.Unpack(secret)
        kind = secret.WhichOneof("type")
        if kind == "tls_certificate":
            chain = secret.tls_certificate.certificate_chain.inline_bytes
            key = secret.tls_certificate.private_key.inline_bytes
            leaf = x509.load_pem_x509_certificates(chain)[0]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
            out[secret.name] = {
                "kind": "certificate",
                "uris": uris,
                "serial": str(leaf.serial_number),
                "has_key": b"PRIVATE KEY" in key,
            }
        elif kind == "validation_context":
            vc = secret.validation_context
            if vc.HasField("custom_validator_config"):
                cfg = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
                vc.custom_validator_config.typed_config.Unpack(cfg)
                out[secret.name] = {
                    "kind": "spiffe_validator",
                    "validator": vc.custom_validator_config.name,
                    "trust_domains": [td.name for td in cfg.trust_domains],
                    "cas": [
                        len(x509.load_pem_x509_certificates(td.trust_bundle.inline_bytes))
                        for td in cfg.trust_domains
                    ],
                }
            else:
                cas = x509.load_pem_x509_certificates(vc.trusted_ca.inline_bytes)
                out[secret.name] = {"kind": "trusted_ca", "cas": len(cas)}
        else:
            out[secret.name] = {"kind": str(kind)}
    return out


def summary(resp):
    return {"version": resp.version_info, "nonce": resp.nonce, "secrets": describe(resp)}


def stream(expected, timeout):
    names = [expected, "default", "ROOTCA", "ALL"]
    outbox = queue.Queue()

    def requests():
        while True:
            item = outbox.get()
            if item is None:
                return
            yield item

    out = {"errors": []}
    with channel() as ch:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
        responses = stub.StreamSecrets(requests(), timeout=timeout)
        try:
            outbox.put(request(names))
            first = next(responses)
            out["first"] = summary(first)
            # A bogus nonce: ignored (its names never take effect).
            outbox.put(request(["spiffe://example.org/bogus"], "1", "bogus-nonce"))
            # ACK the first response.
            outbox.put(request(names, first.version_info, first.nonce))
            # Wait for a rotation: a response whose certificate changed.
            serial = out["first"]["secrets"]["default"]["serial"]
            rotated = next(responses)
            while describe(rotated)["default"]["serial"] == serial:
                rotated = next(responses)
            out["rotated"] = summary(rotated)
            # NACK it: the stream must stay up, and the next rotation still arrive.
            outbox.put(request(names, first.version_info, rotated.nonce, "rejected by the test"))
            serial = out["rotated"]["secrets"]["default"]["serial"]
            after = next(responses)
            while describe(after)["default"]["serial"] == serial:
                after = next(responses)
            out["after_nack"] = summary(after)
            # ACK it and ask for a name it does not hold as well: nothing for that name.
            outbox.put(
                request(names + ["spiffe://example.org/not-mine"], after.version_info, after.nonce)
            )
            widened = next(responses)
            out["widened"] = summary(widened)
        except grpc.RpcError as e:
            out["errors"].append(f"{e.code()}: {e.details()}")
        finally:
            outbox.put(None)
            responses.cancel()

        try:
            fetched = stub.FetchSecrets(request(["default"]), timeout=timeout)
            out["fetch_default"] = summary(fetched)
            everything = stub.FetchSecrets(request([]), timeout=timeout)
            out["fetch_all_names"] = sorted(describe(everything))
        except grpc.RpcError as e:
            out["errors"].append(f"fetch {e.code()}: {e.details()}")

        try:
            delta = stub.DeltaSecrets(iter([discovery_pb2.DeltaDiscoveryRequest()]), timeout=timeout)
            next(delta)
            out["delta"] = "answered"
        except grpc.RpcError as e:
            out["delta"] = str(e.code())
    print(json.dumps(out))


def stranger():
    out = {}
    with channel() as ch:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(ch)
        try:
            responses = stub.StreamSecrets(iter([request(["default", "ROOTCA", "ALL"])]), timeout=10)
            out["stream"] = describe(next(responses))
        except grpc.RpcError as e:
            out["stream"] = str(e.code())
            out["stream_details"] = e.details()
        try:
            out["fetch"] = describe(stub.FetchSecrets(request([]), timeout=10))
        except grpc.RpcError as e:
            out["fetch"] = str(e.code())
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "stream":
        stream(sys.argv[2], float(sys.argv[3]))
    else:
        stranger()
