/**
 * FHIR rest-hook subscription delivery on loopback (issue 7): `npm run -s bench:subscriptions [-- flags]`.
 *
 * A real server (`startServer`, embedded PGlite, or PostgreSQL with CUSTOS_BENCH_DATABASE_URL /
 * CUSTOS_TEST_DATABASE_URL and `--storage postgres`), a webhook receiver on 127.0.0.1 registered as
 * a vendor endpoint (full class, BAA), one Subscription per payload kind. Measured in the same run:
 *   post         a plain POST round trip from this process to the receiver (the network floor);
 *   write        a FHIR create of an Observation over HTTP that matches no subscription (the write alone);
 *   latency      sequential, each after a random pause of 0–poll ms: create a matching Observation,
 *                wait for the webhook; from the create's request to the webhook's arrival
 *                (`write→hook`), and from the 201 to it (`201→hook`);
 *   throughput   `--burst` matching creates sent 8 at a time; notifications per second from the first
 *                create to the last webhook, next to the creates per second of the same burst (live);
 *                then the worker is stopped, `--burst` creates are written, a new worker started, and
 *                the backlog's notifications per second measured from its start to the last webhook
 *                (detection and delivery alone, not bounded by the write rate).
 * The worker polls the change feed every `--poll-ms` (default: the server default, 250 ms), which
 * bounds the latency from below on average by half of it; `--poll-ms 20` shows the cost without it.
 * Payload `email` (opt in: `--payload full-resource,empty,email`): id-only e-mail through a real
 * SMTP server on loopback (smtp-server, implicit TLS with a throwaway CA from openssl, login
 * required) registered as the relay (CUSTOS_SMTP_URL); a notification arrives when the relay has
 * taken the message (250 after DATA).
 * Flags: --iterations N (latency samples per payload, default 100), --burst N (default 500),
 * --poll-ms N, --payload full-resource,empty[,email], --storage embedded|postgres, --json.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { loadConfig } from '../src/config/config.ts';
import { createLogger } from '../src/log/logger.ts';
import { startServer } from '../src/server.ts';
import { loadSmtpCa, startSubscriptionWorker } from '../src/subscriptions/subscription-service.ts';
import {
  DEFAULT_SUBSCRIPTION_OPTIONS,
  NOTIFICATION_ID_HEADER,
} from '../src/subscriptions/subscription-worker.ts';
import { PAYLOAD_CONTENT_EXTENSION } from '../src/subscriptions/subscription-channel.ts';
import { SMTPServer } from 'smtp-server';
import { simpleParser } from 'mailparser';
import { makePki } from '../test/support/test-pki.ts';

const { values: flags } = parseArgs({
  options: {
    iterations: { type: 'string', default: '100' },
    burst: { type: 'string', default: '500' },
    'poll-ms': { type: 'string' },
    payload: { type: 'string', default: 'full-resource,empty' },
    storage: { type: 'string', default: 'embedded' },
    json: { type: 'boolean', default: false },
  },
});
const ITER = Number(flags.iterations);
const BURST = Number(flags.burst);
const POLL = flags['poll-ms'] ? Number(flags['poll-ms']) : DEFAULT_SUBSCRIPTION_OPTIONS.pollMs;
const PAYLOADS = flags.payload!.split(',') as ('full-resource' | 'empty' | 'email')[];
const HTEST = { system: 'http://terminology.hl7.org/CodeSystem/v3-ActReason', code: 'HTEST' };
const say = (s: string) => process.stderr.write(`subscription-bench: ${s}\n`);

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};
const summary = (xs: number[]) => ({
  p50: +pct(xs, 50).toFixed(2),
  p95: +pct(xs, 95).toFixed(2),
  mean: +(xs.reduce((a, b) => a + b, 0) / xs.length).toFixed(2),
});

// ---- the receiver: resolves a waiter per notification path ----------------------------------
const waiters = new Map<string, (t: number) => void>();
const arrived = new Map<string, number>();
const seen = new Set<string>();
const receiver = http.createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    const t = performance.now();
    const id = String(req.headers[NOTIFICATION_ID_HEADER] ?? '');
    const dup = seen.has(id);
    seen.add(id);
    res.writeHead(200).end();
    if (dup) return;
    const key = req.url!;
    const w = waiters.get(key);
    if (w) {
      waiters.delete(key);
      w(t);
    } else arrived.set(key, t);
  });
});
receiver.keepAliveTimeout = 60_000;
await new Promise<void>((r) => receiver.listen(0, '127.0.0.1', r));
const rport = (receiver.address() as { port: number }).port;
const waitFor = (key: string) =>
  new Promise<number>((resolve) => {
    const t = arrived.get(key);
    if (t !== undefined) {
      arrived.delete(key);
      resolve(t);
    } else waiters.set(key, resolve);
  });

// ---- storage and server -----------------------------------------------------------------------
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-subbench-'));
const env: Record<string, string> = { CUSTOS_DATA_DIR: dataDir, CUSTOS_PORT: '0' };

// ---- the SMTP relay (payload email): a message's arrival resolves the waiter of its resource ---
let relay: SMTPServer | undefined;
let relayPort = 0;
if (PAYLOADS.includes('email')) {
  const pki = makePki(path.join(dataDir, 'pki'));
  relay = new SMTPServer({
    secure: true,
    key: fs.readFileSync(pki.serverKey),
    cert: fs.readFileSync(pki.serverCert),
    authMethods: ['PLAIN'],
    logger: false,
    onAuth: (_auth, _session, cb) => cb(null, { user: 'bench' }),
    onData: (stream, _session, cb) => {
      let raw = '';
      stream.on('data', (c: Buffer) => (raw += c.toString('utf8')));
      stream.on('end', async () => {
        const t = performance.now();
        cb();
        // The text may be quoted-printable or base64: read it as a mail client would.
        const text = (await simpleParser(raw)).text ?? '';
        const id = /Resource: Observation\/([A-Za-z0-9.-]+)\/_history/.exec(text)?.[1];
        if (!id) return;
        const key = `/email/Observation/${id}`;
        const w = waiters.get(key);
        if (w) {
          waiters.delete(key);
          w(t);
        } else arrived.set(key, t);
      });
    },
  });
  await new Promise<void>((r) => relay!.listen(0, '127.0.0.1', r));
  relayPort = (relay.server.address() as { port: number }).port;
  Object.assign(env, {
    CUSTOS_SMTP_URL: `smtps://127.0.0.1:${relayPort}`,
    CUSTOS_SMTP_FROM: 'bench@example.org',
    CUSTOS_SMTP_USER: 'bench',
    CUSTOS_SMTP_PASSWORD: 'bench-password-0001',
    CUSTOS_SMTP_CA_FILE: pki.caFile,
    CUSTOS_SMTP_RECIPIENT_DOMAINS: 'example.org',
  });
}
const pgAdmin = process.env.CUSTOS_BENCH_DATABASE_URL || process.env.CUSTOS_TEST_DATABASE_URL;
let dbName: string | undefined;
if (flags.storage === 'postgres') {
  if (!pgAdmin)
    throw new Error('--storage postgres needs CUSTOS_BENCH_DATABASE_URL or CUSTOS_TEST_DATABASE_URL');
  dbName = `custos_subbench_${randomBytes(5).toString('hex')}`;
  const c = new pg.Client({ connectionString: pgAdmin });
  await c.connect();
  await c.query(`CREATE DATABASE ${dbName}`);
  await c.query(`CREATE DATABASE ${dbName}_audit`);
  await c.end();
  const at = (db: string) => Object.assign(new URL(pgAdmin), { pathname: `/${db}` }).href;
  env.CUSTOS_DATABASE_URL = at(dbName);
  env.CUSTOS_AUDIT_DATABASE_URL = at(`${dbName}_audit`);
}
const config = loadConfig(env);
const log = createLogger({
  level: 'warn',
  destination: new Writable({ write: (_c, _e, cb) => cb() }) as never,
});
say(`starting a server (${flags.storage}, poll ${POLL} ms)`);
const server = await startServer(config, log, { subscriptions: { pollMs: POLL } });
let worker = server.subscriptions;
const init = await server.core.admin.init();
const base = `${server.url}/fhir/R4`;
/** A loopback vendor that may receive full PHI, with one endpoint and an executed BAA. */
const registerVendor = async (name: string, service: string, port: number, protocol: 'http' | 'tls') => {
  const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10);
  await server.core.vendors.addVendor({ name, services: [service], phiClass: 'full' });
  await server.core.vendors.addEndpoint({
    vendor: name,
    host: '127.0.0.1',
    port,
    protocol,
    allowPrivate: true,
  });
  await server.core.vendors.recordBaa({
    vendor: name,
    executedAt: day(-1),
    expiresOn: day(365),
    documentSha256: 'c'.repeat(64),
  });
};
await registerVendor('Bench hooks', 'webhooks', rport, 'http');
if (relay) await registerVendor('Bench relay', 'email', relayPort, 'tls');
const tokenRes = await fetch(`${server.url}/oauth/token`, {
  method: 'POST',
  headers: { 'content-type': 'application/x-www-form-urlencoded' },
  body: new URLSearchParams({
    grant_type: 'client_credentials',
    scope: 'system/*.cruds',
    client_id: init.clientId,
    client_secret: init.clientSecret!,
  }),
});
const token = ((await tokenRes.json()) as { access_token: string }).access_token;
const headers = {
  authorization: `Bearer ${token}`,
  'x-purpose-of-use': 'TREAT',
  'content-type': 'application/fhir+json',
};
const create = async (resource: unknown): Promise<{ id: string; status: number }> => {
  const res = await fetch(`${base}/${(resource as { resourceType: string }).resourceType}`, {
    method: 'POST',
    headers,
    body: JSON.stringify(resource),
  });
  const body = (await res.json()) as { id: string };
  if (res.status !== 201) throw new Error(`create: ${res.status} ${JSON.stringify(body)}`);
  return { id: body.id, status: res.status };
};
const observation = (code: string) => ({
  resourceType: 'Observation',
  meta: { security: [HTEST] },
  status: 'final',
  code: { coding: [{ system: 'http://loinc.org', code }] },
  valueQuantity: { value: 42, unit: 'mg/dL' },
});

