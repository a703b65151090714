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
//
// SMART App Launch / OpenID Connect sign-in (only with --interactive-clients; nothing above changes without it):
//   --interactive-clients f.json  clients for the authorization_code grant with PKCE S256 (always required):
//                                 [{"client_id": "psych-cds-launch", "redirect_uris": ["http://.../smart/callback"]},
//                                  {"client_id": "psych-cds-sso", "client_secret": "...", "redirect_uris": [...]}]
//                                 no client_secret = public client ("none"); with one = client_secret_basic.
//   --accounts f.json             accountId -> claims: {"dr-li": {"fhirUser": "Practitioner/p1",
//                                 "preferred_username": "dr.li", "name": "Dr Li"}} (scopes fhirUser / profile).
//   --auto-login ACCOUNT          TEST ONLY: every login and consent interaction is completed at once for
//                                 ACCOUNT (no page), so a script can follow the redirects to the code.
//   --aud URL,URL                 FHIR base URLs accepted as the SMART `aud` parameter (default ${issuer}/fhir);
//                                 another aud is refused with invalid_request.
//   POST /admin/launch {"patient": "123"} -> {"launch": "<opaque>"}: the EHR side of an EHR launch; the
//                                 token response of a code issued for that launch carries "patient": "123"
//                                 (added by a post-middleware on /token, as SMART App Launch asks).
//   GET /fhir/.well-known/smart-configuration  SMART discovery for the /fhir gateway.

import fs from 'node:fs';
import http from 'node:http';
import { parseArgs } from 'node:util';

import crypto from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.OAUTH_PORT ?? '9000' },
    host: { type: 'string', default: '127.0.0.1' },
    clients: { type: 'string' },
    ttl: { type: 'string', default: process.env.OAUTH_TOKEN_TTL ?? '300' },
    upstream: { type: 'string' },
    'interactive-clients': { type: 'string' },
    accounts: { type: 'string' },
    'auto-login': { type: 'string' },
    aud: { type: 'string' },
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

// -- SMART App Launch / OpenID Connect (authorization_code + PKCE), only with --interactive-clients ------------
const interactive = Boolean(args['interactive-clients']);
const USER_SCOPES = ['launch', 'launch/patient', 'offline_access', 'patient/*.read', 'patient/*.rs', 'user/*.read',
  'user/*.rs'];
const accounts = args.accounts ? JSON.parse(fs.readFileSync(args.accounts, 'utf8')) : {};
const audiences = new Set((args.aud ?? `${issuer}/fhir`).split(',').map((a) => a.trim().replace(/\/$/, '')));
const launches = new Map(); // launch id -> {patient, encounter}: contexts the "EHR" created
const codeLaunch = new Map(); // authorization code -> launch id, until the code is redeemed

const interactiveClients = (interactive
  ? JSON.parse(fs.readFileSync(args['interactive-clients'], 'utf8')) : []).map((c) => ({
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: c.client_secret ? 'client_secret_basic' : 'none',
  scope: ['openid', 'profile', 'fhirUser', ...USER_SCOPES].join(' '),
  ...c,
}));

const interactiveConfig = interactive ? {
  clientAuthMethods: ['private_key_jwt', 'none', 'client_secret_basic', 'client_secret_post'],
  claims: { openid: ['sub'], profile: ['preferred_username', 'name'], fhirUser: ['fhirUser'] },
  conformIdTokenClaims: false, // scope claims (fhirUser, preferred_username) go into the id_token too
  pkce: { required: () => true }, // S256 is the only method oidc-provider accepts
  extraParams: {
    launch(_ctx, value) {
      if (value && !launches.has(value)) throw new errors.InvalidRequest('unknown or expired launch');
    },
    aud(_ctx, value) {
      if (value && !audiences.has(value.replace(/\/$/, ''))) {
        throw new errors.InvalidRequest(`aud ${value} is not a FHIR server of this authorization server`);
      }
    },
  },
  async findAccount(_ctx, id) {
    if (!Object.hasOwn(accounts, id) && id !== args['auto-login']) return undefined;
    return { accountId: id, claims: async () => ({ preferred_username: id, ...accounts[id], sub: id }) };
  },
} : {};

const provider = new Provider(issuer, {
  clients: [...clients, ...interactiveClients],
  scopes: [...SCOPES, ...(interactive ? USER_SCOPES : [])],
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
  ...interactiveConfig,
});

if (interactive) {
  // SMART launch context: remember which launch each issued code belongs to, and answer the token request
  // for that code with "patient" (and "encounter") beside the access token, as SMART App Launch specifies.
  provider.use(async (ctx, next) => {
    await next();
    const route = ctx.oidc?.route;
    const launch = ctx.oidc?.params?.launch; // authorization or resume: the authorization request's params
    const code = route === 'token' ? ctx.oidc?.params?.code : undefined;
    if ((route === 'authorization' || route === 'resume') && launch) {
      const location = ctx.response.get('location');
      const issued = location ? new URL(location, issuer).searchParams.get('code') : null;
      if (issued) codeLaunch.set(issued, launch);
    }
    if (route === 'token' && code && ctx.status === 200 && ctx.body?.access_token) {
      const context = launches.get(codeLaunch.get(code));
      codeLaunch.delete(code);
      if (context) Object.assign(ctx.body, context, { need_patient_banner: true });
    }
  });
}

// TEST ONLY (--auto-login): finish the login prompt for the account, then consent to everything asked.
async function autoInteraction(req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    return provider.interactionFinished(req, res, { login: { accountId: args['auto-login'] } },
      { mergeWithLastSubmission: false });
  }
  const grant = details.grantId ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details ?? {};
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

function smartConfiguration() {
  return {
    issuer,
    jwks_uri: `${issuer}/jwks`,
    authorization_endpoint: `${issuer}/auth`,
    token_endpoint: `${issuer}/token`,
    grant_types_supported: ['authorization_code', 'client_credentials'],
    token_endpoint_auth_methods_supported: ['none', 'client_secret_basic', 'private_key_jwt'],
    scopes_supported: ['openid', 'profile', 'fhirUser', ...USER_SCOPES, ...SCOPES],
    response_types_supported: ['code'],
    code_challenge_methods_supported: ['S256'],
    capabilities: ['launch-ehr', 'client-public', 'client-confidential-symmetric', 'sso-openid-connect',
      'context-ehr-patient', 'permission-patient', 'permission-v1', 'permission-v2'],
  };
}

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
    if (interactive && url.pathname === '/admin/launch' && req.method === 'POST') {
      const context = JSON.parse((await readBody(req)).toString() || '{}');
      if (typeof context.patient !== 'string' || !context.patient) {
        return send(res, 400, { error: 'invalid_request', error_description: 'patient (an id) is required' });
      }
      const launch = crypto.randomBytes(16).toString('base64url');
      launches.set(launch, { patient: context.patient, ...(context.encounter ? { encounter: context.encounter } : {}) });
      return send(res, 201, { launch });
    }
    if (interactive && url.pathname === '/fhir/.well-known/smart-configuration' && req.method === 'GET') {
      return send(res, 200, smartConfiguration());
    }
    if (interactive && args['auto-login'] && url.pathname.startsWith('/interaction/') && req.method === 'GET') {
      return await autoInteraction(req, res);
    }
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
