// FHIR Subscriptions for the sandbox EHR: rest-hook delivery, R4 with the Subscriptions R5 Backport IG
// (topic-based: criteria = topic canonical URL, filters in _criteria extensions) and classic R4
// criteria ("Communication?category=...").
//
// Notifications are Backport-IG notification Bundles (type `history`, first entry a SubscriptionStatus
// as an R4 Parameters) for both kinds: handshake when a Subscription is requested, event-notification
// after committed writes, heartbeat when idle. Deliveries run outside the repository's request queue:
// a slow or failing receiver never holds up FHIR requests.
//
// Topics the sandbox knows are recognised by the last path segment of the canonical URL (any base), see
// TOPICS below and README.md. Filters are FHIR search criteria evaluated with Medplum's matcher, the
// same code that answers searches.

import { randomUUID } from 'node:crypto';
import {
  OperationOutcomeError,
  badRequest,
  getResourceTypes,
  isResourceType,
  matchesSearchRequest,
  parseSearchRequest,
} from '@medplum/core';
import { checkSearchSupported } from './repository.mjs';

export const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const EXT = {
  filter: `${BACKPORT}/backport-filter-criteria`,
  heartbeat: `${BACKPORT}/backport-heartbeat-period`,
  timeout: `${BACKPORT}/backport-timeout`,
  maxCount: `${BACKPORT}/backport-max-count`,
  content: `${BACKPORT}/backport-payload-content`,
};
const CONTENT_CODES = new Set(['empty', 'id-only', 'full-resource']);

// Topics by the last segment of their canonical URL. Besides these, a segment naming a resource type
// (`Communication`, `communication`, `questionnaire-response`) is the topic "that type was created or
// updated". Each topic fires on create and update (never on delete, as in R4 criteria subscriptions).
export const TOPICS = {
  'patient-input': {
    description: 'a Communication or QuestionnaireResponse was created or updated',
    types: ['Communication', 'QuestionnaireResponse'],
    criteria: [],
  },
  'questionnaire-response-completed': {
    description: 'a QuestionnaireResponse with status completed was created or updated',
    types: ['QuestionnaireResponse'],
    criteria: ['QuestionnaireResponse?status=completed'],
  },
  'questionnaire-completed': {
    description: 'same as questionnaire-response-completed',
    types: ['QuestionnaireResponse'],
    criteria: ['QuestionnaireResponse?status=completed'],
  },
  'chat-message': {
    description: 'a counselling-chat Communication was created or updated',
    types: ['Communication'],
    criteria: ['Communication?category=counselling-chat'],
  },
};
export const TOPIC_BASE = 'http://psych-cds.example.org/fhir/SubscriptionTopic';

const TYPE_BY_SEGMENT = new Map();
function typeForSegment(segment) {
  if (TYPE_BY_SEGMENT.size === 0) {
    for (const t of getResourceTypes()) TYPE_BY_SEGMENT.set(t.toLowerCase(), t);
  }
  return TYPE_BY_SEGMENT.get(segment.replaceAll('-', '').toLowerCase());
}

export function resolveTopic(url) {
  let segment;
  try {
    segment = new URL(url).pathname.split('/').filter(Boolean).at(-1) ?? '';
  } catch {
    return undefined;
  }
  const known = TOPICS[segment.toLowerCase()];
  if (known) return known;
  const type = typeForSegment(segment);
  return type ? { description: `a ${type} was created or updated`, types: [type], criteria: [] } : undefined;
}

const invalid = (message) => new OperationOutcomeError(badRequest(message, 'Subscription'));

function parseCriteria(text, what) {
  if (typeof text !== 'string' || !/^[A-Za-z]+(\?|$)/.test(text)) {
    throw invalid(`${what} must be FHIR search criteria such as "Communication?status=completed": ${text}`);
  }
  const type = text.split('?')[0];
  if (!isResourceType(type)) throw invalid(`${what}: unknown resource type ${type}`);
  let req;
  try {
    req = parseSearchRequest(text);
    checkSearchSupported(req);
  } catch (err) {
    const detail = err instanceof OperationOutcomeError ? err.outcome.issue?.[0]?.details?.text : err.message;
    throw invalid(`${what} "${text}": ${detail}`);
  }
  return { resourceType: type, filters: req.filters ?? [] };
}

const extension = (element, url) => element?.extension?.find((e) => e.url === url);