const results: Record<string, unknown> = {
  storage: flags.storage,
  pollMs: POLL,
  node: process.version,
  cpus: os.cpus().length,
};
try {
  // The network floor and the write alone.
  const post: number[] = [];
  for (let i = 0; i < ITER + 20; i++) {
    const t = performance.now();
    const r = await fetch(`http://127.0.0.1:${rport}/floor/${i}`, { method: 'POST', body: '{}' });
    await r.arrayBuffer();
    if (i >= 20) post.push(performance.now() - t);
  }
  arrived.clear();
  const write: number[] = [];
  for (let i = 0; i < ITER + 20; i++) {
    const t = performance.now();
    await create(observation('0000-0'));
    if (i >= 20) write.push(performance.now() - t);
  }
  results.postRoundTripMs = summary(post);
  results.writeMs = summary(write);
  say(`post p50 ${summary(post).p50} ms, write p50 ${summary(write).p50} ms`);

  for (const payload of PAYLOADS) {
    const code = payload === 'empty' ? '1111-1' : payload === 'email' ? '3333-3' : '2222-2';
    const content = (valueCode: string) => ({
      payload: 'application/fhir+json',
      _payload: { extension: [{ url: PAYLOAD_CONTENT_EXTENSION, valueCode }] },
    });
    const sub = await create({
      resourceType: 'Subscription',
      meta: { security: [HTEST] },
      status: 'requested',
      reason: 'bench',
      criteria: `Observation?code=http://loinc.org|${code}`,
      channel:
        payload === 'email'
          ? { type: 'email', endpoint: 'mailto:bench-desk@example.org', ...content('id-only') }
          : {
              type: 'rest-hook',
              endpoint: `http://127.0.0.1:${rport}/${payload}`,
              ...(payload === 'empty' ? {} : content(payload)),
            },
    });
    for (;;) {
      const r = (await (await fetch(`${base}/Subscription/${sub.id}`, { headers })).json()) as {
        status: string;
      };
      if (r.status === 'active') break;
      if (r.status === 'error') throw new Error('subscription refused');
      await new Promise((r2) => setTimeout(r2, 20));
    }
    // Empty notifications all go to the same URL: one in flight at a time in the latency phase.
    const keyOf = (id: string) => (payload === 'empty' ? `/${payload}` : `/${payload}/Observation/${id}`);
    const e2e: number[] = [];
    const after201: number[] = [];
    for (let i = 0; i < ITER + 10; i++) {
      // A random pause first: writes arrive at random points of the worker's poll cycle, as in use
      // (back to back, each write would land just after a poll and wait a whole interval).
      await new Promise((r) => setTimeout(r, Math.random() * POLL));
      const t0 = performance.now();
      const { id } = await create(observation(code));
      const t1 = performance.now();
      const t2 = await waitFor(keyOf(id));
      if (i >= 10) {
        e2e.push(t2 - t0);
        after201.push(t2 - t1);
      }
    }
    say(`${payload}: write→hook p50 ${summary(e2e).p50} ms p95 ${summary(e2e).p95} ms`);
    // Throughput: a burst of matching creates, 8 in flight.
    const got: Promise<number>[] = [];
    const start = performance.now();
    let next = 0;
    let writesDone = 0;
    let emptyCount = 0;
    const emptyAll =
      payload === 'empty'
        ? new Promise<number>((resolve) => {
            const on = (t: number) => {
              emptyCount++;
              if (emptyCount === BURST) resolve(t);
              else waiters.set(`/${payload}`, on);
            };
            waiters.set(`/${payload}`, on);
          })
        : undefined;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < BURST) {
          next++;
          const { id } = await create(observation(code));
          if (payload !== 'empty') got.push(waitFor(keyOf(id)));
        }
        writesDone = performance.now();
      }),
    );
    const last = emptyAll ? await emptyAll : Math.max(...(await Promise.all(got)));
    const seconds = (last - start) / 1000;
    const writeSeconds = (writesDone - start) / 1000;
    say(`${payload}: ${BURST} notifications in ${seconds.toFixed(2)} s (${(BURST / seconds).toFixed(0)}/s)`);
    // Drain: the worker stopped, a backlog written, a new worker started; from its start to the last
    // webhook: detection and delivery alone, not bounded by the rate of writes.
    await worker.stop();
    const backlog: string[] = [];
    for (let i = 0; i < BURST; i++) backlog.push((await create(observation(code))).id);
    let drainEmpty = 0;
    const drainAll =
      payload === 'empty'
        ? new Promise<number>((resolve) => {
            const on = (t: number) => {
              if (++drainEmpty === BURST) resolve(t);
              else waiters.set(`/${payload}`, on);
            };
            waiters.set(`/${payload}`, on);
          })
        : undefined;
    const drainStart = performance.now();
    worker = startSubscriptionWorker(
      config,
      log,
      server.core,
      { pollMs: POLL },
      config.smtp && loadSmtpCa(config.smtp),
    );
    const drainLast = drainAll
      ? await drainAll
      : Math.max(...(await Promise.all(backlog.map((id) => waitFor(keyOf(id))))));
    const drainSeconds = (drainLast - drainStart) / 1000;
    say(`${payload}: backlog of ${BURST} drained in ${drainSeconds.toFixed(2)} s`);
    results[payload] = {
      writeToHookMs: summary(e2e),
      createdToHookMs: summary(after201),
      burst: BURST,
      notificationsPerSecond: +(BURST / seconds).toFixed(1),
      createsPerSecond: +(BURST / writeSeconds).toFixed(1),
      burstSeconds: +seconds.toFixed(2),
      backlogNotificationsPerSecond: +(BURST / drainSeconds).toFixed(1),
    };
  }
  const counts = await server.subscriptions.queue.counts();
  results.queue = counts;
} finally {
  await worker.stop();
  await server.close();
  receiver.closeAllConnections();
  receiver.close();
  await new Promise<void>((r) => (relay ? relay.close(() => r()) : r()));
  fs.rmSync(dataDir, { recursive: true, force: true });
  if (dbName && pgAdmin) {
    const c = new pg.Client({ connectionString: pgAdmin });
    await c.connect();
    await c.query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`);
    await c.query(`DROP DATABASE IF EXISTS ${dbName}_audit WITH (FORCE)`);
    await c.end();
  }
}

if (flags.json) process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
else {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const r = results as Record<string, any>;
  console.log(
    `subscription delivery on loopback (${r.storage}, poll ${r.pollMs} ms, ${r.node}, ${r.cpus} cpus)`,
  );
  console.log(
    `  baseline POST round trip   p50 ${r.postRoundTripMs.p50} ms  p95 ${r.postRoundTripMs.p95} ms`,
  );
  console.log(`  FHIR create (no match)     p50 ${r.writeMs.p50} ms  p95 ${r.writeMs.p95} ms`);
  for (const p of PAYLOADS) {
    const x = r[p];
    console.log(
      `  ${p.padEnd(14)} write→hook p50 ${x.writeToHookMs.p50} ms p95 ${x.writeToHookMs.p95} ms; ` +
        `201→hook p50 ${x.createdToHookMs.p50} ms p95 ${x.createdToHookMs.p95} ms; ` +
        `burst ${x.burst}: ${x.notificationsPerSecond} notifications/s (creates ${x.createsPerSecond}/s); ` +
        `backlog drained at ${x.backlogNotificationsPerSecond}/s`,
    );
  }
  console.log(`  queue: ${JSON.stringify(r.queue)}`);
}
process.exit(0);
