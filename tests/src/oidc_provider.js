// A real OpenID Provider (npm `oidc-provider` 9) for the OIDC ingress tests.
//
// Usage: node provider.js <node_modules dir>
// Prints one JSON line on stdout once listening:
//   {"issuer": "...", "port": N, "client_id": "...", "client_secret": "...",
//    "resource": "...", "rogue_key_pem": "..."}
// The client uses the client_credentials grant with a resource indicator, so the
// provider issues RFC 9068 JWT access tokens (`typ: at+jwt`, `aud` = the resource).
// GET /__test/jwks_hits returns how many times /jwks has been fetched.
'use strict';

const http = require('node:http');
const crypto = require('node:crypto');
const path = require('node:path');

async function main() {
  const modules = process.argv[2];
  if (!modules) throw new Error('usage: node provider.js <node_modules dir>');
  const { default: Provider } = await import(
    path.join(modules, 'oidc-provider', 'lib', 'index.js')
  );

  const server = http.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const resource = 'https://tts.writ.test';
  const clientId = 'writ-gateway';
  const clientSecret = crypto.randomBytes(24).toString('hex');

  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const rogue = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const ecJwk = { ...ec.privateKey.export({ format: 'jwk' }), kid: 'ec-1', alg: 'ES256', use: 'sig' };
  const rsaJwk = { ...rsa.privateKey.export({ format: 'jwk' }), kid: 'rsa-1', alg: 'RS256', use: 'sig' };

  const provider = new Provider(issuer, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
      token_endpoint_auth_method: 'client_secret_post',
      scope: 'read write admin',
    }],
    jwks: { keys: [ecJwk, rsaJwk] },
    scopes: ['openid', 'read', 'write', 'admin'],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          if (indicator !== resource) throw new Error(`unknown resource ${indicator}`);
          return {
            scope: 'read write admin',
            audience: resource,
            accessTokenTTL: 120,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
    },
  });

  let jwksHits = 0;
  const callback = provider.callback();
  server.on('request', (req, res) => {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/__test/jwks_hits') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ hits: jwksHits }));
      return;
    }
    if (url.pathname === '/jwks') jwksHits += 1;
    callback(req, res);
  });

  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    client_id: clientId,
    client_secret: clientSecret,
    resource,
    rogue_key_pem: rogue.privateKey.export({ format: 'pem', type: 'pkcs8' }),
  })}\n`);

  // Exit when the parent goes away (stdin closes).
  process.stdin.on('end', () => process.exit(0));
  process.stdin.resume();
}

main().catch((err) => {
  process.stderr.write(`provider failed: ${err.stack || err}\n`);
  process.exit(1);
});
