#!/usr/bin/env node
// Local FHIR R4 EHR for psych-cds demos and integration tests.
//
// Medplum's FHIR engine (@medplum/fhir-router over its MemoryRepository) behind plain node:http.
// The Python service must treat this exactly like a hospital server, so the wrapper adds what a real
// server does and the in-memory engine does not: validation on write, atomic transactions, HTTP
// status/ETag/Location headers, paging links, loud errors for search features the engine would
// otherwise silently answer with "no match". Admin endpoints outside /fhir let tests reset the data,
// count requests and simulate outages. repository.mjs holds the repository (transaction journal,
// identifier and _lastUpdated indexes); subscriptions.mjs delivers FHIR Subscriptions (rest-hook,
// Subscriptions Backport IG) after each committed write.
//
// Usage: node server.mjs [--port 8090] [--host 127.0.0.1] [--seed path.json]

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import {
  OperationOutcomeError,
  getResourceTypes,
  getSearchParameters,
  getStatus,
  isOk,
  isResourceType,
  normalizeOperationOutcome,
} from '@medplum/core';
import { FhirRouter } from '@medplum/fhir-router';
import { SUPPORTED_OPERATORS, SandboxRepository } from './repository.mjs';
import { BACKPORT, SubscriptionManager, TOPICS, TOPIC_BASE } from './subscriptions.mjs';

// ---------------------------------------------------------------------------------------------------
// Options

const { values: opts } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.SANDBOX_PORT ?? '8090' },
    host: { type: 'string', default: process.env.SANDBOX_HOST ?? '127.0.0.1' },
    seed: { type: 'string' },
  },
});
const PORT = Number.parseInt(opts.port, 10); // 0 = any free port (parallel test runs)
const HOST = opts.host;

// Page size when the client sends no _count, and the most one page may hold. Medplum's own server and
// HAPI default to 20 as well; a client that ignores Bundle.link "next" should fail here, not in a hospital.
const DEFAULT_COUNT = 20;
const MAX_COUNT = 1000;
const MAX_BODY_BYTES = 20 * 1024 * 1024;
const REQUEST_LOG_SIZE = 500;

// ---------------------------------------------------------------------------------------------------
// Repository (validation, atomic transactions, indexes: repository.mjs) and Subscriptions
// (subscriptions.mjs), which hang off the repository's commit hook.

const repo = new SandboxRepository();
const router = new FhirRouter();
const ROUTER_CONFIG = { transactions: true };

// One FHIR request at a time. The engine is synchronous CPU work behind promises anyway; serialising
// makes conditional create and the transaction journal race-free at no real cost. Subscription
// deliveries run outside this queue; only their status updates of the Subscription resource join it.
let queueTail = Promise.resolve();
function serial(fn) {
  const run = queueTail.then(fn, fn);
  queueTail = run.catch(() => {});
  return run;
}

const subscriptions = new SubscriptionManager({ repo, serial });

// ---------------------------------------------------------------------------------------------------
// Admin state: fault injection and the request log (method, path, status only: no bodies or query
// strings, which carry names and identifiers).

let fault = null; // { mode, status, remaining (null = until cleared), methods, delayMs, retryAfter }
let faultsInjected = 0;
let requestSeq = 0;
const requestLog = [];

function logRequest(item) {
  requestSeq++;
  requestLog.push({ seq: requestSeq, time: new Date().toISOString(), ...item });
  if (requestLog.length > REQUEST_LOG_SIZE) requestLog.shift();
}

function takeFault(method) {
  if (!fault || (fault.methods && !fault.methods.includes(method))) return null;
  const current = fault;
  if (current.remaining !== null && --current.remaining <= 0) fault = null;
  faultsInjected++;
  return current;
}

