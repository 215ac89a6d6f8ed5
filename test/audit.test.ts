import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { MerkleAccumulator } from '../src/audit/merkle-proof.ts';
import { leafHash, canonicalJson } from '../src/audit/audit-event.ts';

const here = path.dirname(fileURLToPath(import.meta.url));
const vectors = path.join(here, '..', '..', 'shared', 'data', 'tlog-vectors', 'rfc6962-reference-tree.json');

type Entry = Record<string, any>;

async function entries(h: Harness): Promise<Entry[]> {
  const rows = await h.server.core.audit.read(0, 100000);
  return rows.map((r) => JSON.parse(r.entry.toString('utf8')) as Entry);
}

describe('Merkle tree head (RFC 9162)', () => {
  test(
    'matches the RFC 6962 reference tree for sizes 0..8',
    { skip: fs.existsSync(vectors) ? false : 'shared/data/tlog-vectors absent' },
    () => {
      const ref = JSON.parse(fs.readFileSync(vectors, 'utf8')) as {
        leafInputsHex: string[];
        rootHashesBySize: string[];
      };
      for (let n = 1; n <= 8; n++) {
        const acc = new MerkleAccumulator();
        for (const hex of ref.leafInputsHex.slice(0, n)) acc.add(leafHash(Buffer.from(hex, 'hex')));
        assert.equal(acc.root()?.toString('hex'), ref.rootHashesBySize[n], `size ${n}`);
      }
    },
  );

  test('canonical JSON is key-sorted and stable', () => {
    assert.equal(canonicalJson({ b: 1, a: [{ d: 2, c: undefined }] }), '{"a":[{"d":2}],"b":1}');
  });
});

describe('audit records', () => {
  let h: Harness;
  before(async () => {
    h = await startHarness();
  });
  after(async () => {
    await h?.close();
  });

  test('a read is audited with actor, purpose, record, patients and no content', async () => {
    const p = (await (
      await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) })
    ).json()) as Entry;
    const res = await h.fhir(`/Patient/${p.id}`, { purpose: 'HOPERAT' });
    assert.equal(res.status, 200);
    const requestId = res.headers.get('x-request-id');
    const all = await entries(h);
    const read = all.find((e) => e.requestId === requestId)!;
    assert.ok(read, 'the read has an audit entry');
    assert.equal(read.action, 'read');
    assert.equal(read.outcome, 'success');
    assert.equal(read.purpose, 'HOPERAT');
    assert.equal(read.actor.clientId, h.init.clientId);
    assert.equal(read.projectId, h.init.projectId);
    assert.deepEqual(read.resource, { type: 'Patient', id: p.id, version: '1' });
    assert.deepEqual(read.patients, [p.id]);
    assert.ok(read.source.ip);
    const text = JSON.stringify(all);
    assert.ok(
      !text.includes('Testpatient') && !text.includes('999-01-0001'),
      'no resource content in the audit log',
    );
  });

  test('a write has a durable attempt and an outcome under one request id', async () => {
    const res = await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    const requestId = res.headers.get('x-request-id');
    const mine = (await entries(h)).filter((e) => e.requestId === requestId);
    assert.deepEqual(
      mine.map((e) => e.phase),
      ['attempt', 'outcome'],
    );
    assert.equal(mine[1]!.outcome, 'success');
    const id = ((await res.json()) as Entry).id;
    assert.deepEqual(mine[1]!.patients, [id]);
  });

  test('refusals are audited: missing purpose, no token', async () => {
    const a = await h.fhir('/Patient/some-id', { purpose: null });
    const b = await h.fhir('/Patient/some-id', { token: null });
    const all = await entries(h);
    const ea = all.find((e) => e.requestId === a.headers.get('x-request-id'))!;
    const eb = all.find((e) => e.requestId === b.headers.get('x-request-id'))!;
    assert.equal(ea.outcome, 'refused');
    assert.equal(ea.code, 'PURPOSE_REQUIRED');
    assert.equal(eb.outcome, 'refused');
    assert.equal(eb.code, 'UNAUTHENTICATED');
  });

  test('verify passes, then catches a tampered entry and names its sequence number', async () => {
    const ok = await verifyAuditLog(h.server.core.audit);
    assert.equal(ok.ok, true);
    assert.ok(ok.size > 3);
    assert.match(ok.rootHash ?? '', /^[0-9a-f]{64}$/);
    const db = h.server.core.auditDb;
    await assert.rejects(
      db.query(`UPDATE audit_entry SET entry = entry WHERE seq = 2`),
      'append-only trigger refuses UPDATE',
    );
    await assert.rejects(
      db.query(`DELETE FROM audit_entry WHERE seq = 2`),
      'append-only trigger refuses DELETE',
    );
    // An attacker with owner rights disables the trigger and edits a row: verification must catch it.
    // The first entry that states a purpose of use (key-access events before it have none).
    const target = Number(
      (
        await db.query<{ seq: number }>(
          `SELECT min(seq) AS seq FROM audit_entry WHERE position('"TREAT"' in convert_from(entry, 'UTF8')) > 0`,
        )
      ).rows[0]!.seq,
    );
    await db.query('ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_no_update');
    await db.query(
      `UPDATE audit_entry SET entry = convert_to(replace(convert_from(entry, 'UTF8'), 'TREAT', 'HPAYMT'), 'UTF8') WHERE seq = $1`,
      [target],
    );
    await db.query('ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_no_update');
    const bad = await verifyAuditLog(h.server.core.audit);
    assert.equal(bad.ok, false);
    assert.equal(bad.firstBadSeq, target);
    assert.equal(bad.problem, 'leaf_hash_mismatch');
  });
});

describe('fail-closed audit', () => {
  test('when the audit database is gone, reads return no PHI and writes commit nothing', async () => {
    const h = await startHarness();
    try {
      const p = (await (
        await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) })
      ).json()) as Entry;
      const token = await h.token();
      await h.server.core.auditDb.close();
      const read = await h.fhir(`/Patient/${p.id}`, { token });
      assert.equal(read.status, 503);
      const body = await read.text();
      assert.ok(!body.includes('Testpatient'), 'no PHI in the response');
      assert.match(body, /OperationOutcome/);
      const write = await h.fhir(`/Patient/${p.id}`, {
        method: 'PUT',
        token,
        body: JSON.stringify({ ...p, gender: 'female' }),
      });
      assert.equal(write.status, 503);
      const rows = await h.server.core.resourceDb.query<{ version_id: number }>(
        'SELECT version_id FROM resource WHERE id = $1',
        [p.id],
      );
      assert.equal(Number(rows.rows[0]!.version_id), 1, 'the update was not committed');
    } finally {
      await h.close();
    }
  });

  test('verify lists write attempts that have no outcome', async () => {
    const h = await startHarness();
    try {
      await h.server.core.audit.append({
        v: 1,
        id: 'e-1',
        time: new Date().toISOString(),
        phase: 'attempt',
        action: 'create',
        outcome: 'pending',
        requestId: 'crashed-request-1',
        actor: {},
        source: {},
      });
      const r = await verifyAuditLog(h.server.core.audit);
      assert.deepEqual(r.attemptsWithoutOutcome, ['crashed-request-1']);
    } finally {
      await h.close();
    }
  });
});