// The delivery configuration of a Subscription, or a 400 for what the sandbox cannot honour.
export function parseSubscription(resource) {
  const channel = resource.channel ?? {};
  if (channel.type !== 'rest-hook') {
    throw invalid(`channel.type "${channel.type}" is not supported by the psych-cds sandbox (rest-hook only)`);
  }
  let endpoint;
  try {
    endpoint = new URL(channel.endpoint);
  } catch {
    throw invalid(`channel.endpoint must be an http(s) URL: ${channel.endpoint}`);
  }
  if (endpoint.protocol !== 'http:' && endpoint.protocol !== 'https:') {
    throw invalid(`channel.endpoint must be an http(s) URL: ${channel.endpoint}`);
  }
  const headers = [];
  for (const line of channel.header ?? []) {
    const colon = line.indexOf(':');
    if (colon <= 0) throw invalid(`channel.header must be "Name: value": ${line}`);
    headers.push([line.slice(0, colon).trim(), line.slice(colon + 1).trim()]);
  }
  const mime = channel.payload ?? 'application/fhir+json';
  if (!/^application\/(fhir\+)?json\b/.test(mime)) {
    throw invalid(`channel.payload ${mime} is not supported by the psych-cds sandbox (JSON only)`);
  }
  const criteria = resource.criteria;
  const topicUrl = /^https?:\/\//.test(criteria ?? '') ? criteria : undefined;
  const contentExt = extension(channel._payload, EXT.content)?.valueCode;
  if (contentExt !== undefined && !CONTENT_CODES.has(contentExt)) {
    throw invalid(`backport-payload-content must be empty, id-only or full-resource: ${contentExt}`);
  }
  // Classic R4: a payload MIME type means "send the resource"; topic-based defaults to id-only.
  const content = contentExt ?? (topicUrl ? 'id-only' : channel.payload ? 'full-resource' : 'empty');
  const seconds = (ext, fallback) => {
    const v = extension(channel, ext)?.valueUnsignedInt ?? extension(channel, ext)?.valuePositiveInt;
    return Number.isInteger(v) && v >= 0 ? v : fallback;
  };

  const rules = new Map(); // resource type -> [search requests that must all match]
  if (topicUrl) {
    const topic = resolveTopic(topicUrl);
    if (!topic) {
      const known = Object.keys(TOPICS).map((k) => `${TOPIC_BASE}/${k}`);
      throw invalid(
        `Unknown SubscriptionTopic ${topicUrl}; the psych-cds sandbox knows ${known.join(', ')} and ` +
          `${TOPIC_BASE}/<ResourceType> (matched on the last URL segment)`
      );
    }
    for (const type of topic.types) rules.set(type, []);
    for (const c of topic.criteria) {
      const req = parseCriteria(c, 'topic criteria');
      rules.get(req.resourceType).push(req);
    }
    for (const ext of resource._criteria?.extension ?? []) {
      if (ext.url !== EXT.filter) continue;
      const req = parseCriteria(ext.valueString, 'backport-filter-criteria');
      if (!rules.has(req.resourceType)) {
        throw invalid(`Filter ${ext.valueString} is for ${req.resourceType}, not covered by topic ${topicUrl}`);
      }
      rules.get(req.resourceType).push(req);
    }
  } else {
    const req = parseCriteria(criteria, 'criteria');
    rules.set(req.resourceType, [req]);
  }
  return {
    endpoint: endpoint.href,
    headers,
    contentType: mime,
    content,
    topic: topicUrl,
    rules,
    heartbeatMs: seconds(EXT.heartbeat, 0) * 1000,
    timeoutMs: Math.max(1, seconds(EXT.timeout, 10)) * 1000,
    maxCount: Math.max(1, seconds(EXT.maxCount, 100)),
  };
}

function matches(config, resource) {
  const rules = config.rules.get(resource.resourceType);
  return rules !== undefined && rules.every((req) => matchesSearchRequest(resource, req));
}

// ---------------------------------------------------------------------------------------------------

class Sub {
  constructor(id) {
    this.id = id;
    this.generation = 0;
    this.status = 'requested';
    this.verified = false; // a handshake succeeded for the current configuration
    this.eventCount = 0; // events-since-subscription-start
    this.queue = []; // events not yet delivered, from index `head`
    this.head = 0;
    this.inFlight = null; // AbortController of the request under way
    this.timer = null;
    this.timerAt = 0;
    this.failures = 0; // consecutive failed deliveries
    this.retryAt = 0;
    this.lastAttemptAt = 0;
    this.lastSentAt = 0;
    this.lastError = null;
    this.delivered = 0; // events delivered
    this.notifications = 0; // notification requests answered 2xx
    this.dropped = false;
  }

