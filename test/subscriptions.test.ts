import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { Writable } from 'node:stream';
import { loadConfig } from '../src/config/config.ts';
import { createLogger } from '../src/log/logger.ts';
import { startServer, type RunningServer } from '../src/server.ts';
import type { InitResult } from '../src/admin/admin-service.ts';
import type { AuditEvent } from '../src/audit/audit-event.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';
import { NOTIFICATION_ID_HEADER, SUBSCRIPTION_CLIENT_ID } from '../src/subscriptions/subscription-worker.ts';
import { PAYLOAD_CONTENT_EXTENSION } from '../src/subscriptions/subscription-channel.ts';
import type { Delivery } from '../src/subscriptions/subscription-queue.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import { freePort, HTEST } from './support/harness.ts';
import { runCustos } from './support/custos-cli.ts';
import { until } from './support/until.ts';

// FHIR R4 rest-hook subscriptions (issue 7) against real loopback HTTP receivers registered as
// vendor endpoints: matching, payload classes through the egress gateway, retries, dead letters,
// replay, refusals, unregistered endpoints and project isolation. Embedded storage, or PostgreSQL
// with CUSTOS_TEST_DATABASE_URL.

const SHA = 'b'.repeat(64);
const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10);
const LOINC = 'http://loinc.org';
/** Retries 100, 200, 400, 800, 1000 ms apart: a receiver back within ~2 s of the second failure gets it. */
const MAX_ATTEMPTS = 6;
/** A claimed attempt is leased for 35 s (requestTimeoutMs * 3 + 5 s); a failed one is due within 1.2 s. */
const inFlight = (d: Delivery) => Date.parse(d.nextAttemptAt) - Date.now() > 5_000;

interface Hit {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
  at: number;
}

/** A loopback webhook receiver; `status` decides its answer. */
class Receiver {
  hits: Hit[] = [];
  status = 200;
  server: http.Server | undefined;
  constructor(readonly port: number) {}
  async listen(): Promise<void> {
    this.server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        this.hits.push({ method: req.method!, url: req.url!, headers: req.headers, body, at: Date.now() });
        res.writeHead(this.status).end();
      });
    });
    await new Promise<void>((r) => this.server!.listen(this.port, '127.0.0.1', r));
  }
  async close(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (!s) return;
    s.closeAllConnections();
    await new Promise<void>((r) => s.close(() => r()));
  }
  on(path: string): Hit[] {
    return this.hits.filter((h) => h.url.startsWith(path));
  }
}

