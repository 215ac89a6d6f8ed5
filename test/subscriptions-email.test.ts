import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SMTPServer } from 'smtp-server';
import { simpleParser, type ParsedMail } from 'mailparser';
import type { AuditEvent } from '../src/audit/audit-event.ts';
import { collectFlowMap } from '../src/egress/flow-map.ts';
import { PAYLOAD_CONTENT_EXTENSION } from '../src/subscriptions/subscription-channel.ts';
import type { Delivery } from '../src/subscriptions/subscription-queue.ts';
import { freePort, HTEST, startHarness, type Harness } from './support/harness.ts';
import { findExecutable, makePki, type TestPki } from './support/test-pki.ts';
import { until } from './support/until.ts';

// E-mail notifications (issue 7): R4 Subscriptions with channel.type email, delivered through the
// egress gateway to an SMTP relay registered as a vendor endpoint (protocol tls), over implicit
// TLS, to a real SMTP server on loopback (the smtp-server package) whose messages are parsed with
// mailparser. Each payload choice puts no more in the message than its data class; the relay's BAA
// gates PHI; a relay's temporary failure is retried; every attempt is audited.

const skip = findExecutable('openssl') ? false : 'openssl not found: it makes the relay certificate';
const LOINC = 'http://loinc.org';
const RELAY_USER = 'custos-relay';
const RELAY_PASSWORD = 'relay-test-password-0001';
const SHA = 'c'.repeat(64);
const day = (offset: number) => new Date(Date.now() + offset * 86_400_000).toISOString().slice(0, 10);

interface Mail {
  to: string[];
  from: string;
  user: string | undefined;
  raw: string;
  parsed: ParsedMail;
}

/** An SMTPS relay (implicit TLS) requiring authentication; `failNext` answers 451 to that many messages. */
class Relay {
  mails: Mail[] = [];
  failNext = 0;
  server: SMTPServer | undefined;
  constructor(
    readonly port: number,
    readonly pki: TestPki,
  ) {}
  async listen(): Promise<void> {
    this.server = new SMTPServer({
      secure: true,
      key: fs.readFileSync(this.pki.serverKey),
      cert: fs.readFileSync(this.pki.serverCert),
      authMethods: ['PLAIN', 'LOGIN'],
      logger: false,
      onAuth: (auth, _session, cb) =>
        auth.username === RELAY_USER && auth.password === RELAY_PASSWORD
          ? cb(null, { user: auth.username })
          : cb(new Error('bad credentials')),
      onData: (stream, session, cb) => {
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c));
        stream.on('end', () => {
          if (this.failNext > 0) {
            this.failNext--;
            cb(Object.assign(new Error('try again later'), { responseCode: 451 }));
            return;
          }
          const raw = Buffer.concat(chunks).toString('utf8');
          void simpleParser(raw).then((parsed) => {
            this.mails.push({
              to: session.envelope.rcptTo.map((r) => r.address),
              from: session.envelope.mailFrom ? session.envelope.mailFrom.address : '',
              user: session.user as string | undefined,
              raw,
              parsed,
            });
            cb();
          });
        });
      },
    });
    await new Promise<void>((r) => this.server!.listen(this.port, '127.0.0.1', r));
  }
  async close(): Promise<void> {
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
  /** The messages of one subscription (its id is in a header of each). */
  of(subscriptionId: string): Mail[] {
    return this.mails.filter((m) => m.parsed.headers.get('x-custos-subscription-id') === subscriptionId);
  }
}

