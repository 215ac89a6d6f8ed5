import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startHarness, testPatient, type Harness } from './support/harness.ts';
import { verifyAuditLog } from '../src/audit/audit-verify.ts';
import { verifyInclusion } from '../src/audit/merkle-proof.ts';
import { parseCheckpoint, verifyNote } from '../src/audit/signed-note.ts';

// Signed checkpoints and inclusion proofs over the real audit log, checked the way an outsider
// would: with the verifier key and the RFC 9162 algorithms only.
let h: Harness;
before(async () => {
  h = await startHarness();
  for (let i = 0; i < 5; i++)
    await h.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
});
after(async () => {
  await h?.close();
});

test('a checkpoint is a signed note over the current tree head', async () => {
  const cp = await h.server.core.checkpoints.checkpoint();
  const size = await h.server.core.audit.size();
  assert.equal(cp.treeSize, size);
  const { text, verifiedBy } = verifyNote(cp.note, [cp.verifierKey]);
  assert.equal(verifiedBy.length, 1);
  const parsed = parseCheckpoint(text);
  assert.equal(parsed.size, size);
  assert.equal(parsed.rootHash.toString('hex'), (await verifyAuditLog(h.server.core.audit)).rootHash);
  assert.match(parsed.origin, /\/custos\/audit$/);
});

test('every entry has an inclusion proof that verifies against the signed root', async () => {
  const size = await h.server.core.audit.size();
  for (let seq = 0; seq < size; seq++) {
    const p = (await h.server.core.checkpoints.prove(seq))!;
    const ok = verifyInclusion(
      p.seq,
      p.treeSize,
      Buffer.from(p.leafHash, 'hex'),
      p.proof.map((x) => Buffer.from(x, 'hex')),
      Buffer.from(p.rootHash, 'hex'),
    );
    assert.equal(ok, true, `seq ${seq}`);
    assert.equal(
      parseCheckpoint(verifyNote(p.checkpoint, [p.verifierKey]).text).rootHash.toString('hex'),
      p.rootHash,
    );
  }
  assert.equal(await h.server.core.checkpoints.prove(size + 10), undefined);
});

test('verify checks the checkpoints: an entry rewritten with a matching leaf hash is still caught', async () => {
  await h.server.core.checkpoints.checkpoint();
  assert.equal((await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints)).ok, true);
  // An attacker with owner rights rewrites entry 1 *and* its leaf hash: leaf checks pass, the tree
  // head no longer matches the signed checkpoints.
  const db = h.server.core.auditDb;
  const target = await db.query<{ seq: number }>(
    `SELECT seq FROM audit_entry WHERE convert_from(entry, 'UTF8') LIKE '%"purpose":"TREAT"%' ORDER BY seq LIMIT 1`,
  );
  const seq = Number(target.rows[0]!.seq);
  await db.query('ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_no_update');
  await db.query(
    `UPDATE audit_entry SET entry = convert_to(replace(convert_from(entry, 'UTF8'), 'TREAT', 'HPAYMT'), 'UTF8') WHERE seq = $1`,
    [seq],
  );
  await db.query(`UPDATE audit_entry SET leaf_hash = sha256('\\x00'::bytea || entry) WHERE seq = $1`, [seq]);
  await db.query('ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_no_update');
  const report = await verifyAuditLog(h.server.core.audit, h.server.core.checkpoints);
  assert.equal(report.firstBadSeq, undefined, 'the leaf hashes alone look fine');
  assert.equal(report.ok, false);
  assert.ok(report.checkpoints?.firstBadTreeSize !== undefined);
});

test('scheduled checkpoints go to an external directory, which catches a truncated log', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'custos-checkpoints-'));
  const s = await startHarness({
    env: { CUSTOS_AUDIT_CHECKPOINT_INTERVAL: '1', CUSTOS_AUDIT_CHECKPOINT_DIR: dir },
  });
  try {
    await s.fhir('/Patient', { method: 'POST', body: JSON.stringify(testPatient()) });
    const size = await s.server.core.audit.size();
    // Within the maximum merge delay (1 s here) a signed checkpoint covers every entry.
    const deadline = Date.now() + 10_000;
    let files: string[] = [];
    while (Date.now() < deadline) {
      files = fs.readdirSync(dir).filter((f) => f.endsWith('.note'));
      if (files.some((f) => Number(/(\d+)/.exec(f)![1]) >= size)) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.ok(
      files.some((f) => Number(/(\d+)/.exec(f)![1]) >= size),
      'a checkpoint covers the log',
    );
    const ok = await verifyAuditLog(s.server.core.audit, s.server.core.checkpoints);
    assert.equal(ok.ok, true);
    assert.ok((ok.checkpoints?.external ?? 0) >= 1);

    // Truncate with owner rights: drop the last entries (the head is max(seq) + 1, so it rewinds
    // with them) and empty the checkpoint table.
    const db = s.server.core.auditDb;
    await db.query('ALTER TABLE audit_entry DISABLE TRIGGER audit_entry_no_update');
    await db.query('ALTER TABLE audit_checkpoint DISABLE TRIGGER audit_checkpoint_no_update');
    await db.query('DELETE FROM audit_entry WHERE seq >= $1', [size - 2]);
    await db.query('DELETE FROM audit_checkpoint');
    await db.query('ALTER TABLE audit_entry ENABLE TRIGGER audit_entry_no_update');
    await db.query('ALTER TABLE audit_checkpoint ENABLE TRIGGER audit_checkpoint_no_update');
    assert.equal(await s.server.core.audit.size(), size - 2, 'the log looks shorter, not broken');
    const bad = await verifyAuditLog(s.server.core.audit, s.server.core.checkpoints);
    assert.equal(bad.firstBadSeq, undefined, 'what is left is internally consistent');
    assert.equal(bad.ok, false, 'the external checkpoint shows the truncation');
  } finally {
    await s.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