function parseFault(body) {
  if (!body || typeof body !== 'object') throw new Error('body must be a JSON object');
  const mode = body.mode;
  if (!['down', 'error', 'delay'].includes(mode)) throw new Error('mode must be "down", "error" or "delay"');
  const status = body.status ?? 503;
  if (!Number.isInteger(status) || status < 400 || status > 599) throw new Error('status must be 400..599');
  const count = body.count ?? null;
  if (count !== null && (!Number.isInteger(count) || count < 1)) throw new Error('count must be a positive integer or null');
  let methods = null;
  if (body.methods !== undefined && body.methods !== null) {
    if (!Array.isArray(body.methods) || body.methods.some((m) => typeof m !== 'string')) {
      throw new Error('methods must be an array of HTTP methods');
    }
    methods = body.methods.map((m) => m.toUpperCase());
  }
  const delayMs = body.delayMs ?? 5000;
  if (!Number.isInteger(delayMs) || delayMs < 0) throw new Error('delayMs must be a non-negative integer');
  const retryAfter = body.retryAfter ?? null;
  return { mode, status, remaining: count, methods, delayMs, retryAfter };
}

function faultState() {
  return { active: fault !== null, ...(fault ?? {}), injected: faultsInjected };
}

// ---------------------------------------------------------------------------------------------------
// HTTP plumbing

const CORS_HEADERS = {
  'Access-Control-Allow-Origin': '*',
  'Access-Control-Allow-Methods': 'GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS',
  'Access-Control-Allow-Headers':
    'Authorization, Content-Type, Accept, If-None-Exist, If-Match, If-None-Match, If-Modified-Since, Prefer',
  'Access-Control-Expose-Headers': 'Location, Content-Location, ETag, Last-Modified',
  'Access-Control-Max-Age': '600',
};