describe('e-mail subscriptions through the SMTP relay', { skip }, () => {
  let h: Harness;
  let relay: Relay;
  let dir: string;

  const create = async (resource: Record<string, unknown>) => {
    const res = await h.fhir(`/${resource.resourceType as string}`, {
      method: 'POST',
      body: JSON.stringify(resource),
    });
    assert.equal(res.status, 201, await res.clone().text());
    return (await res.json()) as Record<string, any>;
  };
  const observation = (code: string) => ({
    resourceType: 'Observation',
    meta: { security: [HTEST] },
    status: 'final',
    code: { coding: [{ system: LOINC, code }] },
    valueQuantity: { value: 97, unit: 'mg/dL' },
  });
  const emailSubscription = (
    endpoint: string,
    code: string,
    payload?: 'id-only' | 'full-resource',
    extra: Record<string, unknown> = {},
  ) => ({
    resourceType: 'Subscription',
    meta: { security: [HTEST] },
    status: 'requested',
    reason: 'test',
    criteria: `Observation?code=${LOINC}|${code}`,
    channel: {
      type: 'email',
      endpoint,
      ...(payload
        ? {
            payload: 'application/fhir+json',
            _payload: { extension: [{ url: PAYLOAD_CONTENT_EXTENSION, valueCode: payload }] },
          }
        : {}),
      ...extra,
    },
  });
  const read = async (id: string) =>
    (await (await h.fhir(`/Subscription/${id}`)).json()) as Record<string, any>;
  /** Creates a Subscription and waits until the worker has set its status. */
  const subscribe = async (s: Record<string, unknown>) => {
    const created = await create(s);
    return until(`subscription ${created.id} to leave requested`, async () => {
      const r = await read(created.id);
      return r.status !== 'requested' ? r : undefined;
    });
  };
  const auditEvents = async (): Promise<AuditEvent[]> => {
    const r = await h.server.core.auditDb.query<{ entry: Uint8Array }>(
      'SELECT entry FROM audit_entry ORDER BY seq',
    );
    return r.rows.map((x) => JSON.parse(Buffer.from(x.entry).toString('utf8')) as AuditEvent);
  };
  const deliveries = async (subscriptionId: string): Promise<Delivery[]> => {
    const r = await h.server.core.resourceDb.query<{ id: string }>(
      'SELECT id FROM subscription_delivery WHERE subscription_id = $1 ORDER BY created_at',
      [subscriptionId],
    );
    const out: Delivery[] = [];
    for (const x of r.rows) out.push((await h.server.subscriptions.queue.get(x.id))!);
    return out;
  };
  const egressOf = async (notificationId: string) =>
    (await auditEvents()).filter((e) => e.action === 'egress' && e.requestId === notificationId);

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-smtp-'));
    const pki = makePki(dir);
    relay = new Relay(await freePort(), pki);
    await relay.listen();
    h = await startHarness({
      env: {
        CUSTOS_SMTP_URL: `smtps://127.0.0.1:${relay.port}`,
        CUSTOS_SMTP_FROM: 'notifications@example.org',
        CUSTOS_SMTP_USER: RELAY_USER,
        CUSTOS_SMTP_PASSWORD: RELAY_PASSWORD,
        CUSTOS_SMTP_CA_FILE: pki.caFile,
        CUSTOS_SUBSCRIPTION_TIMEOUT: '20',
        CUSTOS_SMTP_RECIPIENT_DOMAINS: 'example.org',
      },
      subscriptions: {
        pollMs: 40,
        retryBaseMs: 100,
        retryMaxMs: 1000,
        maxAttempts: 6,
        refusalsBeforeError: 3,
      },
    });
  });

  after(async () => {
    await h?.close();
    await relay?.close();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the delivery settings come from the environment; options given in code win', () => {
    assert.equal(h.server.subscriptions.options.requestTimeoutMs, 20_000);
    assert.equal(h.server.subscriptions.options.maxAttempts, 6);
  });

  test('bad email channels are refused with a reason: lists, header fields, HTTP headers', async () => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [emailSubscription('mailto:one@example.org,two@example.org', '1000-1'), /one address/],
      [emailSubscription('mailto:one@example.org?cc=two@example.org', '1000-1'), /one address/],
      [emailSubscription('mailto:one@example.org%0D%0ABcc:two@example.net', '1000-1'), /one address/],
      [emailSubscription('https://example.org/hook', '1000-1'), /mailto:/],
      [
        emailSubscription('mailto:one@example.org', '1000-1', undefined, { header: ['X-A: b'] }),
        /channel.header is for rest-hook/,
      ],
    ];
    for (const [s, reason] of cases) {
      const sub = await subscribe(s);
      assert.equal(sub.status, 'error');
      assert.match(sub.error, reason);
    }
  });

  test('before the relay is registered: the subscription goes to error and the flow map marks the relay red', async () => {
    const sub = await subscribe(emailSubscription('mailto:ward-7@example.org', '1000-1'));
    assert.equal(sub.status, 'error');
    assert.match(sub.error, /SMTP relay \(CUSTOS_SMTP_URL\) is not a registered vendor endpoint/);
    const map = await collectFlowMap({
      config: h.config,
      vendors: h.server.core.vendors,
      db: h.server.core.resourceDb,
    });
    const red = map.flows.find((f) => f.to === 'vendor_smtp_relay');
    assert.ok(red && !red.covered, 'an unregistered relay is a red flow');
    assert.equal(map.covered, false);
    // Registered (class full) without a BAA yet: the red relay flow is gone, the vendor's own flow
    // is red until the BAA is recorded (next tests).
    await h.server.core.vendors.addVendor({ name: 'Mail Relay', services: ['email'], phiClass: 'full' });
    await h.server.core.vendors.addEndpoint({
      vendor: 'Mail Relay',
      host: '127.0.0.1',
      port: relay.port,
      protocol: 'tls',
      allowPrivate: true,
    });
    const again = await collectFlowMap({
      config: h.config,
      vendors: h.server.core.vendors,
      db: h.server.core.resourceDb,
    });
    assert.equal(
      again.flows.find((f) => f.to === 'vendor_smtp_relay'),
      undefined,
    );
  });

  test('without a BAA: the empty notification (class none) is sent, id-only (limited) is refused and audited', async () => {
    const empty = await subscribe(emailSubscription('mailto:ward-7@example.org', '2000-2'));
    const ids = await subscribe(emailSubscription('mailto:ward-7@example.org', '2000-2', 'id-only'));
    assert.equal(empty.status, 'active', empty.error);
    assert.equal(ids.status, 'active', ids.error);
    const obs = await create(observation('2000-2'));
    const [m] = await until('the empty notification', () => {
      const ms = relay.of(empty.id);
      return ms.length ? ms : undefined;
    });
    assert.deepEqual(m!.to, ['ward-7@example.org']);
    assert.equal(m!.from, 'notifications@example.org');
    assert.equal(m!.user, RELAY_USER, 'the relay was logged in to');
    assert.match(m!.parsed.subject ?? '', new RegExp(`Subscription/${empty.id}`));
    assert.ok(!m!.raw.includes(obs.id), 'class none: the message does not name the resource');
    assert.ok(!m!.raw.includes('mg/dL'));
    assert.equal(m!.parsed.attachments.length, 0);
    const notificationId = m!.parsed.headers.get('x-custos-notification-id') as string;
    assert.deepEqual(
      (await egressOf(notificationId)).map((e) => [e.outcome, e.egress?.dataClass, e.egress?.port]),
      [['success', 'none', relay.port]],
    );
    // id-only carries a record locator (limited): no BAA, no message; after 3 refusals, error.
    const sub = await until('the id-only subscription in error', async () => {
      const r = await read(ids.id);
      return r.status === 'error' ? r : undefined;
    });
    assert.match(sub.error, /refused by the egress gateway 3 times/);
    assert.equal(relay.of(ids.id).length, 0);
    const [d] = await deliveries(ids.id);
    assert.equal(d!.status, 'dead');
    const refusals = await egressOf(d!.id);
    assert.ok(refusals.length >= 3);
    assert.ok(refusals.every((e) => e.outcome === 'refused' && e.code === 'EGRESS_BAA_INACTIVE'));
  });

  test('with a BAA: id-only names the version, full-resource attaches the resource; each audited with its class', async () => {
    await h.server.core.vendors.recordBaa({
      vendor: 'Mail Relay',
      executedAt: day(-5),
      expiresOn: day(365),
      documentSha256: SHA,
    });
    const ids = await subscribe(emailSubscription('mailto:lab-desk@example.org', '3000-3', 'id-only'));
    const full = await subscribe(emailSubscription('mailto:lab-desk@example.org', '3000-3', 'full-resource'));
    assert.equal(ids.status, 'active', ids.error);
    assert.equal(full.status, 'active', full.error);
    const obs = await create(observation('3000-3'));
    const [i] = await until('the id-only message', () =>
      relay.of(ids.id).length ? relay.of(ids.id) : undefined,
    );
    const [f] = await until('the full-resource message', () =>
      relay.of(full.id).length ? relay.of(full.id) : undefined,
    );
    assert.match(i!.parsed.text ?? '', new RegExp(`Observation/${obs.id}/_history/1`));
    assert.ok(!i!.raw.includes('mg/dL'), 'id-only: no resource content');
    assert.equal(i!.parsed.attachments.length, 0);
    assert.equal(f!.parsed.attachments.length, 1);
    const [att] = f!.parsed.attachments;
    assert.equal(att!.contentType, 'application/fhir+json');
    const attached = JSON.parse(att!.content.toString('utf8'));
    assert.equal(attached.id, obs.id);
    assert.equal(attached.meta.versionId, '1');
    assert.equal(attached.valueQuantity.value, 97);
    assert.ok(!(f!.parsed.subject ?? '').includes(obs.id), 'the subject names the subscription only');
    const cls = async (m: Mail) =>
      (await egressOf(m.parsed.headers.get('x-custos-notification-id') as string)).map(
        (e) => [e.outcome, e.egress?.dataClass, e.egress?.purpose] as const,
      );
    assert.deepEqual(await cls(i!), [['success', 'limited', 'subscription']]);
    assert.deepEqual(await cls(f!), [['success', 'full', 'subscription']]);
    // The running server's flow map shows what the relay is sent (a sandbox project: test data).
    const m = await h.server.core.flows();
    const node = m.nodes.find((n) => n.label === 'Mail Relay')!;
    assert.ok(node.details.some((d) => /^\d+ active email subscription\(s\) of project /.test(d)));
    // The relay's password and the resource never reach the server's log.
    const log = h.logLines.join('\n');
    assert.ok(!log.includes(RELAY_PASSWORD));
    assert.ok(!log.includes('mg/dL'));
  });

  test("the patient's access report lists what was e-mailed about them (vendor, class); the empty notification names nobody", async () => {
    const patient = await create({
      resourceType: 'Patient',
      meta: { security: [HTEST] },
      name: [{ family: 'Zzyzx', given: ['Testy'] }],
    });
    const ids = await subscribe(emailSubscription('mailto:ward-9@example.org', '5000-5', 'id-only'));
    const empty = await subscribe(emailSubscription('mailto:ward-9@example.org', '5000-5'));
    await create({ ...observation('5000-5'), subject: { reference: `Patient/${patient.id}` } });
    const [i] = await until('the id-only message', () =>
      relay.of(ids.id).length ? relay.of(ids.id) : undefined,
    );
    const [e] = await until('the empty message', () =>
      relay.of(empty.id).length ? relay.of(empty.id) : undefined,
    );
    const idOf = (m: Mail) => m.parsed.headers.get('x-custos-notification-id') as string;
    const [sent] = await egressOf(idOf(i!));
    assert.deepEqual(sent!.patients, [patient.id]);
    assert.equal(sent!.purpose, 'HOPERAT');
    const [none] = await egressOf(idOf(e!));
    assert.equal(none!.patients, undefined, 'class none carries nothing of the patient');
    const report = await h.server.core.reports.run('access', { patient: patient.id, purpose: 'HCOMPL' });
    const row = report.rows.find((r) => r.action === 'egress');
    assert.ok(row, 'the e-mail is in the access report');
    assert.equal(row.requestId, idOf(i!));
    assert.match(
      row.description,
      new RegExp(`sent to vendor .* at 127\\.0\\.0\\.1:${relay.port} \\(data class limited, subscription\\)`),
    );
    assert.ok(!report.rows.some((r) => r.requestId === idOf(e!)));
    // Operations (HOPERAT) is exempt from the accounting of disclosures (45 CFR 164.528(a)(1)).
    const accounting = await h.server.core.reports.run('disclosures', {
      patient: patient.id,
      purpose: 'HCOMPL',
    });
    assert.ok(!accounting.rows.some((r) => r.action === 'egress'));
  });

  test('PHI by e-mail only to the listed recipient domains; an empty notification goes anywhere', async () => {
    const outside = await subscribe(emailSubscription('mailto:someone@example.net', '6000-6', 'id-only'));
    assert.equal(outside.status, 'error');
    assert.match(outside.error, /CUSTOS_SMTP_RECIPIENT_DOMAINS/);
    const sub = await subscribe(emailSubscription('mailto:ward-2@north.example.org', '6000-6', 'id-only'));
    assert.equal(sub.status, 'active', 'a subdomain of a listed domain');
    const empty = await subscribe(emailSubscription('mailto:someone@example.net', '6000-6'));
    assert.equal(empty.status, 'active', empty.error);
    await create(observation('6000-6'));
    const [m] = await until('the id-only message', () =>
      relay.of(sub.id).length ? relay.of(sub.id) : undefined,
    );
    await until('the empty message', () => relay.of(empty.id).length === 1);
    assert.equal(relay.of(outside.id).length, 0);
    const [e] = await egressOf(m!.parsed.headers.get('x-custos-notification-id') as string);
    assert.equal(
      e!.egress?.recipient,
      'north.example.org',
      'the recipient domain is audited, not the mailbox',
    );
  });

  test('a temporary failure of the relay (451) is retried; the message arrives once, with the same notification id', async () => {
    const sub = await subscribe(emailSubscription('mailto:ward-7@example.org', '4000-4', 'id-only'));
    assert.equal(sub.status, 'active', sub.error);
    relay.failNext = 2;
    await create(observation('4000-4'));
    const [m] = await until('the message after two refusals', () =>
      relay.of(sub.id).length ? relay.of(sub.id) : undefined,
    );
    const [d] = await until('delivered', async () => {
      const ds = await deliveries(sub.id);
      return ds[0]?.status === 'delivered' ? ds : undefined;
    });
    // Two refusals, then the delivery (more only if a loaded machine timed an attempt out).
    assert.ok(d!.attempts >= 3, `attempts ${d!.attempts}`);
    assert.equal(m!.parsed.headers.get('x-custos-notification-id'), d!.id);
    // What a failure recorded: the reply code, never the relay's text.
    const r = await h.server.core.resourceDb.query<{ last_error: string | null }>(
      'SELECT last_error FROM subscription_delivery WHERE id = $1',
      [d!.id],
    );
    assert.equal(r.rows[0]!.last_error, null, 'cleared on delivery');
    assert.ok(!h.logLines.join('\n').includes('try again later'), "the relay's reply text is not logged");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(relay.of(sub.id).length, 1);
    const egress = await egressOf(d!.id);
    assert.equal(egress.length, d!.attempts, 'each attempt is an audited connection');
  });
});
