import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { ConfigError, loadConfig } from '../src/config/config.ts';
import { silentLogger } from '../src/log/logger.ts';
import { startServer } from '../src/server.ts';
import { setupAuditDatabase } from '../src/audit/audit-setup.ts';
import { encodeAuditEvent, leafHash, type AuditEvent } from '../src/audit/audit-event.ts';
import {
  formatSyslog,
  frameSyslog,
  SIEM_MAX_MESSAGE_BYTES,
  SIEM_SD_ID,
} from '../src/audit/siem-forwarder.ts';
import { freePort, startHarness, testPatient, type Harness } from './support/harness.ts';
import { createTestStorage, needs, serverUrl, type TestStorage } from './support/storage.ts';
import { makePki, needsRsyslog, Rsyslog, type TestPki } from './support/rsyslog.ts';
import { runCustos } from './support/custos-cli.ts';

// Forwarding the audit log to a SIEM (RFC 5424 over TLS, RFC 5425) against a real rsyslog on
// loopback: what arrives, in what order, that nothing is lost while the SIEM is down, that the
// cursor survives a restart, and that TLS verification refuses a SIEM it should not trust.

const skip = needsRsyslog();

/** Values of this test's synthetic patients and requests that must never reach the SIEM. */
const CANARY = {
  family: 'Quuxsiemfamily',
  given: 'Zzyzxsiem',
  ssn: '999-41-0042',
  phone: '555-0142',
  userAgent: 'CanaryAgentSiem-7f3a',
  searchValue: 'Quuxsiemfamily',
};

/** Every SD-PARAM name that may go out (docs/audit.md, "Forwarding to a SIEM"). */
const ALLOWED_PARAMS = new Set([
  'seq',
  'leaf',
  'id',
  'phase',
  'outcome',
  'code',
  'requestId',
  'project',
  'client',
  'user',
  'role',
  'purpose',
  'resourceType',
  'resourceId',
  'resourceVersion',
  'count',
  'srcIp',
  'patient',
  'part',
  'parts',
  'error',
]);

// RFC 5424 §6: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
const SD_PARAM = /([^=\s\]"]{1,32})="((?:[^"\\\]]|\\["\\\]])*)"/g;
const RFC5424 = new RegExp(
  String.raw`^<(\d{1,3})>1 (\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})|-) ([\x21-\x7e]{1,255}) ([\x21-\x7e]{1,48}) ([\x21-\x7e]{1,128}) ([\x21-\x7e]{1,32}) ` +
    String.raw`(\[${SIEM_SD_ID}(?: [^=\s\]"]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*\])(?: (.*))?$`,
);

interface Received {
  line: string;
  pri: number;
  timestamp: string;
  hostname: string;
  appName: string;
  procId: string;
  msgId: string;
  params: [string, string][];
  msg: string | undefined;
  seq: number;
  part: number;
}