function send(res, status, body, headers = {}, contentType = 'application/fhir+json; charset=utf-8') {
  const payload = body === undefined ? '' : JSON.stringify(body, null, res.pretty ? 2 : undefined);
  res.writeHead(status, {
    ...CORS_HEADERS,
    ...(body === undefined ? {} : { 'Content-Type': contentType }),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendJson(res, status, body) {
  send(res, status, body, {}, 'application/json; charset=utf-8');
}

function outcomeError(code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code, details: { text } }] };
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw Object.assign(new Error('Request body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function parseJsonBody(text) {
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw Object.assign(new Error(`Invalid JSON body: ${err.message}`), { status: 400 });
  }
}

function versionHeaders(resource) {
  const headers = {};
  if (resource?.meta?.versionId) headers.ETag = `W/"${resource.meta.versionId}"`;
  if (resource?.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
  return headers;
}

// ---------------------------------------------------------------------------------------------------
// /fhir

function baseUrl(req) {
  return `http://${req.headers.host ?? `${HOST}:${PORT}`}/fhir`;
}

// Clamp/insert _count so every search pages the same way; returns the effective paging.
function normaliseSearchQuery(params) {
  const rawCount = params.getAll('_count').at(-1);
  const rawOffset = params.getAll('_offset').at(-1);
  for (const [name, raw] of [['_count', rawCount], ['_offset', rawOffset]]) {
    if (raw !== undefined && !/^\d+$/.test(raw)) {
      throw Object.assign(new Error(`${name} must be a non-negative integer`), { status: 400 });
    }
  }
  const summaryCount = params.getAll('_summary').includes('count');
  const count = summaryCount ? 0 : Math.min(rawCount === undefined ? DEFAULT_COUNT : Number(rawCount), MAX_COUNT);
  const offset = rawOffset === undefined ? 0 : Number(rawOffset);
  params.delete('_count');
  params.delete('_offset');
  if (!summaryCount) params.set('_count', String(count));
  if (offset) params.set('_offset', String(offset));
  return { count, offset };
}

function decorateSearchset(bundle, base, resourceType, params, { count, offset }) {
  const pageUrl = (off) => {
    const p = new URLSearchParams(params);
    p.delete('_offset');
    if (off) p.set('_offset', String(off));
    return `${base}/${resourceType}?${p}`;
  };
  const link = [{ relation: 'self', url: pageUrl(offset) }];
  const total = bundle.total ?? 0;
  if (count > 0 && offset + count < total) link.push({ relation: 'next', url: pageUrl(offset + count) });
  if (count > 0 && offset > 0) link.push({ relation: 'previous', url: pageUrl(Math.max(0, offset - count)) });
  bundle.link = link;
  for (const e of bundle.entry ?? []) {
    e.fullUrl = `${base}/${e.resource.resourceType}/${e.resource.id}`;
    e.search = { mode: 'match' };
  }
  return bundle;
}

// Medplum's batch responses carry neither fullUrl nor etag/lastModified per entry.
function decorateBatchResponse(bundle, base) {
  for (const e of bundle.entry ?? []) {
    const r = e.resource;
    if (r?.id && r.resourceType !== 'OperationOutcome') {
      e.fullUrl = `${base}/${r.resourceType}/${r.id}`;
      if (e.response && r.meta?.versionId) {
        e.response.etag = `W/"${r.meta.versionId}"`;
        e.response.lastModified = r.meta.lastUpdated;
        e.response.location = `${r.resourceType}/${r.id}/_history/${r.meta.versionId}`;
      }
    }
  }
  return bundle;
}

let capabilityStatement;
function capability(base) {
  capabilityStatement ??= {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'psych-cds sandbox (Medplum fhir-router 4.5.2, in-memory)' },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'batch' }, { code: 'transaction' }],
        resource: getResourceTypes()
          .filter((t) => t !== 'Resource' && t !== 'DomainResource')
          .sort()
          .map((type) => ({
            type,
            interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map(
              (code) => ({ code })
            ),
            versioning: 'versioned',
            conditionalCreate: true,
            conditionalUpdate: true,
            conditionalDelete: 'single',
            searchParam: Object.values(getSearchParameters(type) ?? {})
              .filter((p) => SUPPORTED_OPERATORS[p.type])
              .map((p) => ({ name: p.code, type: p.type })),
            ...(type === 'Subscription'
              ? {
                  extension: Object.keys(TOPICS).map((name) => ({
                    url: `${BACKPORT}/capabilitystatement-subscriptiontopic-canonical`,
                    valueCanonical: `${TOPIC_BASE}/${name}`,
                  })),
                  operation: [
                    {
                      name: '$status',
                      definition: 'http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status',
                    },
                  ],
                }
              : {}),
          })),
      },
    ],
  };
  return { ...capabilityStatement, implementation: { description: 'psych-cds local EHR', url: base } };
}