  get pending() {
    return this.queue.length - this.head;
  }

  // Events are queued while the subscription is active, and kept (and retried) while it is in error
  // after delivery failures: nothing is lost while a receiver is down.
  get accepting() {
    return this.verified && (this.status === 'active' || this.status === 'error');
  }
}

export class SubscriptionManager {
  #subs = new Map();
  #internal = false;

  /**
   * @param {object} options
   * @param {import('./repository.mjs').SandboxRepository} options.repo
   * @param {(fn: () => Promise<any>) => Promise<any>} options.serial  the server's request queue
   */
  constructor({
    repo,
    serial,
    backoffMs = 200,
    maxBackoffMs = 30000,
    batchIntervalMs = 50,
    maxBatch = 100,
    errorAfter = 3,
    handshakeAttempts = 4,
  }) {
    this.repo = repo;
    this.serial = serial;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.batchIntervalMs = batchIntervalMs;
    this.maxBatch = maxBatch;
    this.errorAfter = errorAfter;
    this.handshakeAttempts = handshakeAttempts;
    this.defaultBase = 'http://127.0.0.1/fhir';
    this.requestBase = undefined; // base URL of the FHIR request being handled (set by the server)
    repo.beforeWrite = (resource) => this.#beforeWrite(resource);
    repo.onCommit = (changes) => this.#onCommit(changes);
  }

