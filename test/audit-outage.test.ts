import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { createTestStorage, type TestStorage } from './support/storage.ts';
import {
  needsPrivatePostgres,
  startPrivateCluster,
  type PrivateCluster,
} from './support/private-postgres.ts';
import { runCustos } from './support/custos-cli.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import type { AuditEvent } from '../src/audit/audit-event.ts';

// Fail-closed audit through a real outage: the audit database is a PostgreSQL cluster of this
// test's own (never the shared server), prepared by `custos audit setup`, stopped with
// `pg_ctl stop -m immediate` under a running Custos and started again. Resources stay where the
// suite keeps them (embedded, or the shared server with CUSTOS_TEST_DATABASE_URL).

const skip = needsPrivatePostgres();
const MARKER_SYSTEM = 'urn:test:outage';

describe('audit database outage', { skip }, () => {
  let cluster: PrivateCluster | undefined;
  let storage: TestStorage | undefined;
  let h: Harness;
  let patientId: string;
  let sizeBefore: number;
  const refusedRequestIds: string[] = [];
  const outageMarker = `outage-${Math.random().toString(36).slice(2)}`;

  before(async () => {
    cluster = await startPrivateCluster();
    const c = new pg.Client({ connectionString: cluster.adminUrl() });
    await c.connect();
    await c.query('CREATE DATABASE custos_audit');
    await c.end();
    const setup = await runCustos(
      ['audit', 'setup', '--admin-url', cluster.adminUrl('custos_audit'), '--json'],
      {},
    );
    assert.equal(setup.code, 0, setup.stderr);
    const appUrl = (JSON.parse(setup.stdout) as { appDatabaseUrl: string }).appDatabaseUrl;
    storage = await createTestStorage();
    h = await startHarness({
      storage,
      env: { CUSTOS_AUDIT_DATABASE_URL: appUrl, CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '0' },
    });
  });

  after(async () => {
    // Each step on its own: the cluster is stopped and removed whatever failed before.
    await h?.close().catch(() => {});
    await storage?.cleanup().catch(() => {});
    await cluster?.destroy();
  });

  test('with the audit database up: a patient is written and read', async () => {
    const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    assert.equal(created.status, 201);
    patientId = ((await created.json()) as { id: string }).id;
    assert.equal((await h.fhir(`/Patient/${patientId}`)).status, 200);
    await h.token(); // cached: the token endpoint is not what this test is about
    sizeBefore = await h.server.core.audit.size();
    assert.ok(sizeBefore >= 3);
  });

  test('audit database down: a PHI read gets 503 AUDIT_UNAVAILABLE and no patient data', async () => {
    await cluster!.stop('immediate');
    const res = await h.fhir(`/Patient/${patientId}`);
    assert.equal(res.status, 503);
    refusedRequestIds.push(res.headers.get('x-request-id')!);
    const body = await res.text();
    const oo = JSON.parse(body) as {
      resourceType: string;
      issue: { details: { coding: { code: string }[] } }[];
    };
    assert.equal(oo.resourceType, 'OperationOutcome');
    assert.equal(oo.issue[0]!.details.coding[0]!.code, 'AUDIT_UNAVAILABLE');
    for (const phi of ['Testpatient', 'Zzyzx', '999-01-0001', '555-0100', '1970-01-01'])
      assert.ok(!body.includes(phi), `no ${phi} in the body`);
    const search = await h.fhir('/Patient?family=Testpatient');
    assert.equal(search.status, 503);
    refusedRequestIds.push(search.headers.get('x-request-id')!);
    assert.ok(!(await search.text()).includes('Zzyzx'));
  });

  test('audit database down: a create gets 503 and an update 503, and neither is committed', async () => {
    const create = await h.fhir('/Patient', {
      method: 'POST',
      body: JSON.stringify(testPatient({ identifier: [{ system: MARKER_SYSTEM, value: outageMarker }] })),
    });
    assert.equal(create.status, 503);
    refusedRequestIds.push(create.headers.get('x-request-id')!);
    assert.match(await create.text(), /AUDIT_UNAVAILABLE/);
    const update = await h.fhir(`/Patient/${patientId}`, {
      method: 'PUT',
      body: JSON.stringify({ ...testPatient(), id: patientId, gender: 'female' }),
    });
    assert.equal(update.status, 503);
    refusedRequestIds.push(update.headers.get('x-request-id')!);
  });

  test('audit database back: requests succeed without restarting Custos; the outage create does not exist', async () => {
    await cluster!.start();
    const read = await h.fhir(`/Patient/${patientId}`);
    assert.equal(read.status, 200, 'the pool reconnected on its own');
    const patient = (await read.json()) as { meta: { versionId: string }; gender: string };
    assert.equal(patient.meta.versionId, '1', 'the update during the outage was not committed');
    assert.equal(patient.gender, 'other');
    const search = await h.fhir(`/Patient?identifier=${MARKER_SYSTEM}|${outageMarker}`);
    assert.equal(search.status, 200);
    assert.equal(((await search.json()) as { total?: number; entry?: unknown[] }).entry?.length ?? 0, 0);
    const created = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    assert.equal(created.status, 201);

    // Nothing lost, nothing duplicated: exactly the entries of the requests that succeeded since.
    const rows = await h.server.core.audit.read(sizeBefore, 10_000);
    const events = rows.map((r) => JSON.parse(r.entry.toString('utf8')) as AuditEvent);
    const byRequest = (rid: string | null) => events.filter((e) => e.requestId === rid).map((e) => e.phase);
    assert.deepEqual(byRequest(read.headers.get('x-request-id')), ['access']);
    assert.deepEqual(byRequest(search.headers.get('x-request-id')), ['access']);
    assert.deepEqual(byRequest(created.headers.get('x-request-id')), ['attempt', 'outcome']);
    assert.equal(events.length, 4);
    assert.deepEqual(
      rows.map((r) => r.seq),
      [0, 1, 2, 3].map((k) => sizeBefore + k),
      'the sequence continues without a gap',
    );
    for (const rid of refusedRequestIds)
      assert.deepEqual(byRequest(rid), [], 'a refused request left no entry');
    const all = (await h.server.core.audit.read(0, 100_000)).map(
      (r) => JSON.parse(r.entry.toString('utf8')) as AuditEvent,
    );
    assert.equal(new Set(all.map((e) => e.id)).size, all.length, 'no entry twice');
  });

  test('verify passes after the outage', async () => {
    await h.server.core.checkpoints.checkpoint();
    const report = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
    assert.equal(report.ok, true);
    assert.deepEqual(report.attemptsWithoutOutcome, []);
    const cli = await runCustos(['audit', 'verify', '--json'], {
      ...storage!.env,
      CUSTOS_AUDIT_DATABASE_URL: h.config.auditDatabaseUrl!,
    });
    assert.equal(cli.code, 0, cli.stderr);
    assert.equal((JSON.parse(cli.stdout) as { ok: boolean; size: number }).size, report.size);
  });
});
