// A service in Node.js: serves HTTPS with its X509-SVID (the files `writ api fetch x509
// --write DIR` or `writ api watch --write DIR` keeps in DIR), requires a client
// certificate signed by the trust bundle, and accepts a request only when
//
// - the caller's SPIFFE ID (the URI SAN of its client certificate) is one it allows, and
// - the `Txn-Token` header holds a Txn-Token signed by the token service's keys (`jose`'s
//   createRemoteJWKSet on the service's JWKS, fetched over HTTPS verified with the
//   bundle), typed `txntoken+jwt`, for this trust domain (`aud`), from the expected
//   issuer, not expired, whose `req_wl` is that same caller.
//
// Node's standard library plus npm `jose` (5.x: `npm install jose@5`).
//
//   node service.js --svid-dir DIR --listen 127.0.0.1:9443 --issuer https://127.0.0.1:8443 \
//     --jwks-url https://localhost:8443/.well-known/jwks.json \
//     --allow-caller spiffe://example.org/gateway
//
// Prints `listening on HOST:PORT` once ready. Answers 200 with the accepted claims as JSON,
// 403 with {"error": ...} otherwise.
'use strict';

const { X509Certificate } = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');
const { parseArgs } = require('node:util');
const { createRemoteJWKSet, jwtVerify } = require('jose');

const TXN_TOKEN_TYP = 'txntoken+jwt';
const MAX_TOKEN_BYTES = 16 * 1024;

/** The URI SANs of a certificate (`subjectaltname` is "DNS:a, IP Address:b, URI:c"). */
function spiffeIds(subjectaltname) {
  return (subjectaltname || '')
    .split(', ')
    .filter((san) => san.startsWith('URI:'))
    .map((san) => san.slice(4));
}

function main() {
  const { values: args } = parseArgs({
    options: {
      'svid-dir': { type: 'string' },
      listen: { type: 'string', default: '127.0.0.1:9443' },
      issuer: { type: 'string' },
      'jwks-url': { type: 'string' },
      'allow-caller': { type: 'string', multiple: true },
    },
  });
  for (const need of ['svid-dir', 'issuer', 'jwks-url', 'allow-caller']) {
    if (!args[need]) throw new Error(`--${need} is required`);
  }
  const dir = args['svid-dir'];
  const cert = fs.readFileSync(path.join(dir, 'svid.0.pem'));
  const key = fs.readFileSync(path.join(dir, 'svid.0.key'));
  const ca = fs.readFileSync(path.join(dir, 'bundle.0.pem'));
  const me = spiffeIds(new X509Certificate(cert).subjectAltName)[0];
  const audience = me.split('/')[2]; // Writ's Txn-Tokens name the trust domain
  const allowed = new Set(args['allow-caller']);

  // The JWKS over HTTPS: the bundle as CA, host names checked (https.Agent's defaults).
  const jwks = createRemoteJWKSet(new URL(args['jwks-url']), {
    agent: new https.Agent({ ca }),
    timeoutDuration: 10000,
  });

  const answer = (res, status, body) => {
    const data = JSON.stringify(body);
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) });
    res.end(data);
  };

  const server = https.createServer(
    // A client certificate is required and must chain to the bundle.
    { cert, key, ca, requestCert: true, rejectUnauthorized: true },
    async (req, res) => {
      try {
        const ids = spiffeIds(req.socket.getPeerCertificate().subjectaltname);
        if (ids.length !== 1 || !allowed.has(ids[0])) {
          return answer(res, 403, { error: `caller ${JSON.stringify(ids)} is not allowed` });
        }
        const caller = ids[0];
        const token = req.headers['txn-token'] || '';
        if (!token || token.length > MAX_TOKEN_BYTES) {
          return answer(res, 403, { error: 'no Txn-Token' });
        }
        let claims;
        try {
          ({ payload: claims } = await jwtVerify(token, jwks, {
            issuer: args.issuer,
            audience,
            typ: TXN_TOKEN_TYP,
            algorithms: ['ES256'],
            requiredClaims: ['exp', 'iat', 'sub', 'txn'],
          }));
        } catch (err) {
          return answer(res, 403, { error: `Txn-Token: ${err.message}` });
        }
        if (claims.req_wl !== caller) {
          return answer(res, 403, { error: `Txn-Token was issued to ${claims.req_wl}, not ${caller}` });
        }
        return answer(res, 200, {
          caller,
          sub: claims.sub,
          req_wl: claims.req_wl,
          scope: claims.scope,
          txn: claims.txn,
        });
      } catch (err) {
        return answer(res, 500, { error: err.message });
      }
    },
  );
  const idx = args.listen.lastIndexOf(':');
  server.listen(Number(args.listen.slice(idx + 1)), args.listen.slice(0, idx), () => {
    const { address, port } = server.address();
    process.stdout.write(`listening on ${address}:${port} as ${me}\n`);
  });
}

try {
  main();
} catch (err) {
  process.stderr.write(`service: ${err.message}\n`);
  process.exit(1);
}