  reset() {
    for (const sub of this.#subs.values()) this.#drop(sub);
    this.#subs.clear();
  }

  state() {
    return [...this.#subs.values()].map((s) => ({
      id: s.id,
      status: s.status,
      endpoint: s.config?.endpoint,
      topic: s.config?.topic ?? null,
      content: s.config?.content,
      eventsSinceSubscriptionStart: s.eventCount,
      queued: s.pending,
      delivered: s.delivered,
      notifications: s.notifications,
      consecutiveFailures: s.failures,
      lastError: s.lastError,
    }));
  }

  // The SubscriptionStatus of GET Subscription/id/$status (type query-status).
  statusBundle(id, base) {
    const sub = this.#subs.get(id);
    if (!sub?.config) return undefined;
    const status = this.#statusParameters(sub, 'query-status', [], base);
    return { resourceType: 'Bundle', type: 'searchset', total: 1, entry: [{ resource: status, search: { mode: 'match' } }] };
  }

  backoff(failures) {
    return Math.min(this.backoffMs * 2 ** Math.max(0, failures - 1), this.maxBackoffMs);
  }

  // -- repository hooks (run inside the request queue) --------------------------------------------------

  #beforeWrite(resource) {
    if (resource.resourceType !== 'Subscription' || this.#internal) return resource;
    if (resource.status !== 'requested' && resource.status !== 'active') return resource; // off, error: inert
    parseSubscription(resource); // 400 for what cannot be delivered
    // The server owns the transition to active: it follows a successful handshake.
    const { error, ...rest } = resource;
    return { ...rest, status: 'requested' };
  }

  #onCommit(changes) {
    for (const change of changes) {
      if (change.resourceType === 'Subscription') {
        if (!this.#internal) this.#configure(change);
        continue;
      }
      if (change.kind !== 'write') continue; // deletes notify nothing (as in R4)
      for (const sub of this.#subs.values()) {
        if (sub.accepting && matches(sub.config, change.resource)) this.#enqueue(sub, change);
      }
    }
  }

  #configure(change) {
    let sub = this.#subs.get(change.id);
    if (change.kind === 'delete') {
      if (sub) {
        this.#drop(sub);
        this.#subs.delete(change.id);
      }
      return;
    }
    const resource = change.resource;
    if (!sub) {
      sub = new Sub(change.id);
      this.#subs.set(change.id, sub);
    }
    sub.generation++;
    sub.base = this.requestBase ?? sub.base ?? this.defaultBase;
    this.#clearTimer(sub);
    if (resource.status !== 'requested') {
      // Switched off (or set to error) by a client: nothing more is sent; undelivered events are dropped.
      sub.status = resource.status;
      sub.verified = false;
      sub.queue = [];
      sub.head = 0;
      return;
    }
    sub.config = parseSubscription(resource);
    sub.status = 'requested';
    sub.verified = false;
    sub.failures = 0;
    sub.retryAt = 0;
    void this.#handshake(sub, sub.generation, 1);
  }

  #enqueue(sub, change) {
    const resource = change.resource;
    sub.queue.push({
      number: ++sub.eventCount,
      timestamp: resource.meta?.lastUpdated ?? new Date().toISOString(),
      resource,
      created: change.previous === undefined,
    });
    this.#kick(sub);
  }

  #drop(sub) {
    sub.dropped = true;
    this.#clearTimer(sub);
    sub.inFlight?.abort();
    sub.queue = [];
    sub.head = 0;
  }

  // -- delivery ---------------------------------------------------------------------------------------

  async #handshake(sub, generation, attempt) {
    if (sub.dropped || sub.generation !== generation) return;
    if (sub.inFlight) {
      // A notification for the previous configuration is still under way; handshake after it.
      setTimeout(() => this.#handshake(sub, generation, attempt), 10).unref();
      return;
    }
    const ok = await this.#post(sub, this.#bundle(sub, 'handshake', []));
    if (sub.dropped || sub.generation !== generation) return;
    if (ok) {
      sub.verified = true;
      sub.status = 'active';
      sub.failures = 0;
      sub.lastSentAt = Date.now();
      this.#persist(sub, 'active');
      this.#kick(sub);
    } else if (attempt < this.handshakeAttempts) {
      setTimeout(() => this.#handshake(sub, generation, attempt + 1), this.backoff(attempt)).unref();
    } else {
      sub.status = 'error';
      this.#persist(sub, 'error', `handshake failed: ${sub.lastError}`);
    }
  }

  // Schedule the next send: queued events (at most one notification per batch interval, none before the
  // retry time), else a heartbeat when one is due.
  #kick(sub) {
    if (sub.dropped || !sub.accepting || sub.inFlight) return;
    const now = Date.now();
    let at;
    if (sub.pending > 0) at = Math.max(now, sub.retryAt, sub.lastAttemptAt + this.batchIntervalMs);
    else if (sub.config.heartbeatMs > 0) at = Math.max(now, sub.lastSentAt + sub.config.heartbeatMs);
    else return;
    if (sub.timer && sub.timerAt <= at) return;
    this.#clearTimer(sub);
    sub.timerAt = at;
    sub.timer = setTimeout(() => {
      sub.timer = null;
      void this.#send(sub);
    }, at - now);
    sub.timer.unref();
  }

  #clearTimer(sub) {
    if (sub.timer) clearTimeout(sub.timer);
    sub.timer = null;
  }

  async #send(sub) {
    if (sub.dropped || !sub.accepting || sub.inFlight) return;
    const now = Date.now();
    const generation = sub.generation;
    let events = [];
    let type;
    if (sub.pending > 0) {
      if (now < sub.retryAt) return this.#kick(sub);
      events = sub.queue.slice(sub.head, sub.head + Math.min(this.maxBatch, sub.config.maxCount));
      type = 'event-notification';
    } else if (sub.config.heartbeatMs > 0 && now - sub.lastSentAt >= sub.config.heartbeatMs) {
      type = 'heartbeat';
    } else {
      return this.#kick(sub);
    }
    sub.lastAttemptAt = now;
    const ok = await this.#post(sub, this.#bundle(sub, type, events));
    if (sub.dropped) return;
    if (ok) {
      sub.head += events.length;
      sub.delivered += events.length;
      if (sub.head > 1024 && sub.head * 2 > sub.queue.length) {
        sub.queue = sub.queue.slice(sub.head);
        sub.head = 0;
      }
      sub.failures = 0;
      sub.retryAt = 0;
      sub.lastSentAt = Date.now();
      if (sub.status === 'error' && sub.generation === generation) {
        sub.status = 'active'; // the receiver is back and has everything queued meanwhile
        this.#persist(sub, 'active');
      }
    } else {
      sub.failures++;
      if (events.length > 0) sub.retryAt = Date.now() + this.backoff(sub.failures);
      else sub.lastSentAt = Date.now(); // a failed heartbeat: the next one after another period
      if (sub.failures >= this.errorAfter && sub.status === 'active' && sub.generation === generation) {
        sub.status = 'error';
        this.#persist(sub, 'error', `delivery failed ${sub.failures} times: ${sub.lastError}`);
      }
    }
    this.#kick(sub);
  }

  async #post(sub, bundle) {
    const controller = new AbortController();
    sub.inFlight = controller;
    const timer = setTimeout(() => controller.abort(), sub.config.timeoutMs);
    try {
      const headers = new Headers();
      for (const [name, value] of sub.config.headers) headers.append(name, value);
      headers.set('Content-Type', sub.config.contentType);
      const res = await fetch(sub.config.endpoint, {
        method: 'POST',
        headers,
        body: JSON.stringify(bundle),
        signal: controller.signal,
      });
      await res.arrayBuffer().catch(() => undefined);
      if (res.ok) {
        sub.notifications++;
        sub.lastError = null;
        return true;
      }
      sub.lastError = `HTTP ${res.status}`;
      return false;
    } catch (err) {
      sub.lastError = controller.signal.aborted ? 'timed out or cancelled' : (err.cause?.code ?? err.message);
      return false;
    } finally {
      clearTimeout(timer);
      sub.inFlight = null;
    }
  }

  // Write the server-side status change into the stored Subscription (a new version), through the
  // request queue like any write. Skipped when a client changed the Subscription meanwhile.
  #persist(sub, status, error) {
    const generation = sub.generation;
    this.serial(async () => {
      if (sub.dropped || sub.generation !== generation) return;
      let current;
      try {
        current = await this.repo.readResource('Subscription', sub.id);
      } catch {
        return; // deleted meanwhile
      }
      const { error: _old, ...rest } = current;
      const next = { ...rest, status, ...(error ? { error } : {}) };
      this.#internal = true;
      try {
        await this.repo.updateResource(next);
      } finally {
        this.#internal = false;
      }
    }).catch((err) => console.error('sandbox: cannot record Subscription status:', err));
  }

  // -- notification Bundles (Backport IG, R4) ---------------------------------------------------------

  #statusParameters(sub, type, events, base) {
    const content = sub.config.content;
    const since = type === 'event-notification' ? events.at(-1).number : sub.eventCount;
    const parameter = [
      { name: 'subscription', valueReference: { reference: `${base}/Subscription/${sub.id}` } },
      ...(sub.config.topic && content !== 'empty' ? [{ name: 'topic', valueCanonical: sub.config.topic }] : []),
      { name: 'status', valueCode: sub.status },
      { name: 'type', valueCode: type },
      { name: 'events-since-subscription-start', valueString: String(since) },
    ];
    for (const e of events) {
      const part = [
        { name: 'event-number', valueString: String(e.number) },
        { name: 'timestamp', valueInstant: e.timestamp },
      ];
      if (content !== 'empty') {
        const r = e.resource;
        part.push({ name: 'focus', valueReference: { reference: `${base}/${r.resourceType}/${r.id}/_history/${r.meta.versionId}` } });
      }
      parameter.push({ name: 'notification-event', part });
    }
    const id = randomUUID();
    return {
      resourceType: 'Parameters',
      id,
      meta: { profile: [`${BACKPORT}/backport-subscription-status-r4`] },
      parameter,
    };
  }

  #bundle(sub, type, events) {
    const base = sub.base;
    const status = this.#statusParameters(sub, type, events, base);
    const entry = [
      {
        fullUrl: `urn:uuid:${status.id}`,
        resource: status,
        request: { method: 'GET', url: `${base}/Subscription/${sub.id}/$status` },
        response: { status: '200' },
      },
    ];
    if (sub.config.content !== 'empty') {
      for (const e of events) {
        const r = e.resource;
        entry.push({
          fullUrl: `${base}/${r.resourceType}/${r.id}`,
          ...(sub.config.content === 'full-resource' ? { resource: r } : {}),
          request: e.created ? { method: 'POST', url: r.resourceType } : { method: 'PUT', url: `${r.resourceType}/${r.id}` },
          response: {
            status: e.created ? '201' : '200',
            etag: `W/"${r.meta.versionId}"`,
            lastModified: r.meta.lastUpdated,
          },
        });
      }
    }
    return {
      resourceType: 'Bundle',
      id: randomUUID(),
      meta: { profile: [`${BACKPORT}/backport-subscription-notification-r4`] },
      type: 'history',
      timestamp: new Date().toISOString(),
      entry,
    };
  }
}
