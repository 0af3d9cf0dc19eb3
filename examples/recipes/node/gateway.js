// A gateway in Node.js: reads its X509-SVID from the files `writ api fetch x509 --write DIR`
// (or `writ api watch --write DIR`) keeps in DIR (svid.0.pem, svid.0.key, bundle.0.pem),
// exchanges a user's token for a Txn-Token at Writ's token service (RFC 8693, over mTLS)
// and calls a service with it.
//
// Every TLS connection is verified as any HTTPS client verifies a server: the trust bundle
// is the CA, the host name is checked against the certificate's SANs, and then the
// certificate's URI SAN must be the SPIFFE ID the gateway expects at that address.
//
// Node's standard library only.
//
//   node gateway.js --svid-dir DIR --tts-url https://localhost:8443 \
//     --tts-id spiffe://example.org/writ/tts --service-url https://localhost:9443 \
//     --service-id spiffe://example.org/orders --subject-token-file user.jwt --scope orders.read
//
// Prints the service's JSON answer on stdout; exits 1 with the reason on stderr otherwise.
'use strict';

const { X509Certificate } = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const path = require('node:path');
const tls = require('node:tls');
const { parseArgs } = require('node:util');

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TXN_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:txn_token';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

/** The URI SANs of a peer certificate (`subjectaltname` is "DNS:a, IP Address:b, URI:c"). */
function spiffeIds(cert) {
  return (cert.subjectaltname || '')
    .split(', ')
    .filter((san) => san.startsWith('URI:'))
    .map((san) => san.slice(4));
}

/** One HTTPS request; the server must verify by name and be `expectedId`. */
function request(identity, url, expectedId, { method, body, headers }) {
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        headers,
        ca: identity.ca,
        cert: identity.cert,
        key: identity.key,
        // The default check (host name against the DNS/IP SANs), then the SPIFFE ID.
        checkServerIdentity: (host, cert) => {
          const err = tls.checkServerIdentity(host, cert);
          if (err) return err;
          const ids = spiffeIds(cert);
          if (ids.length !== 1 || ids[0] !== expectedId) {
            return new Error(`${url} is ${JSON.stringify(ids)}, not ${expectedId}`);
          }
          return undefined;
        },
        timeout: 30000,
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${url}: timed out`)));
    req.on('error', reject);
    req.end(body);
  });
}

async function main() {
  const { values: args } = parseArgs({
    options: {
      'svid-dir': { type: 'string' },
      'tts-url': { type: 'string' },
      'tts-id': { type: 'string' },
      'service-url': { type: 'string' },
      'service-id': { type: 'string' },
      'service-path': { type: 'string', default: '/orders' },
      'subject-token-file': { type: 'string' },
      scope: { type: 'string', default: 'orders.read' },
      audience: { type: 'string' },
    },
  });
  for (const need of ['svid-dir', 'tts-url', 'tts-id', 'service-url', 'service-id', 'subject-token-file']) {
    if (!args[need]) throw new Error(`--${need} is required`);
  }
  const dir = args['svid-dir'];
  const identity = {
    cert: fs.readFileSync(path.join(dir, 'svid.0.pem')),
    key: fs.readFileSync(path.join(dir, 'svid.0.key')),
    ca: fs.readFileSync(path.join(dir, 'bundle.0.pem')),
  };
  const me = spiffeIds({ subjectaltname: new X509Certificate(identity.cert).subjectAltName });
  const trustDomain = args.audience || (me[0] || '').split('/')[2];
  const form = new URLSearchParams({
    grant_type: TOKEN_EXCHANGE,
    requested_token_type: TXN_TOKEN_TYPE,
    audience: trustDomain,
    scope: args.scope,
    subject_token: fs.readFileSync(args['subject-token-file'], 'utf8').trim(),
    subject_token_type: ACCESS_TOKEN_TYPE,
  }).toString();
  const exchanged = await request(identity, new URL('/token', args['tts-url']), args['tts-id'], {
    method: 'POST',
    body: form,
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
  });
  if (exchanged.status !== 200) {
    throw new Error(`token exchange refused (${exchanged.status}): ${exchanged.body}`);
  }
  const txnToken = JSON.parse(exchanged.body).access_token;
  const answer = await request(identity, new URL(args['service-path'], args['service-url']), args['service-id'], {
    method: 'GET',
    headers: { 'Txn-Token': txnToken },
  });
  if (answer.status !== 200) {
    throw new Error(`the service refused (${answer.status}): ${answer.body}`);
  }
  process.stdout.write(`${answer.body}\n`);
}

main().catch((err) => {
  process.stderr.write(`gateway: ${err.message}\n`);
  process.exit(1);
});