describe('FHIR rest-hook subscriptions', () => {
  let storage: TestStorage;
  let server: RunningServer;
  let init: InitResult;
  let base: string;
  let adminToken: string;
  // Access tokens live five minutes: a cached one is renewed after one, so a slow machine that
  // stalls a test for minutes does not fail every later test with 401s.
  const tokens = new Map<string, { token: string; at: number }>();
  const ok = new Receiver(0); // vendor "Hooks": full, BAA
  const flaky = new Receiver(0); // vendor "Flaky": full, BAA; down or failing
  const nobaa = new Receiver(0); // vendor "No BAA": full, no BAA
  const noneOnly = new Receiver(0); // vendor "Nothing": class none, no BAA
  const stranger = new Receiver(0); // listening, never registered
  const receivers = [ok, flaky, nobaa, noneOnly, stranger];
  let projectB: { projectId: string; clientId: string; clientSecret?: string };

  const token = async (clientId = init.clientId, secret = init.clientSecret!) => {
    const cached = tokens.get(clientId);
    if (cached && Date.now() - cached.at < 60_000) return cached.token;
    const res = await fetch(`${server.url}/oauth/token`, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        scope: 'system/*.cruds',
        client_id: clientId,
        client_secret: secret,
      }),
    });
    const t = ((await res.json()) as { access_token: string }).access_token;
    tokens.set(clientId, { token: t, at: Date.now() });
    return t;
  };
  const fhir = async (path: string, init2: RequestInit & { as?: 'B' } = {}) => {
    const headers = new Headers(init2.headers);
    headers.set(
      'authorization',
      `Bearer ${init2.as === 'B' ? await token(projectB.clientId, projectB.clientSecret!) : await token()}`,
    );
    headers.set('x-purpose-of-use', 'TREAT');
    if (init2.body !== undefined) headers.set('content-type', 'application/fhir+json');
    return fetch(`${base}${path}`, { ...init2, headers });
  };
  const create = async (resource: Record<string, unknown>, as?: 'B') => {
    const res = await fhir(`/${resource.resourceType as string}`, {
      method: 'POST',
      body: JSON.stringify(resource),
      as,
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as Record<string, any>;
  };
  const observation = (code: string, extra: Record<string, unknown> = {}) => ({
    resourceType: 'Observation',
    meta: { security: [HTEST] },
    status: 'final',
    code: { coding: [{ system: LOINC, code }] },
    valueQuantity: { value: 42, unit: 'mg/dL' },
    ...extra,
  });
  const subscription = (
    endpoint: string,
    criteria: string,
    payload?: 'full-resource' | 'id-only' | 'empty',
  ) => ({
    resourceType: 'Subscription',
    meta: { security: [HTEST] },
    status: 'requested',
    reason: 'test',
    criteria,
    channel: {
      type: 'rest-hook',
      endpoint,
      header: ['Authorization: Bearer receiver-secret'],
      ...(payload === undefined
        ? {}
        : {
            payload: 'application/fhir+json',
            _payload: { extension: [{ url: PAYLOAD_CONTENT_EXTENSION, valueCode: payload }] },
          }),
    },
  });
  /** Creates a Subscription and waits until the worker has set its status. */
  const subscribe = async (s: Record<string, unknown>, as?: 'B') => {
    const created = await create(s, as);
    return until(`subscription ${created.id} to leave requested`, async () => {
      const r = (await (await fhir(`/Subscription/${created.id}`, { as })).json()) as Record<string, any>;
      return r.status !== 'requested' ? r : undefined;
    });
  };
  const admin = async (path: string, body: unknown) => {
    const res = await fetch(`${server.url}${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: adminToken },
      body: JSON.stringify(body),
    });
    return { status: res.status, json: (await res.json()) as any };
  };
  const auditEvents = async (): Promise<AuditEvent[]> => {
    const r = await server.core.auditDb.query<{ entry: Uint8Array }>(
      'SELECT entry FROM audit_entry ORDER BY seq',
    );
    return r.rows.map((x) => JSON.parse(Buffer.from(x.entry).toString('utf8')) as AuditEvent);
  };
  const deliveries = async (subscriptionId: string): Promise<Delivery[]> => {
    const r = await server.core.resourceDb.query<{ id: string }>(
      'SELECT id FROM subscription_delivery WHERE subscription_id = $1 ORDER BY created_at',
      [subscriptionId],
    );
    const out: Delivery[] = [];
    for (const x of r.rows) out.push((await server.subscriptions.queue.get(x.id))!);
    return out;
  };
  const url = (r: Receiver, path: string) => `http://127.0.0.1:${r.port}${path}`;

  before(async () => {
    for (const r of receivers) (r as { port: number }).port = await freePort();
    for (const r of receivers) await r.listen();
    storage = await createTestStorage();
    const port = await freePort();
    const config = loadConfig({ ...storage.env, CUSTOS_PORT: String(port) });
    const log = createLogger({
      level: 'warn',
      destination: new Writable({ write: (_c, _e, cb) => cb() }) as never,
    });
    server = await startServer(config, log, {
      subscriptions: {
        pollMs: 40,
        retryBaseMs: 100,
        retryMaxMs: 1000,
        maxAttempts: MAX_ATTEMPTS,
        refusalsBeforeError: 3,
      },
    });
    init = await server.core.admin.init();
    base = `${server.url}/fhir/R4`;
    adminToken = (await import('node:fs')).readFileSync(`${storage.dataDir}/admin-token`, 'utf8').trim();
    const v = server.core.vendors;
    const register = async (name: string, r: Receiver, phiClass: 'full' | 'none', baa: boolean) => {
      await v.addVendor({ name, services: ['webhooks'], phiClass });
      await v.addEndpoint({
        vendor: name,
        host: '127.0.0.1',
        port: r.port,
        protocol: 'http',
        allowPrivate: true,
      });
      if (baa)
        await v.recordBaa({ vendor: name, executedAt: day(-10), expiresOn: day(365), documentSha256: SHA });
    };
    await register('Hooks', ok, 'full', true);
    await register('Flaky', flaky, 'full', true);
    await register('No BAA', nobaa, 'full', false);
    await register('Nothing', noneOnly, 'none', false);
    const p = await server.core.admin.createProject({ name: 'Project B' });
    projectB = await server.core.admin.createClient({
      projectId: p.projectId,
      scopes: ['system/*.cruds'],
      purposes: ['TREAT'],
    });
  });

  after(async () => {
    await server?.close();
    for (const r of receivers) await r.close();
    await storage?.cleanup();
  });

  test('full-resource: a matching write is PUT to [endpoint]/Observation/id; a non-matching one is not sent', async () => {
    const sub = await subscribe(
      subscription(url(ok, '/full'), `Observation?code=${LOINC}|1234-5`, 'full-resource'),
    );
    assert.equal(sub.status, 'active', sub.error);
    assert.equal(sub.error, undefined);
    const miss = await create(observation('9999-9'));
    const hit = await create(observation('1234-5'));
    const [h] = await until('the notification', () => (ok.on('/full').length ? ok.on('/full') : undefined));
    assert.equal(h!.method, 'PUT');
    assert.equal(h!.url, `/full/Observation/${hit.id}`);
    assert.equal(h!.headers['content-type'], 'application/fhir+json');
    assert.equal(h!.headers.authorization, 'Bearer receiver-secret');
    const notificationId = h!.headers[NOTIFICATION_ID_HEADER] as string;
    assert.match(notificationId, /^[0-9a-f-]{36}$/);
    const body = JSON.parse(h!.body);
    assert.equal(body.id, hit.id);
    assert.equal(body.meta.versionId, '1');
    assert.equal(body.valueQuantity.value, 42);
    // The miss was written first: its change was processed no later than the hit's.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(ok.on('/full').length, 1);
    assert.ok(!ok.hits.some((x) => x.url.includes(miss.id)));
    // Audited: the worker's matching search and its read of the version (purpose HOPERAT), and the
    // egress with class full to the vendor.
    const events = await auditEvents();
    const mine = events.filter((e) => e.actor.clientId === SUBSCRIPTION_CLIENT_ID);
    assert.ok(
      mine.some(
        (e) => e.action === 'search' && e.resource?.type === 'Observation' && e.purpose === 'HOPERAT',
      ),
    );
    assert.ok(mine.some((e) => e.action === 'vread' && e.resource?.id === hit.id && e.outcome === 'success'));
    const egress = events.filter((e) => e.action === 'egress' && e.requestId === notificationId);
    assert.deepEqual(
      egress.map((e) => [e.outcome, e.egress?.dataClass, e.egress?.purpose, e.egress?.port]),
      [['success', 'full', 'subscription', ok.port]],
    );
    const [d] = await until('delivered', async () => {
      const ds = await deliveries(sub.id);
      return ds[0]?.status === 'delivered' ? ds : undefined;
    });
    assert.equal(d!.id, notificationId);
  });

  test('id-only (class limited) and empty (class none) payloads', async () => {
    const idOnly = await subscribe(
      subscription(url(ok, '/ids'), `Observation?code=${LOINC}|2222-2`, 'id-only'),
    );
    const empty = await subscribe(subscription(url(ok, '/empty'), `Observation?code=${LOINC}|2222-2`));
    assert.equal(idOnly.status, 'active');
    assert.equal(empty.status, 'active');
    const obs = await create(observation('2222-2'));
    await until('both notifications', () => ok.on('/ids').length === 1 && ok.on('/empty').length === 1);
    const [i] = ok.on('/ids');
    assert.equal(i!.method, 'POST');
    assert.equal(i!.url, '/ids');
    const bundle = JSON.parse(i!.body);
    assert.equal(bundle.resourceType, 'Bundle');
    assert.equal(bundle.id, i!.headers[NOTIFICATION_ID_HEADER]);
    assert.deepEqual(bundle.entry, [
      { request: { method: 'POST', url: `Observation/${obs.id}/_history/1` } },
    ]);
    assert.ok(!i!.body.includes('mg/dL'), 'no resource content in an id-only notification');
    const [e] = ok.on('/empty');
    assert.equal(e!.method, 'POST');
    assert.equal(e!.body, '');
    assert.equal(e!.headers['content-type'], undefined);
    const events = (await auditEvents()).filter((x) => x.action === 'egress');
    const cls = (h: Hit) =>
      events.find((x) => x.requestId === h.headers[NOTIFICATION_ID_HEADER])?.egress?.dataClass;
    assert.equal(cls(i!), 'limited');
    assert.equal(cls(e!), 'none');
  });

  test('receiver down: retried with backoff, delivered when it comes back', async () => {
    const sub = await subscribe(
      subscription(url(flaky, '/down'), `Observation?code=${LOINC}|3333-3`, 'full-resource'),
    );
    assert.equal(sub.status, 'active');
    await flaky.close();
    await create(observation('3333-3'));
    // Two attempts that have failed, not a second one still in flight (it could reach the receiver
    // once it is back, and be delivered on attempt 2).
    const [d] = await until('two failed attempts', async () => {
      const ds = await deliveries(sub.id);
      return ds[0] && ds[0].attempts >= 2 && ds[0].status === 'pending' && !inFlight(ds[0]) ? ds : undefined;
    });
    assert.equal(d!.lastError, 'ECONNREFUSED');
    await flaky.listen();
    await until('delivery after the receiver is back', () => flaky.on('/down').length === 1);
    const [after] = await until('delivered', async () => {
      const ds = await deliveries(sub.id);
      return ds[0]?.status === 'delivered' ? ds : undefined;
    });
    assert.ok(after!.attempts >= 3);
    assert.equal(flaky.on('/down')[0]!.headers[NOTIFICATION_ID_HEADER], d!.id);
  });

  test('after maxAttempts failures: a dead letter; the admin lists it and replays it; delivered with the same id', async () => {
    const sub = await subscribe(
      subscription(url(flaky, '/fail'), `Observation?code=${LOINC}|4444-4`, 'id-only'),
    );
    flaky.status = 503;
    try {
      await create(observation('4444-4'));
      const [d] = await until('a dead letter', async () => {
        const ds = await deliveries(sub.id);
        return ds[0]?.status === 'dead' ? ds : undefined;
      });
      assert.equal(d!.attempts, MAX_ATTEMPTS);
      assert.equal(d!.lastError, 'HTTP 503');
      assert.equal(flaky.on('/fail').length, MAX_ATTEMPTS);
      const listed = await admin('/admin/subscriptions/dead-letters', { subscriptionId: sub.id });
      assert.equal(listed.status, 200);
      assert.deepEqual(
        listed.json.deadLetters.map((x: Delivery) => [x.id, x.resourceType, x.status]),
        [[d!.id, 'Observation', 'dead']],
      );
      assert.ok(!JSON.stringify(listed.json).includes('mg/dL'));
      assert.ok(
        listed.json.deadLetters.every((x: Record<string, unknown>) => !('patients' in x)),
        'the admin listing does not say whose data a notification concerned',
      );
      flaky.status = 200;
      // The CLI, through the running server's admin API.
      const cli = await runCustos(['subscription', 'dead-letters', '--json'], storage.env);
      assert.equal(cli.code, 0, cli.stderr);
      assert.ok(
        (JSON.parse(cli.stdout) as { deadLetters: Delivery[] }).deadLetters.some((x) => x.id === d!.id),
      );
      const replay = await runCustos(['subscription', 'replay', '--id', d!.id, '--json'], storage.env);
      assert.equal(replay.code, 0, replay.stderr);
      await until('the replayed delivery', () => flaky.on('/fail').length === MAX_ATTEMPTS + 1);
      const last = flaky.on('/fail')[MAX_ATTEMPTS]!;
      assert.equal(last.headers[NOTIFICATION_ID_HEADER], d!.id);
      const [again] = await until('delivered', async () => {
        const ds = await deliveries(sub.id);
        return ds[0]?.status === 'delivered' ? ds : undefined;
      });
      assert.equal(again!.replays, 1);
      const codes = (await auditEvents()).filter((e) => e.action === 'admin').map((e) => e.code);
      assert.ok(codes.includes('subscription.dead_letters_listed'));
      assert.ok(codes.includes('subscription.replayed'));
      // Replaying what is not a dead letter: 404, and bad ids 400.
      assert.equal((await admin('/admin/subscriptions/replay', { id: d!.id })).status, 404);
      assert.equal((await admin('/admin/subscriptions/replay', { id: 'x' })).status, 400);
    } finally {
      flaky.status = 200;
    }
  });

  test('a vendor without a BAA, or not allowed the class, gets nothing; refusals are audited; the subscription goes to error', async () => {
    const full = await subscribe(
      subscription(url(nobaa, '/x'), `Observation?code=${LOINC}|5555-5`, 'full-resource'),
    );
    const ids = await subscribe(
      subscription(url(noneOnly, '/ids'), `Observation?code=${LOINC}|5555-5`, 'id-only'),
    );
    const empty = await subscribe(subscription(url(noneOnly, '/empty'), `Observation?code=${LOINC}|5555-5`));
    for (const s of [full, ids, empty]) assert.equal(s.status, 'active');
    await create(observation('5555-5'));
    // Class none needs no BAA: the empty notification gets through to the same vendor.
    await until('the empty notification', () => noneOnly.on('/empty').length === 1);
    for (const s of [full, ids]) {
      const sub = await until(`subscription ${s.id} in error`, async () => {
        const r = (await (await fhir(`/Subscription/${s.id}`)).json()) as Record<string, any>;
        return r.status === 'error' ? r : undefined;
      });
      assert.match(sub.error, /refused by the egress gateway 3 times/);
      const [d] = await deliveries(s.id);
      assert.equal(d!.status, 'dead');
    }
    assert.equal(nobaa.hits.length, 0);
    assert.equal(noneOnly.on('/ids').length, 0);
    const refusals = (await auditEvents()).filter((e) => e.action === 'egress' && e.outcome === 'refused');
    assert.ok(refusals.some((e) => e.code === 'EGRESS_BAA_INACTIVE' && e.egress?.port === nobaa.port));
    assert.ok(
      refusals.some(
        (e) =>
          e.code === 'EGRESS_CLASS_NOT_ALLOWED' &&
          e.egress?.port === noneOnly.port &&
          e.egress.dataClass === 'limited',
      ),
    );
  });

  test('an unregistered endpoint (127.0.0.1) or another channel type: status error, nothing sent', async () => {
    const s = await subscribe(subscription(url(stranger, '/hook'), `Observation?code=${LOINC}|6666-6`));
    assert.equal(s.status, 'error');
    assert.match(s.error, /not a registered vendor endpoint/);
    const metadata = await subscribe(
      subscription('http://169.254.169.254/latest', `Observation?code=${LOINC}|6666-6`),
    );
    assert.equal(metadata.status, 'error');
    const ws = await subscribe({
      ...subscription(url(ok, '/ws'), `Observation?code=${LOINC}|6666-6`),
      channel: { type: 'websocket' },
    });
    assert.equal(ws.status, 'error');
    assert.match(ws.error, /Only channel.type rest-hook/);
    const bad = await subscribe(subscription(url(ok, '/bad'), 'Observation?no-such-param=1'));
    assert.equal(bad.status, 'error');
    assert.match(bad.error, /^criteria/);
    // A client writing `active` itself does not skip the endpoint check.
    const sneaky = await create({
      ...subscription(url(stranger, '/sneaky'), `Observation?code=${LOINC}|6666-6`),
      status: 'active',
    });
    await until('the client-activated subscription in error', async () => {
      const r = (await (await fhir(`/Subscription/${sneaky.id}`)).json()) as Record<string, any>;
      return r.status === 'error';
    });
    // A good subscription to see that the write was processed.
    await subscribe(subscription(url(ok, '/seen6'), `Observation?code=${LOINC}|6666-6`));
    await create(observation('6666-6'));
    await until('the control notification', () => ok.on('/seen6').length === 1);
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(stranger.hits.length, 0);
    assert.equal(ok.on('/ws').length + ok.on('/bad').length, 0);
    const egress = (await auditEvents()).filter(
      (e) => e.action === 'egress' && e.egress?.port === stranger.port,
    );
    assert.equal(egress.length, 0, 'never even attempted');
  });

  test("project isolation: project A's subscription never gets project B's data", async () => {
    const a = await subscribe(
      subscription(url(ok, '/iso-a'), `Observation?code=${LOINC}|7777-7`, 'full-resource'),
    );
    const b = await subscribe(
      subscription(url(ok, '/iso-b'), `Observation?code=${LOINC}|7777-7`, 'full-resource'),
      'B',
    );
    assert.equal(a.status, 'active');
    assert.equal(b.status, 'active');
    const fromB = await create(observation('7777-7', { valueQuantity: { value: 7, unit: 'from-b' } }), 'B');
    const fromA = await create(observation('7777-7'));
    await until('both projects notified', () => ok.on('/iso-a').length === 1 && ok.on('/iso-b').length === 1);
    await new Promise((r) => setTimeout(r, 150));
    assert.deepEqual(
      ok.on('/iso-a').map((h) => h.url),
      [`/iso-a/Observation/${fromA.id}`],
    );
    assert.deepEqual(
      ok.on('/iso-b').map((h) => h.url),
      [`/iso-b/Observation/${fromB.id}`],
    );
    assert.ok(!ok.on('/iso-a')[0]!.body.includes('from-b'));
  });

  test("a production project's PHI notifications need its BAA to cover subscriptions; an empty one does not", async () => {
    // Project B becomes production under a BAA covering the FHIR API and the audit log only.
    const baa = (services: string[]) =>
      server.core.admin.recordBaa({
        projectId: projectB.projectId,
        counterparty: 'Example Clinic LLC',
        signedBy: 'Dana Roe',
        signedAt: day(-3),
        services,
        documentSha256: SHA,
      });
    await baa(['fhir', 'audit']);
    const ids = await subscribe(
      subscription(url(ok, '/prod-ids'), `Observation?code=${LOINC}|8888-8`, 'id-only'),
      'B',
    );
    assert.equal(ids.status, 'error');
    assert.match(ids.error, /BAA does not cover the service subscriptions/);
    const empty = await subscribe(
      subscription(url(ok, '/prod-empty'), `Observation?code=${LOINC}|8888-8`),
      'B',
    );
    assert.equal(empty.status, 'active', empty.error);
    // Covered by a further BAA: requested again, it activates.
    await baa(['subscriptions']);
    const res = await fhir(`/Subscription/${ids.id}`, {
      method: 'PUT',
      body: JSON.stringify({ ...ids, status: 'requested', error: undefined }),
      as: 'B',
    });
    assert.equal(res.status, 200, await res.clone().text());
    const again = await until('the subscription to leave requested', async () => {
      const r = (await (await fhir(`/Subscription/${ids.id}`, { as: 'B' })).json()) as Record<string, any>;
      return r.status !== 'requested' ? r : undefined;
    });
    assert.equal(again.status, 'active', again.error);
  });
});