function parseLine(line: string): Received {
  const m = RFC5424.exec(line);
  assert.ok(m, `not an RFC 5424 message with our structured data: ${line.slice(0, 200)}`);
  const params = [...m[7]!.matchAll(SD_PARAM)].map(
    (p) => [p[1]!, p[2]!.replace(/\\(["\\\]])/g, '$1')] as [string, string],
  );
  const one = (n: string) => params.find(([k]) => k === n)?.[1];
  return {
    line,
    pri: Number(m[1]),
    timestamp: m[2]!,
    hostname: m[3]!,
    appName: m[4]!,
    procId: m[5]!,
    msgId: m[6]!,
    params,
    msg: m[8],
    seq: Number(one('seq')),
    part: Number(one('part') ?? 1),
  };
}

const param = (r: Received, name: string) => r.params.filter(([k]) => k === name).map(([, v]) => v);

/** First arrival of each (seq, part), in arrival order: what a receiver deduping by seq keeps. */
function dedupe(rs: Received[]): Received[] {
  const seen = new Set<string>();
  return rs.filter((r) => {
    const k = `${r.seq}/${r.part}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 45_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

interface StoredEntry {
  seq: number;
  event: AuditEvent;
  leaf: string;
}

async function storedEntries(h: Harness): Promise<StoredEntry[]> {
  const rows = await h.server.core.audit.read(0, 1_000_000);
  return rows.map((r) => ({
    seq: r.seq,
    event: JSON.parse(r.entry.toString('utf8')) as AuditEvent,
    leaf: r.leafHash.toString('hex'),
  }));
}

/** The received messages about entries of this log (matched by event UUID). */
function receivedOf(rs: Rsyslog, entries: StoredEntry[]): Received[] {
  const ids = new Set(entries.map((e) => e.event.id));
  return rs
    .lines()
    .map(parseLine)
    .filter((r) => ids.has(param(r, 'id')[0] ?? ''));
}

/** Waits until every entry of the log has arrived (deduped) and the forwarder confirmed them all. */
async function untilDelivered(h: Harness, rs: Rsyslog): Promise<StoredEntry[]> {
  let entries: StoredEntry[] = [];
  await until('every audit entry at the SIEM', async () => {
    entries = await storedEntries(h);
    const got = new Set(dedupe(receivedOf(rs, entries)).map((r) => r.seq));
    return entries.every((e) => got.has(e.seq)) && h.server.siem!.status().confirmed === entries.length;
  });
  return entries;
}

/**
 * Another server on the storage of `first`. `custos init` returns the demo client's secret only the
 * first time; it is derived from a key file, so the first one still holds.
 */
async function reopen(storage: TestStorage, env: Record<string, string>, first: Harness): Promise<Harness> {
  const next = await startHarness({ storage, env });
  next.init.clientSecret ??= first.init.clientSecret;
  return next;
}

function siemEnv(port: number, caFile: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    CUSTOS_SIEM_URL: `syslog-tls://127.0.0.1:${port}`,
    CUSTOS_SIEM_CA_FILE: caFile,
    CUSTOS_SIEM_RETRY_MAX: '1',
    CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0',
    ...extra,
  };
}

describe('forwarding the audit log to a SIEM: rsyslog over TLS on loopback', { skip }, () => {
  let dir: string;
  let pki: TestPki;
  let rs: Rsyslog;
  let storage: TestStorage;
  let h: Harness;
  const extra: Rsyslog[] = [];

  async function receiver(authMode: 'anon' | 'x509/certvalid' = 'anon'): Promise<Rsyslog> {
    const r = new Rsyslog(path.join(dir, `rsyslog-${extra.length + 1}`), await freePort(), pki, authMode);
    extra.push(r);
    await r.start();
    return r;
  }

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-siem-'));
    pki = makePki(path.join(dir, 'pki'));
    rs = await receiver();
    storage = await createTestStorage();
    h = await startHarness({ storage, env: siemEnv(rs.port, pki.caFile) });
  });

  after(async () => {
    await h?.close().catch(() => {});
    await storage?.cleanup().catch(() => {});
    for (const r of extra) await r.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  test('every entry arrives in order as RFC 5424, with identifiers only: no PHI, no sealed field', async () => {
    const headers = { 'user-agent': CANARY.userAgent };
    const created = await h.fhir('/Patient', {
      method: 'POST',
      headers,
      body: JSON.stringify(
        testPatient({
          name: [{ family: CANARY.family, given: [CANARY.given] }],
          identifier: [{ system: 'http://hl7.org/fhir/sid/us-ssn', value: CANARY.ssn }],
          telecom: [{ system: 'phone', value: CANARY.phone }],
        }),
      ),
    });
    assert.equal(created.status, 201);
    const patientId = ((await created.json()) as { id: string }).id;
    assert.equal((await h.fhir(`/Patient/${patientId}`, { headers })).status, 200);
    assert.equal((await h.fhir(`/Patient?family=${CANARY.searchValue}`, { headers })).status, 200);
    assert.equal((await h.fhir(`/Patient/${patientId}`, { headers, purpose: null })).status, 403);

    const entries = await untilDelivered(h, rs);
    const received = receivedOf(rs, entries);
    const text = received.map((r) => r.line).join('\n');

    // Nothing left before the first connection: the whole log, each entry once, in sequence order.
    assert.deepEqual(
      received.map((r) => r.seq),
      entries.map((e) => e.seq),
    );
    for (const [i, r] of received.entries()) {
      const e = entries[i]!;
      assert.equal(r.pri >> 3, 10, 'facility authpriv');
      const severity = { failed: 3, refused: 4, pending: 6, success: 6 }[e.event.outcome];
      assert.equal(r.pri & 7, severity, `severity of a ${e.event.outcome} event`);
      assert.equal(r.timestamp, e.event.time);
      assert.equal(r.hostname, '127.0.0.1');
      assert.equal(r.appName, 'custos');
      assert.equal(r.procId, '-');
      assert.equal(r.msgId, e.event.action);
      assert.deepEqual(param(r, 'leaf'), [e.leaf], 'the Merkle leaf hash of the entry');
      assert.deepEqual(param(r, 'outcome'), [e.event.outcome]);
      assert.deepEqual(param(r, 'requestId'), [e.event.requestId]);
      assert.deepEqual(param(r, 'patient'), e.event.patients ?? []);
      assert.deepEqual(param(r, 'client'), e.event.actor.clientId ? [e.event.actor.clientId] : []);
      assert.deepEqual(param(r, 'resourceType'), e.event.resource?.type ? [e.event.resource.type] : []);
      assert.deepEqual(param(r, 'resourceId'), e.event.resource?.id ? [e.event.resource.id] : []);
      for (const [name] of r.params) assert.ok(ALLOWED_PARAMS.has(name), `parameter ${name} is allowed`);
      if (e.event.sealed) assert.ok(!text.includes(e.event.sealed), 'a sealed field never goes out');
    }
    // The events of this test's requests are there, with the patient they name.
    const read = received.find((r) => r.msgId === 'read' && param(r, 'outcome')[0] === 'success');
    assert.ok(read, 'the read arrived');
    assert.deepEqual(param(read, 'patient'), [patientId]);
    assert.deepEqual(param(read, 'purpose'), ['TREAT']);
    assert.ok(received.some((r) => r.msgId === 'search'));
    const refused = received.find((r) => param(r, 'outcome')[0] === 'refused');
    assert.ok(refused, 'the refusal arrived');
    assert.equal(refused.pri, 10 * 8 + 4);
    assert.ok(
      entries.some((e) => e.event.sealed),
      'the log does hold sealed fields',
    );
    for (const v of Object.values(CANARY)) assert.ok(!text.includes(v), `${v} never reaches the SIEM`);
    // Shapes, not substrings: a random UUID contains "999-" about once in 4,096 hyphens. A UUID has no
    // 2- or 3-character group, so a hex character before the match is what rules UUIDs out; a hyphen
    // before it may not (555-555-0123 must still be caught).
    for (const [what, re] of [
      ['an SSN', /(?<![0-9a-f])9\d\d-\d\d-\d{4}(?![0-9a-f])/i],
      ['a 555-01xx phone number', /(?<![0-9a-f])555-01\d\d(?![0-9a-f])/i],
      ['the word sealed', /sealed/],
    ] as const)
      assert.ok(!re.test(text), `${what} never reaches the SIEM`);
  });

  test('while the SIEM is down requests still succeed; when it is back everything arrives', async () => {
    await rs.stop();
    const before = (await storedEntries(h)).length;
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const started = Date.now();
      const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
      assert.equal(created.status, 201, 'a write succeeds with the SIEM down');
      const id = ((await created.json()) as { id: string }).id;
      assert.equal((await h.fhir(`/Patient/${id}`)).status, 200, 'a read succeeds with the SIEM down');
      assert.ok(Date.now() - started < 5_000, 'and is not held up by it');
      ids.push(id);
    }
    await until('the forwarder to notice the SIEM is down', () =>
      h.logLines.some((l) => l.includes('"audit.siem_unavailable"')),
    );
    assert.ok((await storedEntries(h)).length >= before + 6);
    assert.ok(h.server.siem!.status().confirmed <= before + 6);

    const logLinesBefore = h.logLines.length;
    await rs.start();
    const entries = await untilDelivered(h, rs);
    // At least once: deduped by seq, the stream is the whole log in order (resends allowed).
    assert.deepEqual(
      dedupe(receivedOf(rs, entries)).map((r) => r.seq),
      entries.map((e) => e.seq),
    );
    const read = receivedOf(rs, entries).filter((r) => r.msgId === 'read');
    for (const id of ids)
      assert.ok(
        read.some((r) => param(r, 'resourceId')[0] === id),
        `read of ${id} arrived`,
      );
    // On reconnecting, the lag (entries not yet delivered) is logged.
    const connected = h.logLines
      .slice(logLinesBefore)
      .map((l) => JSON.parse(l) as { event: string; count?: number })
      .find((l) => l.event === 'audit.siem_connected');
    assert.ok(connected && (connected.count ?? 0) > 0, 'audit.siem_connected reports the lag');
    assert.ok(
      h.logLines.some((l) => l.includes('"audit.siem_lag"')),
      'the lag line is logged',
    );
    for (const l of h.logLines.filter((x) => x.includes('siem'))) {
      for (const v of Object.values(CANARY)) assert.ok(!l.includes(v));
    }
  });

  test('the cursor is durable: a restarted server resumes where it stopped, without resending', async () => {
    const entries = await untilDelivered(h, rs);
    await h.close(); // records the confirmed position
    const linesBefore = rs.lines().length;
    h = await reopen(storage, siemEnv(rs.port, pki.caFile), h);
    const cursor = await h.server.core.auditDb.query<{ n: number }>(
      'SELECT max(next_seq) AS n FROM audit_siem_cursor WHERE destination = $1',
      [`syslog-tls://127.0.0.1:${rs.port}`],
    );
    assert.equal(Number(cursor.rows[0]!.n), entries.length, 'the recorded position is the log size');
    assert.equal(
      (await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) })).status,
      201,
    );
    const after = await untilDelivered(h, rs);
    assert.ok(after.length > entries.length);
    const fresh = rs.lines().slice(linesBefore).map(parseLine);
    assert.ok(fresh.length > 0);
    assert.ok(
      fresh.every((r) => r.seq >= entries.length),
      'nothing before the recorded position is sent again',
    );
    // The cursor table is append-only like the log.
    if (h.storage.kind === 'embedded') {
      await assert.rejects(h.server.core.auditDb.query('DELETE FROM audit_siem_cursor'), /append-only/);
      await assert.rejects(
        h.server.core.auditDb.query('UPDATE audit_siem_cursor SET next_seq = 0'),
        /append-only/,
      );
    }
  });

  test('an event naming many patients is split into parts that a stock rsyslog accepts whole', async () => {
    const family = `Splitfamily${randomBytes(3).toString('hex')}`;
    const bundle = {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: Array.from({ length: 220 }, () => ({
        resource: testPatient({ name: [{ family, given: ['Zzyzx'] }] }),
        request: { method: 'POST', url: 'Patient' },
      })),
    };
    const tx = await h.fhir('', { method: 'POST', body: JSON.stringify(bundle) });
    assert.equal(tx.status, 200);
    const search = await h.fhir(`/Patient?family=${family}&_count=500`);
    assert.equal(search.status, 200);
    assert.equal(((await search.json()) as { entry: unknown[] }).entry.length, 220);
    const entries = await untilDelivered(h, rs);
    const searchEntry = [...entries].reverse().find((e) => e.event.action === 'search')!;
    assert.equal(searchEntry.event.patients?.length, 220);
    const parts = dedupe(receivedOf(rs, entries)).filter((r) => r.seq === searchEntry.seq);
    assert.ok(parts.length >= 2, 'split into parts');
    for (const p of parts) {
      assert.ok(Buffer.byteLength(p.line) <= SIEM_MAX_MESSAGE_BYTES);
      assert.deepEqual(param(p, 'parts'), [String(parts.length)]);
      assert.deepEqual(param(p, 'leaf'), [searchEntry.leaf]);
    }
    assert.deepEqual(
      parts.map((p) => p.part),
      parts.map((_, i) => i + 1),
    );
    assert.deepEqual(
      parts.flatMap((p) => param(p, 'patient')),
      searchEntry.event.patients,
      'every patient id, once, in order',
    );
  });

  test('TLS verification: a SIEM certificate from another CA, or for another name, gets nothing', async () => {
    const cases = [
      { name: 'untrusted CA', env: siemEnv(rs.port, pki.otherCaFile), code: /ISSUER|SELF_SIGNED|VERIFY/ },
      {
        name: 'certificate for another host',
        env: { ...siemEnv(rs.port, pki.caFile), CUSTOS_SIEM_URL: `syslog-tls://localhost:${rs.port}` },
        code: /^ERR_TLS_CERT_ALTNAME_INVALID$/,
      },
    ];
    for (const c of cases) {
      const other = await startHarness({ env: c.env });
      try {
        const created = await other.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
        assert.equal(created.status, 201, `${c.name}: requests succeed`);
        let code: string | undefined;
        await until(`${c.name}: a refused connection`, () => {
          const l = other.logLines
            .map((x) => JSON.parse(x) as { event: string; code?: string })
            .find((x) => x.event === 'audit.siem_unavailable');
          code = l?.code;
          return code !== undefined;
        });
        assert.match(code!, c.code, `${c.name}: refused with a certificate error`);
        await sleep(1_500);
        const entries = await storedEntries(other);
        assert.equal(receivedOf(rs, entries).length, 0, `${c.name}: nothing arrived`);
        assert.equal(other.server.siem!.status().confirmed, 0);
      } finally {
        await other.close();
      }
    }
  });

  test('mutual TLS: a receiver that requires a client certificate gets the log only from a client that has one', async () => {
    const mtls = await receiver('x509/certvalid');
    const without = await startHarness({ env: siemEnv(mtls.port, pki.caFile) });
    try {
      assert.equal(
        (await without.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) })).status,
        201,
      );
      await until('a connection the receiver drops', () =>
        without.logLines.some((l) => l.includes('"audit.siem_unavailable"')),
      );
      await sleep(3_000); // longer than the confirmation delay
      assert.equal(
        receivedOf(mtls, await storedEntries(without)).length,
        0,
        'nothing accepted without a certificate',
      );
      assert.equal(without.server.siem!.status().confirmed, 0, 'nothing counted as delivered');
    } finally {
      await without.close();
    }
    const withCert = await startHarness({
      env: siemEnv(mtls.port, pki.caFile, {
        CUSTOS_SIEM_CLIENT_CERT: pki.clientCert,
        CUSTOS_SIEM_CLIENT_KEY: pki.clientKey,
      }),
    });
    try {
      assert.equal(
        (await withCert.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) })).status,
        201,
      );
      await untilDelivered(withCert, mtls);
    } finally {
      await withCert.close();
    }
  });

  test(
    'PostgreSQL: the INSERT/SELECT-only application role keeps the cursor; of two servers, one forwards',
    {
      skip: needs('postgres'),
    },
    async () => {
      const shared = await createTestStorage();
      const appRole = `custos_test_siem_${randomBytes(4).toString('hex')}`;
      const mine = await receiver();
      const servers: Harness[] = [];
      try {
        const { appDatabaseUrl } = await setupAuditDatabase({ adminUrl: shared.auditDatabaseUrl!, appRole });
        const env = siemEnv(mine.port, pki.caFile, { CUSTOS_AUDIT_DATABASE_URL: appDatabaseUrl });
        servers.push(await startHarness({ storage: shared, env }));
        servers.push(await reopen(shared, env, servers[0]!));
        // Both forward from the one audit database; the requests go to the first only (the second
        // does not see a project key the first adds to the shared local keyring after it started).
        for (let i = 0; i < 6; i++)
          assert.equal(
            (await servers[0]!.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) }))
              .status,
            201,
          );
        await until('one leader', () => servers.filter((s) => s.server.siem!.status().leader).length === 1);
        const leader = servers.find((s) => s.server.siem!.status().leader)!;
        const entries = await untilDelivered(leader, mine);
        await sleep(6_000); // past the cursor's write interval
        const got = receivedOf(mine, entries).map((r) => r.seq);
        assert.deepEqual(
          got,
          entries.map((e) => e.seq),
          'each entry sent once, by the leader only',
        );
        const c = new pg.Client({ connectionString: appDatabaseUrl });
        await c.connect();
        try {
          const n = await c.query('SELECT max(next_seq)::int AS n, current_user AS u FROM audit_siem_cursor');
          assert.equal(n.rows[0].u, appRole);
          assert.ok(n.rows[0].n > 0, 'the application role recorded the position');
          for (const sql of ['UPDATE audit_siem_cursor SET next_seq = 0', 'DELETE FROM audit_siem_cursor'])
            await assert.rejects(c.query(sql), (e: { code?: string }) => e.code === '42501', sql);
        } finally {
          await c.end();
        }
      } finally {
        for (const s of servers) await s.close();
        await shared.cleanup();
        const admin = new pg.Client({ connectionString: serverUrl });
        await admin.connect();
        await admin.query(`DROP ROLE IF EXISTS ${appRole}`);
        await admin.end();
      }
    },
  );
});

