import { after, before, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { startHarness, testPatient, HTEST, type Harness } from './support/harness.ts';
import { runCustos } from './support/custos-cli.ts';
import { ADMIN_TOKEN_HEADER } from '../src/admin/admin-routes.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { NOT_ACCOUNTABLE_PURPOSES, csvField, isAccountableDisclosure } from '../src/audit/audit-report.ts';
import { dateRange } from '../src/audit/audit-query.ts';
import { AuditSealer } from '../src/audit/audit-sealer.ts';
import {
  INDEX_COLUMNS,
  STORED_DIGEST_SQL,
  entryIndexRecords,
  indexColumns,
  indexRowsOf,
  indexDigest,
  rowRecord,
  unnestIndexColumns,
} from '../src/audit/audit-index.ts';
import { initValidator, validateResource } from '../src/fhir/validator.ts';

type Entry = Record<string, any>;
type Logged = { seq: number; e: Entry };

/** A value that must never appear in clear in the audit database. */
const CANARY_QUERY = 'Qzxcanaryquery';
const CANARY_REASON = 'Qzxcanaryreason';
const CANARY_AGENT = 'Qzxcanaryagent/1.0';

async function logged(h: Harness): Promise<Logged[]> {
  const rows = await h.server.core.audit.read(0, 1_000_000);
  return rows.map((r) => ({ seq: r.seq, e: JSON.parse(r.entry.toString('utf8')) as Entry }));
}

/** RFC 4180 parser (quoted fields, doubled quotes, CRLF), to read reports back. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ',') {
      row.push(field);
      field = '';
    } else if (c === '\r' && text[i + 1] === '\n') {
      row.push(field);
      rows.push(row);
      row = [];
      field = '';
      i++;
    } else field += c;
  }
  if (field !== '' || row.length > 0) rows.push([...row, field]);
  return rows;
}

describe('the audit log as AuditEvent resources, and its reports', () => {
  let h: Harness;
  let auditor: string;
  let adminToken: string;
  let patientA: string;
  let patientB: string;
  let research: { clientId: string; token: string };
  const RESEARCH_NAME = 'Research, "Lab" Inc';

  const admin = (p: string, body: unknown) =>
    fetch(`${h.server.url}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', [ADMIN_TOKEN_HEADER]: adminToken },
      body: JSON.stringify(body),
    });
  const audit = (query: string, purpose = 'HCOMPL', token = auditor) =>
    h.fhir(`/AuditEvent${query}`, { token, purpose });
  const ids = (bundle: any): number[] =>
    (bundle.entry ?? [])
      .filter((x: any) => x.resource?.resourceType === 'AuditEvent')
      .map((x: any) => Number(x.resource.id));
  const project = (all: Logged[]) => all.filter((x) => x.e.projectId === h.init.projectId);

  // Renewed before each test (the harness renews a token after a minute): a stalled machine must
  // not turn the rest of the suite into 401s.
  beforeEach(async () => {
    if (h) auditor = await h.token('system/AuditEvent.rs');
  });

  before(async () => {
    h = await startHarness();
    initValidator();
    adminToken = fs.readFileSync(path.join(h.config.dataDir, 'admin-token'), 'utf8').trim();
    auditor = await h.token('system/AuditEvent.rs');
    const create = async (r: Record<string, unknown>) => {
      const res = await h.fhir(`/${r.resourceType as string}`, { method: 'POST', body: JSON.stringify(r) });
      assert.equal(res.status, 201);
      return ((await res.json()) as Entry).id as string;
    };
    patientA = await create(testPatient());
    patientB = await create(testPatient({ name: [{ family: 'Otherpatient' }] }));
    await create({
      resourceType: 'Observation',
      meta: { security: [HTEST] },
      status: 'final',
      code: { text: 'test' },
      subject: { reference: `Patient/${patientA}` },
    });
    // Accesses under different purposes (the harness client may claim any ordinary one).
    assert.equal((await h.fhir(`/Patient/${patientA}`, { purpose: 'TREAT' })).status, 200);
    assert.equal((await h.fhir(`/Patient/${patientA}`, { purpose: 'HRESCH' })).status, 200);
    assert.equal((await h.fhir(`/Patient/${patientB}`, { purpose: 'PUBHLTH' })).status, 200);
    assert.equal(
      (await h.fhir(`/Observation?subject=Patient/${patientA}`, { purpose: 'PUBHLTH' })).status,
      200,
    );
    assert.equal(
      (await h.fhir(`/Observation?subject=Patient/${patientA}`, { purpose: 'HOPERAT' })).status,
      200,
    );
    assert.equal((await h.fhir(`/Patient/${patientA}/_history`, { purpose: 'HLEGAL' })).status, 200);
    // Refused: no purpose; a write refused under a scope that lacks it.
    assert.equal((await h.fhir(`/Patient/${patientA}`, { purpose: null })).status, 403);
    // A research client with a name that needs CSV quoting.
    const c = (await (
      await admin('/admin/clients', {
        projectId: h.init.projectId,
        scopes: ['system/*.rs'],
        purposes: ['HRESCH'],
        name: RESEARCH_NAME,
      })
    ).json()) as { clientId: string; clientSecret: string };
    const tok = (await (
      await fetch(`${h.server.url}/oauth/token`, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({
          grant_type: 'client_credentials',
          scope: 'system/Patient.rs',
          client_id: c.clientId,
          client_secret: c.clientSecret,
        }),
      })
    ).json()) as { access_token: string };
    research = { clientId: c.clientId, token: tok.access_token };
    assert.equal(
      (await h.fhir(`/Patient/${patientA}`, { token: research.token, purpose: 'HRESCH' })).status,
      200,
    );
  });
  after(async () => {
    await h?.close();
  });

  test('search by each parameter returns exactly the matching events of the project', async () => {
    const all = project(await logged(h));
    const t = (x: Logged) => Date.parse(x.e.time);
    const mid = all[Math.floor(all.length / 2)]!;
    const late = all[all.length - 3]!;
    const cases: { q: string; want: (x: Logged) => boolean }[] = [
      { q: `patient=${patientA}`, want: (x) => (x.e.patients ?? []).includes(patientA) },
      { q: `patient=Patient/${patientB}`, want: (x) => (x.e.patients ?? []).includes(patientB) },
      {
        q: `patient=${patientA},${patientB}`,
        want: (x) => (x.e.patients ?? []).some((p: string) => p === patientA || p === patientB),
      },
      { q: `agent=${research.clientId}`, want: (x) => x.e.actor.clientId === research.clientId },
      { q: `agent=Device/${h.init.clientId}`, want: (x) => x.e.actor.clientId === h.init.clientId },
      { q: 'action=read', want: (x) => x.e.action === 'read' },
      { q: 'action=R', want: (x) => ['read', 'vread', 'history'].includes(x.e.action) },
      { q: 'action=C', want: (x) => x.e.action === 'create' },
      { q: 'action=search,history', want: (x) => ['search', 'history'].includes(x.e.action) },
      { q: 'outcome=4', want: (x) => x.e.outcome === 'refused' },
      { q: 'outcome=success', want: (x) => x.e.outcome === 'success' },
      { q: 'purpose=HRESCH', want: (x) => x.e.purpose === 'HRESCH' },
      {
        q: 'purpose=http://terminology.hl7.org/CodeSystem/v3-ActReason|PUBHLTH',
        want: (x) => x.e.purpose === 'PUBHLTH',
      },
      { q: `date=ge${mid.e.time}`, want: (x) => t(x) >= t(mid) },
      { q: `date=lt${mid.e.time}`, want: (x) => t(x) < t(mid) },
      { q: `date=gt${mid.e.time}&date=le${late.e.time}`, want: (x) => t(x) > t(mid) && t(x) <= t(late) },
      { q: `date=${mid.e.time.slice(0, 10)}`, want: (x) => x.e.time.startsWith(mid.e.time.slice(0, 10)) },
      { q: 'date=ge2000-01-01&date=lt2001', want: () => false },
      {
        q: `patient=${patientA}&purpose=HRESCH&action=read`,
        want: (x) =>
          (x.e.patients ?? []).includes(patientA) && x.e.purpose === 'HRESCH' && x.e.action === 'read',
      },
    ];
    for (const c of cases) {
      const before = project(await logged(h));
      const res = await audit(`?${c.q.replace(/\+/g, '%2B')}&_count=1000`);
      assert.equal(res.status, 200, c.q);
      const got = ids(await res.json());
      const want = before.filter(c.want).map((x) => x.seq);
      assert.deepEqual(got, want, c.q);
    }
    // Something matched in every case that should match something.
    const some = await audit(`?patient=${patientA}&purpose=HRESCH&_count=1000`);
    assert.equal(ids(await some.json()).length, 2, 'two HRESCH reads of patient A');
  });

  test('pages follow a seq cursor, forwards and backwards, with no duplicates', async () => {
    const full = ids(await (await audit(`?patient=${patientA}&_count=1000`)).json());
    assert.ok(full.length >= 6);
    const follow = async (first: string) => {
      const out: number[] = [];
      let url: string | undefined = `${h.base}/AuditEvent${first}`;
      let pages = 0;
      while (url) {
        const res: Response = await fetch(url, {
          headers: { authorization: `Bearer ${auditor}`, 'x-purpose-of-use': 'HCOMPL' },
        });
        assert.equal(res.status, 200);
        const b: any = await res.json();
        out.push(...ids(b));
        url = b.link.find((l: any) => l.relation === 'next')?.url;
        pages++;
      }
      return { out, pages };
    };
    const fwd = await follow(`?patient=${patientA}&_count=2`);
    assert.deepEqual(fwd.out.slice(0, full.length), full);
    assert.equal(new Set(fwd.out).size, fwd.out.length);
    assert.ok(fwd.pages >= Math.ceil(full.length / 2));
    const back = await follow(`?patient=${patientA}&_count=3&_sort=-date`);
    assert.deepEqual(back.out.slice(back.out.length - full.length).reverse(), full);
    assert.equal(new Set(back.out).size, back.out.length);
    // _count is bounded.
    const big = (await (await audit(`?patient=${patientA}&_count=5000`)).json()) as any;
    assert.ok(big.entry.some((e: any) => e.resource.resourceType === 'OperationOutcome'));
  });

  test('the resources are valid FHIR R4 AuditEvents shaped after BALP', async () => {
    const b = (await (await audit(`?patient=${patientA}&_count=1000`)).json()) as any;
    for (const e of b.entry) {
      const issues = validateResource(e.resource).filter((i) => i.severity === 'error');
      assert.deepEqual(issues, [], JSON.stringify(e.resource));
    }
    const read = b.entry
      .map((e: any) => e.resource)
      .find(
        (r: any) =>
          r.subtype.some((s: any) => s.code === 'read') && r.purposeOfEvent?.[0].coding[0].code === 'HRESCH',
      );
    assert.equal(read.action, 'R');
    assert.equal(read.outcome, '0');
    assert.equal(read.type.code, 'rest');
    assert.ok(read.entity.some((x: any) => x.what?.reference === `Patient/${patientA}`));
    assert.ok(read.agent.some((a: any) => a.requestor === true && a.network?.address));
    assert.equal(read.source.observer.identifier.value, h.base);
    const one = await audit(`/${read.id}`);
    assert.equal(one.status, 200);
    assert.equal(((await one.json()) as any).id, read.id);
    assert.equal((await audit('/not-a-seq')).status, 404);
    assert.equal((await audit('/99999999')).status, 404);
  });

  test('a caller without the AuditEvent scope, or with a wrong purpose, is refused, and that is audited', async () => {
    const patientScope = await h.token('system/Patient.rs');
    const cases = [
      { token: patientScope, purpose: 'HCOMPL', status: 403, code: 'FORBIDDEN_SCOPE' },
      { token: auditor, purpose: 'TREAT', status: 403, code: 'PURPOSE_NOT_ALLOWED' },
      { token: auditor, purpose: 'HRESCH', status: 403, code: 'PURPOSE_NOT_ALLOWED' },
      { token: auditor, purpose: null, status: 403, code: 'PURPOSE_REQUIRED' },
    ];
    for (const c of cases) {
      const res = await h.fhir(`/AuditEvent?patient=${patientA}`, { token: c.token, purpose: c.purpose });
      assert.equal(res.status, c.status, c.code);
      const body = (await res.json()) as any;
      assert.equal(body.resourceType, 'OperationOutcome');
      assert.ok(!JSON.stringify(body).includes('entry'), 'no audit data in a refusal');
      const e = (await logged(h)).find((x) => x.e.requestId === res.headers.get('x-request-id'));
      assert.ok(e, `the refusal ${c.code} is audited`);
      assert.equal(e.e.action, 'audit-read');
      assert.equal(e.e.outcome, 'refused');
      assert.equal(e.e.code, c.code);
    }
    const anon = await h.fhir('/AuditEvent', { token: null, purpose: 'HCOMPL' });
    assert.equal(anon.status, 401);
    const e = (await logged(h)).find((x) => x.e.requestId === anon.headers.get('x-request-id'));
    assert.equal(e?.e.action, 'audit-read');
    assert.equal(e?.e.code, 'UNAUTHENTICATED');
  });

  test('every read of the audit log is itself audited', async () => {
    const res = await audit(`?patient=${patientA}&purpose=HRESCH`, 'HLEGAL');
    const b = (await res.json()) as any;
    const e = (await logged(h)).find((x) => x.e.requestId === res.headers.get('x-request-id'))!;
    assert.equal(e.e.action, 'audit-read');
    assert.equal(e.e.outcome, 'success');
    assert.equal(e.e.purpose, 'HLEGAL');
    assert.equal(e.e.count, ids(b).length);
    assert.deepEqual(e.e.patients, [patientA]);
    assert.ok(e.e.sealed, 'the audit query itself is sealed');
    // A malformed query is audited as a failed read.
    const badRes = await audit('?date=2020-13-01');
    const bad = (await logged(h)).find((x) => x.e.requestId === badRes.headers.get('x-request-id'))!;
    assert.equal(bad.e.outcome, 'failed');
    assert.equal(bad.e.code, 'SEARCH_INVALID');
  });

  test('malformed queries are a 400 OperationOutcome naming the parameter', async () => {
    const cases: [string, string][] = [
      ['date=2020-13-01', 'date'],
      ['date=2021-02-29', 'date'],
      ['date=ap2020', 'date'],
      ['date=yesterday', 'date'],
      ['foo=1', 'foo'],
      ['_include=AuditEvent:agent', '_include'],
      ['_count=abc', '_count'],
      ['_count=0', '_count'],
      ['outcome=7', 'outcome'],
      ['action=peek', 'action'],
      ['purpose=treat', 'purpose'],
      ['patient=bad%20id!', 'patient'],
      ['agent=', 'agent'],
      ['_cursor=xyz', '_cursor'],
      ['_sort=outcome', '_sort'],
    ];
    for (const [q, name] of cases) {
      const res = await audit(`?${q}`);
      assert.equal(res.status, 400, q);
      const body = (await res.json()) as any;
      assert.equal(body.resourceType, 'OperationOutcome', q);
      assert.ok(
        body.issue.some((i: any) => i.expression?.includes(name) && i.diagnostics.includes(name)),
        `${q}: ${JSON.stringify(body)}`,
      );
    }
    // Huge ranges are fine: bounded by _count.
    const huge = await audit('?date=ge0001-01-01&date=le9999-12-31&_count=1');
    assert.equal(huge.status, 200);
    assert.equal(ids(await huge.json()).length, 1);
  });

  test('sealed fields: nothing in clear in the audit database, opened for an auditor', async () => {
    const s = await h.fhir(`/Patient?name=${CANARY_QUERY}`, {
      purpose: 'HOPERAT',
      headers: { 'user-agent': CANARY_AGENT },
    });
    assert.equal(s.status, 200);
    const bg = await h.fhir(`/Patient/${patientA}`, {
      purpose: 'ETREAT',
      headers: { 'x-break-glass-reason': CANARY_REASON },
    });
    assert.equal(bg.status, 403, 'this client may not break glass; the attempt is audited with its reason');
    // Every table of the audit database, as text.
    const db = h.server.core.auditDb;
    const tables = (
      await db.query<{ t: string }>(
        'SELECT tablename AS t FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1',
      )
    ).rows.map((r) => r.t);
    assert.ok(tables.includes('audit_index'));
    for (const t of tables) {
      const dump = (await db.query<{ j: string }>(`SELECT row_to_json(x)::text AS j FROM ${t} x`)).rows
        .map((r) => r.j)
        .join('\n');
      const entries =
        t === 'audit_entry'
          ? (await db.query<{ s: string }>("SELECT convert_from(entry, 'UTF8') AS s FROM audit_entry")).rows
              .map((r) => r.s)
              .join('\n')
          : '';
      for (const canary of [CANARY_QUERY, CANARY_REASON, CANARY_AGENT])
        assert.ok(!dump.includes(canary) && !entries.includes(canary), `${canary} in clear in ${t}`);
    }
    if (h.storage.kind === 'embedded') {
      // The files of the embedded audit database too.
      const walk = (d: string): string[] =>
        fs
          .readdirSync(d, { withFileTypes: true })
          .flatMap((f) => (f.isDirectory() ? walk(path.join(d, f.name)) : [path.join(d, f.name)]));
      for (const f of walk(path.join(h.config.dataDir, 'audit'))) {
        const bytes = fs.readFileSync(f);
        for (const canary of [CANARY_QUERY, CANARY_REASON, CANARY_AGENT])
          assert.equal(bytes.indexOf(canary), -1, `${canary} in ${f}`);
      }
    }
    // The auditor (HCOMPL) sees the query, the reason and the user agent.
    const find = async (requestId: string, purpose: string) => {
      const seq = (await logged(h)).find((x) => x.e.requestId === requestId)!.seq;
      const r = await audit(`/${seq}`, purpose);
      assert.equal(r.status, 200);
      return (await r.json()) as any;
    };
    const ev = await find(s.headers.get('x-request-id')!, 'HCOMPL');
    const q = ev.entity.find((x: any) => x.query);
    assert.equal(Buffer.from(q.query, 'base64').toString('utf8'), `name=${CANARY_QUERY}`);
    assert.equal(q.role.code, '24');
    assert.ok(q.detail.some((d: any) => d.type === 'user-agent' && d.valueString === CANARY_AGENT));
    const bgEv = await find(bg.headers.get('x-request-id')!, 'HLEGAL');
    assert.ok(
      bgEv.entity.some((x: any) =>
        (x.detail ?? []).some((d: any) => d.type === 'break-glass-reason' && d.valueString === CANARY_REASON),
      ),
    );
    assert.equal(bgEv.outcome, '4');
    // A system administrator sees that there were sealed fields, not what they were.
    const admin = await find(s.headers.get('x-request-id')!, 'HSYSADMIN');
    assert.ok(!JSON.stringify(admin).includes(CANARY_QUERY));
    assert.ok(!JSON.stringify(admin).includes(Buffer.from(`name=${CANARY_QUERY}`).toString('base64')));
    assert.ok(admin.entity.some((x: any) => (x.detail ?? []).some((d: any) => d.type === 'sealed')));
  });

  test('sealing: bound to its event, and a wrong key or a changed byte fails', () => {
    const key = Buffer.alloc(32, 7);
    const s = AuditSealer.fromKey(key);
    const sealed = s.seal('event-1', { query: 'a=b', userAgent: 'x' })!;
    assert.match(sealed, /^v1\.[A-Za-z0-9_-]{16}\.[A-Za-z0-9_-]+$/);
    assert.deepEqual(s.open('event-1', sealed), { query: 'a=b', userAgent: 'x' });
    assert.notEqual(s.seal('event-1', { query: 'a=b' }), s.seal('event-1', { query: 'a=b' }), 'fresh nonce');
    // Nonces come from a pooled CSPRNG block of 341 (src/kernel/nonce.ts): none repeats across refills.
    const many = Array.from({ length: 1_000 }, () => s.seal('event-1', { query: 'a=b' })!);
    assert.equal(new Set(many.map((x) => x.split('.')[1])).size, many.length);
    assert.ok(many.every((x) => s.open('event-1', x).query === 'a=b'));
    assert.throws(() => s.open('event-2', sealed), /integrity/);
    assert.throws(() => AuditSealer.fromKey(Buffer.alloc(32, 8)).open('event-1', sealed), /integrity/);
    assert.equal(s.seal('e', {}), undefined);
    const long = s.open('e', s.seal('e', { query: 'q'.repeat(20_000) })!);
    assert.equal(long.query!.length, 16_384);
    assert.deepEqual(long.truncated, ['query']);
    const keyFile = path.join(h.config.dataDir, 'keys', 'audit-field.key');
    assert.equal(fs.statSync(keyFile).mode & 0o777, 0o600);
  });

  test('access report and accounting of disclosures, as FHIR and CSV, each run audited', async () => {
    const all = await logged(h);
    const aboutA = all.filter((x) => (x.e.patients ?? []).includes(patientA));
    // Access report: every event naming A.
    const rep = await admin('/admin/audit/report', { patient: patientA });
    assert.equal(rep.status, 200);
    const bundle = (await rep.json()) as any;
    assert.equal(bundle.type, 'collection');
    assert.deepEqual(
      bundle.entry.map((e: any) => Number(e.resource.id)),
      aboutA.map((x) => x.seq),
    );
    const repRun = (await logged(h)).find((x) => x.e.requestId === rep.headers.get('x-request-id'));
    assert.equal(repRun?.e.action, 'audit-read');
    assert.equal(repRun?.e.code, 'report.access');
    assert.deepEqual(repRun?.e.patients, [patientA]);

    // Disclosures: successful reads/searches/history naming A under a purpose outside TPO.
    const res = await admin('/admin/audit/disclosures', { patient: patientA, format: 'csv' });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/csv/);
    const csv = parseCsv(await res.text());
    const [header, ...rows] = csv;
    assert.deepEqual(header, [
      'date',
      'recipient_client_id',
      'recipient_client_name',
      'recipient_user_id',
      'recipient_address',
      'purpose',
      'description',
      'resource_type',
      'resource_id',
      'project_id',
      'seq',
    ]);
    const want = all.filter(
      (x) =>
        (x.e.patients ?? []).includes(patientA) &&
        x.e.outcome === 'success' &&
        ['read', 'vread', 'history', 'search'].includes(x.e.action) &&
        !['TREAT', 'HOPERAT', 'HPAYMT', 'CAREMGT', 'PATSFTY', 'ETREAT'].includes(x.e.purpose),
    );
    assert.deepEqual(
      rows.map((r) => Number(r[10])),
      want.map((x) => x.seq),
    );
    // Exactly: the two HRESCH reads, the PUBHLTH search and the HLEGAL history.
    assert.deepEqual(rows.map((r) => r[5]).sort(), ['HLEGAL', 'HRESCH', 'HRESCH', 'PUBHLTH']);
    // A client id is base64url, so 1 in 64 starts with '-' and gets the CSV formula guard (an apostrophe).
    const byResearch = rows.find((r) => r[1]!.replace(/^'(?=[-=+@])/, '') === research.clientId)!;
    assert.equal(byResearch[2], RESEARCH_NAME, 'a quoted name parses back');
    assert.equal(byResearch[6], `Patient/${patientA} (version 1)`);
    for (const r of rows) {
      assert.equal(r.length, header!.length);
      assert.ok(!NOT_ACCOUNTABLE_PURPOSES.has(r[5]!));
      assert.ok(Date.parse(r[0]!) > Date.now() - 6 * 366 * 86_400_000);
    }
    const run = (await logged(h)).find((x) => x.e.requestId === res.headers.get('x-request-id'));
    assert.equal(run?.e.code, 'report.disclosures');
    assert.equal(run?.e.count, rows.length);

    // Bad input: a clear 400 naming the field.
    const bad = await admin('/admin/audit/report', { patient: patientA, since: 'last tuesday' });
    assert.equal(bad.status, 400);
    assert.match(JSON.stringify(await bad.json()), /since/);
    assert.equal((await admin('/admin/audit/disclosures', {})).status, 400);
  });

  test('the CLI prints the reports (through the running server)', async () => {
    const env = { ...h.storage.env, CUSTOS_PORT: String(new URL(h.server.url).port) };
    const r = await runCustos(['audit', 'disclosures', '--patient', patientA], env);
    assert.equal(r.code, 0, r.stderr);
    const rows = parseCsv(r.stdout);
    assert.equal(rows[0]![0], 'date');
    assert.equal(rows.length - 1, 4);
    const j = await runCustos(
      ['audit', 'report', '--patient', patientB, '--since', '2020-01-01', '--json'],
      env,
    );
    assert.equal(j.code, 0, j.stderr);
    const b = JSON.parse(j.stdout) as any;
    assert.equal(b.resourceType, 'Bundle');
    assert.ok(b.entry.length >= 2);
    const usage = await runCustos(['audit', 'report', '--patient', patientA, '--csv', '--json'], env);
    assert.equal(usage.code, 2);
  });

  test("verify's stored-row digest (SQL) and the expected one (JS) hash the same bytes", async () => {
    const tricky = ['plain', 'a"b\\c', 'line\nbreak\ttab', '\u0001\u007f', 'é€😀', '\uffff', '😀'];
    const rows = tricky.map((t, i) => ({
      seq: 1_000_000_000_000,
      patient: `${t}-${i}`,
      time: i % 2 ? null : new Date(1_780_000_000_123 + i).toISOString(),
      action: t,
      outcome: i % 3 ? null : t,
      purpose: t,
      projectId: null,
      clientId: t,
      userId: i % 2 ? t : null,
    }));
    const order = [...rows].sort((a, b) => Buffer.compare(Buffer.from(a.patient), Buffer.from(b.patient)));
    const want = indexDigest(Buffer.concat(order.map((r) => rowRecord(r.seq, r))));
    const got = await h.server.core.auditDb
      .transaction(async (tx) => {
        await tx.query(
          `INSERT INTO audit_index (${INDEX_COLUMNS}) SELECT * FROM ${unnestIndexColumns(1)}`,
          indexColumns(rows),
        );
        const r = await tx.query<{ digest: string; n: number }>(STORED_DIGEST_SQL, [
          rows[0]!.seq,
          rows[0]!.seq,
        ]);
        throw Object.assign(new Error('rollback'), { result: r.rows[0] });
      })
      .catch((e: { result?: { digest: string; n: number } }) => e.result);
    assert.equal(Number(got?.n), rows.length);
    assert.equal(got?.digest, want);
  });

  test("verify's fast derivation writes what the index definition does", () => {
    const events: unknown[] = [
      {
        time: '2026-01-01T00:00:00.000Z',
        action: 'read',
        outcome: 'success',
        patients: ['b', 'a', 'b', '', 7],
      },
      { time: '2026-01-01T01:00:00+01:00', actor: { clientId: 'c', userId: 'u' }, patients: [] },
      { time: '2026-01-01T00:00:00Z', actor: 'not an object', purpose: 'HRESCH', projectId: 'p' },
      { time: 'yesterday', patients: ['😀', '\uffff', 'z'] },
      { time: '+010000-01-01T00:00:00.000Z', patients: 'p' },
      { time: 12, action: 5, patients: [''] },
      { patients: ['a"b\\c\n'] },
      {},
      [],
      'text',
      null,
    ];
    for (const [i, e] of events.entries()) {
      const entry = Buffer.from(JSON.stringify(e));
      const want = Buffer.concat(indexRowsOf(e).map((r) => rowRecord(i, r)));
      assert.deepEqual(entryIndexRecords(i, entry, 0, entry.length), want, JSON.stringify(e));
    }
    assert.equal(entryIndexRecords(0, Buffer.from('{no'), 0, 3).length, 0);
  });

  test('CSV fields and date ranges', () => {
    assert.equal(csvField('plain'), 'plain');
    assert.equal(csvField('a,b'), '"a,b"');
    assert.equal(csvField('say "hi"'), '"say ""hi"""');
    assert.equal(csvField('line\nbreak'), '"line\nbreak"');
    assert.equal(csvField('=SUM(A1)'), "'=SUM(A1)");
    assert.deepEqual(dateRange('2024'), { lo: '2024-01-01T00:00:00.000Z', hi: '2025-01-01T00:00:00.000Z' });
    assert.deepEqual(dateRange('2024-02'), {
      lo: '2024-02-01T00:00:00.000Z',
      hi: '2024-03-01T00:00:00.000Z',
    });
    assert.deepEqual(dateRange('2024-02-29'), {
      lo: '2024-02-29T00:00:00.000Z',
      hi: '2024-03-01T00:00:00.000Z',
    });
    assert.deepEqual(dateRange('2024-01-01T10:00:00+02:00'), {
      lo: '2024-01-01T08:00:00.000Z',
      hi: '2024-01-01T08:00:01.000Z',
    });
    assert.equal(dateRange('2023-02-29'), undefined);
    assert.equal(dateRange('2024-01-01T25:00:00Z'), undefined);
  });

  test('verify checks the query index: a changed, a missing and an extra row are reported', async () => {
    const db = h.server.core.auditDb;
    const ok = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(ok.ok, true, JSON.stringify(ok));
    assert.ok(ok.index && ok.index.checkedRows >= ok.size);
    assert.equal(ok.index.firstBadSeq, undefined);
    await assert.rejects(db.query(`UPDATE audit_index SET purpose = 'TREAT'`), 'append-only');
    await assert.rejects(db.query(`DELETE FROM audit_index`), 'append-only');
    const target = (
      await db.query<Record<string, unknown>>(
        `SELECT * FROM audit_index WHERE purpose = 'HRESCH' ORDER BY seq LIMIT 1`,
      )
    ).rows[0]!;
    const seq = Number(target.seq);
    const owner = async (sql: string, params: unknown[] = []) => {
      await db.query('ALTER TABLE audit_index DISABLE TRIGGER audit_index_no_update');
      try {
        await db.query(sql, params);
      } finally {
        await db.query('ALTER TABLE audit_index ENABLE TRIGGER audit_index_no_update');
      }
    };
    const insert = (patient: unknown, at = seq) =>
      owner(
        `INSERT INTO audit_index (seq, patient, event_time, action, outcome, purpose, project_id, client_id, user_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
        [
          at,
          patient,
          target.event_time,
          target.action,
          target.outcome,
          target.purpose,
          target.project_id,
          target.client_id,
          target.user_id,
        ],
      );
    const verify = () => verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    // Changed: the research read now looks like treatment.
    await owner(`UPDATE audit_index SET purpose = 'TREAT' WHERE seq = $1`, [seq]);
    let r = await verify();
    assert.equal(r.ok, false);
    assert.equal(r.index?.firstBadSeq, seq);
    assert.equal(r.firstBadSeq, undefined, 'the entries themselves are intact');
    await owner(`UPDATE audit_index SET purpose = 'HRESCH' WHERE seq = $1`, [seq]);
    assert.equal((await verify()).ok, true);
    // Changed by one microsecond (the rows are compared in PostgreSQL's binary form, not as text).
    await owner(`UPDATE audit_index SET event_time = event_time + interval '1 microsecond' WHERE seq = $1`, [
      seq,
    ]);
    r = await verify();
    assert.equal(r.ok, false);
    assert.equal(r.index?.firstBadSeq, seq);
    await owner(`UPDATE audit_index SET event_time = event_time - interval '1 microsecond' WHERE seq = $1`, [
      seq,
    ]);
    assert.equal((await verify()).ok, true);
    // Missing (on worker threads, in small batches: the same answer).
    await owner(`DELETE FROM audit_index WHERE seq = $1 AND patient = $2`, [seq, target.patient]);
    r = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints, { workers: 2, batchRows: 256 });
    assert.equal(r.index?.firstBadSeq, seq);
    assert.equal((await verify()).index?.firstBadSeq, seq);
    await insert(target.patient);
    assert.equal((await verify()).ok, true);
    // Extra: a row naming a patient the entry does not name.
    await insert('x-extra-patient');
    assert.equal((await verify()).index?.firstBadSeq, seq);
    await owner(`DELETE FROM audit_index WHERE seq = $1 AND patient = 'x-extra-patient'`, [seq]);
    // A row for an entry that does not exist.
    const size = await h.server.core.audit.size();
    await insert('', size + 10);
    r = await verify();
    assert.equal(r.ok, false);
    assert.equal(r.index?.firstBadSeq, size + 10);
  });
});

test('AuditEvent cannot be written or read through the resource routes', async () => {
  const h = await startHarness();
  try {
    const res = await h.fhir('/AuditEvent/x', {
      method: 'PUT',
      body: JSON.stringify({ resourceType: 'AuditEvent', id: 'x' }),
    });
    assert.equal(res.status, 405);
    const tx = await h.fhir('/Patient?_has:AuditEvent:patient:action=R');
    assert.equal(tx.status, 200);
    const sys = await h.fhir('?_type=AuditEvent');
    assert.equal(sys.status, 403);
  } finally {
    await h.close();
  }
});

test('egress to a vendor is a disclosure: accounted unless its purpose is exempt; refusals never', () => {
  const egress = (outcome: 'success' | 'refused', purpose: string | undefined) =>
    ({
      v: 1,
      id: 'e',
      time: '2026-12-01T00:00:00Z',
      phase: 'access',
      action: 'egress',
      outcome,
      code: outcome === 'success' ? 'egress.allowed' : 'EGRESS_BAA_INACTIVE',
      purpose,
      patients: ['pat-1'],
      actor: { roles: ['custos'] },
      source: {},
      egress: {
        vendorId: 'v',
        host: 'hooks.example.org',
        port: 443,
        dataClass: 'full',
        purpose: 'subscription',
        hop: 0,
      },
    }) as unknown as Parameters<typeof isAccountableDisclosure>[0];
  assert.equal(isAccountableDisclosure(egress('success', 'PUBHLTH')), true);
  assert.equal(isAccountableDisclosure(egress('success', undefined)), true, 'no purpose: listed');
  assert.equal(isAccountableDisclosure(egress('success', 'HOPERAT')), false);
  assert.equal(isAccountableDisclosure(egress('refused', 'PUBHLTH')), false);
});
