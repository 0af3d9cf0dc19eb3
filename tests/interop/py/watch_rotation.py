"""Watches X.509 context updates with py-spiffe (PyPI `spiffe` 0.3.2) until the default
SVID's leaf certificate changes (the agent rotated it) or the time runs out.

Run by tests/tests/suite/py_spiffe.rs with PYTHONPATH pointing at the installed package and
SPIFFE_ENDPOINT_SOCKET=unix:///path/agent.sock. Prints one JSON line on stdout.

Usage: watch_rotation.py TIMEOUT_SECONDS
"""

import json
import os
import sys
import threading
import time

from cryptography.hazmat.primitives import hashes
from spiffe import WorkloadApiClient


def main():
    timeout = float(sys.argv[1])
    endpoint = os.environ["SPIFFE_ENDPOINT_SOCKET"]
    lock = threading.Lock()
    seen = []  # (spiffe id, leaf SHA-256 hex, serial, not_after) per update
    errors = []
    rotated = threading.Event()

    def on_success(context):
        svid = context.default_svid
        leaf = svid.leaf
        item = (
            str(svid.spiffe_id),
            leaf.fingerprint(hashes.SHA256()).hex(),
            leaf.serial_number,
            int(leaf.not_valid_after_utc.timestamp()),
        )
        with lock:
            seen.append(item)
            if len({fp for (_, fp, _, _) in seen}) > 1:
                rotated.set()

    def on_error(err):
        with lock:
            errors.append(str(err))
        rotated.set()  # wake the main thread; the result says what happened

    started = time.monotonic()
    with WorkloadApiClient(socket_path=endpoint) as client:
        handler = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
        rotated.wait(timeout)
        elapsed = time.monotonic() - started
        handler.cancel()
    with lock:
        first = seen[0] if seen else None
        other = next((s for s in seen if first and s[1] != first[1]), None)
        out = {
            "updates": len(seen),
            "errors": errors,
            "first_id": first[0] if first else None,
            "first_not_after": first[3] if first else None,
            "rotated": other is not None,
            "rotated_id": other[0] if other else None,
            "rotated_not_after": other[3] if other else None,
            "serials_differ": bool(other and other[2] != first[2]),
            "seconds": round(elapsed, 3),
        }
    print(json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
