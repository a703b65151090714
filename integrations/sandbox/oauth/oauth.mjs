// A real OAuth 2 authorization server for psych-cds SMART Backend Services tests and demos:
// npm oidc-provider@9.13.3 with client_credentials + private_key_jwt (RS384 / ES384), plus
//  * /fhir/*            a protected-resource gateway: checks the bearer token this server issued,
//                       then forwards to --upstream (the local EHR); 401 OperationOutcome otherwise;
//  * GET  /admin/stats  counts of token requests (ok / failed) and gateway requests (authorised / refused);
//  * POST /admin/revoke every token issued so far is refused from now on (an EHR revoking tokens).
// No .well-known/smart-configuration: the client is given the token URL (${issuer}/token).
//
//   node oauth.mjs --port 9000 --clients clients.json --ttl 300 --upstream http://127.0.0.1:8090/fhir
//
// clients.json: [{"client_id": "psych-cds", "jwks": {"keys": [...]}, "token_endpoint_auth_signing_alg": "ES384"}]
// Binds 127.0.0.1 only.

import fs from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.OAUTH_PORT ?? '9000' },
    host: { type: 'string', default: '127.0.0.1' },
    clients: { type: 'string' },
    ttl: { type: 'string', default: process.env.OAUTH_TOKEN_TTL ?? '300' },
    upstream: { type: 'string' },
  },
});

const port = Number.parseInt(args.port, 10);
const ttl = Number.parseInt(args.ttl, 10);
if (!Number.isInteger(ttl) || ttl < 1) throw new Error('--ttl must be a positive number of seconds');
const issuer = `http://${args.host}:${port}`;

// SMART system scopes psych-cds asks for (oidc-provider silently drops scopes it does not know).
const SCOPES = [
  'system/*.read', 'system/RiskAssessment.write', 'system/Flag.write', 'system/Communication.write',
  'system/Task.write', 'system/ServiceRequest.write', 'system/Provenance.write', 'system/AuditEvent.write',
];

const clients = (args.clients ? JSON.parse(fs.readFileSync(args.clients, 'utf8')) : []).map((c) => ({
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'private_key_jwt',
  scope: SCOPES.join(' '),
  ...c,
}));

const provider = new Provider(issuer, {
  clients,
  scopes: SCOPES,
  clientAuthMethods: ['private_key_jwt'],
  features: {
    clientCredentials: { enabled: true },
    devInteractions: { enabled: false },
    introspection: { enabled: false },
    revocation: { enabled: false },
  },
  // RS384 / ES384 are what SMART Backend Services names; oidc-provider has them off by default.
  enabledJWA: { clientAuthSigningAlgValues: ['RS256', 'RS384', 'ES256', 'ES384'] },
  ttl: { ClientCredentials: ttl },
  cookies: { keys: ['psych-cds-test-only-cookie-key'] },
});

const stats = { token_ok: 0, token_failed: 0, resource_authorised: 0, resource_refused: 0, last_error: null };
let revokedBefore = 0; // epoch seconds: tokens issued at or before this instant are refused

provider.on('grant.success', () => { stats.token_ok++; });
provider.on('grant.error', (_ctx, err) => {
  stats.token_failed++;
  stats.last_error = `${err.error ?? err.name}: ${err.error_description ?? ''}`;
});

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
}

function outcome(code, diagnostics) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, diagnostics }] };
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

async function gateway(req, res, url) {
  const auth = req.headers.authorization ?? '';
  const value = auth.startsWith('Bearer ') ? auth.slice(7) : null;
  const token = value ? await provider.ClientCredentials.find(value) : undefined;
  if (!token || token.iat <= revokedBefore) {
    stats.resource_refused++;
    return send(res, 401, outcome('login', value ? 'invalid or expired access token' : 'bearer token required'),
      { 'Content-Type': 'application/fhir+json', 'WWW-Authenticate': 'Bearer error="invalid_token"' });
  }
  stats.resource_authorised++;
  if (!args.upstream) return send(res, 200, { resourceType: 'Parameters', parameter: [] });
  const target = args.upstream.replace(/\/$/, '') + url.pathname.replace(/^\/fhir/, '') + url.search;
  const headers = {};
  for (const name of ['accept', 'content-type', 'if-none-exist', 'if-match', 'prefer']) {
    if (req.headers[name]) headers[name] = req.headers[name];
  }
  const body = ['GET', 'HEAD'].includes(req.method) ? undefined : await readBody(req);
  const upstream = await fetch(target, { method: req.method, headers, body });
  const out = Buffer.from(await upstream.arrayBuffer());
  const passed = {};
  for (const name of ['content-type', 'location', 'etag', 'last-modified']) {
    const v = upstream.headers.get(name);
    if (v) passed[name] = v;
  }
  res.writeHead(upstream.status, passed);
  res.end(out);
}

const handle = provider.callback();

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url ?? '/', issuer);
  try {
    if (url.pathname === '/admin/stats' && req.method === 'GET') return send(res, 200, stats);
    if (url.pathname === '/admin/revoke' && req.method === 'POST') {
      revokedBefore = Math.floor(Date.now() / 1000);
      // tokens carry whole-second iat: wait into the next second so new tokens are not caught
      await new Promise((resolve) => setTimeout(resolve, 1100 - (Date.now() % 1000)));
      return send(res, 200, { revoked_before: revokedBefore });
    }
    if (url.pathname === '/healthz') return send(res, 200, { status: 'ok', issuer });
    if (url.pathname === '/fhir' || url.pathname.startsWith('/fhir/')) return await gateway(req, res, url);
    return handle(req, res);
  } catch (err) {
    send(res, 500, { error: 'server_error', error_description: String(err?.message ?? err) });
  }
});

server.listen(port, args.host, () => {
  console.log(`oauth sandbox listening on ${issuer} (token endpoint ${issuer}/token, ttl ${ttl}s)`);
});

for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