async function handleFhir(req, res, url) {
  const base = baseUrl(req);
  let method = req.method === 'HEAD' ? 'GET' : req.method;
  const segments = url.pathname.slice('/fhir'.length).split('/').filter(Boolean);
  const params = new URLSearchParams(url.search);
  res.pretty = params.get('_pretty') === 'true';

  let body = ['POST', 'PUT', 'PATCH'].includes(method) ? await readBody(req) : '';

  // POST Type/_search with a form body is the same search as GET Type?query.
  if (method === 'POST' && segments.length === 2 && segments[1] === '_search') {
    for (const [k, v] of new URLSearchParams(body)) params.append(k, v);
    method = 'GET';
    segments.pop();
    body = '';
  }

  if (segments.length === 1 && segments[0] === 'metadata' && method === 'GET') {
    return send(res, 200, capability(base));
  }
  // Subscriptions Backport IG: GET Subscription/id/$status
  if (method === 'GET' && segments.length === 3 && segments[0] === 'Subscription' && segments[2] === '$status') {
    const bundle = subscriptions.statusBundle(segments[1], base);
    if (!bundle) return send(res, 404, outcomeError('not-found', `No Subscription/${segments[1]} is managed here`));
    return send(res, 200, bundle);
  }
  if (segments.length > 0 && !isResourceType(segments[0])) {
    return send(res, 404, outcomeError('not-supported', `Unknown resource type or endpoint: ${segments[0]}`));
  }

  const isTypeSearch = method === 'GET' && segments.length === 1;
  const paging = isTypeSearch ? normaliseSearchQuery(params) : undefined;

  let resourceBody = parseJsonBody(body);
  // FHIR: the server assigns the id on create and ignores one in the body.
  if (method === 'POST' && segments.length === 1 && resourceBody && typeof resourceBody === 'object') {
    delete resourceBody.id;
  }

  const query = params.toString();
  const fhirRequest = {
    method,
    url: segments.join('/') + (query ? `?${query}` : ''),
    pathname: '',
    body: resourceBody,
    params: {},
    query: {},
    headers: req.headers,
    config: ROUTER_CONFIG,
  };
  const [outcome, resource] = await serial(() => {
    subscriptions.requestBase = base; // notifications name resources the way this client addresses us
    return router.handleRequest(fhirRequest, repo);
  });
  const status = getStatus(outcome);
  res.logExtra = bundleSummary(resourceBody);

  if (!isOk(outcome)) {
    return send(res, status, outcome);
  }

  let headers = {};
  let out = resource ?? outcome;
  if (resource?.resourceType === 'Bundle' && resource.type === 'searchset' && isTypeSearch) {
    out = decorateSearchset(resource, base, segments[0], params, paging);
  } else if (resource?.resourceType === 'Bundle' && /-response$/.test(resource.type ?? '')) {
    out = decorateBatchResponse(resource, base);
  } else if (resource?.id && resource.meta?.versionId) {
    headers = versionHeaders(resource);
    if (method === 'POST' || method === 'PUT') {
      headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
    }
  }

  const prefer = String(req.headers.prefer ?? '');
  if (/return=minimal/.test(prefer) && method !== 'GET') out = undefined;
  else if (/return=OperationOutcome/.test(prefer) && method !== 'GET') out = outcome;
  return send(res, status, out, headers);
}

// What a request log line may say about a Bundle: entry methods and resource types only.
function bundleSummary(body) {
  if (body?.resourceType !== 'Bundle' || !Array.isArray(body.entry)) return undefined;
  return {
    bundleType: body.type,
    entries: body.entry.map((e) => `${e.request?.method ?? '?'} ${(e.request?.url ?? '').split(/[/?]/)[0]}`),
  };
}

// ---------------------------------------------------------------------------------------------------
// Admin endpoints

async function handleAdmin(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /healthz':
      return sendJson(res, 200, { status: 'ok', resources: repo.count() });

    case 'POST /admin/reset': {
      const options = parseJsonBody(await readBody(req)) ?? {};
      await serial(() => {
        repo.clear();
        subscriptions.reset(); // subscriptions, queued events and deliveries under way
      });
      fault = null;
      requestLog.length = 0; // seq keeps counting so a "since" taken before the reset stays valid
      let seeded;
      if (options.reseed && opts.seed) seeded = await loadSeed(opts.seed);
      return sendJson(res, 200, { reset: true, ...(seeded === undefined ? {} : { seeded }) });
    }

    case 'GET /admin/fault':
      return sendJson(res, 200, faultState());
    case 'POST /admin/fault':
      try {
        fault = parseFault(parseJsonBody(await readBody(req)));
      } catch (err) {
        return sendJson(res, 400, { error: err.message });
      }
      return sendJson(res, 200, faultState());
    case 'DELETE /admin/fault':
      fault = null;
      return sendJson(res, 200, faultState());

    case 'GET /admin/subscriptions':
      return sendJson(res, 200, { subscriptions: subscriptions.state(), search: repo.stats });

    case 'GET /admin/requests': {
      const since = Number.parseInt(url.searchParams.get('since') ?? '0', 10) || 0;
      return sendJson(res, 200, { last: requestSeq, requests: requestLog.filter((r) => r.seq > since) });
    }

    default:
      return sendJson(res, 404, { error: `no such endpoint: ${route}` });
  }
}

