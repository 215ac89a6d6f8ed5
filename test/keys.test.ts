import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import {
  approveKeyDestruction,
  requestKeyDestruction,
  rewrapKeys,
  rotateKeys,
} from '../src/phi/key-admin.ts';

// Key rotation, re-wrapping, re-encryption and crypto-shredding under dual control, end to end.
const SSN_SYSTEM = 'http://hl7.org/fhir/sid/us-ssn';
let h: Harness;

before(async () => {
  h = await startHarness();
});
after(async () => {
  await h?.close();
});

async function createPatient(ssn: string): Promise<string> {
  const res = await h.fhir('/Patient', {
    method: 'POST',
    body: JSON.stringify(testPatient({ identifier: [{ system: SSN_SYSTEM, value: ssn }] })),
  });
  assert.equal(res.status, 201);
  return ((await res.json()) as { id: string }).id;
}
async function ssnOf(id: string): Promise<{ status: number; ssn?: string; code?: string }> {
  const res = await h.fhir(`/Patient/${id}`);
  const body = (await res.json()) as any;
  return {
    status: res.status,
    ssn: body.identifier?.[0]?.value,
    code: body.issue?.[0]?.details?.coding?.[0]?.code,
  };
}
async function epochsOf(id: string, table = 'resource'): Promise<string[]> {
  const r = await h.server.core.resourceDb.query<{ sealed: Record<string, string> }>(
    `SELECT sealed FROM ${table} WHERE id = $1 ORDER BY 1`,
    [id],
  );
  return r.rows.flatMap((x) => Object.values(x.sealed ?? {}).map((b) => b.split('.')[1]!));
}

test('rotate: new writes use the new epoch at once; older data stays readable', async () => {
  const keys = h.server.core.keys!;
  const before = await createPatient('999-02-0001');
  assert.deepEqual(await epochsOf(before), ['1']);
  const r = await rotateKeys(keys, { projectId: h.init.projectId });
  assert.deepEqual(r.projects, [{ projectId: h.init.projectId, epoch: 2 }]);
  const afterRotation = await createPatient('999-02-0002');
  assert.deepEqual(await epochsOf(afterRotation), ['2']);
  assert.equal((await ssnOf(before)).ssn, '999-02-0001');
  assert.equal((await ssnOf(afterRotation)).ssn, '999-02-0002');
});

test('rewrap moves every data key under the newest KEK; --reencrypt re-seals old versions', async () => {
  const keys = h.server.core.keys!;
  const old = await createPatient('999-02-0003');
  await rotateKeys(keys, { projectId: h.init.projectId });
  const handles = async () =>
    (
      await h.server.core.resourceDb.query<{ n: number }>(
        `SELECT count(DISTINCT kek_handle)::int AS n FROM data_key WHERE project_id = $1`,
        [h.init.projectId],
      )
    ).rows[0]!.n;
  assert.ok((await handles()) > 1);
  const rewrapped = await rewrapKeys(keys, { projectId: h.init.projectId });
  assert.ok(rewrapped.rewrapped >= 2);
  assert.equal(await handles(), 1, 'every data key is wrapped by the newest KEK');
  assert.equal((await ssnOf(old)).ssn, '999-02-0003');
  // Resumable: a second run has nothing to do.
  assert.equal((await rewrapKeys(keys, { projectId: h.init.projectId })).rewrapped, 0);
  const re = await rewrapKeys(keys, { projectId: h.init.projectId, reencrypt: true });
  assert.ok(re.reencrypted >= 2);
  assert.deepEqual(await epochsOf(old), ['3']);
  assert.deepEqual(await epochsOf(old, 'resource_version'), ['3'], 'history too');
  assert.equal((await ssnOf(old)).ssn, '999-02-0003');
  assert.equal((await rewrapKeys(keys, { projectId: h.init.projectId, reencrypt: true })).reencrypted, 0);
});

test('crypto-shredding needs two administrators and makes protected elements unrecoverable, backups too', async () => {
  const keys = h.server.core.keys!;
  const id = await createPatient('999-02-0004');
  const db = h.server.core.resourceDb;
  // A "backup": the sealed column as it is before destruction.
  const backup = (await db.query<{ sealed: unknown }>('SELECT sealed FROM resource WHERE id = $1', [id]))
    .rows[0]!.sealed;
  await db.query(
    `INSERT INTO app_user (id, project_id, role, email) VALUES ('second-admin', $1, 'admin', 'second.admin@example.com')`,
    [h.init.projectId],
  );
  const req = await requestKeyDestruction(keys, {
    projectId: h.init.projectId,
    adminUserId: h.init.adminUserId,
  });
  assert.equal(req.state, 'pending');
  assert.equal((await ssnOf(id)).ssn, '999-02-0004', 'nothing happens on a request alone');
  await assert.rejects(
    approveKeyDestruction(keys, { requestId: req.requestId, adminUserId: h.init.adminUserId }),
    /two different administrators/,
  );
  await assert.rejects(
    approveKeyDestruction(keys, { requestId: req.requestId, adminUserId: 'not-an-admin' }),
    /two different administrators/,
  );
  const done = await approveKeyDestruction(keys, { requestId: req.requestId, adminUserId: 'second-admin' });
  assert.equal(done.state, 'done');
  assert.ok(done.destroyedKeks >= 1);
  const gone = await ssnOf(id);
  assert.equal(gone.status, 410);
  assert.equal(gone.code, 'KEY_DESTROYED');
  assert.equal(gone.ssn, undefined);
  // Restoring the backup of the database does not bring the data back: the KEK is gone.
  await db.query(`UPDATE data_key SET state = 'active' WHERE project_id = $1`, [h.init.projectId]);
  await db.query('UPDATE resource SET sealed = $2::jsonb WHERE id = $1', [id, JSON.stringify(backup)]);
  h.server.core.keys!.envelope.clearCache();
  const restored = await ssnOf(id);
  assert.equal(restored.status, 410);
  const audit = (await h.server.core.audit.read(0, 100000)).map((r) => JSON.parse(r.entry.toString('utf8')));
  assert.ok(
    audit.some((e) => e.code === 'key.destruction_requested' && e.actor.userId === h.init.adminUserId),
  );
  assert.ok(audit.some((e) => e.code === 'key.destroyed' && e.actor.userId === 'second-admin'));
  assert.ok(audit.some((e) => e.action === 'read' && e.outcome === 'failed' && e.code === 'KEY_DESTROYED'));
});