describe('SIEM configuration: bad values stop the start with a line naming the variable', () => {
  const base = { CUSTOS_DATA_DIR: path.join(os.tmpdir(), 'custos-siem-config-unused') };
  const cases: [Record<string, string>, string, RegExp][] = [
    [
      { CUSTOS_SIEM_URL: 'syslog://siem.example:514' },
      'CUSTOS_SIEM_URL',
      /syslog-tls:\/\/.*plain syslog is refused/,
    ],
    [{ CUSTOS_SIEM_URL: 'https://siem.example' }, 'CUSTOS_SIEM_URL', /must start with syslog-tls:\/\//],
    [{ CUSTOS_SIEM_URL: 'not a url' }, 'CUSTOS_SIEM_URL', /is not a URL/],
    [{ CUSTOS_SIEM_URL: 'syslog-tls://siem.example:6514/x' }, 'CUSTOS_SIEM_URL', /host and port only/],
    [{ CUSTOS_SIEM_URL: 'syslog-tls://u:p@siem.example' }, 'CUSTOS_SIEM_URL', /host and port only/],
    [{ CUSTOS_SIEM_URL: 'syslog-tls://siem.example:0' }, 'CUSTOS_SIEM_URL', /port/],
    [{ CUSTOS_SIEM_CA_FILE: '/etc/ssl/ca.pem' }, 'CUSTOS_SIEM_CA_FILE', /CUSTOS_SIEM_URL is not/],
    [
      { CUSTOS_SIEM_URL: 'syslog-tls://siem.example', CUSTOS_SIEM_CLIENT_CERT: '/x.pem' },
      'CUSTOS_SIEM_CLIENT_KEY',
      /set together/,
    ],
    [
      { CUSTOS_SIEM_URL: 'syslog-tls://siem.example', CUSTOS_SIEM_RETRY_MAX: '0' },
      'CUSTOS_SIEM_RETRY_MAX',
      /1 to 3600/,
    ],
    [
      { CUSTOS_SIEM_URL: 'syslog-tls://siem.example', CUSTOS_SIEM_RETRY_MAX: 'soon' },
      'CUSTOS_SIEM_RETRY_MAX',
      /seconds/,
    ],
  ];
  for (const [env, variable, reason] of cases) {
    test(`${Object.entries(env)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ')}`, () => {
      assert.throws(
        () => loadConfig({ ...base, ...env }),
        (e: unknown) => e instanceof ConfigError && e.variable === variable && reason.test(e.message),
      );
    });
  }

  test('good values: the RFC 5425 port by default, IPv6, files resolved; unset is off', () => {
    assert.equal(loadConfig(base).siem, undefined);
    const c = loadConfig({ ...base, CUSTOS_SIEM_URL: 'syslog-tls://SIEM.example' }, '/srv');
    assert.deepEqual(c.siem, {
      host: 'siem.example',
      port: 6514,
      caFile: undefined,
      clientCertFile: undefined,
      clientKeyFile: undefined,
      retryMaxSeconds: 60,
    });
    const v6 = loadConfig(
      {
        ...base,
        CUSTOS_SIEM_URL: 'syslog-tls://[::1]:7514',
        CUSTOS_SIEM_CA_FILE: 'ca.pem',
        CUSTOS_SIEM_CLIENT_CERT: 'c.pem',
        CUSTOS_SIEM_CLIENT_KEY: 'c.key',
        CUSTOS_SIEM_RETRY_MAX: '5',
      },
      '/srv',
    );
    assert.deepEqual(v6.siem, {
      host: '::1',
      port: 7514,
      caFile: '/srv/ca.pem',
      clientCertFile: '/srv/c.pem',
      clientKeyFile: '/srv/c.key',
      retryMaxSeconds: 5,
    });
  });

  test('files that do not load stop the start before any storage is opened', { skip }, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-siem-files-'));
    try {
      const pki = makePki(path.join(dir, 'pki'));
      const junk = path.join(dir, 'junk.pem');
      fs.writeFileSync(junk, 'this is not a certificate\n');
      const data = path.join(dir, 'data');
      const cases: [Record<string, string>, string, RegExp][] = [
        [
          { CUSTOS_SIEM_CA_FILE: path.join(dir, 'missing.pem') },
          'CUSTOS_SIEM_CA_FILE',
          /cannot read .* \(ENOENT\)/,
        ],
        [{ CUSTOS_SIEM_CA_FILE: junk }, 'CUSTOS_SIEM_CA_FILE', /holds no PEM certificate/],
        [
          { CUSTOS_SIEM_CLIENT_CERT: pki.clientCert, CUSTOS_SIEM_CLIENT_KEY: pki.serverKey },
          'CUSTOS_SIEM_CLIENT_KEY',
          /not an unencrypted PEM private key of the certificate/,
        ],
        [
          { CUSTOS_SIEM_CLIENT_CERT: junk, CUSTOS_SIEM_CLIENT_KEY: pki.clientKey },
          'CUSTOS_SIEM_CLIENT_CERT',
          /holds no PEM certificate/,
        ],
      ];
      for (const [env, variable, reason] of cases) {
        const config = loadConfig({
          CUSTOS_DATA_DIR: data,
          CUSTOS_SIEM_URL: 'syslog-tls://127.0.0.1:1',
          ...env,
        });
        await assert.rejects(
          startServer(config, silentLogger),
          (e: unknown) => e instanceof ConfigError && e.variable === variable && reason.test(e.message),
          variable,
        );
      }
      assert.ok(!fs.existsSync(path.join(data, 'audit')), 'no storage was opened');
      const r = await runCustos(['serve'], {
        CUSTOS_DATA_DIR: data,
        CUSTOS_SIEM_URL: 'syslog-tls://127.0.0.1:1',
        CUSTOS_SIEM_CA_FILE: junk,
      });
      assert.equal(r.code, 2);
      assert.match(r.stderr, /^custos: configuration: CUSTOS_SIEM_CA_FILE: .* holds no PEM certificate\n$/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('RFC 5424 formatting (no receiver needed)', () => {
  function entry(e: Partial<AuditEvent>, seq = 7) {
    const event: AuditEvent = {
      v: 1,
      id: randomUUID(),
      time: '2024-02-29T12:34:56.789Z',
      phase: 'access',
      action: 'read',
      outcome: 'success',
      requestId: 'req-1',
      actor: { clientId: 'client-1' },
      source: { ip: '127.0.0.1' },
      ...e,
    };
    const bytes = encodeAuditEvent(event);
    return { seq, entry: bytes, leafHash: leafHash(bytes), event };
  }

  test('header, structured data and message; sealed and unknown fields stay home', () => {
    const e = entry({
      purpose: 'ETREAT',
      projectId: 'proj-1',
      actor: { clientId: 'client-1', userId: 'user-1', roles: ['practitioner', 'admin'] },
      resource: { type: 'Patient', id: 'p1', version: '3' },
      patients: ['p1'],
      sealed: 'v1.bm9uY2U.c2VjcmV0',
      ...({ extra: CANARY.family } as object),
    });
    const [m, ...rest] = formatSyslog(e, 'fhir.example.org');
    assert.equal(rest.length, 0);
    assert.equal(
      m!.toString(),
      `<85>1 2024-02-29T12:34:56.789Z fhir.example.org custos - read [custos@32473 seq="7" leaf="${e.leafHash.toString('hex')}" ` +
        `id="${e.event.id}" phase="access" outcome="success" requestId="req-1" project="proj-1" client="client-1" ` +
        `user="user-1" role="practitioner" role="admin" purpose="ETREAT" resourceType="Patient" resourceId="p1" ` +
        `resourceVersion="3" srcIp="127.0.0.1" patient="p1"] read success Patient/p1`,
    );
    assert.equal(frameSyslog(m!).toString(), `${m!.length} ${m!.toString()}`);
  });

  test('severity by outcome; escaping of quotes, backslashes and brackets; control characters replaced', () => {
    const pri = (outcome: AuditEvent['outcome']) =>
      formatSyslog(entry({ outcome }), 'h')[0]!.toString().slice(0, 4);
    assert.deepEqual((['success', 'pending', 'refused', 'failed'] as const).map(pri), [
      '<86>',
      '<86>',
      '<84>',
      '<83>',
    ]);
    const m = formatSyslog(entry({ resource: { type: 'Patient', id: 'a"b\\c]d\ne' } }), 'h')[0]!.toString();
    assert.ok(m.includes('resourceId="a\\"b\\\\c\\]d?e"'), m);
    assert.ok(!m.includes('\n'));
    const garbage = formatSyslog(
      { seq: 3, entry: Buffer.from('{not json'), leafHash: Buffer.alloc(32) },
      'h',
    );
    assert.match(
      garbage[0]!.toString(),
      /^<83>1 - h custos - - \[custos@32473 seq="3" leaf="0{64}" error="unreadable-entry"\]$/,
    );
  });

  test('an event naming thousands of patients is split into parts of at most 2048 bytes', () => {
    const patients = Array.from(
      { length: 2000 },
      (_, i) => `patient-${String(i).padStart(5, '0')}-${randomUUID()}`,
    );
    const e = entry({ action: 'search', patients, count: 2000 });
    const parts = formatSyslog(e, 'h').map((b) => parseLine(b.toString()));
    assert.ok(parts.length > 10);
    for (const [i, p] of parts.entries()) {
      assert.ok(Buffer.byteLength(p.line) <= SIEM_MAX_MESSAGE_BYTES);
      assert.deepEqual(param(p, 'part'), [String(i + 1)]);
      assert.deepEqual(param(p, 'parts'), [String(parts.length)]);
      assert.deepEqual(param(p, 'seq'), ['7']);
      assert.deepEqual(param(p, 'count'), ['2000']);
    }
    assert.deepEqual(
      parts.flatMap((p) => param(p, 'patient')),
      patients,
    );
  });
});