// ---------------------------------------------------------------------------------------------------
// Server

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url ?? '/', 'http://sandbox');
  if (req.method === 'OPTIONS') {
    res.writeHead(204, CORS_HEADERS);
    return res.end();
  }

  const isFhir = url.pathname === '/fhir' || url.pathname.startsWith('/fhir/');
  const started = performance.now();
  try {
    if (!isFhir) {
      return await handleAdmin(req, res, url);
    }
    const injected = takeFault(req.method);
    if (injected?.mode === 'down') {
      // No answer at all, as when the EHR or the network between is gone.
      logRequest({ method: req.method, path: url.pathname, status: null, fault: 'down' });
      return req.socket.destroy();
    }
    if (injected?.mode === 'error') {
      const headers = injected.retryAfter === null ? {} : { 'Retry-After': String(injected.retryAfter) };
      res.logExtra = { fault: 'error' };
      send(res, injected.status, outcomeError('transient', 'Simulated EHR outage (sandbox fault injection)'), headers);
      return;
    }
    if (injected?.mode === 'delay') {
      await new Promise((resolve) => setTimeout(resolve, injected.delayMs));
    }
    await handleFhir(req, res, url);
  } catch (err) {
    const status = err.status ?? (err instanceof OperationOutcomeError ? getStatus(err.outcome) : 500);
    const outcome = err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err);
    if (status >= 500) console.error('sandbox: request failed:', err);
    if (!res.headersSent) {
      if (isFhir) send(res, status, err.status ? outcomeError('invalid', err.message) : outcome);
      else sendJson(res, status, { error: err.message });
    }
  } finally {
    if (isFhir && !req.socket.destroyed) {
      logRequest({
        method: req.method,
        path: url.pathname,
        status: res.statusCode,
        ms: Math.round(performance.now() - started),
        ...(res.logExtra ?? {}),
      });
    }
  }
});

// Seed through HTTP, i.e. exactly the path a client's transaction takes (validation, atomicity).
async function loadSeed(file) {
  const bundle = readFileSync(file, 'utf8');
  const { address, family, port } = server.address();
  const host = address === '0.0.0.0' || address === '::' ? '127.0.0.1' : family === 'IPv6' ? `[${address}]` : address;
  const response = await fetch(`http://${host}:${port}/fhir`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/fhir+json' },
    body: bundle,
  });
  const result = await response.json();
  if (!response.ok) {
    throw new Error(`seed ${file} rejected (${response.status}): ${JSON.stringify(result.issue ?? result)}`);
  }
  return result.entry?.filter((e) => e.resource?.id).length ?? 0;
}

function shutdown(signal) {
  console.log(`sandbox: ${signal}, shutting down`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

server.on('error', (err) => {
  console.error(`sandbox: cannot listen on ${HOST}:${PORT}: ${err.message}`);
  process.exit(1);
});

server.listen(PORT, HOST, async () => {
  const { port } = server.address();
  subscriptions.defaultBase = `http://${HOST === '0.0.0.0' || HOST === '::' ? '127.0.0.1' : HOST}:${port}/fhir`;
  if (opts.seed) {
    try {
      const n = await loadSeed(opts.seed);
      requestLog.length = 0; // tests count their own requests, not the seed's
      console.log(`sandbox: seeded ${n} resources from ${opts.seed}`);
    } catch (err) {
      console.error(`sandbox: ${err.message}`);
      process.exit(1);
    }
  }
  const ms = Math.round(performance.now()); // since process start, imports included
  console.log(`sandbox listening on http://${HOST}:${port}/fhir`);
  console.error(`sandbox: ready in ${ms} ms, rss ${Math.round(process.memoryUsage().rss / 1048576)} MiB`);
});
